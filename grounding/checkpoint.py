"""The grounding module's checkpoints, in the project's one checkpoint format
(``factory.core.checkpoints``); reading one never imports a trainer.

Besides the weights, checkpoint.json holds what the module was trained on: the epoch and
metrics, the model and text config, the capture layout and vocabulary of its training data,
the trained classes and their split ("split", null for a list of classes), and "generation":
how the training images were made (generator model, total denoising steps, capture step,
guidance scale, prompt templates). Annotation and
Protocol-I compare that record with the images they give the module (``check_generation``).
"""

from __future__ import annotations

import torch

from factory.core.checkpoints import (
    METADATA_FILE,
    CheckpointError,
    is_intact,
    load_optimizer_state,
    read_checkpoint_metadata,
    read_tensors,
    save_checkpoint,
)
from factory.core.storage import Location
from factory.core.vocab import ClassInfo, Vocabulary, get_vocabulary
from grounding.config import GroundingModelConfig
from grounding.model import GroundingModule

FORMAT = "grounding-checkpoint/2"

# Fields of "generation" that decide which U-Net features the module reads: the model, the sampler,
# and which denoising call of how many (the timestep schedule depends on the total). A use that
# differs in one of them gives the module features it never saw, and is refused.
FEATURE_FIELDS = {"model": "generator model", "scheduler": "sampler", "steps": "total steps",
                  "capture_step": "capture step"}
RECORD_DEFAULTS = {"scheduler": "ddim"}  # what records written before a field existed mean
# Fields that change how the images and prompts look, not how features are made: warned about.
OTHER_FIELDS = {"guidance_scale": "guidance scale", "prompts": "prompt template"}


def save_grounding_checkpoint(uri: str, module: GroundingModule, optimizer: torch.optim.Optimizer | None,
                              metadata: dict) -> None:
    """`metadata` must hold "epoch" (it names the weight files)."""
    save_checkpoint(uri, FORMAT, metadata["epoch"], module, optimizer,
                    {**metadata, "model": module.config.model_dump(mode="json")})


def read_grounding_metadata(uri: str) -> dict:
    return read_checkpoint_metadata(uri, FORMAT)


def load_grounding_checkpoint(uri: str) -> tuple[GroundingModule, dict]:
    """The trained module (eval mode, CPU) and its checkpoint.json."""
    metadata = read_grounding_metadata(uri)
    module = GroundingModule(GroundingModelConfig.model_validate(metadata["model"]))
    module.load_state_dict(read_tensors(uri, metadata, "model"))
    return module.eval(), metadata


def restore_grounding_checkpoint(uri: str, module: GroundingModule, optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint's weights and optimizer state into a module of its sizes; its checkpoint.json."""
    metadata = read_grounding_metadata(uri)
    if GroundingModelConfig.model_validate(metadata["model"]) != module.config:
        raise CheckpointError(f"{uri} holds a module of other sizes than this dataset and preset give")
    module.load_state_dict(read_tensors(uri, metadata, "model"))
    load_optimizer_state(uri, optimizer, metadata)
    return metadata


def generation_record(recipe: dict, capture_step: int) -> dict:
    """The "generation" of images made by a build `recipe` (its JSON form), captured `capture_step`
    steps before the end: what checkpoints record and ``check_generation`` compares."""
    generator = recipe["generator"]
    return {"model": generator["model"], "scheduler": generator.get("scheduler", "ddim"),
            "steps": generator["steps"], "capture_step": capture_step,
            "guidance_scale": generator["guidance_scale"], "prompts": recipe["prompts"]}


def training_generation(uri: str, metadata: dict) -> dict:
    """The "generation" of a checkpoint's training data; CheckpointError for a checkpoint
    written before checkpoints recorded it (nothing would then show a mismatch of total steps)."""
    if "generation" not in metadata:
        raise CheckpointError(f"{uri} does not record how its training data was generated (total steps, "
                              f"guidance scale, prompt templates): it predates that record; retrain it")
    return metadata["generation"]


def check_generation(trained: dict, used: dict) -> tuple[list[str], list[str]]:
    """Differences between the generation a checkpoint was trained on and the one it is used
    on, each as "<field> <trained> vs <used>": those of FEATURE_FIELDS (the caller refuses) and
    those of OTHER_FIELDS (the caller warns)."""
    def changed(fields: dict[str, str]) -> list[str]:
        out = []
        for key, name in fields.items():
            ours, theirs = (record.get(key, RECORD_DEFAULTS.get(key)) for record in (trained, used))
            if isinstance(ours, dict):  # the prompt templates, each by its own name
                # a field a record predates was at its default, empty (per_class: {}): no difference
                out += [f"{name} {k} {ours.get(k)!r} vs {theirs.get(k)!r}"
                        for k in sorted({*ours, *theirs}) if (ours.get(k) or None) != (theirs.get(k) or None)]
            elif ours != theirs:
                out.append(f"{name} {ours!r} vs {theirs!r}")
        return out

    return changed(FEATURE_FIELDS), changed(OTHER_FIELDS)


def classes_seen(metadata: dict, vocabulary: Vocabulary) -> list[str]:
    """The classes of `vocabulary` the module was trained on, matched by the words that name them
    (name, natural words, detector class, synonyms) against the trained classes of its training
    data's vocabulary, not by the names alone: a user's class drawn as a trained class is seen,
    whatever the user calls it, so a renamed class cannot pass for an unseen one."""
    trained = get_vocabulary(metadata["vocabulary"]) if "vocabulary" in metadata else vocabulary
    words = set().union(*(_words(trained.lookup(name)) for name in metadata["classes"]))
    return [info.name for info in vocabulary.classes if _words(info) & words]


def _words(info: ClassInfo) -> set[str]:
    return {w.replace("_", " ").strip().lower() for w in (info.name, info.natural, info.detector, *info.synonyms) if w}


def resume_point(location: Location) -> tuple[str, dict] | None:
    """The checkpoint a rerun continues from: last/, or best/ when last/ is damaged (a file
    no longer matches its checkpoint.json)."""
    for name in ("last", "best"):
        if not location.exists(f"{name}/{METADATA_FILE}"):
            continue
        metadata = read_grounding_metadata(location.url(name))
        if is_intact(location.url(name), metadata):
            return name, metadata
    return None

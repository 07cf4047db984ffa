"""The checks before a build: every one that can fail without a model, so that a bad recipe,
unreachable models or an output of another build are refused before anything loads or is written."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from factory.core.conventions import TINY
from factory.core.errors import FactoryError
from factory.core.storage import Location, StorageError, access_refused, check_model_source, first_line
from factory.core.vocab import Vocabulary
from factory.dataset.layout import BUILD_FILE
from factory.dataset.write import read_commits
from factory.diffusion.families import CAPTURING, Family, read_generator
from factory.pipeline.labelers import labeler_of
from factory.pipeline.plan import Sample, all_attempts
from factory.pipeline.recipe import Recipe


class BuildError(FactoryError, RuntimeError):
    """The output cannot be built or resumed as asked; the message is one line."""


@dataclass
class Prepared:
    """A build that passed every check (``pipeline.prepare_build``), its vocabulary resolved once."""
    recipe: Recipe
    vocabulary: Vocabulary
    plan: list[Sample]
    location: Location
    notes: list[str] = field(default_factory=list)  # what the user should know before the run
    follows: dict | None = None  # the followed dataset (recipe.follow), as the manifest records it
    claimed: bool = False  # build.json is this run's: a model-load failure before any commit takes it back
    family: Family | None = None  # the generator's, read from its saved config


def check_generator(recipe: Recipe) -> tuple[Recipe, Family]:
    """The recipe against its generator's family, read from the saved configs (no weights): the sampler (a
    flow-matching model's own when the recipe names none: the returned recipe says so), the image size,
    and the parts of the method that read a U-Net's blocks or cross-attention."""
    g = recipe.generator
    saved = read_generator(g.model)
    family, which = saved.family, f"{saved.family.title} ({g.model})"
    if family.flow and "scheduler" not in g.model_fields_set:
        recipe = recipe.model_copy(deep=True)
        recipe.generator.scheduler = "flow"
    if recipe.generator.scheduler not in family.schedulers:
        *others, last = family.schedulers
        raise BuildError(f"generator.scheduler {recipe.generator.scheduler} does not apply to {which}: choose "
                         f"{', '.join(others) + ' or ' if others else ''}{last}")
    for side in ("height", "width"):
        if getattr(g, side) % saved.multiple:
            raise BuildError(f"generator.{side} {getattr(g, side)} is not a multiple of {saved.multiple}, which "
                             f"{which} needs")
    if not family.capture:
        reads_unet = {"capture.features": recipe.capture.features != "none", "capture.attention": recipe.capture.attention,
                      "annotator.checkpoint": recipe.annotator.enabled, "annotator.daam": recipe.annotator.daam,
                      "source (real images)": recipe.source.enabled}
        if used := [what for what, on in reads_unet.items() if on]:
            raise BuildError(f"{used[0]} reads a U-Net's features or cross-attention, and {which} is a diffusion "
                             f"transformer: capture and annotation run on {CAPTURING}")
        if recipe.fast.attention != "sdpa":
            raise BuildError(f"fast.attention {recipe.fast.attention} is for U-Nets; {which} runs its own attention")
    return recipe, family


def check_models(recipe: Recipe, vocabulary: Vocabulary) -> list[str]:
    """Every model the recipe names exists (one-line errors); returns notes for the user."""
    if recipe.quality.model and recipe.quality.model != TINY:
        check_model_source(recipe.quality.model, "config.json")
    notes = []
    if recipe.annotator.checkpoint:
        notes += check_annotator(recipe, vocabulary)
    elif not recipe.source.enabled:
        labeler_of(recipe.labeler.model).check(recipe.labeler)
    if recipe.agreement.enabled:
        labeler_of(recipe.agreement.labeler.model).check(recipe.agreement.labeler)
    return notes


def check_annotator(recipe: Recipe, vocabulary: Vocabulary) -> list[str]:
    """The checkpoint must exist, read the features this build makes (same generator model and
    total steps; it captures at the checkpoint's step), and, for a dataset declared for a split,
    never have seen that split's unseen classes. Other generation differences are returned as
    notes for the user."""
    # Imported here: only an annotating build needs grounding (and torch) before its models load.
    from factory.core.checkpoints import CheckpointError
    from grounding.checkpoint import (
        check_generation,
        classes_seen,
        generation_record,
        read_grounding_metadata,
        training_generation,
    )

    uri = recipe.annotator.checkpoint
    try:
        metadata = read_grounding_metadata(uri)
        trained = training_generation(uri, metadata)
    except CheckpointError as exc:
        raise BuildError(str(exc)) from None
    # This build captures at the checkpoint's step: only the rest of its generation can differ.
    used = generation_record(recipe.model_dump(mode="json"), trained["capture_step"])
    features, others = check_generation(trained, used)
    if features:
        raise BuildError(f"grounding checkpoint {uri} reads features this build does not make: "
                         f"{'; '.join(features)} (its training data vs this recipe)")
    if recipe.split is not None:
        shown = sorted(set(classes_seen(metadata, vocabulary)) & set(vocabulary.unseen(recipe.split)))
        if shown:
            raise BuildError(f"grounding checkpoint {uri} was trained on {', '.join(shown)}, unseen classes of "
                             f"split {recipe.split}, which this dataset is declared for; annotate with a module "
                             f"trained on split {recipe.split}'s seen classes")
    return [f"grounding checkpoint {uri} was trained on images made otherwise: {'; '.join(others)} "
            f"(its training data vs this recipe)"] if others else []


def claim_output(recipe: Recipe, plan: list[Sample], location: Location) -> bool:
    """Writes build.json, or checks that the one there is this recipe's and that the output holds
    nothing outside the plan; True when this run wrote it. Writing it proves write access."""
    build = {"content_key": recipe.content_key(), "recipe": recipe.model_dump(mode="json")}
    try:
        claimed = not location.exists(BUILD_FILE)
        if not claimed:
            previous = json.loads(location.read_bytes(BUILD_FILE))
            if previous["content_key"] != build["content_key"]:
                raise BuildError(f"{recipe.output} holds a dataset of a different recipe "
                                 f"({previous['recipe']['name']}, key {previous['content_key']}); "
                                 f"use another --out or the same recipe")
            if previous["recipe"].get("follow") != recipe.follow:  # another set of samples with the same key
                raise BuildError(f"{recipe.output} holds a build with follow {previous['recipe'].get('follow')}; "
                                 f"use another --out or the same follow")
            build = previous  # keep the first run's record; num_samples etc. may differ now
            planned = {s.sample_id for s in all_attempts(plan, recipe)}
            outside = sum(1 for c in read_commits(location) for i in (*c.written, *c.dropped) if i not in planned)
            if outside and recipe.source.enabled:  # an image's id is its name and content
                raise BuildError(f"{recipe.output} holds {outside} samples of images no longer in "
                                 f"{recipe.source.images} (removed, renamed or changed since); restore them, or "
                                 f"write to another --out")
            if outside:
                raise BuildError(f"{recipe.output} holds {outside} samples outside this plan (were num_samples "
                                 f"or attempts larger before?); use the same or larger --num-samples and --attempts")
        location.write_bytes(BUILD_FILE, json.dumps(build, indent=2).encode())
    except OSError as exc:
        what = "no permission to write to" if access_refused(exc) else "cannot write to"
        raise StorageError(f"{what} {recipe.output}: {first_line(exc)}") from None
    return claimed

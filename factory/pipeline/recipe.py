"""The build recipe: one typed config for `jobs/build_dataset.py`.

A recipe is a YAML file in `factory/recipes/` (or anywhere) validated by pydantic;
every field can be overridden from the command line as `--section.field VALUE`.
Validation is complete before anything is written or any model loads, and every
error is one line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from factory.core.conventions import RECIPE_DIR
from factory.core.options import (
    ConfigError,
    add_config_arguments,
    load_config,
    overrides_from_args,
    resolve_config_path,
)
from factory.core.storage import StorageError, first_line, is_s3, open_location, split_file_uri
from factory.core.vocab import (
    DEFINITION_SUFFIXES,
    VOCABULARIES,
    define_vocabulary,
    get_vocabulary,
)
from factory.core.vocab_files import read_vocabulary_file
from factory.diffusion.steps import REFERENCE_STEPS
from factory.pipeline.labelers import labeler_for
from factory.pipeline.sections import (
    AgreementConfig,
    AnnotatorConfig,
    CaptureConfig,
    FastConfig,
    GeneratorConfig,
    LabelerConfig,
    PoolConfig,
    PromptConfig,
    QualityConfig,
    Section,
    SourceConfig,
    WriterConfig,
)

DEFAULT_RECIPE = "shapes"
MAX_ATTEMPTS = 64  # most samples tried per plan entry (recipe.attempts)


RecipeError = ConfigError  # a recipe or command line that cannot be built; the message is one line


class Recipe(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="recipe name (used in the default output path)")
    vocabulary: str | dict[str, Any] = Field(
        "voc", description="class vocabulary: voc, coco, shapes (the mini world's), or your own: a .yaml/.tsv file "
        "(local, s3://, or in factory/recipes/) or an inline mapping; kept in the recipe as its definition")
    classes: Literal["all", "seen", "unseen"] | list[str] = Field(
        "all", description="'all', 'seen' or 'unseen' of --split, or a list of class names")
    split: int | None = Field(None, description="seen/unseen split (voc, coco, shapes: 1-3) for classes: seen|unseen")
    per_class: int = Field(1, ge=0, description="one-class samples per class")
    per_pair: int = Field(0, ge=0, description="two-class samples per co-appearing pair")
    pairs: str | None = Field(
        None, min_length=1, description="co-appearing pairs: a TSV file from jobs/derive_pairs.py, 'vocabulary' for "
        "the pairs its file names, or 'all' for every pair of the selected classes; pairs with a class outside the "
        "selection are skipped")
    num_samples: int | None = Field(None, ge=1, description="keep only the first N samples of the "
                                    "shuffled plan (a prefix: a larger N extends the same dataset)")
    seed: int = Field(0, ge=0, lt=2**63, description="plan seed: sample order and per-sample noise seeds")
    attempts: int = Field(4, ge=1, le=MAX_ATTEMPTS, description="samples tried per plan entry: a dropped sample "
                          "(a class not found) is replaced by the entry's next seed, up to this many; 1: never "
                          "replaced")
    follow: str | None = Field(
        None, min_length=1, description="a finished dataset (folder or s3://) of this recipe's plan (vocabulary, "
        "classes, per_class, per_pair, pairs, num_samples, seed, prompts, generator; checked before any model "
        "loads): make exactly the samples it wrote, each with its attempt's seed and its sample id, once and never "
        "replaced, so the images are its images and only the labels differ (an oracle or DAAM set beside a module-labelled one). "
        "A detector-labelled follower that captures nothing reads those images from the set instead of generating "
        "them again; the grounding module and DAAM, which read the generator's insides, generate them again. "
        "A class this build's labeler misses keeps its sample with every unclaimed pixel 255, so on_missing "
        "must say so (ignore; the annotator's absent too), not drop; attempts is not used")
    out: str | None = Field(None, min_length=1, description="output folder or s3://bucket/prefix "
                            "(default: outputs/<name>)")
    prompts: PromptConfig = PromptConfig()
    generator: GeneratorConfig = GeneratorConfig()
    labeler: LabelerConfig = LabelerConfig()
    annotator: AnnotatorConfig = AnnotatorConfig()
    agreement: AgreementConfig = AgreementConfig()
    source: SourceConfig = SourceConfig()
    capture: CaptureConfig = CaptureConfig()
    quality: QualityConfig = QualityConfig()
    pool: PoolConfig = PoolConfig()
    fast: FastConfig = FastConfig()
    writer: WriterConfig = WriterConfig()
    _notes: list[str] = PrivateAttr(default_factory=list)  # see `notes`

    @field_validator("classes", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # `--classes dog,cat` on the command line is friendlier than YAML list syntax.
        if isinstance(value, str) and value not in ("all", "seen", "unseen"):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("vocabulary", mode="before")
    @classmethod
    def _vocabulary_definition(cls, value: Any) -> Any:
        # A file is read once, here: the recipe (and so the manifest) keeps the definition itself.
        if isinstance(value, str) and value.strip().lower() in VOCABULARIES:
            return value.strip().lower()
        if isinstance(value, str):
            if not value.endswith(DEFINITION_SUFFIXES):
                get_vocabulary(value)  # one line naming the choices
            value = read_vocabulary_file(value, read_recipe_file(value, "vocabulary"))
        if isinstance(value, dict):
            return define_vocabulary(value).definition()
        return value

    # Field validators, so that errors name the field; `vocabulary` is validated before both.
    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("empty list: name at least one class, or use all, seen or unseen")
            if "vocabulary" in info.data:
                for name in value:
                    get_vocabulary(info.data["vocabulary"]).lookup(name)
        return value

    @field_validator("prompts")
    @classmethod
    def _prompted_classes(cls, value: PromptConfig, info: ValidationInfo) -> PromptConfig:
        if "vocabulary" in info.data:
            for name in value.per_class:
                get_vocabulary(info.data["vocabulary"]).lookup(name)
        return value

    @field_validator("split")
    @classmethod
    def _known_split(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and "vocabulary" in info.data:
            vocabulary = get_vocabulary(info.data["vocabulary"])
            if vocabulary.unseen_splits:  # a vocabulary without splits: `_consistent` drops it
                vocabulary.unseen(value)  # one line naming the valid splits
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        vocabulary = get_vocabulary(self.vocabulary)
        if self.classes in ("seen", "unseen") and not vocabulary.unseen_splits:
            raise ValueError(f"classes: {self.classes} needs seen/unseen splits, and vocabulary {vocabulary.name} "
                             f"has none (its file's unseen)")
        if self.split is not None and not vocabulary.unseen_splits:
            # A recipe's split (the default's is 1) applies where the vocabulary has splits: your own
            # classes build under any recipe, and the dataset declares no split.
            self._notes.append(f"split {self.split} does not apply: vocabulary {vocabulary.name} has no seen/unseen "
                               f"splits, so this dataset is declared for none")
            self.split = None  # validated again, now without it
        if self.classes in ("seen", "unseen") and self.split is None:
            raise ValueError(f"classes: {self.classes} needs split (1-3)")
        if self.per_class == 0 and self.per_pair == 0:
            raise ValueError("per_class and per_pair are both 0: the plan would be empty")
        if self.per_pair > 0 and self.pairs is None:
            raise ValueError("per_pair > 0 needs pairs: a pair file or 'all'")
        if self.capture.features != "none":
            steps, of = ((self.generator.steps, "generator.steps") if self.generator.scheduler == "ddim"
                         else (REFERENCE_STEPS, f"DDIM-{REFERENCE_STEPS}, the reference of {self.generator.scheduler}"))
            if self.capture.step > steps:
                raise ValueError(f"capture.step {self.capture.step} is beyond {of} ({steps} steps)")
        if self.fast.compile != "off" and (self.capture.attention or self.annotator.daam):
            raise ValueError("fast.compile with DAAM: its recorder swaps the U-Net's attention processors for each "
                             "batch, which a compiled graph does not see; compile off, or no attention maps")
        if self.annotator.enabled and (self.capture.features != "none" or self.capture.attention):
            raise ValueError("an annotator makes a segmentation set; capture is for oracle triplet sets")
        if self.follow is not None:
            self._check_follower()
        if self.source.enabled:
            self._check_source()
        labeler_for(self).check_classes(self.labeler, vocabulary, self.selected_classes)
        if self.capture.unconditional and self.generator.guidance_scale <= 1.0:
            raise ValueError("capture.unconditional needs guidance (generator.guidance_scale > 1)")
        return self

    def _check_source(self) -> None:
        if self.annotator.daam or self.capture.attention:
            raise ValueError("DAAM reads a generation's attention; real images are labelled by their masks or by "
                             "annotator.checkpoint")
        if self.source.format == "folder" and not self.annotator.enabled:
            raise ValueError("a folder of images has no masks: set annotator.checkpoint to annotate it")
        if not self.annotator.enabled and self.capture.features == "none":
            raise ValueError("real images with masks make a triplet set: set capture.features (latent or tensors), "
                             "or annotator.checkpoint to annotate them")
        if self.source.classes_file and self.source.format != "folder":
            raise ValueError(f"source.classes_file is for a folder; {self.source.format} names each image's classes")
        if self.capture.unconditional:
            raise ValueError("capture.unconditional: real images are featurized without guidance")
        if self.generator.scheduler != "ddim":
            raise ValueError(f"real images are inverted or noised on DDIM's schedule, not {self.generator.scheduler}: "
                             f"generator.scheduler ddim")

    def _check_follower(self) -> None:
        # Dropping a sample would leave a hole where the followed set has an image: refused, not overridden,
        # so that the recipe (and the card made from it) says what the build does.
        if self.source.enabled:
            raise ValueError("follow is for generated sets; a build from real images plans each image once already")
        on_missing, section = ((self.annotator.on_missing, "annotator") if self.annotator.enabled
                               else (self.labeler.on_missing, "labeler"))
        if on_missing == "drop":
            raise ValueError(f"follow keeps every sample it follows: {section}.on_missing ignore (a missed class "
                             f"leaves every unclaimed pixel 255), not drop")
        if self.agreement.min_iou > 0 and self.agreement.action == "drop":
            raise ValueError("follow keeps every sample it follows: agreement.action ignore, not drop")

    @property
    def notes(self) -> list[str]:
        """What validation changed that the user should know (the build prints each)."""
        return list(self._notes)

    @property
    def selected_classes(self) -> list[str]:
        """Canonical names of the recipe's classes, in vocabulary order."""
        vocabulary = get_vocabulary(self.vocabulary)
        if self.classes == "all":
            return list(vocabulary.names)
        if self.classes == "seen":
            return list(vocabulary.seen(self.split))
        if self.classes == "unseen":
            return list(vocabulary.unseen(self.split))
        chosen = {vocabulary.lookup(name).name for name in self.classes}
        return [name for name in vocabulary.names if name in chosen]

    @property
    def tries(self) -> int:
        """Samples per plan entry: `attempts`, or one for a real image (another try would be the
        same image again) and for a follower (the followed set decided each entry's attempt)."""
        return 1 if self.source.enabled or self.follow is not None else self.attempts

    @property
    def output(self) -> str:
        return self.out or f"outputs/{self.name}"

    def content_key(self) -> str:
        """Hash of every field that decides what a sample contains; part of sample ids.

        Resuming into an existing output requires the same key. Left out, and free to
        change between runs: name, output, sample count, attempts (a larger number replaces
        what was given up), the followed set (which samples are made, not what each holds), batch
        and pool sizes, speed switches (`fast`), file sizes.
        """
        data = self.model_dump(mode="json", exclude={
            "name": True, "out": True, "num_samples": True, "attempts": True, "follow": True,
            "writer": {"rows_per_file", "preview_samples"},
            "pool": True, "fast": True, "generator": {"batch_size"}, "labeler": {"batch_size"},
            "agreement": {"labeler": {"batch_size"}}})
        for section, fields in ADDED_FIELDS.items():
            for field, default in fields.items():
                if data[section][field] == default:
                    del data[section][field]
            if not data[section]:  # a section added whole
                del data[section]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# Fields added after datasets were first built with this key: left out of it while at their
# default, so that those datasets keep their key and resume after an upgrade.
ADDED_FIELDS = {"annotator": {"daam": False, "presence_threshold": 0.5}, "prompts": {"per_class": {}},
                "generator": {"scheduler": "ddim"},
                "agreement": AgreementConfig().model_dump(mode="json"),
                "source": SourceConfig().model_dump(mode="json")}


def find_file(path: str, kind: str) -> Path:
    """A local file named in a recipe: as given, or relative to the recipe folder."""
    for candidate in (Path(path), RECIPE_DIR / path):
        if candidate.is_file():
            return candidate
    hint = " (derive it with jobs/derive_pairs.py from real annotations)" if kind == "pairs" else ""
    raise RecipeError(f"{kind} file not found: {path}{hint}")


def read_recipe_file(path: str, kind: str) -> bytes:
    """The bytes of a file named in a recipe: s3://, or local as ``find_file`` finds it."""
    try:
        if is_s3(path):
            return open_location(split_file_uri(path)[0]).read_bytes(split_file_uri(path)[1])
        return find_file(path, kind).read_bytes()
    except (OSError, StorageError) as exc:
        raise RecipeError(f"cannot read the {kind} file {path}: {first_line(exc)}") from None


def resolve_recipe_path(name_or_path: str) -> Path:
    return resolve_config_path(name_or_path, RECIPE_DIR, kind="recipe")


def load_recipe(name_or_path: str = DEFAULT_RECIPE, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe by name (factory/recipes/NAME.yaml) or path and apply dotted overrides."""
    path = resolve_recipe_path(name_or_path)
    return load_config(Recipe, path, overrides, defaults={"name": path.stem})


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--recipe plus one --dotted.field option per recipe field."""
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"recipe name in factory/recipes/ or a YAML path (default: {DEFAULT_RECIPE})")
    add_config_arguments(parser, Recipe)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, overrides_from_args(args, Recipe))

"""The build recipe: one typed config for `jobs/build_dataset.py`.

A recipe is a YAML file in `jobs/recipes/` (or anywhere) validated by pydantic;
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

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from factory.core.conventions import TINY
from factory.core.options import (
    ConfigError,
    add_config_arguments,
    check_template,
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
    read_vocabulary_file,
)
from factory.diffusion.steps import REFERENCE_STEPS

RECIPE_DIR = Path(__file__).resolve().parents[2] / "jobs" / "recipes"
DEFAULT_RECIPE = "shapes"
TORCHVISION_WEIGHTS = "torchvision"  # labeler.weights: torchvision's own COCO checkpoint
SMALL = "maskrcnn_small"  # labeler.model: a slim Mask R-CNN over the vocabulary's own labels (the mini world's)
MAX_ATTEMPTS = 64  # most samples tried per plan entry (recipe.attempts)


RecipeError = ConfigError  # a recipe or command line that cannot be built; the message is one line


class _Section(BaseModel):
    # strict: `per_class: yes` or `steps: 2.5` is a mistake, not 1 or a silent rounding.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class PoolConfig(_Section):
    """The model actors: each holds every model of the recipe (generator, labeler or annotator,
    quality) on one GPU when the cluster has GPUs, and encodes what it made."""
    min_size: int = Field(1, ge=1, description="actors started at once")
    max_size: int = Field(1, ge=1, description="actors the pool may grow to (one GPU each when GPUs exist)")
    require_gpu: bool | None = Field(
        None, description="without GPUs in the cluster, wait for GPU nodes (an autoscaler adds them) instead of "
        "running on CPUs; null: for every model but the tiny ones; false: models small enough for CPUs (the mini "
        "world's). With GPUs in the cluster, actors always take one")
    load_attempts: int = Field(3, ge=1, le=20, description="tries per actor to load its models (backoff 2 s, "
                               "4 s, ...) before the build fails with the cause")

    @model_validator(mode="after")
    def _ordered(self) -> "PoolConfig":
        if self.max_size < self.min_size:
            raise ValueError(f"max_size {self.max_size} is smaller than min_size {self.min_size}")
        return self


class PromptConfig(_Section):
    one: str = Field("a photograph of a {0}", description="template for one class")
    two: str = Field("a photograph of a {0} and a {1}", description="template for a pair")
    file: str | None = Field(
        None, min_length=1, description="file of 'complicated' prompts, class names in braces: "
        "'a photograph of a {bus} crossing a busy street'; used for one-class samples "
        "whose class it mentions, the template otherwise")
    per_class: dict[str, list[str]] = Field(
        {}, description="more templates per class, {} where its words go: {forklift: ['a {} in a warehouse "
        "aisle', 'a {} lifting a pallet']}; a one-class sample picks among them and the file's prompts for the class, "
        "instead of `one`")

    @model_validator(mode="after")
    def _placeholders(self) -> "PromptConfig":
        check_template("one", self.one, 1)
        check_template("two", self.two, 2)
        for name, templates in self.per_class.items():
            if not templates:
                raise ValueError(f"per_class: {name} has an empty list")
            for template in templates:
                check_template(f"per_class: {name}", template, 1)
        return self


class GeneratorConfig(_Section):
    model: str = Field(TINY, min_length=1, description="'tiny' (random, built in code), a diffusers model id, "
                       "a local folder or an s3:// prefix of a saved pipeline")
    steps: int = Field(50, ge=1, le=1000, description="DDIM denoising steps")
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0, description="classifier-free guidance scale")
    height: int = Field(512, ge=16, le=2048, multiple_of=8, description="image height")
    width: int = Field(512, ge=16, le=2048, multiple_of=8, description="image width")
    batch_size: int = Field(4, ge=1, le=256, description="prompts per generator call")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="'auto': float16 on CUDA, float32 on CPU")
    scheduler: Literal["ddim", "dpm++", "lcm"] = Field(
        "ddim", description="sampler: 'ddim' (eta 0, the papers'), 'dpm++' (DPM-Solver++ 2M: about 25 steps for "
        "DDIM-50's images), 'lcm' (4-8 steps of a latent consistency model: generator.lora an LCM-LoRA, "
        "guidance_scale 1-2)")
    # Left out of the recipe's dump while unset, so that datasets built before it keep their content key.
    lora: str | None = Field(None, min_length=1, exclude_if=lambda value: value is None,
                             description="LoRA weights fused into the U-Net at load (a diffusers .safetensors "
                             "file, local or s3://): an LCM-LoRA for scheduler lcm")


class FastConfig(_Section):
    """How fast the model actor runs, not what it makes: each switch changes a sample by float rounding
    at most (tests bound each against the reference path), so none is part of the content key."""
    attention: Literal["sdpa", "math"] = Field(
        "sdpa", description="'sdpa': PyTorch's fused scaled_dot_product_attention (flash or memory-efficient "
        "kernels on a GPU); 'math': diffusers' plain matmul-softmax-matmul, the reference")
    channels_last: bool = Field(False, description="U-Net and VAE in channels-last memory (faster convolutions "
                                "on tensor cores)")
    compile: Literal["off", "default", "max-autotune", "reduce-overhead"] = Field(
        "off", description="torch.compile the U-Net as one graph (capture hooks compiled in; a graph break is "
        "an error): 'default', 'max-autotune' (slower to start, tuned kernels), 'reduce-overhead' (CUDA graphs: "
        "use with static_batch). Compiling takes minutes at the actor's first batch")
    static_batch: bool = Field(False, description="pad every model call to its full batch size (a short last batch "
                               "repeats its last sample), so a compiled model sees one shape")
    overlap: bool = Field(False, description="pipeline the model actor: batch k's VAE decode, labels and encoding "
                          "run (own CUDA stream, own thread) while batch k+1 denoises")


class LabelerConfig(_Section):
    model: Literal["tiny", "maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "maskrcnn_small",
                   "open_vocabulary"] = Field(
        "tiny", description="oracle detector architecture: COCO's classes, or maskrcnn_small, whose labels "
        "are the vocabulary's (the mini world's trained oracle), or open_vocabulary: every instance of each prompt "
        "class found by its name and synonyms (SAM 3, or a text-prompted detector with labeler.sam)")
    weights: str | None = Field(None, min_length=1, description="COCO-pretrained weights: 'torchvision' (its COCO "
                                "checkpoint, downloaded on the node), or a .safetensors/.pth file, local or "
                                "s3://; required for the real architectures. open_vocabulary: a saved SAM 3, "
                                "OWLv2 or Grounding DINO (model id, local folder or s3:// prefix; its config says "
                                "which)")
    # Left out of the recipe's dump while unset, so that datasets built before it keep their content key.
    sam: str | None = Field(None, min_length=1, exclude_if=lambda value: value is None,
                            description="open_vocabulary with a detector: the Segment Anything model (SAM or SAM 2; "
                            "model id, local folder or s3:// prefix) that turns its boxes into masks; not with SAM 3")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="instances at or above this score "
                                   "are merged into their class mask (open_vocabulary: SAM 3's query x presence "
                                   "score, or the detector's box score)")
    ignore_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="instances of a prompt class scoring in "
        "[ignore_threshold, score_threshold) become ignore (255) instead of background")
    mask_threshold: float = Field(0.5, ge=0.0, le=1.0, description="soft mask binarisation threshold")
    nms_threshold: float = Field(0.5, ge=0.0, le=1.0, description="detector NMS IoU threshold (per class, on "
                                 "boxes; open_vocabulary: the detector's boxes before SAM, unused by SAM 3)")
    on_missing: Literal["drop", "ignore"] = Field(
        "drop", description="a prompt class the detector does not find: 'drop' the sample, or "
        "'ignore': keep it, mark the class missing and make unclaimed pixels 255")
    batch_size: int = Field(4, ge=1, le=256, description="images per detector call")

    @model_validator(mode="after")
    def _thresholds(self) -> "LabelerConfig":
        if self.ignore_threshold is not None and self.ignore_threshold >= self.score_threshold:
            raise ValueError(f"ignore_threshold {self.ignore_threshold} must be below "
                             f"score_threshold {self.score_threshold}")
        if self.model == "open_vocabulary" and self.weights is None:
            raise ValueError("labeler open_vocabulary needs weights: a SAM 3, OWLv2 or Grounding DINO model")
        if self.model != TINY and self.weights is None:
            raise ValueError(f"labeler {self.model} needs weights (a COCO-pretrained checkpoint path)")
        if self.model in (TINY, SMALL, "open_vocabulary") and self.weights == TORCHVISION_WEIGHTS:
            raise ValueError(f"weights: torchvision needs a torchvision COCO architecture, not {self.model}")
        # Whether weights is SAM 3 (no sam) or a detector (sam needed) is known when its config loads.
        if self.sam is not None and self.model != "open_vocabulary":
            raise ValueError(f"sam is for labeler open_vocabulary with a detector, not {self.model}")
        return self


class AnnotatorConfig(_Section):
    checkpoint: str | None = Field(
        None, min_length=1, description="a trained grounding module (checkpoint folder, local or s3://): when set, it "
        "labels the images inside the generator's actor instead of the detector (Algorithm 2)")
    daam: bool = Field(False, description="label with DAAM's cross-attention heat maps instead (the papers' "
                       "training-free baseline; set threshold to its tau, 0.4)")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="a pixel belongs to a class above this probability")
    ignore_below: float | None = Field(
        None, ge=0.0, le=1.0, description="pixels whose best probability is in [ignore_below, threshold] become 255")
    presence_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="a grounding module with a presence head judges a class absent below this "
        "presence score and gives it no pixels (then on_missing applies); docs/label-truth.md has the "
        "measurements behind the default")
    on_missing: Literal["drop", "ignore", "absent"] = Field(
        "drop", description="a class with an empty predicted mask (or judged absent): drop the sample, keep it "
        "with unclaimed pixels 255 ('ignore'), or keep it as is ('absent': the class is not in the image; for a "
        "class list asked of every real image)")

    @property
    def enabled(self) -> bool:
        """Whether the build labels in the generator's actor (module or DAAM) instead of the detector."""
        return self.checkpoint is not None or self.daam

    @model_validator(mode="after")
    def _band(self) -> "AnnotatorConfig":
        if self.checkpoint and self.daam:
            raise ValueError("annotator: give a grounding checkpoint or daam: true, not both")
        if self.ignore_below is not None and self.ignore_below >= self.threshold:
            raise ValueError(f"ignore_below {self.ignore_below} must be below threshold {self.threshold}")
        return self


class AgreementConfig(_Section):
    """A second labeler that checks the labels (``factory.pipeline.agreement``): every sample records
    the IoU of the two labelers' masks per class, and a threshold acts on disagreeing classes."""
    labeler: LabelerConfig | None = Field(
        None, description="the second labeler, a labeler section ({model: maskrcnn_small, weights: ...} or "
        "{model: open_vocabulary, ...}) run on every image after the labels are made; null: none")
    min_iou: float = Field(0.0, ge=0.0, le=1.0, description="a class whose two masks agree less than this (IoU) "
                           "is handled by `action`; 0: record the agreement only")
    action: Literal["drop", "ignore"] = Field(
        "drop", description="a disagreeing class: 'drop' the sample, or 'ignore': make its pixels (either "
        "labeler's) 255")

    @property
    def enabled(self) -> bool:
        return self.labeler is not None

    @model_validator(mode="after")
    def _needs_labeler(self) -> "AgreementConfig":
        if self.min_iou > 0 and self.labeler is None:
            raise ValueError("min_iou needs a second labeler (agreement.labeler)")
        return self


class CaptureConfig(_Section):
    features: Literal["none", "latent", "tensors"] = Field(
        "none", description="U-Net features for grounding triplets: 'latent' stores the capture call's "
        "latent (features are one U-Net pass away, ~1000x smaller), 'tensors' the features themselves (fp16)")
    step: int = Field(5, ge=1, description="denoising steps remaining at capture (the paper's t; best: 5 of 50). "
                      "generator.scheduler dpm++ or lcm: the call nearest DDIM-50's noise level at this step")
    unconditional: bool = Field(False, description="tensors mode: also store the unconditional branch")
    attention: bool = Field(False, description="store DAAM cross-attention heat maps per class "
                            "(the baseline that Protocol-I evaluation compares the grounding module with)")


class SourceConfig(_Section):
    """Real images instead of generated ones: each is turned into the U-Net features a generated
    image gives for free (``factory.diffusion.inversion``), then labelled by its own masks (a
    triplet set for grounding training: "sim+real") or by the annotator (annotating real images)."""
    images: str | None = Field(
        None, min_length=1, description="null: generate. Otherwise the images: a folder or s3:// prefix of "
        ".png/.jpg files (format folder), a VOC root (voc, voc_aug), a COCO root (coco) or a factory dataset (dataset)")
    format: Literal["folder", "voc", "voc_aug", "coco", "dataset"] = Field(
        "folder", description="how `images` is laid out; every format but folder has masks, and names each image's "
        "classes")
    split: str | None = Field(None, min_length=1, description="voc/voc_aug/coco: the image list or folder (default: "
                              "val, train_aug, val2017)")
    classes_file: str | None = Field(
        None, min_length=1, description="folder: a JSON file {\"<image file name>\": [class names]} naming each "
        "image's classes; without it every image is asked for the recipe's classes")
    route: Literal["inversion", "noised"] = Field(
        "inversion", description="'inversion': DDIM-invert the image under its prompt (guidance 1, generator.steps), "
        "regenerate, capture (000, C.3; 2 x steps U-Net calls); 'noised': one U-Net call on the VAE latent noised "
        "to the capture step (fast, as ODISE, 004)")
    resize: Literal["squash", "crop", "pad"] = Field(
        "squash", description="how an image of another shape meets the generator's size: 'squash' (default) resizes "
        "it whole, stretching it; 'crop' keeps its centre at its own aspect ratio; 'pad' fits it whole and fills the "
        "rest with black (255, ignore, in its masks); each row records the original size")

    @property
    def enabled(self) -> bool:
        return self.images is not None


class QualityConfig(_Section):
    model: str | None = Field(
        None, min_length=1, description="CLIP for an image-quality score per sample ('tiny', a local folder or s3:// "
        "prefix of a saved CLIPModel): P('Good photo.') against 'Bad photo.', to filter test sets")


class WriterConfig(_Section):
    rows_per_file: int = Field(64, ge=1, le=100_000, description="samples per Parquet file")
    image_format: Literal["png", "jpeg"] = Field("png", description="encoding of the generated image")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality when image_format is jpeg")
    preview_samples: int = Field(16, ge=0, le=256, description="samples in preview.png (0: none)")


class Recipe(_Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="recipe name (used in the default output path)")
    vocabulary: str | dict[str, Any] = Field(
        "voc", description="class vocabulary: voc, coco, shapes (the mini world's), or your own: a .yaml/.tsv file "
        "(local, s3://, or in jobs/recipes/) or an inline mapping; kept in the recipe as its definition")
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
        elif not self.annotator.enabled and self.labeler.model != "open_vocabulary":
            self._check_detectable()
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

    def _check_detectable(self) -> None:
        vocabulary = get_vocabulary(self.vocabulary)
        knows = "shapes" if self.labeler.model == SMALL else "coco"  # the tiny model's random head fits either
        if self.labeler.model != TINY and vocabulary.detector_space != knows:
            raise ValueError(f"labeler {self.labeler.model} detects {knows} classes, and vocabulary {vocabulary.name}'s "
                             f"detector names {vocabulary.detector_space} classes: set the vocabulary's detector to "
                             f"{knows} and name its classes, or use an oracle of {vocabulary.detector_space} "
                             f"({'maskrcnn_small, the mini world' if knows == 'coco' else 'a COCO Mask R-CNN'})")
        blind = [name for name in self.selected_classes if not vocabulary.lookup(name).coco_id]
        if blind:
            raise ValueError(f"the {self.labeler.model} oracle has no class for {', '.join(blind)} (vocabulary "
                             f"{vocabulary.name} names no detector class): label them with labeler.model "
                             f"open_vocabulary or annotator.checkpoint")

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
    """Read a recipe by name (jobs/recipes/NAME.yaml) or path and apply dotted overrides."""
    path = resolve_recipe_path(name_or_path)
    return load_config(Recipe, path, overrides, defaults={"name": path.stem})


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--recipe plus one --dotted.field option per recipe field."""
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"recipe name in jobs/recipes/ or a YAML path (default: {DEFAULT_RECIPE})")
    add_config_arguments(parser, Recipe)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, overrides_from_args(args, Recipe))

"""The recipe's sections: one typed config per part of the build (``factory.pipeline.recipe``
puts them together and checks them against each other)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from factory.core.conventions import PROMPT_ONE, PROMPT_TWO, TINY
from factory.core.options import check_template
from factory.pipeline.labelers import LABELERS


class Section(BaseModel):
    # strict: `per_class: yes` or `steps: 2.5` is a mistake, not 1 or a silent rounding.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class PoolConfig(Section):
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
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads of each model actor that runs on CPUs (no GPU in the cluster); null: "
        "the driver's cores (its OMP_NUM_THREADS where set) shared among max_size actors. Ray would give an actor "
        "one thread, one per logical CPU it holds")

    @model_validator(mode="after")
    def _ordered(self) -> "PoolConfig":
        if self.max_size < self.min_size:
            raise ValueError(f"max_size {self.max_size} is smaller than min_size {self.min_size}")
        return self


class PromptConfig(Section):
    one: str = Field(PROMPT_ONE, description="template for one class")
    two: str = Field(PROMPT_TWO, description="template for a pair")
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


class GeneratorConfig(Section):
    model: str = Field(TINY, min_length=1, description="'tiny' (random, built in code), or a diffusers model id, "
                       "a local folder or an s3:// prefix of a saved Stable Diffusion 1.x/2, SDXL, Stable Diffusion "
                       "3.5 or FLUX.1 pipeline (its model_index.json says which)")
    steps: int = Field(50, ge=1, le=1000, description="denoising steps")
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0, description="classifier-free guidance scale; FLUX.1: its "
                                  "distilled guidance, an input of one pass (FLUX.1-schnell ignores it)")
    height: int = Field(512, ge=16, le=2048, multiple_of=8, description="image height: a multiple of 8, of 16 for "
                        "SD 3.5 and FLUX.1 (SDXL, SD 3.5 and FLUX.1 were trained at 1024)")
    width: int = Field(512, ge=16, le=2048, multiple_of=8, description="image width (as height)")
    batch_size: int = Field(4, ge=1, le=256, description="prompts per generator call")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="'auto': float16 on CUDA for SD 1.x/2 and SDXL (whose VAE stays float32), bfloat16 for "
        "SD 3.5 and FLUX.1; float32 on CPU")
    scheduler: Literal["ddim", "dpm++", "lcm", "flow"] = Field(
        "ddim", description="sampler: 'ddim' (eta 0, the papers'), 'dpm++' (DPM-Solver++ 2M: about 25 steps for "
        "DDIM-50's images), 'lcm' (4-8 steps of a latent consistency model: generator.lora an LCM-LoRA, "
        "guidance_scale 1-2), 'flow' (the flow-matching Euler sampler SD 3.5 and FLUX.1 are saved with; theirs "
        "when left out)")
    # Left out of the recipe's dump while unset, so that datasets built before it keep their content key.
    lora: str | None = Field(None, min_length=1, exclude_if=lambda value: value is None,
                             description="LoRA weights fused into the U-Net at load (a diffusers .safetensors "
                             "file, local or s3://): an LCM-LoRA for scheduler lcm")


class FastConfig(Section):
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


class LabelerConfig(Section):
    # A registered labeler's name (``factory.pipeline.labelers``), which checks the rest of the section.
    model: str = Field(
        TINY, description="the labeler: tiny, maskrcnn_resnet50_fpn_v2 or maskrcnn_resnet50_fpn: COCO's classes, "
        "or maskrcnn_small, whose labels are the vocabulary's (the mini world's trained oracle), or open_vocabulary: every instance of each prompt "
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

    @field_validator("model")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in LABELERS:  # worded as pydantic words a Literal's error
            *others, last = (f"'{name}'" for name in LABELERS)
            raise PydanticCustomError("literal_error", "Input should be {expected}",
                                      {"expected": f"{', '.join(others)} or {last}" if others else last})
        return value

    @model_validator(mode="after")
    def _thresholds(self) -> "LabelerConfig":
        if self.ignore_threshold is not None and self.ignore_threshold >= self.score_threshold:
            raise ValueError(f"ignore_threshold {self.ignore_threshold} must be below "
                             f"score_threshold {self.score_threshold}")
        LABELERS[self.model].validate(self)
        return self

    @property
    def candidate_threshold(self) -> float:
        """The lowest score any labelling rule looks at: a detector keeps candidates down to it; label.py decides."""
        if self.ignore_threshold is None:  # 0.0 is a threshold, not 'unset'
            return self.score_threshold
        return min(self.score_threshold, self.ignore_threshold)


class AnnotatorConfig(Section):
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


class AgreementConfig(Section):
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


class CaptureConfig(Section):
    features: Literal["none", "latent", "tensors"] = Field(
        "none", description="U-Net features for grounding triplets: 'latent' stores the capture call's "
        "latent (features are one U-Net pass away, ~1000x smaller), 'tensors' the features themselves (fp16)")
    step: int = Field(5, ge=1, description="denoising steps remaining at capture (the paper's t; best: 5 of 50). "
                      "generator.scheduler dpm++ or lcm: the call nearest DDIM-50's noise level at this step")
    unconditional: bool = Field(False, description="tensors mode: also store the unconditional branch")
    attention: bool = Field(False, description="store DAAM cross-attention heat maps per class "
                            "(the baseline that Protocol-I evaluation compares the grounding module with)")


class SourceConfig(Section):
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
        "regenerate, capture (Li et al. 2023, supplementary C.3; 2 x steps U-Net calls); 'noised': one U-Net call on "
        "the VAE latent noised to the capture step (fast, as ODISE, Xu et al. 2023)")
    resize: Literal["squash", "crop", "pad"] = Field(
        "squash", description="how an image of another shape meets the generator's size: 'squash' (default) resizes "
        "it whole, stretching it; 'crop' keeps its centre at its own aspect ratio; 'pad' fits it whole and fills the "
        "rest with black (255, ignore, in its masks); each row records the original size")

    @property
    def enabled(self) -> bool:
        return self.images is not None


class QualityConfig(Section):
    model: str | None = Field(
        None, min_length=1, description="CLIP for an image-quality score per sample ('tiny', a local folder or s3:// "
        "prefix of a saved CLIPModel): P('Good photo.') against 'Bad photo.', to filter test sets")


class WriterConfig(Section):
    rows_per_file: int = Field(64, ge=1, le=100_000, description="samples per Parquet file")
    image_format: Literal["png", "jpeg"] = Field("png", description="encoding of the generated image")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality when image_format is jpeg")
    preview_samples: int = Field(16, ge=0, le=256, description="samples in preview.png (0: none)")

"""Every option of the grounding module: its sizes (Li et al., ICCV 2023, supplementary A), the text
its class embeddings are read from, its training and its Protocol-I evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from factory.core.options import check_template, fill_template
from factory.diffusion.daam import DAAM_THRESHOLD

# Channels per spatial resolution of the Stable Diffusion 1.5 U-Net features for a
# 64x64 latent (512x512 image): all blocks factory/features.py captures at one
# resolution, concatenated (measured by bench/storage.py). Training reads the actual
# channels from its dataset; these size the real preset before any data is seen.
REAL_SD15_CHANNELS = {8: 8960, 16: 8320, 32: 4800, 64: 2560}
# The same for SDXL's U-Net (Podell et al., 2023) at 1024x1024 (a 128x128 latent): three levels of
# 320/640/1280 channels, cross-attention at the last two, so no 16x16 level. Measured, not summed by
# hand: SDXL's U-Net config (factory.diffusion.pipelines.sdxl_unet) instantiated on the meta device
# and run once under FeatureCapture, as tests/grounding/test_grounding_model.py does again.
REAL_SDXL_CHANNELS = {32: 8320, 64: 4800, 128: 2560}


class GroundingModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    feature_channels: dict[int, int] = Field(description="U-Net channels per feature resolution")
    reduce_channels: dict[int, int] = Field(description="1x1-conv output width per feature resolution")
    fused_dim: int = Field(240, ge=1, description="D: channels of the fused map F and of mask embeddings")
    patch_size: int = Field(4, ge=1, description="p: F is cut into p x p patches to make visual tokens")
    embed_dim: int = Field(512, ge=1, description="d_e: width of the transformer decoder")
    text_dim: int = Field(768, ge=1, description="width of the frozen text encoder's class embeddings")
    decoder_layers: int = Field(3, ge=1)
    decoder_heads: int = Field(8, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="decoder dropout (Simoncini and Ankit train with 0.1)")
    fuse_resolution: int | None = Field(
        None, description="side of F; None = the largest feature resolution (the reference code's 64; "
        "the paper states 512)")
    mask_resolution: int = Field(512, ge=1, description="side of the output masks")
    presence: Literal["none", "query", "region", "match"] = Field(
        "none", description="a presence head, one logit per class, whether it is in the image (grounding.model): "
        "'query' reads the decoded class query, 'region' also what the class's mask covers, 'match' the cosine "
        "of that region with the class's text embedding; 'none': the papers' module, and checkpoints written "
        "before the head existed")

    @model_validator(mode="after")
    def _consistent(self) -> "GroundingModelConfig":
        if set(self.reduce_channels) != set(self.feature_channels):
            raise ValueError(f"reduce_channels resolutions {sorted(self.reduce_channels)} differ from "
                             f"feature_channels resolutions {sorted(self.feature_channels)}")
        if len(self.feature_channels) < 2:
            raise ValueError("the visual encoder fuses at least two feature resolutions")
        largest = max(self.feature_channels)
        if self.fuse_resolution is None:
            self.fuse_resolution = largest
        if self.fuse_resolution < largest:
            raise ValueError(f"fuse_resolution {self.fuse_resolution} is below the largest feature "
                             f"resolution {largest}")
        if self.fuse_resolution % self.patch_size:
            raise ValueError(f"fuse_resolution {self.fuse_resolution} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.embed_dim % self.decoder_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by decoder_heads {self.decoder_heads}")
        return self

    @classmethod
    def real(cls, **overrides: Any) -> "GroundingModelConfig":
        """Stable Diffusion 1.5 sizes: widths 16/32/64/128 add up to D=240, as in the reference code."""
        sizes = dict(feature_channels=REAL_SD15_CHANNELS,
                     reduce_channels={8: 16, 16: 32, 32: 64, 64: 128},
                     fused_dim=240, patch_size=4, embed_dim=512, text_dim=768,
                     decoder_layers=3, decoder_heads=8, dropout=0.1, mask_resolution=512)
        return cls(**{**sizes, **overrides})

    @classmethod
    def sdxl(cls, **overrides: Any) -> "GroundingModelConfig":
        """SDXL sizes: features at 32, 64 and 128 (1024x1024 images), its two text encoders side by side
        (768 + 1280 = 2048 wide). The reference's widths but one level fewer: 48/64/128 still add up to
        D=240 (the coarsest takes the 16 of SD 1.5's missing 8x8 level). A 4x4 patch of F covers 32x32
        image pixels as with SD 1.5, so there are 1024 visual tokens (SD 1.5: 256)."""
        sizes = dict(feature_channels=REAL_SDXL_CHANNELS,
                     reduce_channels={32: 48, 64: 64, 128: 128},
                     fused_dim=240, patch_size=4, embed_dim=512, text_dim=2048,
                     decoder_layers=3, decoder_heads=8, dropout=0.1, mask_resolution=1024)
        return cls(**{**sizes, **overrides})

    @classmethod
    def world(cls, **overrides: Any) -> "GroundingModelConfig":
        """The mini world's generator (world/generator.py): features at 4, 8 and 16 (a 16x16 latent),
        a 64-dim text encoder, 64x64 images; small enough to train on a CPU in minutes."""
        sizes = dict(feature_channels={4: 480, 8: 432, 16: 288},
                     reduce_channels={4: 16, 8: 16, 16: 32},
                     fused_dim=64, patch_size=2, embed_dim=64, text_dim=64,
                     decoder_layers=2, decoder_heads=4, dropout=0.1, mask_resolution=64)
        return cls(**{**sizes, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "GroundingModelConfig":
        """The tiny test U-Net (32x32 latent) and text encoder (32 dims); fast on CPU."""
        sizes = dict(feature_channels={16: 96, 32: 64},
                     reduce_channels={16: 8, 32: 8},
                     fused_dim=16, patch_size=4, embed_dim=32, text_dim=32,
                     decoder_layers=1, decoder_heads=4, dropout=0.1, mask_resolution=32)
        return cls(**{**sizes, **overrides})


class TextConfig(BaseModel):
    """The text whose class-word tokens give the class embeddings.

    Simoncini and Ankit (Table 3) found "{x} and {y}" the best text-encoder input of the grounding module,
    while the images were generated with "a photograph of a {x} and a {y}".
    """
    model_config = ConfigDict(extra="forbid")

    source: Literal["template", "prompt"] = Field(
        "template", description="'prompt': the generation prompt; 'template': one/two filled with the class words")
    one: str = Field("{0}", description="template for one class")
    two: str = Field("{0} and {1}", description="template for two classes")

    @model_validator(mode="after")
    def _placeholders(self) -> "TextConfig":
        check_template("one", self.one, 1)
        check_template("two", self.two, 2)
        return self

    def render(self, prompt: str, class_words: Sequence[str]) -> str:
        if self.source == "prompt":
            return prompt
        return fill_template(self.one, self.two, class_words)


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: Literal["tiny", "world", "real", "sdxl"] = Field(
        "tiny", description="module sizes: 'tiny' (tests, CPU), 'world' (the mini world's generator, CPU), "
        "'real' (the paper's on Stable Diffusion 1.5: D=240, d_e=512, 3 decoder layers) or 'sdxl' (the same on "
        "SDXL's three feature resolutions); feature channels, text width and mask size come from the dataset")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="decoder dropout; null: the preset's (0.1)")
    presence: Literal["none", "query", "region", "match"] = Field(
        "region", description="a presence head (grounding.model), trained on every named seen class, found or not, "
        "so that a class the image lacks gets no mask: 'region' reads the class query and what its mask covers, "
        "'match' that region's cosine with the class's text embedding, 'query' the query alone; 'none': the "
        "papers' module")
    text: TextConfig = TextConfig()


class GroundingTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="triplet dataset: local folder or s3:// prefix")
    mix: list[str] | None = Field(None, description="more triplet datasets trained on whole with data, made "
                                  "alike (e.g. real images' triplets: the papers' sim+real); validation stays data's")
    val: str | None = Field(None, description="validation triplet dataset; null: hold out val_fraction of data")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of data held out for validation "
                                "(by sample_id hash) when val is null")
    out: str = Field(description="checkpoint folder: local or s3://; a rerun resumes from it")
    model: ModelSection = ModelSection()
    loss: Literal["bce", "bce+logcosh_dice"] = Field("bce+logcosh_dice", description="BCE (Li et al. "
                                                     "2023) or BCE + log-cosh Dice (Simoncini and Ankit)")
    ignore_empty: bool = Field(True, description="classes with an empty oracle mask do not count in the mask loss "
                               "(Li et al. 2023, Table 3); the presence loss counts them, as absent")
    presence_weight: float = Field(1.0, ge=0.0, description="weight of the presence loss beside the mask loss")
    negatives: float = Field(1.0, ge=0.0, le=1.0, description="share of training samples also asked about one "
                             "trained class they do not name (prompt and text name it; an empty target, presence "
                             "0): the hard negatives of an annotated image's class list")
    confusable: int = Field(0, ge=0, description="draw each hard negative from the k trained classes whose text "
                            "embeddings are nearest a class the sample names (those a text most easily confuses); "
                            "0: from all trained classes. In the mini world 4, with the cosine schedule, found fewer present "
                            "unseen classes than that schedule alone (docs/label-truth.md, three seeds each)")
    classes: Literal["seen", "all"] | list[str] = Field(
        "seen", description="classes trained on: 'seen' of the split, 'all', or a list of names; samples "
        "naming any other class are left out, so unseen classes are never shown")
    split: int | None = Field(None, description="seen/unseen split; null: the dataset recipe's split")
    epochs: int = Field(10, ge=1, description="epochs in all (a resumed run continues up to this)")
    batch_size: int = Field(8, ge=1, description="samples per step over all workers")
    lr: float = Field(1e-4, gt=0.0, description="Adam learning rate")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate: constant (Li et al. "
                                                   "2023) or a cosine from lr to 0 over the epochs")
    weight_decay: float = Field(1e-4, ge=0.0, description="Adam weight decay")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    use_gpu: Literal["auto"] | bool = Field("auto", description="'auto': a GPU per worker if the cluster has GPUs")
    seed: int = Field(0, ge=0, description="module initialisation and sample order")

    @field_validator("classes", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("seen", "all"):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("mix", mode="before")
    @classmethod
    def _comma_uris(cls, value: Any) -> Any:
        return [uri.strip() for uri in value.split(",") if uri.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _divisible(self) -> "GroundingTrainConfig":
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}")
        return self


# Changing these makes a different experiment: such an output is not resumed.
RUN_IDENTITY = ("data", "mix", "val", "val_fraction", "model", "classes", "split", "ignore_empty")


def grounding_model_config(section: ModelSection, feature_channels: dict[int, int], text_dim: int,
                           image_size: int) -> GroundingModelConfig:
    """The preset's sizes on this dataset: its feature resolutions (the preset's reduce widths,
    coarsest first), its text encoder's width, and masks at the image size (as the paper)."""
    preset = getattr(GroundingModelConfig, section.preset)()
    widths = [preset.reduce_channels[r] for r in sorted(preset.reduce_channels)]
    if len(widths) != len(feature_channels):
        raise ValueError(f"preset {section.preset} fuses {len(widths)} feature resolutions, the dataset "
                         f"has {sorted(feature_channels)}")
    sizes = dict(feature_channels=feature_channels, reduce_channels=dict(zip(sorted(feature_channels), widths)),
                 text_dim=text_dim, mask_resolution=image_size, fuse_resolution=None)
    if section.dropout is not None:
        sizes["dropout"] = section.dropout
    sizes["presence"] = section.presence
    return GroundingModelConfig(**{**preset.model_dump(), **sizes})


class GroundingEvalOptions(BaseModel):
    """The options of a Protocol-I evaluation (``jobs/eval_grounding.py``)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    checkpoints: dict[int, str] = Field(
        min_length=1, strict=False, description="one grounding checkpoint folder (local or s3://) per seen/unseen "
        "split, trained on that split's seen classes, as a YAML mapping: '{1: URI, 2: URI, 3: URI}'; each split "
        "is scored with its own module, and the paper's Average needs all three")
    data: str = Field(description="triplet test set (local or s3://)")
    out: str | None = Field(None, description="results JSON file, local or s3:// (null: print only)")
    daam_threshold: float = Field(DAAM_THRESHOLD, ge=0.0, le=1.0,
                                  description="DAAM heat-map threshold (Tang et al.'s; heat maps are normalised)")
    presence_threshold: float = Field(0.5, ge=0.0, le=1.0, description="in the presence-gated rows (and the text "
                                      "control), a module with a presence head gives a class scoring below this no "
                                      "mask, as the annotator (its presence_threshold); the plain rows ask for a mask "
                                      "of every class, as the papers' protocol")
    text_control: bool = Field(True, description="also score the text-blind control: every class asked for under "
                               "another class's name (a fixed derangement), its masks scored as the true class")
    batch_size: int = Field(8, ge=1, description="rows per module call")
    num_workers: int | None = Field(None, ge=1, description="actors (null: one per GPU in the cluster, else 1)")
    min_score: float | None = Field(None, ge=0.0, le=1.0, description="automatic test-set filter, detector "
                                    "agreement: keep samples whose every class the oracle found with this score")
    keep_quality: float | None = Field(None, gt=0.0, le=1.0, description="automatic test-set filter, image "
                                       "quality: keep this best fraction by the CLIP quality score (the follow-up "
                                       "paper keeps 0.8; needs a build with quality.model)")

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _per_split(cls, value):
        if isinstance(value, str):  # one checkpoint for every split: what the paper does not do
            # pydantic turns a ValueError (not a TypeError) into the option's one-line error
            raise ValueError(f"one checkpoint per split, as a mapping: '{{1: URI, 2: URI, 3: URI}}' "  # noqa: TRY004
                             f"(got {value!r})")
        return value

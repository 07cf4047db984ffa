"""Sizes of the grounding module (Li et al., ICCV 2023, supplementary A)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Channels per spatial resolution of the Stable Diffusion 1.5 U-Net features for a
# 64x64 latent (512x512 image): all blocks factory/features.py captures at one
# resolution, concatenated (measured by bench/storage.py). Training reads the actual
# channels from its dataset; these size the real preset before any data is seen.
REAL_SD15_CHANNELS = {8: 8960, 16: 8320, 32: 4800, 64: 2560}


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

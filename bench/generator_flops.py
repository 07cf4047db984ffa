"""TFLOP of each generator the factory runs, counted from the published configs: the table of
docs/generators.md and the constants of factory/pipeline/cost.py.

Every model of a generator (the denoiser, a U-Net or a diffusion transformer; the VAE decoder; the
text encoders) is built from its published config on the meta device (shapes only: no memory, no
weights, no download), and one forward pass at batch 1 is counted by
torch.utils.flop_counter.FlopCounterMode, attention included (bench/gpu.py's counter).

A forward pass's FLOPs are a polynomial of degree 2 in the image's pixel count: convolutions and
linear layers grow with the pixels (the image tokens), self-attention with their square, and the
text tokens are fixed. Three counts (at half, once and twice the native side) give its three
coefficients exactly; a fourth, at 3/4 of the side, checks them ("fit" column: the largest
relative error). factory/pipeline/cost.py holds the coefficients and evaluates them at a recipe's
size.

Configs: SD 1.5's U-Net is factory.diffusion.pipelines.sd15_unet(). The others are written below
from the models' published config.json files as remembered (no download here), checked against the
installed diffusers' and transformers' signatures and against the published parameter counts the
table prints (SDXL's U-Net 2.6B, SD 3.5 Large 8.1B, SD 3.5 Medium 2.5B, FLUX.1 12B).

    python -m bench.generator_flops     # the table, then cost.py's constants (under a minute on a CPU)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from bench.gpu import count_tflop
from factory.diffusion.families import FLUX, SD, SD3, SDXL, Family
from factory.diffusion.pipelines import sd15_unet, sdxl_unet
from factory.pipeline.cost import CountedGenerator, Flops

META = torch.device("meta")
CLIP_TOKENS = 77


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device=META)


# ------------------------------------------------------------------ text encoders

def clip_l() -> CLIPTextModel:
    """CLIP ViT-L/14's text tower (every family)."""
    return CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, projection_dim=768))


def clip_big_g() -> CLIPTextModelWithProjection:
    """OpenCLIP ViT-bigG/14's text tower (SDXL's and SD 3.5's second encoder)."""
    return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                      num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))


def t5_xxl() -> T5EncoderModel:
    """T5 v1.1 XXL's encoder (google/t5-v1_1-xxl: SD 3.5's third encoder, FLUX.1's second)."""
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu"))


# ------------------------------------------------------------------ VAEs

def vae(latent_channels: int) -> AutoencoderKL:
    """The KL autoencoder of every family (128/256/512/512): 4 latent channels for SD and SDXL, 16 for SD 3.5
    and FLUX.1 (which drop the quantisation convolutions)."""
    wide = latent_channels == 16
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=latent_channels, use_quant_conv=not wide,
                         use_post_quant_conv=not wide)


# ------------------------------------------------------------------ denoisers and their inputs

def sd35_large() -> SD3Transformer2DModel:
    """stabilityai/stable-diffusion-3.5-large's transformer/config.json (38 MMDiT layers of 38 heads x 64)."""
    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                                 attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                 caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                                 qk_norm="rms_norm")


def sd35_medium() -> SD3Transformer2DModel:
    """stabilityai/stable-diffusion-3.5-medium's transformer/config.json (MMDiT-X: 24 layers of 24 heads x 64,
    a second self-attention in the first 13)."""
    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                 attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                 caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                                 dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def flux(guidance_embeds: bool) -> Callable[[], FluxTransformer2DModel]:
    """black-forest-labs/FLUX.1-dev's transformer/config.json (19 double-stream and 38 single-stream blocks of
    24 heads x 128); FLUX.1-schnell's is the same without the guidance embedding."""
    return lambda: FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                          attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                          pooled_projection_dim=768, guidance_embeds=guidance_embeds,
                                          axes_dims_rope=(16, 56, 56))


def unet_inputs(text_width: int, sdxl: bool) -> Callable[[int, int], dict]:
    def inputs(height: int, width: int) -> dict:
        extra = {"added_cond_kwargs": {"text_embeds": _meta(1, 1280), "time_ids": _meta(1, 6)}} if sdxl else {}
        return {"sample": _meta(1, 4, height // 8, width // 8), "timestep": _meta(1),
                "encoder_hidden_states": _meta(1, CLIP_TOKENS, text_width), **extra}
    return inputs


def sd3_inputs(height: int, width: int) -> dict:
    """The CLIP states (77 tokens, padded to 4096 wide) and the T5's (the pipeline's 256 tokens), joined."""
    return {"hidden_states": _meta(1, 16, height // 8, width // 8), "timestep": _meta(1),
            "encoder_hidden_states": _meta(1, CLIP_TOKENS + 256, 4096), "pooled_projections": _meta(1, 2048)}


def flux_inputs(guidance_embeds: bool) -> Callable[[int, int], dict]:
    """Latents packed 2x2 into 64-channel tokens, the T5's 512 tokens (the pipeline's default)."""
    def inputs(height: int, width: int) -> dict:
        tokens = (height // 16) * (width // 16)
        return {"hidden_states": _meta(1, tokens, 64), "encoder_hidden_states": _meta(1, 512, 4096),
                "pooled_projections": _meta(1, 768), "timestep": _meta(1), "img_ids": _meta(tokens, 3),
                "txt_ids": _meta(512, 3), **({"guidance": _meta(1)} if guidance_embeds else {})}
    return inputs


# ------------------------------------------------------------------ the generators

@dataclass(frozen=True)
class Generator:
    name: str
    family: Family
    steps: int  # its recipe's (or its model card's, where no recipe uses it)
    guidance: float
    denoiser: Callable[[], torch.nn.Module]
    inputs: Callable[[int, int], dict]  # (height, width) -> the denoiser's keyword arguments
    latent_channels: int
    text: tuple[tuple[Callable[[], torch.nn.Module], int], ...]  # (encoder, tokens: its pipeline's)


GENERATORS = (
    Generator("SD 1.5", SD, 50, 7.5, sd15_unet, unet_inputs(768, sdxl=False), 4, ((clip_l, CLIP_TOKENS),)),
    Generator("SDXL base 1.0", SDXL, 25, 5.0, sdxl_unet, unet_inputs(2048, sdxl=True), 4,
              ((clip_l, CLIP_TOKENS), (clip_big_g, CLIP_TOKENS))),
    Generator("SD 3.5 Large", SD3, 28, 3.5, sd35_large, sd3_inputs, 16,
              ((clip_l, CLIP_TOKENS), (clip_big_g, CLIP_TOKENS), (t5_xxl, 256))),
    Generator("SD 3.5 Medium", SD3, 40, 4.5, sd35_medium, sd3_inputs, 16,
              ((clip_l, CLIP_TOKENS), (clip_big_g, CLIP_TOKENS), (t5_xxl, 256))),
    Generator("FLUX.1-dev", FLUX, 28, 3.5, flux(True), flux_inputs(True), 16, ((clip_l, CLIP_TOKENS), (t5_xxl, 512))),
    Generator("FLUX.1-schnell", FLUX, 4, 0.0, flux(False), flux_inputs(False), 16,
              ((clip_l, CLIP_TOKENS), (t5_xxl, 512))),
)


def build(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with META:
        return make().eval()


def weights(module: torch.nn.Module) -> int:
    """Values a checkpoint of ``module`` holds: its parameters (tied ones once) and saved buffers (SD 3.5's
    position table: 0.09B of Large's, 0.23B of Medium's published size)."""
    saved = module.state_dict().keys()
    return (sum(p.numel() for p in module.parameters())
            + sum(b.numel() for name, b in module.named_buffers() if name in saved))


def polynomial(count: Callable[[int], float], side: int) -> tuple[Flops, float]:
    """TFLOP of a square image as Flops(constant, per megapixel, per megapixel squared), from counts at side/2,
    side and 2 x side; and the fit's relative error at 3/4 of the side."""
    sides = (side // 2, side, 2 * side)
    megapixels = [s * s / 1e6 for s in sides]
    flops = Flops(*(float(c) for c in np.linalg.solve(np.vander(megapixels, 3, increasing=True),
                                                       [count(s) for s in sides])))
    check = 3 * side // 4
    return flops, abs(flops.at(check, check) / count(check) - 1)


@dataclass
class Row:
    generator: Generator
    counted: CountedGenerator  # the cost model's form: its passes and TFLOP per image are the estimate's
    fit: float
    denoiser_weights: int
    all_weights: int

    @property
    def side(self) -> int:
        return self.generator.family.size

    @property
    def per_image(self) -> float:
        g = self.generator
        return self.counted.tflop_per_image(g.steps, g.guidance, self.side, self.side)


def count(generator: Generator) -> Row:
    denoiser = build(generator.denoiser)
    decoder = build(lambda: vae(generator.latent_channels))
    encoders = [(build(make), tokens) for make, tokens in generator.text]

    def denoise(side: int) -> float:
        return count_tflop(lambda: denoiser(**generator.inputs(side, side)))

    def decode(side: int) -> float:
        return count_tflop(lambda: decoder.decode(_meta(1, generator.latent_channels, side // 8, side // 8)))

    side = generator.family.size
    denoiser_flops, denoiser_error = polynomial(denoise, side)
    vae_flops, vae_error = polynomial(decode, side)
    text = sum(count_tflop(lambda: encoder(input_ids=torch.zeros(1, tokens, dtype=torch.long, device=META)))
               for encoder, tokens in encoders)
    counted = CountedGenerator(generator.name, generator.family, (), denoiser_flops, vae_flops, text)
    return Row(generator, counted, max(denoiser_error, vae_error), weights(denoiser),
               weights(denoiser) + weights(decoder) + sum(weights(e) for e, _ in encoders))


def table(rows: list[Row]) -> str:
    sd15 = next((row.per_image for row in rows if row.generator.family is SD), None)
    lines = ["| generator | side | denoiser weights | all weights | TFLOP per evaluation | evaluations per step "
             "| steps | VAE decode TFLOP | text encoders TFLOP per prompt | TFLOP per image | vs SD 1.5 | fit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        g, c, side = row.generator, row.counted, row.side
        versus = f"{row.per_image / sd15:.1f}x" if sd15 else "-"
        lines.append(f"| {g.name} | {side} | {row.denoiser_weights / 1e9:.2f}B | {row.all_weights / 1e9:.2f}B "
                     f"| {c.denoiser.at(side, side):.3f} | {c.passes(g.guidance)} | {g.steps} "
                     f"| {c.vae.at(side, side):.2f} | {c.text:.3f} | {row.per_image:,.1f} | {versus} | {row.fit:.0e} |")
    return "\n".join(lines)


def constants(rows: list[Row]) -> str:
    """The counts as factory/pipeline/cost.py writes them."""
    def flops(f: Flops) -> str:  # rounded to a MFLOP, + 0.0: no -0
        return "Flops(" + ", ".join(f"{round(x, 6) + 0.0:.5g}" for x in (f.constant, f.linear, f.quadratic)) + ")"
    return "\n".join(f"{row.generator.name}: denoiser={flops(row.counted.denoiser)}, vae={flops(row.counted.vae)}, "
                     f"text={row.counted.text:.5g}" for row in rows)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generators", default=",".join(g.name for g in GENERATORS),
                        help="comma-separated names of the generators to count (default: all)")
    names = parser.parse_args(argv).generators.split(",")
    unknown = set(names) - {g.name for g in GENERATORS}
    if unknown:
        parser.error(f"unknown generator {', '.join(sorted(unknown))}")
    rows = [count(g) for g in GENERATORS if g.name in names]
    print(f"TFLOP at each generator's native side, batch 1, at the steps and guidance of its recipe or model "
          f"card (torch {torch.__version__}):\n")
    print(table(rows))
    print("\nTFLOP = constant + a x megapixels + b x megapixels^2 (factory/pipeline/cost.py):\n")
    print(constants(rows))
    return rows


if __name__ == "__main__":
    main()

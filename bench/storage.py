"""Bytes per grounding-triplet sample for real Stable Diffusion 1.5 feature shapes.

Builds the SD 1.5 U-Net from its config (random weights: the shapes, not the values,
decide the size; float16 random-ish activations compress about like real ones), runs
the capture call once at 512x512 (64x64 latent), and stores one sample three ways:

- fp32 arrays, conditional + unconditional branches (how the public follow-up code
  stored features, as pickles: the array bytes are what a pickle holds);
- ours, `capture.features: tensors`: conditional branch, float16, zstd Parquet column;
- ours, `capture.features: latent`: the capture call's latent (features are one U-Net
  pass away, see factory/features.py).

    python bench/storage.py            # real SD 1.5 shapes (about 30 s and 6 GB on a CPU)
    python bench/storage.py --tiny     # the tiny U-Net, seconds (what the smoke test runs)
"""

from __future__ import annotations

import argparse
import io

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import UNet2DConditionModel

from factory.features import FeatureCapture, feature_channels, to_fp16_bytes
from factory.generate import tiny_pipeline

REFERENCE_MB = 54.0  # per sample, the public follow-up implementation (spec section 5)


def sd15_unet() -> UNet2DConditionModel:
    # diffusers' defaults are SD 1.x's U-Net except the text width (768 for CLIP ViT-L/14)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def parquet_bytes(columns: dict[str, bytes]) -> int:
    table = pa.table({name: pa.array([data], pa.binary()) for name, data in columns.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.tell()


def measure(unet: torch.nn.Module, latent_size: int, text_dim: int) -> dict[str, float]:
    torch.manual_seed(0)
    latent = torch.randn(2, 4, latent_size, latent_size)  # [unconditional; conditional], as in a guided call
    text = torch.randn(2, 77, text_dim)
    with torch.inference_mode(), FeatureCapture(unet, call=0, batch=1, keep_unconditional=True) as capture:
        unet(latent, 801, encoder_hidden_states=text)
    conditional, unconditional = capture.features, capture.unconditional
    fp32_both = sum(t.numel() * 4 for t in (*conditional.values(), *unconditional.values()))
    tensors = parquet_bytes({f"features_{r}": to_fp16_bytes(t[0]) for r, t in conditional.items()})
    latent_only = parquet_bytes({"latent": to_fp16_bytes(capture.latent[0])})
    return {"channels": feature_channels(conditional), "fp32_both_MB": fp32_both / 1e6,
            "tensors_fp16_zstd_MB": tensors / 1e6, "latent_fp16_zstd_MB": latent_only / 1e6}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny U-Net instead of SD 1.5's")
    args = parser.parse_args(argv)
    if args.tiny:
        result = measure(tiny_pipeline().unet, 32, 32)
    else:
        result = measure(sd15_unet().eval(), 64, 768)
    print(f"feature channels per resolution: {result['channels']}")
    print(f"{'storage':<44}{'MB/sample':>10}{'vs fp32 c+u':>13}{'vs 54 MB':>10}")
    base = result["fp32_both_MB"]
    for label, key in (("fp32 arrays, cond + uncond (reference style)", "fp32_both_MB"),
                       ("ours: tensors, cond, fp16 + zstd", "tensors_fp16_zstd_MB"),
                       ("ours: latent, fp16 + zstd", "latent_fp16_zstd_MB")):
        mb = result[key]
        print(f"{label:<44}{mb:>10.3f}{base / mb:>12.1f}x{REFERENCE_MB / mb:>9.1f}x")
    return result


if __name__ == "__main__":
    main()

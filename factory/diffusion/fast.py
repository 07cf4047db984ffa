"""The generator's fast paths (recipe section ``fast``), applied to a loaded pipeline.

Each changes how the denoiser (U-Net or diffusion transformer) and VAE compute, not what:
attention kernels, memory layout and compilation reorder floating-point work, so images move by
rounding only (tests/diffusion/test_fast.py and test_families.py bound each against the reference
path). Feature capture works on every path: its hooks are installed before compiling, so the
compiled U-Net records them in-graph.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from factory.diffusion.features import block_recorder
from factory.diffusion.pipelines import family_of

COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")


def apply_fast_paths(pipe: DiffusionPipeline, *, attention: str = "sdpa", channels_last: bool = False,
                     compile: str = "off", backend: str = "inductor") -> DiffusionPipeline:
    """``pipe`` with its denoiser (U-Net or transformer) and VAE set up as asked; ``compile`` replaces the
    denoiser by its compiled wrapper (``backend``: "inductor" for speed; tests use "aot_eager", which
    traces the same graph without generating code)."""
    family = family_of(pipe)
    # 1. Attention: PyTorch's fused kernel (flash / memory-efficient on a GPU), or plain matmuls. The
    #    transformers' own joint-attention processors already call the fused kernel.
    processor = {"sdpa": AttnProcessor2_0, "math": AttnProcessor}[attention]
    if family.denoiser == "unet":
        pipe.unet.set_attn_processor(processor())
    elif attention != "sdpa":
        raise ValueError(f"fast.attention {attention} is for U-Nets; {family.title} runs its own attention")
    pipe.vae.set_attn_processor(processor())
    # 2. Memory layout: NHWC convolutions run on tensor cores without transposes (a transformer has none to speak of).
    if channels_last:
        if family.denoiser == "unet":
            pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    # 3. One graph of the U-Net, shapes fixed (dynamic=False: a new batch size compiles anew, so
    #    fast.static_batch keeps one). fullgraph: a graph break is an error, not a silent eager fallback.
    if compile != "off":
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile!r}; choose off or {', '.join(COMPILE_MODES)}")
        options = {"mode": compile} if backend == "inductor" else {}
        if family.denoiser == "unet":
            block_recorder(pipe.unet)  # capture hooks first: a compiled graph only sees hooks present at its tracing
        setattr(pipe, family.denoiser, torch.compile(getattr(pipe, family.denoiser), fullgraph=True, dynamic=False,
                                                     backend=backend, **options))
    return pipe

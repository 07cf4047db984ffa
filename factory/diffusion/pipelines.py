"""Stable Diffusion pipelines: loading, the tiny miniature, and one generation call.

Two ways to get a pipeline, one code path after that:
- ``tiny_pipeline()``: a randomly initialised miniature (U-Net, VAE, CLIP text
  encoder, BPE tokenizer) built from config in code; the default, and what tests use.
- ``load_pipeline(source)``: a saved diffusers pipeline by model id, local folder or
  ``s3://`` prefix (e.g. Stable Diffusion 1.5), read from safetensors only.
Both get a DDIM scheduler (eta 0), as in the papers, or a few-step sampler (``make_scheduler``).
A generation is two calls, ``denoise`` then ``decode``, so that a model actor can decode one batch
while the next denoises; ``generate`` is both.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from factory.core.conventions import TINY
from factory.core.storage import local_copy
from factory.core.vocab import COCO, VOC


def sd_scheduler(config=None) -> DDIMScheduler:
    # Stable Diffusion 1.x's noise schedule; DDIM with eta=0 is deterministic given the seed.
    if config is not None:
        return DDIMScheduler.from_config(config)
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def make_scheduler(name: str, config=None):
    """The sampler ``generator.scheduler`` names, on SD 1.x's noise schedule (or ``config``'s):
    DDIM (eta 0), DPM-Solver++ 2M, or LCM (for a latent consistency model or an LCM-LoRA)."""
    ddim = sd_scheduler(config)
    if name == "ddim":
        return ddim
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(ddim.config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "lcm":
        return LCMScheduler.from_config(ddim.config)
    raise ValueError(f"unknown scheduler {name!r}; choose ddim, dpm++ or lcm")


PROMPT_WORDS = frozenset({"a", "photograph", "of", "and"})  # the recipes' default templates


def tiny_tokenizer() -> CLIPTokenizer:
    """The tiny generator's tokenizer: the template words and every VOC and COCO class word."""
    words = set(PROMPT_WORDS)
    for info in VOC.classes + COCO.classes:
        words.update(info.natural.split())
    return bpe_tokenizer(words)


def bpe_tokenizer(words: set[str], max_length: int = 77) -> CLIPTokenizer:
    """A byte-level BPE tokenizer whose merges spell out `words`.

    Every byte is a token, so any text encodes; each of `words` is a single token, like
    most words are in CLIP's real vocabulary. Prompts are padded to `max_length` tokens.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"{c}</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    # BPE applies merges by rank, not left to right, so per-word merge chains collide
    # ("photograph" came out in 7 pieces): learn the merges as BPE training does instead,
    # most frequent pair first, until every word is one symbol.
    segments = [list(word[:-1]) + [word[-1] + "</w>"] for word in sorted(words)]
    merges = []
    while pairs := Counter(pair for parts in segments for pair in zip(parts, parts[1:])):
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for parts in segments:
            i = 0
            while i < len(parts) - 1:
                if (parts[i], parts[i + 1]) == best:
                    parts[i:i + 2] = [parts[i] + parts[i + 1]]
                i += 1
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random miniature of SD 1.x with the same structure (64x64 images, 32x32 latents).

    Its weights come from `seed` alone; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _tiny_pipeline()


def _tiny_pipeline() -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=64)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sd15_unet() -> UNet2DConditionModel:
    """Stable Diffusion 1.5's U-Net from its config, random weights: for sizes and cost, not images."""
    # diffusers' defaults are SD 1.x's U-Net (320/640/1280/1280) except the text width (768: CLIP ViT-L/14)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def load_pipeline(source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  scheduler: str = "ddim", lora: str | None = None) -> StableDiffusionPipeline:
    """The tiny pipeline, or a saved one by model id, local folder or s3:// prefix; with ``lora``
    (a diffusers LoRA .safetensors file, local or s3://) fused into its U-Net."""
    if source == TINY:
        pipe = tiny_pipeline()
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            local_copy(source), dtype=dtype, use_safetensors=True,
            safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler(scheduler, None if source == TINY else pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(local_copy(lora))
        pipe.fuse_lora()  # into the weights: no LoRA layers left to slow each call (or break a compiled graph)
        pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()  # not inference_mode: its tensors could not enter the trained module's autograd graph
def encode_texts(pipe: StableDiffusionPipeline, texts: list[str]) -> torch.Tensor:
    """Last hidden state of the text encoder, tokenized as the generator does (padded to 77)."""
    embeddings, _ = pipe.encode_prompt(texts, pipe.text_encoder.device, 1, do_classifier_free_guidance=False)
    return embeddings


@torch.inference_mode()
def generate(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int] | None, *, steps: int,
             guidance_scale: float, height: int, width: int, latents: torch.Tensor | None = None) -> np.ndarray:
    """uint8 images (N, H, W, 3): ``denoise`` then ``decode``."""
    return decode(pipe, denoise(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale, height=height,
                                width=width, latents=latents))


@torch.inference_mode()
def denoise(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int] | None, *, steps: int,
            guidance_scale: float, height: int, width: int, latents: torch.Tensor | None = None) -> torch.Tensor:
    """The denoised latents (N, 4, H/8, W/8). Sample i's noise comes from seeds[i] alone, on the
    CPU, so an image depends on its own seed and prompt, not on its batch or device; or the
    denoising starts from ``latents`` (an inversion's) and seeds are None. With guidance, each
    step is one U-Net call on [unconditional; conditional]."""
    if (seeds is None) == (latents is None):
        raise ValueError("generate from seeds or from latents, one of them")
    generators = None if seeds is None else [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    return pipe(prompt=list(prompts), generator=generators, latents=latents, num_inference_steps=steps,
                guidance_scale=guidance_scale, eta=0.0, height=height, width=width, output_type="latent").images


@torch.inference_mode()
def decode(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> np.ndarray:
    """uint8 images (N, H, W, 3) of denoised latents: the VAE decoder, as the pipeline's own output."""
    latents = latents.to(pipe.vae.device, pipe.vae.dtype)
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(images, output_type="np")
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)

"""Generator pipelines of every family: loading, one generation call, and the text conditioning
the U-Net is called with.

Two ways to get a pipeline, one code path after that:
- ``tiny``: a randomly initialised Stable Diffusion miniature built in code (``factory.diffusion.tiny``);
  the default, and what tests use.
- a saved diffusers pipeline by model id, local folder or ``s3://`` prefix, read from safetensors
  only: Stable Diffusion 1.x/2, SDXL, Stable Diffusion 3.5 or FLUX.1, its family read from its
  ``model_index.json`` (``factory.diffusion.families``).
U-Net families get DDIM (eta 0), as in the papers, or a few-step sampler; the flow-matching
families their own Euler sampler (``make_scheduler``). A generation is two calls, ``denoise``
then ``decode``, so that a model actor can decode one batch while the next denoises;
``generate`` is both.
"""

from __future__ import annotations

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from factory.core.conventions import TINY
from factory.core.devices import pick_dtype
from factory.core.storage import local_copy
from factory.diffusion.families import FAMILIES, FLUX, SD, SD3, SDXL, Family, read_generator
from factory.diffusion.schedulers import make_scheduler
from factory.diffusion.tiny import tiny_pipeline


def family_of(pipe: DiffusionPipeline) -> Family:
    return FAMILIES[type(pipe).__name__]


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The network each denoising step calls: the U-Net, or the diffusion transformer."""
    return getattr(pipe, family_of(pipe).denoiser)


def sd15_unet() -> UNet2DConditionModel:
    """Stable Diffusion 1.5's U-Net from its config, random weights: for sizes and cost, not images."""
    # diffusers' defaults are SD 1.x's U-Net (320/640/1280/1280) except the text width (768: CLIP ViT-L/14)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def sdxl_unet() -> UNet2DConditionModel:
    """SDXL base 1.0's U-Net from its config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json),
    random weights: for sizes and cost, not images. Build it under ``torch.device("meta")``: 2.6 B parameters."""
    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)  # pooled text (1280) + six size ids of 256


def load_pipeline(source: str, device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32,
                  scheduler: str = "ddim", lora: str | None = None) -> DiffusionPipeline:
    """The tiny pipeline, or a saved one of any family by model id, local folder or s3:// prefix; with
    ``lora`` (a diffusers LoRA .safetensors file, local or s3://) fused into its denoiser. ``dtype``: a torch
    dtype, or a recipe's name for one ("auto": the family's on a GPU, ``pick_dtype``)."""
    # 1. The pipeline of the family its model_index.json names.
    family = read_generator(source).family
    if isinstance(dtype, str):
        dtype = pick_dtype(dtype, torch.device(device), family.gpu_dtype)
    if source == TINY:
        pipe = tiny_pipeline().to(dtype=dtype)
    else:
        extra = {"safety_checker": None, "requires_safety_checker": False} if family is SD else {}
        pipe = getattr(diffusers, family.pipeline).from_pretrained(local_copy(source), dtype=dtype,
                                                                   use_safetensors=True, **extra)
    # 2. SDXL's VAE overflows in float16 (its config says force_upcast): it stays in float32, as SDXL's pipeline
    #    upcasts it to decode.
    if family is SDXL and dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    # 3. The sampler, on the saved noise schedule.
    pipe.scheduler = make_scheduler(scheduler, None if source == TINY else pipe.scheduler.config)
    # 4. LoRA weights fused in: no LoRA layers left to slow each call (or break a compiled graph).
    if lora is not None:
        pipe.load_lora_weights(local_copy(lora))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()  # not inference_mode: its tensors could not enter the trained module's autograd graph
def encode_texts(pipe: DiffusionPipeline, texts: list[str]) -> torch.Tensor:
    """(N, 77, D) text-encoder states, tokenized as the generator does (padded to 77): SD's last hidden
    state; SDXL's two encoders' penultimate states side by side (D = 768 + 1280 at real sizes)."""
    # by keyword: SDXL's second positional parameter is its second prompt
    return pipe.encode_prompt(texts, device=pipe.text_encoder.device, num_images_per_prompt=1,
                              do_classifier_free_guidance=False)[0]


@torch.no_grad()
def unet_conditioning(pipe: DiffusionPipeline, texts: list[str], height: int, width: int) -> dict:
    """The keyword arguments a direct U-Net call needs for ``texts`` (the pipeline makes them itself when it
    generates): ``encoder_hidden_states``, and for SDXL ``added_cond_kwargs``, the second encoder's pooled
    text embedding and the size ids (original size, crop (0, 0), target size: the image's own)."""
    if family_of(pipe) is SD:
        return {"encoder_hidden_states": encode_texts(pipe, texts)}
    device = pipe.text_encoder.device
    hidden, _, pooled, _ = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    size_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=hidden.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return {"encoder_hidden_states": hidden,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": size_ids.to(device).repeat(len(texts), 1)}}


@torch.inference_mode()
def generate(pipe: DiffusionPipeline, prompts: list[str], seeds: list[int] | None, *, steps: int,
             guidance_scale: float, height: int, width: int, latents: torch.Tensor | None = None) -> np.ndarray:
    """uint8 images (N, H, W, 3): ``denoise`` then ``decode``."""
    return decode(pipe, denoise(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale, height=height,
                                width=width, latents=latents))


@torch.inference_mode()
def denoise(pipe: DiffusionPipeline, prompts: list[str], seeds: list[int] | None, *, steps: int,
            guidance_scale: float, height: int, width: int, latents: torch.Tensor | None = None) -> torch.Tensor:
    """The denoised latents (N, C, H/f, W/f) on the VAE's grid. Sample i's noise comes from seeds[i]
    alone, on the CPU, so an image depends on its own seed and prompt, not on its batch or device; or
    the denoising starts from ``latents`` (an inversion's) and seeds are None. With guidance, each
    step is one denoiser call on [unconditional; conditional], except FLUX.1's, whose guidance scale is
    an input of its one (distilled) call."""
    if (seeds is None) == (latents is None):
        raise ValueError("generate from seeds or from latents, one of them")
    family = family_of(pipe)
    generators = None if seeds is None else [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    options = {} if family.flow else {"eta": 0.0}  # DDIM's eta; the flow samplers have none
    out = pipe(prompt=list(prompts), generator=generators, latents=latents, num_inference_steps=steps,
               guidance_scale=guidance_scale, height=height, width=width, output_type="latent", **options).images
    if family is FLUX:  # (N, tokens, 4C) packed 2x2 patches back to the VAE's grid
        out = pipe._unpack_latents(out, height, width, pipe.vae_scale_factor)
    return out


@torch.inference_mode()
def decode(pipe: DiffusionPipeline, latents: torch.Tensor) -> np.ndarray:
    """uint8 images (N, H, W, 3) of denoised latents: the VAE decoder, as the pipeline's own output
    (SD 3.5 and FLUX.1 shift their latents as well as scale them)."""
    config = pipe.vae.config
    latents = latents.to(pipe.vae.device, pipe.vae.dtype) / config.scaling_factor
    if family_of(pipe) in (SD3, FLUX):
        latents = latents + config.shift_factor
    images = pipe.vae.decode(latents, return_dict=False)[0]
    images = pipe.image_processor.postprocess(images, output_type="np")
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)

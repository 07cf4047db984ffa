"""Real images into the U-Net: the two routes from a photo to the features the grounding
module reads, where generation gets them for free.

1. ``ddim_invert``: the deterministic DDIM inversion of `000` (C.3): the image's latent is
   walked up the noise schedule under its prompt (guidance 1, as the paper inverts), and
   generating from the result with the same prompt and steps retraces the image; the
   features are captured on that pass, exactly as for a generated image.
   ``reconstruction_psnr`` says how faithful the retrace, and so the features, are.
2. ``noised_latents``: one forward-noising of the latent to the capture step's timestep, as
   in training (the fast route of ODISE, `004`): one U-Net pass instead of two walks.

``image_features`` runs either route on a batch of images; builds from real images call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DiffusionPipeline

from factory.diffusion.features import FeatureCapture, unet_features
from factory.diffusion.pipelines import generate, unet_conditioning
from factory.diffusion.steps import capture_call_index

ROUTES = ("inversion", "noised")


@dataclass
class ImageFeatures:
    """A batch of real images in the U-Net, as a generation's capture call would have them."""
    features: dict[int, torch.Tensor]  # resolution -> (N, C_r, r, r), the conditional branch
    latent: torch.Tensor  # (N, 4, h, w): the captured call's input; one U-Net pass on it gives `features` again
    timestep: int
    regenerated: np.ndarray | None  # inversion: (N, H, W, 3) uint8 images regenerated from the inversion


@torch.inference_mode()
def image_features(pipe: DiffusionPipeline, images: np.ndarray, prompts: list[str], seeds: list[int], *,
                   route: str, steps: int, remaining: int) -> ImageFeatures:
    """The U-Net features of uint8 (N, H, W, 3) images at the capture step (``remaining`` of ``steps``).

    1. Encode: the VAE latents, scaled as the U-Net expects.
    2. "inversion": DDIM-invert them under their prompts (guidance 1, as the paper), then
       regenerate from the inversion with the same prompts and steps, capturing the features at
       the capture call, exactly as for a generated image; 2 x ``steps`` U-Net calls.
       "noised": noise them to the capture call's timestep with each seed's noise and run the
       U-Net once (the fast route; ``seeds`` are ignored by inversion, which is deterministic).
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r} (choices: {', '.join(ROUTES)})")
    latents = vae_latents(pipe, images)
    height, width = images.shape[1:3]
    if route == "noised":
        noised, timestep = noised_latents(pipe, latents, seeds, steps=steps, remaining=remaining)
        features = unet_features(pipe.unet, noised, timestep, unet_conditioning(pipe, prompts, height, width))
        return ImageFeatures(features, noised, timestep, None)
    noise = ddim_invert(pipe, latents, prompts, steps=steps)
    with FeatureCapture(pipe.unet, capture_call_index(steps, remaining), batch=len(images)) as hooks:
        regenerated = generate(pipe, prompts, None, steps=steps, guidance_scale=1.0, height=height, width=width,
                               latents=noise)
    return ImageFeatures(hooks.features, hooks.latent, hooks.timestep, regenerated)


@torch.inference_mode()
def vae_latents(pipe: DiffusionPipeline, images: np.ndarray, scale: float | None = None) -> torch.Tensor:
    """(N, 4, H/8, W/8) latents of uint8 (N, H, W, 3) images in the U-Net's dtype: the VAE posterior's
    mean times ``scale`` (None: the VAE's own `scaling_factor`, which makes them unit-variance as the
    U-Net expects)."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    pixels = pixels.to(pipe.device, pipe.vae.dtype) / 127.5 - 1
    mean = pipe.vae.encode(pixels).latent_dist.mean
    # SDXL's VAE stays float32 beside a float16 U-Net (load_pipeline): its latents go in at the U-Net's dtype
    return (mean * (pipe.vae.config.scaling_factor if scale is None else scale)).to(pipe.unet.dtype)


@torch.inference_mode()
def noised_latents(pipe: DiffusionPipeline, latents: torch.Tensor, seeds: list[int], *, steps: int,
                   remaining: int) -> tuple[torch.Tensor, int]:
    """Latents noised by the scheduler to the timestep of the capture call (``remaining`` steps
    left of ``steps``); sample i's noise comes from seeds[i] alone, as in generation. Returns the
    noised latents and the timestep."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    timestep = scheduler.timesteps[capture_call_index(steps, remaining)]
    noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator("cpu").manual_seed(int(seed)))
                         for seed in seeds]).to(latents)
    return scheduler.add_noise(latents, noise, timestep.reshape(1)), int(timestep)


@torch.inference_mode()
def ddim_invert(pipe: DiffusionPipeline, latents: torch.Tensor, prompts: list[str], *, steps: int,
                guidance_scale: float = 1.0) -> torch.Tensor:
    """The noise from which DDIM with ``steps`` steps and these prompts regenerates ``latents``.

    The pipeline's own scheduler config run backwards (diffusers' DDIMInverseScheduler), one
    U-Net call per step, or two with guidance (the paper inverts with guidance 1: none), each
    conditioned as the generation's calls (``unet_conditioning``; SDXL's size ids are those of the
    image the latents decode to).
    """
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps, device=latents.device)
    guided = guidance_scale > 1.0
    height, width = (side * pipe.vae_scale_factor for side in latents.shape[-2:])
    conditioning = (_guided_conditioning(pipe, list(prompts), height, width) if guided
                    else unet_conditioning(pipe, list(prompts), height, width))
    sample = latents.clone()
    for t in inverse.timesteps:
        model_input = torch.cat([sample, sample]) if guided else sample
        noise = pipe.unet(model_input, t, **conditioning).sample
        if guided:
            unconditional, conditional = noise.chunk(2)
            noise = unconditional + guidance_scale * (conditional - unconditional)
        sample = inverse.step(noise, t, sample).prev_sample
    return sample


def _guided_conditioning(pipe: DiffusionPipeline, prompts: list[str], height: int, width: int) -> dict:
    """U-Net keyword arguments for the rows [unconditional; conditional], the unconditional branch as the
    pipeline's guidance makes it: the empty prompt's, with SDXL's text zeroed where its config says
    ``force_zeros_for_empty_prompt`` (its size ids stay)."""
    unconditional = unet_conditioning(pipe, [""] * len(prompts), height, width)
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        added = unconditional["added_cond_kwargs"]
        unconditional["encoder_hidden_states"] = torch.zeros_like(unconditional["encoder_hidden_states"])
        added["text_embeds"] = torch.zeros_like(added["text_embeds"])
    return _stacked(unconditional, unet_conditioning(pipe, prompts, height, width))


def _stacked(first: dict, second: dict) -> dict:
    """Two U-Net keyword dicts (tensors, or dicts of them) as one, rows of `first` then `second`."""
    return {key: _stacked(value, second[key]) if isinstance(value, dict) else torch.cat([value, second[key]])
            for key, value in first.items()}


def reconstruction_psnr(original: np.ndarray, regenerated: np.ndarray) -> np.ndarray:
    """(N,) PSNR in dB of uint8 (N, H, W, 3) images regenerated from their inversion."""
    error = (original.astype(np.float64) - regenerated.astype(np.float64)) ** 2
    mse = error.reshape(len(original), -1).mean(axis=1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))

"""Generate: images of any generator family from the plan's prompts and seeds, with optional capture (U-Nets)."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from diffusers import DiffusionPipeline

from factory.core.devices import pick_device
from factory.core.loading import load_with_retries
from factory.dataset.codec import objects
from factory.diffusion.daam import CrossAttentionRecorder
from factory.diffusion.fast import apply_fast_paths
from factory.diffusion.features import FeatureCapture, fp16_array
from factory.diffusion.pipelines import decode, denoise, load_pipeline
from factory.diffusion.steps import capture_call_index
from factory.diffusion.tokens import class_token_positions
from factory.pipeline.sections import CaptureConfig, FastConfig, GeneratorConfig


def load_generator(config: GeneratorConfig, fast: FastConfig | None, load_attempts: int,
                   device: torch.device | None = None) -> DiffusionPipeline:
    """The recipe's generator on this actor's device, its sampler, LoRA and fast paths set."""
    device, fast = device or pick_device(), fast or FastConfig()

    def load() -> DiffusionPipeline:
        pipe = load_pipeline(config.model, device, config.dtype, config.scheduler, config.lora)
        return apply_fast_paths(pipe, attention=fast.attention, channels_last=fast.channels_last,
                                compile=fast.compile)

    return load_with_retries(f"generator {config.model}", load, load_attempts)


class GenerateStage:
    """Ray Data actor: one pipeline per actor (one GPU each when the cluster has GPUs).

    With capture on, the same generation call also yields the U-Net's features (or
    the latent they come from) at the capture step. Two phases, ``denoise`` then ``decode``:
    with ``fast.overlap`` the model actor decodes one batch while the next one denoises.
    """

    def __init__(self, config: GeneratorConfig, capture: CaptureConfig | None = None, fast: FastConfig | None = None,
                 load_attempts: int = 3):
        self.config, self.capture = config, capture or CaptureConfig()
        self.pipe = load_generator(config, fast, load_attempts)
        self.phases = (self.denoise, self.decode)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.decode(self.denoise(batch))

    def denoise(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Adds ``denoised`` (the final latents, float32, for ``decode``) and the captures."""
        start = time.perf_counter()
        c, capture = self.config, self.capture
        n = len(batch["prompt"])
        with contextlib.ExitStack() as stack:
            hooks = recorder = None
            if capture.features != "none":
                hooks = stack.enter_context(FeatureCapture(
                    self.pipe.unet, capture_call_index(c.steps, capture.step, c.scheduler), batch=n,
                    keep_unconditional=capture.unconditional))
            if capture.attention:
                # every denoising step, as DAAM's reference records them (steps=None)
                recorder = stack.enter_context(CrossAttentionRecorder(self.pipe))
            latents = denoise(self.pipe, list(batch["prompt"]), list(batch["seed"]), steps=c.steps,
                              guidance_scale=c.guidance_scale, height=c.height, width=c.width)
        batch["denoised"] = latents.float().cpu().numpy()
        if recorder is not None:
            positions = [class_token_positions(self.pipe.tokenizer, prompt, words)
                         for prompt, words in zip(batch["prompt"], batch["class_words"])]
            # (n, O, h, w) on the latent grid, min-max normalised; O = most classes
            maps = recorder.heatmaps(positions).astype(np.float16)
            batch["daam"] = objects([maps[i, :len(p)] for i, p in enumerate(positions)])
        if hooks is not None:
            batch["timestep"] = np.full(n, hooks.timestep, np.int64)
            if capture.features == "latent":
                batch["latent"] = fp16_array(hooks.latent)
            else:
                for r, tensor in hooks.features.items():
                    batch[f"features_{r}"] = fp16_array(tensor)
                if capture.unconditional:
                    for r, tensor in hooks.unconditional.items():
                        batch[f"ufeatures_{r}"] = fp16_array(tensor)
        batch["generate_seconds"] = np.full(n, (time.perf_counter() - start) / n)
        return batch

    def decode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Replaces ``denoised`` by ``image`` (uint8, N x H x W x 3)."""
        start = time.perf_counter()
        batch["image"] = decode(self.pipe, torch.from_numpy(batch.pop("denoised")))
        batch["generate_seconds"] = batch["generate_seconds"] + (time.perf_counter() - start) / len(batch["image"])
        return batch

"""Generate: Stable Diffusion images from the plan's prompts and seeds, with optional capture."""

from __future__ import annotations

import contextlib
import time

import numpy as np

from factory.build.recipe import CaptureConfig, GeneratorConfig
from factory.core.devices import pick_device, pick_dtype
from factory.core.loading import load_with_retries
from factory.dataset.codec import objects
from factory.diffusion.daam import CrossAttentionRecorder
from factory.diffusion.features import FeatureCapture, fp16_array
from factory.diffusion.pipelines import generate, load_pipeline
from factory.diffusion.steps import capture_call_index
from factory.diffusion.tokens import class_token_positions


class GenerateStage:
    """Ray Data actor: one pipeline per actor (one GPU each when the cluster has GPUs).

    With capture on, the same generation call also yields the U-Net's features (or
    the latent they come from) at the capture step.
    """

    def __init__(self, config: GeneratorConfig, capture: CaptureConfig | None = None, load_attempts: int = 3):
        self.config, self.capture = config, capture or CaptureConfig()
        device = pick_device()
        self.pipe = load_with_retries(f"generator {config.model}",
                                      lambda: load_pipeline(config.model, device, pick_dtype(config.dtype, device)),
                                      load_attempts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        c, capture = self.config, self.capture
        n = len(batch["prompt"])
        with contextlib.ExitStack() as stack:
            hooks = recorder = None
            if capture.features != "none":
                hooks = stack.enter_context(FeatureCapture(
                    self.pipe.unet, capture_call_index(c.steps, capture.step), batch=n,
                    keep_unconditional=capture.unconditional))
            if capture.attention:
                # every denoising step, as DAAM's reference records them (steps=None)
                recorder = stack.enter_context(CrossAttentionRecorder(self.pipe))
            batch["image"] = generate(self.pipe, list(batch["prompt"]), list(batch["seed"]), steps=c.steps,
                                      guidance_scale=c.guidance_scale, height=c.height, width=c.width)
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


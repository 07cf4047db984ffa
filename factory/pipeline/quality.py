"""Quality: a CLIP image-quality score per sample, to filter test sets (factory.diffusion.clip)."""

from __future__ import annotations

import numpy as np

from factory.core.devices import pick_device
from factory.core.loading import load_with_retries
from factory.diffusion.clip import QualityScorer, load_clip


class QualityStage:
    """Ray Data actor: adds a ``quality`` score per image (the CLIP-IQA-style probability)."""

    def __init__(self, model: str, load_attempts: int = 3):
        device = pick_device()
        self.scorer = QualityScorer(*load_with_retries(f"quality model {model}", lambda: load_clip(model, device),
                                                       load_attempts))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["quality"] = self.scorer(batch["image"]).astype(np.float32)
        return batch

"""Plumbing shared by the mini world's trainers: drawn class choices, EMA, the loss log and its
plot, a resumable run of optimizer steps, image grids, the model card."""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from tqdm import tqdm

from factory.core.checkpoints import (
    check_same_run,
    load_optimizer_state,
    read_checkpoint_metadata,
    read_tensors,
    save_checkpoint,
)
from factory.core.conventions import PROMPT_ONE, PROMPT_TWO
from factory.core.vocab import SHAPES


def class_draws(seed: int, step: int, size: int, two_objects: float) -> list[tuple[tuple[str, ...], int]]:
    """(classes, drawing seed) of one training batch: any class, any pair of distinct classes,
    uniformly; a function of (seed, step) alone, so a resumed run draws what it would have.
    Drawing seeds are even: the drawn benchmark's are odd (world/benchmark.py)."""
    rng = np.random.default_rng([seed, step])
    names = SHAPES.names
    out = []
    for _ in range(size):
        n = 2 if rng.random() < two_objects else 1
        classes = tuple(names[i] for i in rng.choice(len(names), n, replace=False))
        out.append((classes, 2 * int(rng.integers(2**30))))
    return out


def prompt_of(classes: tuple[str, ...]) -> str:
    """The recipes' default prompt of one or two ``shapes`` classes: 'a photograph of a red disc'."""
    names = [SHAPES.lookup(name).natural for name in classes]
    return (PROMPT_ONE if len(names) == 1 else PROMPT_TWO).format(*names)


class EMA:
    """An exponential moving average of a module's weights (``shadow``), for sampling."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.shadow = copy.deepcopy(module).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self) -> None:
        current = list(self.module.state_dict().values())
        shadow = list(self.shadow.state_dict().values())
        floats = [(s, c) for s, c in zip(shadow, current) if s.is_floating_point()]
        torch._foreach_lerp_([s for s, _ in floats], [c for _, c in floats], 1.0 - self.decay)


class TrainingLog:
    """Loss records [stage, step, loss] and the wall-clock seconds of training over every run,
    kept in the checkpoint and plotted."""

    def __init__(self, records: list | None = None, seconds: float = 0.0):
        self.records: list[list] = [list(r) for r in records or []]
        self.seconds = seconds
        self._last = time.monotonic()

    def add(self, stage: str, step: int, loss: float) -> None:
        now = time.monotonic()
        self.seconds += now - self._last
        self._last = now
        self.records.append([stage, step, round(float(loss), 6)])

    def recent(self, stage: str, n: int = 50) -> float:
        losses = [loss for s, _, loss in self.records[-4 * n:] if s == stage][-n:]
        return float(np.mean(losses)) if losses else float("nan")

    def stages(self) -> list[str]:
        return list(dict.fromkeys(stage for stage, _, _ in self.records))

    def plot(self, path: Path, title: str) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        stages = self.stages()
        fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.5), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            steps = np.array([step for s, step, _ in self.records if s == stage])
            losses = np.array([loss for s, _, loss in self.records if s == stage])
            ax.plot(steps, losses, alpha=0.25, lw=0.7, label="per step")
            window = min(100, len(losses))
            if window > 1:
                smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(f"{title}: {stage}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


class SteppedTraining:
    """A resumable run of ``config.steps`` optimizer steps of one model (the oracle, the backbone): the rate
    warms up over 100 steps and drops 10x for the last quarter; every ``config.save_every`` steps and at the
    end, a checkpoint in ``config.work`` and ``export()``. A subclass sets ``name``, ``kind`` (the checkpoint's),
    ``identity`` (config fields that make another run), ``clip`` (max gradient norm, or None) and, before
    ``resume()``, ``config``, ``model`` and ``optimizer``; it gives ``loss(step)`` and ``export()``."""
    name: str
    kind: str
    identity: tuple[str, ...]
    clip: float | None = None

    def resume(self) -> None:
        """From the checkpoint in ``config.work``, when there is one of the same run."""
        work = self.config.work
        self.step, self.log = 0, TrainingLog()
        if (Path(work) / "checkpoint.json").exists():
            metadata = read_checkpoint_metadata(work, self.kind)
            check_same_run(work, metadata["config"], self.config.model_dump(), self.identity)
            self.model.load_state_dict(read_tensors(work, metadata, "model"))
            load_optimizer_state(work, self.optimizer, metadata)
            self.step, self.log = metadata["step"], TrainingLog(metadata["log"], metadata.get("seconds", 0.0))

    def run(self):
        config, started = self.config, time.monotonic()
        self.model.train()
        bar = tqdm(total=config.steps, initial=self.step, desc=self.name, unit="step")
        while self.step < config.steps:
            scale = min(1.0, (self.step + 1) / 100) * (0.1 if self.step >= 0.75 * config.steps else 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr * scale
            loss = self.loss(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.step += 1
            self.log.add(self.name, self.step, loss.item())
            bar.update()
            bar.set_postfix(loss=f"{self.log.recent(self.name):.3f}")
            if self.step % config.save_every == 0 or self.step == config.steps:
                save_checkpoint(config.work, self.kind, self.step, self.model, self.optimizer,
                                {"step": self.step, "log": self.log.records, "seconds": self.log.seconds,
                                 "config": config.model_dump()})
                self.export()
                self.model.train()
        bar.close()
        self.minutes = (time.monotonic() - started) / 60
        return self

    def loss(self, step: int) -> torch.Tensor:
        raise NotImplementedError

    def export(self) -> None:
        raise NotImplementedError


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of images in [-1, 1]."""
    mse = torch.mean((a.clamp(-1, 1) - b) ** 2).item()
    return 10 * np.log10(4.0 / max(mse, 1e-12))


def image_grid(images: np.ndarray, captions: list[str], path: Path, columns: int, scale: int = 2) -> None:
    """uint8 images (N, H, W, 3) in a captioned grid, enlarged `scale` times."""
    n, h, w, _ = images.shape
    cell_w, cell_h = w * scale, h * scale + 14
    rows = -(-n // columns)
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    pen = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        canvas.paste(Image.fromarray(image).resize((cell_w, h * scale), Image.NEAREST), (x, y))
        pen.text((x + 2, y + h * scale + 1), caption[:24], fill="black")
    canvas.save(path)


def write_card(path: Path, title: str, doc: str | None, config: dict, log: TrainingLog, quality: dict,
               continued_from: dict | None = None) -> None:
    """A short model card: what it is, how it was trained (after the weights it started from, if
    any), and what it measured."""
    steps = {stage: max(step for s, step, _ in log.records if s == stage) for stage in log.stages()}
    lines = [f"# {title}", "", (doc or "").strip(), "",
             "## Training", "", f"- steps per stage: {json.dumps(steps)}",
             f"- time: {log.seconds / 60:.0f} minutes of training (all runs; the last on {platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, {'CUDA' if torch.cuda.is_available() else 'CPU'})",
             "- config:", "", "```json", json.dumps(config, indent=2), "```", "",
             "## Measured", "", "```json", json.dumps(quality, indent=2), "```", "",
             "![loss](loss.png)", ""]
    if continued_from:
        lines += ["## Started from", "", f"The weights of `{continued_from['folder']}`, whose own record was:", "",
                  "```json", json.dumps({k: v for k, v in continued_from.items() if k != "folder"}, indent=2), "```",
                  ""]
    Path(path).write_text("\n".join(lines))

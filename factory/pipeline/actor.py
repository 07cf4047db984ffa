"""The model actor: every model stage of a sample in one process on one GPU, then encoding."""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from factory.core.vocab import Vocabulary
from factory.dataset.write import encode_batch
from factory.pipeline.recipe import Recipe
from factory.pipeline.stages import StageSpec, resolve_stage


class ModelActor:
    """Ray Data actor: every model a sample needs, in one process on one GPU, then encoding.

    The labeler needs a few percent of the generator's time, so a pool of its own would
    hold GPUs that mostly idle (and one GPU could not host both pools); here every GPU
    does both, and only PNG bytes cross the object store. Two calls run at once. By default
    one lock keeps the models to one batch at a time, and the other call encodes its finished
    batch meanwhile, off the GPU's critical path. With ``overlap`` each phase of each stage
    (a stage's ``phases``: the generator's denoise and decode) has a lock and a CUDA stream of
    its own, so batch k decodes and is labelled while batch k+1 denoises.

    ``cpu_threads``: torch's threads where the actor has no GPU (Ray sets one per logical CPU held).
    """

    def __init__(self, stages: list[StageSpec], encode: dict, overlap: bool = False, static_batch: bool = False,
                 cpu_threads: int | None = None):
        if cpu_threads:
            import torch  # here: the driver plans builds without loading torch (tests/test_layers.py)

            if not torch.cuda.is_available():
                torch.set_num_threads(cpu_threads)
        self.phases = []
        for spec in stages:
            stage = resolve_stage(spec.stage)(**spec.kwargs)
            phases = getattr(stage, "phases", (stage,)) if overlap else (stage,)  # one call when nothing overlaps
            self.phases += [(phase, spec.batch_size) for phase in phases]
        self.encode, self.static_batch = encode, static_batch
        self.locks = [threading.Lock() for _ in self.phases] if overlap else [threading.Lock()]
        self.streams = _phase_streams(len(self.phases)) if overlap else [contextlib.nullcontext]

    def __call__(self, batch: dict[str, np.ndarray]):
        if len(self.locks) == 1:  # the models one batch at a time, every phase under one lock
            with self.locks[0]:
                for phase, batch_size in self.phases:
                    batch = _in_batches(phase, batch, batch_size, self.static_batch)
        else:
            for (phase, batch_size), lock, stream in zip(self.phases, self.locks, self.streams):
                with lock, stream():
                    batch = _in_batches(phase, batch, batch_size, self.static_batch)
        return encode_batch(batch, **self.encode)


def encode_options(recipe: Recipe, vocabulary: Vocabulary, models: dict[str, str]) -> dict:
    """The model actor's ``encode``: how rows are encoded and which models they name."""
    writer = recipe.writer
    return {"image_format": writer.image_format, "jpeg_quality": writer.jpeg_quality,
            "class_indices": {c.name: c.index for c in vocabulary.classes}, "generator": models["generator"],
            "labeler": models["labeler"]}  # the row's columns; the agreement labeler is the manifest's


def _phase_streams(count: int) -> list:
    """A CUDA stream per phase on a GPU (kernels of two phases can then run at once); each ends
    synchronized, as a phase's outputs leave for the CPU. Without a GPU: no streams."""
    import torch  # in the actor only: the driver never imports torch for this

    if not torch.cuda.is_available():
        return [contextlib.nullcontext] * count

    def on(stream):
        @contextlib.contextmanager
        def context():
            with torch.cuda.stream(stream):
                yield
            stream.synchronize()
        return context

    return [on(torch.cuda.Stream()) for _ in range(count)]


def _in_batches(stage, batch: dict[str, np.ndarray], size: int, static: bool = False) -> dict[str, np.ndarray]:
    """The stage over the batch, at most ``size`` samples per call (its own batch size); ``static``:
    exactly ``size``, a short call padded with copies of its last sample, which are cut off after."""
    n = len(batch["sample_id"])
    if n <= size and not (static and n < size):
        return stage(batch)
    parts = []
    for i in range(0, n, size):
        part = {key: column[i:i + size] for key, column in batch.items()}
        short = size - len(part["sample_id"]) if static else 0
        if short:
            part = {key: np.concatenate([column, np.repeat(column[-1:], short, axis=0)])
                    for key, column in part.items()}
        out = stage(part)
        parts.append({key: column[:len(column) - short] for key, column in out.items()})
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

"""Pipeline overhead: the factory's pipeline against the same models in a bare loop.

In one run, on the same planned samples:
- factory: `factory.pipeline.ray_executor.stream_samples`, the production Ray Data pipeline (model
  actors, encoding, Parquet parts and commit records in a temporary folder);
- bare loop: the generator and labeler stages called one batch after the other in one
  process (same batch sizes; the torch threads and the CPU priority of a model actor on a
  machine without GPUs), no Ray, no encoding, no writes.
Throughputs are after start-up (the factory's ends when its last model is ready; paid
once per build, minutes of a GPU-hour); the end-to-end ratio includes it. On a shared
machine the two halves see different load; the model actors' busy share (model seconds
over actor seconds, both measured inside the one factory run) does not depend on that.

    python bench/pipeline_overhead.py                                 # the default build: tiny recipe, 32 samples
    python bench/pipeline_overhead.py --num-samples 8 --generator.steps 2

Recipe options are the job's (`--recipe`, `--generator.batch-size`, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ray
import torch

from factory.core.options import overrides_from_args
from factory.core.vocab import get_vocabulary
from factory.pipeline.actor import encode_options
from factory.pipeline.generate import GenerateStage
from factory.pipeline.label import LabelStage
from factory.pipeline.plan import Sample, build_plan, plan_batch
from factory.pipeline.ray_executor import cpu_threads, stream_samples
from factory.pipeline.recipe import Recipe, RecipeError, add_recipe_arguments, load_recipe
from factory.pipeline.stages import model_ids, model_stages


def bare_loop(recipe: Recipe, plan: list[Sample], threads: int) -> tuple[float, float, int]:
    """Seconds to build both models, seconds to run every batch through them, samples labelled."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    gen, lab = recipe.generator, recipe.labeler
    generator = GenerateStage(gen, recipe.capture)
    labeler = LabelStage(lab, recipe.vocabulary, min(gen.height, gen.width))
    ready = time.perf_counter()
    labelled = 0
    for first in range(0, len(plan), gen.batch_size):
        images = generator(plan_batch(plan[first:first + gen.batch_size]))
        for i in range(0, len(images["sample_id"]), lab.batch_size):
            part = {key: value[i:i + lab.batch_size] for key, value in images.items()}
            labelled += len(labeler(part)["sample_id"])
    return ready - start, time.perf_counter() - ready, labelled


def announcing(stage: type, folder: Path) -> type:
    """The stage, writing down when its model is ready: the factory's start-up ends there."""

    class Announcing(stage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            (folder / f"{stage.__name__}-{os.getpid()}").write_text(str(time.time()))

    return Announcing


def factory(recipe: Recipe, plan: list[Sample]) -> tuple[float, float, dict]:
    """Seconds for the production pipeline on the plan, seconds of it until every model was
    ready (actor processes, imports, model loading), and its commits' totals."""
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as ready:
        generate, label = model_stages(recipe)
        stages = [dataclasses.replace(generate, stage=announcing(GenerateStage, Path(ready))),
                  dataclasses.replace(label, stage=announcing(LabelStage, Path(ready)))]
        start = time.time()
        encode = encode_options(recipe, get_vocabulary(recipe.vocabulary), model_ids(recipe))
        commits = stream_samples(recipe, plan, out, {}, stages=stages, encode=encode)
        seconds = time.time() - start
        startup = max(float(p.read_text()) for p in Path(ready).iterdir()) - start
        actors = len({p.name.rsplit("-", 1)[1] for p in Path(ready).iterdir()})  # model processes
    done = sorted(i for c in commits for i in (*c.written, *c.dropped))
    busy = {stage: sum(c.seconds.get(stage, 0.0) for c in commits)
            for stage in ("generate", "label", "encode", "write")}
    return seconds, startup, {"accounted": len(done), "exact": done == sorted(s.sample_id for s in plan),
                              "busy": busy, "model_actors": actors,
                              "model_busy": (busy["generate"] + busy["label"]) / (actors * (seconds - startup))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, overrides_from_args(args, Recipe))
    except RecipeError as exc:
        parser.error(str(exc))
    plan = build_plan(recipe)

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    factory_seconds, factory_startup, result = factory(recipe, plan)
    # The bare loop runs in a process of its own with what a model actor gets: its torch
    # threads (ray_executor.cpu_threads) and a Ray worker's CPU priority (nice 15 by default),
    # which on a shared machine decides how much CPU it gets.
    niceness = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=os.nice, initargs=(niceness,)) as pool:
        bare_startup, bare_seconds, labelled = pool.submit(bare_loop, recipe, plan, cpu_threads(recipe)).result()

    n = len(plan)
    bare, steady = n / bare_seconds, n / (factory_seconds - factory_startup)
    figures = {"recipe": recipe.name, "samples": n, "bare_labelled": labelled,
               "bare_startup": bare_startup, "bare_seconds": bare_seconds,
               "factory_startup": factory_startup, "factory_seconds": factory_seconds,
               "bare_throughput": bare, "factory_throughput": steady, "ratio": steady / bare,
               "end_to_end_ratio": (bare_startup + bare_seconds) / factory_seconds, **result}
    print(f"recipe {recipe.name}: {n} samples, {recipe.generator.width}x{recipe.generator.height}, "
          f"{recipe.generator.steps} steps, batch {recipe.generator.batch_size}")
    print(f"{'':<11}{'start-up s':>11}{'run s':>8}{'samples/s':>11}")
    print(f"{'bare loop':<11}{bare_startup:>11.1f}{bare_seconds:>8.1f}{bare:>11.2f}")
    print(f"{'factory':<11}{factory_startup:>11.1f}{factory_seconds - factory_startup:>8.1f}{steady:>11.2f}"
          f"   ({result['accounted']}/{n} samples committed)")
    print(f"ratio      {figures['ratio']:.2f} (factory / bare loop, after start-up)")
    print(f"end to end {figures['end_to_end_ratio']:.2f} (start-up included; the factory's includes its "
          f"actors' processes and imports)")
    print("factory busy seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["busy"].items()))
    print(f"model actors busy {result['model_busy']:.2f} of their time after start-up "
          f"({result['model_actors']} actor(s); on a GPU cluster, the share of GPU-hours spent on models)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()

"""The build's executor on Ray Data: a pool of model actors, then write tasks."""

from __future__ import annotations

import logging
from collections.abc import Callable

import ray

from factory.core.cluster import actor_resources, cluster_gpus, cpu_share
from factory.core.conventions import TINY
from factory.dataset.write import Commit, write_part
from factory.pipeline.actor import ModelActor
from factory.pipeline.plan import Sample
from factory.pipeline.recipe import Recipe
from factory.pipeline.stages import StageSpec

logger = logging.getLogger(__name__)


def stream_samples(recipe: Recipe, todo: list[Sample], out: str, metadata: dict[bytes, bytes], *,
                   stages: list[StageSpec], encode: dict, actor: type = ModelActor,
                   on_commit: Callable[[Commit], None] | None = None) -> list[Commit]:
    """The Ray Data pipeline over the samples still to make; returns their commits.

    One pool of model actors (``stages``, then encoding with ``encode``: ``actor.encode_options``),
    then write tasks. ``actor``: a ModelActor subclass (bench/scaling.py's holds its encoding as time).
    ``on_commit``: called with each commit as its part is written (the progress bar).
    """
    gen, writer, pool = recipe.generator, recipe.writer, recipe.pool
    rows = [s.row() for s in todo]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // gen.batch_size)))
    actors = ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size,
                                        max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    ds = ds.map_batches(actor, batch_size=gen.batch_size, compute=actors, batch_format="numpy",
                        fn_constructor_kwargs={"stages": stages, "encode": encode, "overlap": recipe.fast.overlap,
                                               "static_batch": recipe.fast.static_batch,
                                               "cpu_threads": cpu_threads(recipe)},
                        **accelerator_resources(recipe))
    # A part's write takes a fraction of the time its batches took to make, so a few writes in flight
    # keep up with many GPUs; unbounded, Ray Data runs one per free CPU and each starts a worker process.
    parts = -(-len(rows) // writer.rows_per_file)  # more writers than parts would have nothing to do
    ds = ds.map_batches(write_part, fn_kwargs={"out": out, "metadata": metadata},
                        batch_size=writer.rows_per_file, batch_format="pyarrow", num_cpus=0.5,
                        compute=ray.data.TaskPoolStrategy(size=min(parts, write_concurrency(pool.max_size))))
    commits = []
    for row in ds.iter_rows():
        commits.append(Commit.from_json(row["commit"].encode()))
        if on_commit:
            on_commit(commits[-1])
    return commits


def accelerator_resources(recipe: Recipe) -> dict[str, float]:
    """One GPU per model actor when the cluster has GPUs or the models require one.

    Real models require a GPU, so on an autoscaling cluster that starts with no GPU nodes
    the request is what brings them up (and the CPU head stays free). The tiny models and
    the mini world's (``pool.require_gpu: false``) run on CPUs when there is no GPU.
    """
    has_gpus = cluster_gpus() > 0
    require = recipe.pool.require_gpu if recipe.pool.require_gpu is not None else recipe.generator.model != TINY
    if has_gpus or require:
        if not has_gpus:  # without an autoscaler nothing would ever start: say what we wait for
            logger.warning("the cluster has no GPU now; the model actors wait for GPU nodes (an autoscaler "
                           "adds them; models small enough for CPUs run there with pool.require_gpu: false)")
        return actor_resources(gpu=True)
    return actor_resources(gpu=False)


def cpu_threads(recipe: Recipe) -> int:
    """Torch threads of a model actor without a GPU: the recipe's, else the cores shared among the pool."""
    return recipe.pool.cpu_threads or cpu_share(recipe.pool.max_size)


def write_concurrency(gpus: int) -> int:
    """Write tasks in flight: one per 4 model actors, at least 2."""
    return max(2, gpus // 4)

"""The build's executor in this process, without Ray: the same model actor, encoding and part
writer, one part at a time. For small sets made on one machine (the procedural source), where a
Ray actor's one CPU would halve the torch threads."""

from __future__ import annotations

from collections.abc import Callable

from factory.dataset.write import Commit, write_part
from factory.pipeline.actor import ModelActor
from factory.pipeline.plan import Sample, plan_batch
from factory.pipeline.recipe import Recipe
from factory.pipeline.stages import StageSpec


def make_samples_here(recipe: Recipe, todo: list[Sample], out: str, metadata: dict[bytes, bytes], *,
                      stages: list[StageSpec], encode: dict,
                      on_commit: Callable[[Commit], None] | None = None) -> list[Commit]:
    """What ``ray_executor.stream_samples`` does, here; returns the commits."""
    actor = ModelActor(stages, encode, static_batch=recipe.fast.static_batch)  # one call at a time: nothing to overlap
    commits = []
    for start in range(0, len(todo), recipe.writer.rows_per_file):
        batch = plan_batch(todo[start:start + recipe.writer.rows_per_file])
        commit = write_part(actor(batch), out=out, metadata=metadata).column("commit")[0].as_py()
        commits.append(Commit.from_json(commit.encode()))
        if on_commit:
            on_commit(commits[-1])
    return commits

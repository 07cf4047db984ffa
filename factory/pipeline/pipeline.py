"""The build: plan -> generate -> label -> encode -> write, streamed by Ray Data.

``prepare_build`` does every check that can fail (recipe, plan, output, models: ``checks``) before
any model loads or anything is written. ``run_build`` resumes whatever the output already holds,
makes the missing samples in rounds (``ray_executor``, or ``local_executor`` in this process),
and finishes with the manifest (``manifest``), the preview and the card.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from factory.core.cluster import init_ray
from factory.core.loading import ModelLoadError, pipeline_failure
from factory.core.storage import check_reachable
from factory.core.vocab import get_vocabulary
from factory.dataset.card import write_card
from factory.dataset.layout import BUILD_FILE, COMMIT_DIR, DATA_DIR, MANIFEST_FILE, PREVIEW_FILE
from factory.dataset.preview import preview_png
from factory.dataset.write import Commit, read_commits
from factory.pipeline.actor import encode_options
from factory.pipeline.checks import BuildError, Prepared, check_generator, check_models, claim_output
from factory.pipeline.local_executor import make_samples_here
from factory.pipeline.manifest import build_manifest, outcomes
from factory.pipeline.plan import Sample, build_plan, next_attempts, open_followed
from factory.pipeline.ray_executor import stream_samples
from factory.pipeline.recipe import Recipe
from factory.pipeline.stages import StageSpec, model_ids, model_stages

logger = logging.getLogger(__name__)

@dataclass
class Summary:
    out: str
    planned: int
    written: int
    dropped: dict[str, int]  # samples dropped, by reason (replaced ones too)
    given_up: int  # plan entries whose every attempt was dropped
    new_this_run: int
    resumed_from: int
    wall_seconds: float
    stage_seconds: dict[str, float]
    bytes_written: int
    files: int
    preview: str | None
    manifest: str
    card: str
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """What the build did, for the job's last lines."""
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items()) or "none"
        lines = [f"\nDataset written to {self.out}",
                 f"  samples   {self.written} written of {self.planned} planned; dropped: {dropped}; "
                 f"given up: {self.given_up}"]
        if self.resumed_from:
            lines.append(f"  resumed   {self.resumed_from} samples were already done; {self.new_this_run} made now")
        rate = self.new_this_run / self.wall_seconds if self.wall_seconds else 0.0
        lines.append(f"  time      {self.wall_seconds:.1f} s wall, {rate:.2f} samples/s")
        for stage, seconds in self.stage_seconds.items():
            per = self.new_this_run / seconds if seconds else float("inf")
            lines.append(f"    {stage:<9} {seconds:8.1f} s busy   {per:8.2f} samples per busy second")
        per_sample = self.bytes_written / self.written if self.written else 0
        lines.append(f"  storage   {self.bytes_written / 1e6:.2f} MB in {self.files} Parquet files "
                     f"({per_sample / 1e3:.1f} kB per sample)")
        lines += [f"  note      {note}" for note in self.notes]
        lines += [f"  manifest  {self.manifest}", f"  card      {self.card}"]
        if self.preview:
            lines.append(f"  preview   {self.preview}")
        return "\n".join(lines)


def prepare_build(recipe: Recipe) -> Prepared:
    """Every check that needs no model, then the output is claimed with build.json.

    Plan, output, model paths, resume compatibility: a failure here writes nothing.
    Writing build.json last proves write access before any GPU time is spent.
    """
    recipe, family = check_generator(recipe)  # first: a flow-matching model's sampler is part of the content key
    vocabulary = get_vocabulary(recipe.vocabulary)
    plan = build_plan(recipe)
    notes, follows = recipe.notes, None
    if recipe.follow is not None:  # its plan is the followed set's samples, never more than num_samples
        followed = open_followed(recipe.follow).manifest
        follows = {"dataset": recipe.follow, "name": followed["name"], "content_key": followed["content_key"]}
    elif recipe.num_samples is not None and recipe.num_samples > len(plan):
        notes.append(f"num_samples {recipe.num_samples} is more than the recipe plans: building all {len(plan)}")
    location = check_reachable(recipe.output)
    notes += check_models(recipe, vocabulary)
    claimed = claim_output(recipe, plan, location)
    return Prepared(recipe, vocabulary, plan, location, notes, follows, claimed, family)


def run_build(prepared: Prepared, *, stages: list[StageSpec] | None = None,
              models: dict[str, str] | None = None, in_process: bool = False) -> Summary:
    """Make what the output lacks of the plan, then the manifest, preview and card.

    ``stages`` and ``models``: the model stages and their names, when not the recipe's
    (``model_stages``, ``model_ids``); the procedural source and the benchmarks pass theirs.
    ``in_process``: without Ray (``make_samples_here``)."""
    recipe, plan, location = prepared.recipe, prepared.plan, prepared.location
    models = models or model_ids(recipe)
    stages = stages or model_stages(recipe)
    encode = encode_options(recipe, prepared.vocabulary, models)
    start = time.perf_counter()
    commits, orphans = _existing_commits(prepared)
    made = outcomes(commits)
    resumed = len(made)
    metadata = {b"dataset-factory": json.dumps({"recipe": recipe.name, "content_key": recipe.content_key()}).encode()}
    new: list[Commit] = []
    # One bar over every round: plan entries settled (a sample kept, or every attempt dropped).
    with tqdm(total=len(plan), initial=len(plan) - len(next_attempts(plan, recipe, made)), desc="samples",
              unit="sample", dynamic_ncols=True) as bar:
        try:
            # Rounds: the entries' first samples, then replacements of those dropped, until none is due.
            while todo := next_attempts(plan, recipe, made):
                if todo[0].attempt or new:
                    logger.info(f"replacing {len(todo)} dropped samples with their entries' next attempts")
                made_now = _make(prepared, todo, metadata, stages, encode, in_process,
                                 on_commit=_settles(bar, todo, recipe.tries))
                made |= outcomes(made_now)
                new += made_now
        except KeyboardInterrupt:
            # The build is over: what Ray says while it stops the build's actors is about that stop (Ray
            # Data's executor logs the tasks it loses with their tracebacks, the raylet each task of a killed
            # actor), and said after shutdown it would follow the job's last line.
            logging.disable(logging.CRITICAL)
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    ray.shutdown()
            finally:
                logging.disable(logging.NOTSET)
            written = sum(len(commit.written) for commit in read_commits(location))
            raise KeyboardInterrupt(f"{written} of {len(plan)} planned samples are committed to {location.uri}; "
                                    f"the same command resumes") from None
    commits += new
    _check_complete(prepared, outcomes(commits))
    manifest = build_manifest(prepared, commits, models)
    preview = _preview(prepared, manifest["files"])
    location.write_bytes(MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    card = write_card(location, manifest)
    stage_seconds: dict[str, float] = {}
    for commit in new:
        for stage, seconds in commit.seconds.items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
    notes = prepared.notes + ([f"deleted {len(orphans)} orphan part(s) of an interrupted run"] if orphans else [])
    return Summary(out=location.uri, planned=len(plan), written=manifest["counts"]["written"],
                   dropped=manifest["counts"]["dropped"], given_up=manifest["counts"]["given_up"],
                   new_this_run=sum(len(c.written) + len(c.dropped) for c in new),
                   resumed_from=resumed, wall_seconds=time.perf_counter() - start, stage_seconds=stage_seconds,
                   bytes_written=sum(f["bytes"] for f in manifest["files"]), files=len(manifest["files"]),
                   preview=preview, manifest=location.url(MANIFEST_FILE), card=card, notes=notes)


def _make(prepared: Prepared, todo: list[Sample], metadata: dict[bytes, bytes],
          stages: list[StageSpec], encode: dict, in_process: bool,
          on_commit: Callable[[Commit], None]) -> list[Commit]:
    """One round of samples, here or through Ray; their commits."""
    recipe, out = prepared.recipe, prepared.location.uri
    try:
        if in_process:
            return make_samples_here(recipe, todo, out, metadata, stages=stages, encode=encode, on_commit=on_commit)
        init_ray()
        return stream_samples(recipe, todo, out, metadata, stages=stages, encode=encode, on_commit=on_commit)
    except Exception as exc:  # a model that would not load, or storage that failed beyond its retries
        cause = exc if isinstance(exc, ModelLoadError) else pipeline_failure(exc)
        if cause is None:
            raise
        if isinstance(cause, ModelLoadError):  # the same command would fail again: the fix is the recipe's
            _release(prepared)
            raise cause from None
        raise BuildError(f"{cause} (committed parts are kept; the same command resumes)") from None


def _release(prepared: Prepared) -> None:
    """Takes back the build.json this run wrote while nothing is committed, so that a corrected
    recipe (another content key) may build into the same output."""
    if prepared.claimed and not read_commits(prepared.location):
        prepared.location.delete(BUILD_FILE)


def _settles(bar: tqdm, todo: list[Sample], tries: int) -> Callable[[Commit], None]:
    """Advances `bar` by the plan entries a commit of this round settles: each sample kept, and
    each dropped on its entry's last attempt."""
    last = {sample.sample_id for sample in todo if sample.attempt + 1 >= tries}
    return lambda commit: bar.update(len(commit.written) + sum(i in last for i in commit.dropped))


def _existing_commits(prepared: Prepared) -> tuple[list[Commit], list[str]]:
    """Commits already in the output, after deleting orphan Parquet files of killed runs."""
    location = prepared.location
    for folder in (DATA_DIR, COMMIT_DIR):
        location.remove_temporaries(folder)
    commits = read_commits(location)
    committed = {c.file for c in commits if c.file}
    orphans = [path for path in location.list(DATA_DIR, ".parquet") if path not in committed]
    for path in orphans:
        location.delete(path)
    return commits, orphans


def _check_complete(prepared: Prepared, made: dict[str, str]) -> None:
    missing = len(next_attempts(prepared.plan, prepared.recipe, made))
    if missing:
        raise BuildError(f"{missing} planned samples were not written; run the same command again to resume")


def _preview(prepared: Prepared, files: list[dict]) -> str | None:
    wanted = prepared.recipe.writer.preview_samples
    if not wanted or not files:
        return None
    location = prepared.location
    rows: list[dict] = []
    for entry in files:
        with location.fs.open_input_file(location.path(entry["path"])) as handle:
            rows += pq.read_table(handle).slice(0, wanted - len(rows)).to_pylist()
        if len(rows) >= wanted:
            break
    rows.sort(key=lambda row: row["index"])
    location.write_bytes(PREVIEW_FILE, preview_png(rows))
    return location.url(PREVIEW_FILE)

"""The build: plan -> generate -> label -> encode -> write, streamed by Ray Data.

``prepare_build`` does every check that can fail (recipe, plan, output, models) before
any model loads or anything is written. ``run_build`` resumes whatever the output
already holds, streams the missing samples through the actor pools, and finishes
with the manifest and the preview.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata

import numpy as np
import pyarrow.parquet as pq
import ray

from factory.detect import TORCHVISION_WEIGHTS
from factory.features import capture_call_index
from factory.annotate import AnnotateStage
from factory.generate import TINY, GenerateStage
from factory.label import LabelStage
from factory.plan import Sample, build_plan, plan_digest
from factory.card import write_card
from factory.preview import preview_png
from factory.quality import TINY as QUALITY_TINY, QualityStage
from factory.recipe import Recipe
from factory.loading import pipeline_failure
from factory.storage import (Location, StorageError, access_refused, check_model_source, check_reachable,
                             first_line)
from factory.vocab import get_vocabulary
from factory.write import COMMIT_DIR, DATA_DIR, Commit, encode_batch, read_commits, write_part

logger = logging.getLogger(__name__)

BUILD_FILE = "build.json"
MANIFEST_FILE = "manifest.json"
PREVIEW_FILE = "preview.png"
FORMAT = "dataset-factory/1"
_VERSIONED = ("dataset-factory", "torch", "torchvision", "diffusers", "transformers", "ray", "pyarrow")


class BuildError(RuntimeError):
    """The output cannot be built or resumed as asked; the message is one line."""


@dataclass
class Prepared:
    recipe: Recipe
    plan: list[Sample]
    location: Location


@dataclass
class Summary:
    out: str
    planned: int
    written: int
    dropped: dict[str, int]
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


def prepare_build(recipe: Recipe) -> Prepared:
    """Every check that needs no model, then the output is claimed with build.json.

    Plan, output, model paths, resume compatibility: a failure here writes nothing.
    Writing build.json last proves write access before any GPU time is spent.
    """
    plan = build_plan(recipe)
    location = check_reachable(recipe.output)
    check_model_source(recipe.generator.model, "model_index.json")
    if recipe.quality.model and recipe.quality.model != QUALITY_TINY:
        check_model_source(recipe.quality.model, "config.json")
    if recipe.annotator.checkpoint:
        _check_annotator(recipe)
    elif recipe.labeler.weights not in (None, TORCHVISION_WEIGHTS):
        check_model_source(recipe.labeler.weights)
    build = {"content_key": recipe.content_key(), "recipe": recipe.model_dump(mode="json")}
    try:
        if location.exists(BUILD_FILE):
            previous = json.loads(location.read_bytes(BUILD_FILE))
            if previous["content_key"] != build["content_key"]:
                raise BuildError(f"{recipe.output} holds a dataset of a different recipe "
                                 f"({previous['recipe']['name']}, key {previous['content_key']}); "
                                 f"use another --out or the same recipe")
            build = previous  # keep the first run's record; num_samples etc. may differ now
            planned = {s.sample_id for s in plan}
            outside = sum(1 for c in read_commits(location) for i in (*c.written, *c.dropped) if i not in planned)
            if outside:
                raise BuildError(f"{recipe.output} holds {outside} samples outside this plan "
                                 f"(was num_samples larger before?); use the same or a larger --num-samples")
        location.write_bytes(BUILD_FILE, json.dumps(build, indent=2).encode())
    except OSError as exc:
        what = "no permission to write to" if access_refused(exc) else "cannot write to"
        raise StorageError(f"{what} {recipe.output}: {first_line(exc)}") from None
    return Prepared(recipe, plan, location)


def _check_annotator(recipe: Recipe) -> None:
    """The checkpoint must exist and read features of the same U-Net, at a step this run has."""
    from grounding.train import CheckpointError, read_checkpoint_metadata  # the factory needs grounding only here

    try:
        metadata = read_checkpoint_metadata(recipe.annotator.checkpoint)
    except CheckpointError as exc:
        raise BuildError(str(exc)) from None
    if metadata["generator"] != recipe.generator.model:
        raise BuildError(f"grounding checkpoint {recipe.annotator.checkpoint} reads features of generator "
                         f"{metadata['generator']!r}, not {recipe.generator.model!r}")
    step = metadata["capture"]["steps_remaining"]
    if step > recipe.generator.steps:
        raise BuildError(f"grounding checkpoint needs capture step {step}, beyond generator.steps "
                         f"{recipe.generator.steps}")


def _accelerator_resources(recipe: Recipe) -> dict[str, float]:
    """One GPU per model actor when the cluster has GPUs or the model is a real one.

    Real models always ask for a GPU, so on an autoscaling cluster that starts with
    no GPU nodes the request is what brings them up (and the CPU head stays free).
    """
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if has_gpus or recipe.generator.model != TINY:
        if not has_gpus:  # without an autoscaler nothing would ever start: say what we wait for
            logger.warning("the cluster has no GPU now; the model actors wait for GPU nodes (an autoscaler "
                           "adds them; on a machine without GPUs use the tiny models)")
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": 1}


class ModelActor:
    """Ray Data actor: every model a sample needs, in one process on one GPU, then encoding.

    The labeler needs a few percent of the generator's time, so a pool of its own would
    hold GPUs that mostly idle (and one GPU could not host both pools); here every GPU
    does both, and only PNG bytes cross the object store. Two calls run at once: the
    lock keeps the models to one batch at a time, and the other call encodes its
    finished batch meanwhile, off the GPU's critical path.
    """

    def __init__(self, stages: list[tuple[type, dict, int]], encode: dict):
        self.stages = [(stage(**kwargs), batch_size) for stage, kwargs, batch_size in stages]
        self.encode = encode
        self.models = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]):
        with self.models:
            for stage, batch_size in self.stages:
                batch = _in_batches(stage, batch, batch_size)
        return encode_batch(batch, **self.encode)


def _in_batches(stage, batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The stage over the batch, at most ``size`` samples per call (its own batch size)."""
    n = len(batch["sample_id"])
    if n <= size:
        return stage(batch)
    parts = [stage({key: column[i:i + size] for key, column in batch.items()}) for i in range(0, n, size)]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def stream_samples(recipe: Recipe, todo: list[Sample], out: str, metadata: dict[bytes, bytes], *,
                   generate_stage: type | None = None, label_stage: type | None = None) -> list[Commit]:
    """The Ray Data pipeline over the samples still to make; returns their commits.

    One pool of model actors (generate, label, quality score, encode), then write tasks.
    ``generate_stage`` and ``label_stage`` are the model classes (default: the real
    ones); bench/scaling.py passes stand-ins that hold a GPU for a fixed time.
    """
    vocabulary = get_vocabulary(recipe.vocabulary)
    gen, lab, writer, pool = recipe.generator, recipe.labeler, recipe.writer, recipe.pool
    if recipe.annotator.checkpoint:  # the grounding module reads the generator's own U-Net features
        stages = [(AnnotateStage, {"generator": gen, "annotator": recipe.annotator, "vocabulary": recipe.vocabulary,
                                   "load_attempts": pool.load_attempts}, gen.batch_size)]
    else:
        stages = [(generate_stage or GenerateStage, {"config": gen, "capture": recipe.capture,
                                                     "load_attempts": pool.load_attempts}, gen.batch_size),
                  (label_stage or LabelStage, {"config": lab, "vocabulary": recipe.vocabulary,
                                               "image_size": min(gen.height, gen.width),
                                               "load_attempts": pool.load_attempts}, lab.batch_size)]
    if recipe.quality.model:
        stages.append((QualityStage, {"model": recipe.quality.model,
                                      "load_attempts": pool.load_attempts}, lab.batch_size))
    encode = {"image_format": writer.image_format, "jpeg_quality": writer.jpeg_quality,
              "class_indices": {c.name: c.index for c in vocabulary.classes},
              "generator": gen.model, "labeler": _labeler_id(recipe)}
    rows = [asdict(s) for s in todo]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // gen.batch_size)))
    actors = ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size,
                                        max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    ds = ds.map_batches(ModelActor, fn_constructor_kwargs={"stages": stages, "encode": encode},
                        batch_size=gen.batch_size, compute=actors, batch_format="numpy",
                        **_accelerator_resources(recipe))
    ds = ds.map_batches(write_part, fn_kwargs={"out": out, "metadata": metadata},
                        batch_size=writer.rows_per_file, batch_format="pyarrow", num_cpus=0.5)
    return [Commit.from_json(row["commit"].encode()) for row in ds.iter_rows()]


def _labeler_id(recipe: Recipe) -> str:
    if recipe.annotator.checkpoint:
        return f"grounding:{recipe.annotator.checkpoint}"
    lab = recipe.labeler
    return lab.model if not lab.weights else f"{lab.model}:{lab.weights}"


def _versions() -> dict[str, str]:
    versions = {}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


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


def _check_complete(plan: list[Sample], commits: list[Commit]) -> None:
    seen: set[str] = set()
    for commit in commits:
        for sample_id in (*commit.written, *commit.dropped):
            if sample_id in seen:
                raise BuildError(f"sample {sample_id} is committed twice (two builds writing one output?)")
            seen.add(sample_id)
    missing = len({s.sample_id for s in plan} - seen)
    if missing:
        raise BuildError(f"{missing} planned samples were not written; run the same command again to resume")


def build_manifest(prepared: Prepared, commits: list[Commit]) -> dict:
    recipe, plan = prepared.recipe, prepared.plan
    vocabulary = get_vocabulary(recipe.vocabulary)
    dropped: dict[str, int] = {}
    for commit in commits:
        for reason in commit.dropped.values():
            dropped[reason] = dropped.get(reason, 0) + 1
    files = sorted(({"path": c.file, "rows": c.rows, "bytes": c.bytes, "sha256": c.sha256}
                    for c in commits if c.file), key=lambda f: f["path"])
    return {
        "format": FORMAT,
        "name": recipe.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.model_dump(mode="json"),
        "content_key": recipe.content_key(),
        "plan": {"samples": len(plan), "digest": plan_digest(plan)},
        "vocabulary": {"name": vocabulary.name,
                       "classes": [{"index": c.index, "name": c.name, "natural": c.natural}
                                   for c in vocabulary.classes],
                       "background": 0, "ignore": 255},
        "models": {"generator": recipe.generator.model, "labeler": _labeler_id(recipe)},
        "versions": _versions(),
        "counts": {"planned": len(plan), "written": sum(f["rows"] for f in files), "dropped": dropped},
        "capture": _capture_info(recipe, commits),
        "files": files,
    }


def _capture_info(recipe: Recipe, commits: list[Commit]) -> dict | None:
    """How to read the triplet columns: what was captured when, and each column's fp16 shape."""
    capture = recipe.capture
    if capture.features == "none" and not capture.attention:
        return None
    info = {"features": capture.features, "attention": capture.attention, "dtype": "float16",
            "shapes": next((c.capture_shapes for c in commits if c.capture_shapes), {})}
    if capture.features != "none":
        info.update(steps_remaining=capture.step,
                    unet_call=capture_call_index(recipe.generator.steps, capture.step))
    return info


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


def run_build(prepared: Prepared) -> Summary:
    recipe, plan, location = prepared.recipe, prepared.plan, prepared.location
    start = time.perf_counter()
    commits, orphans = _existing_commits(prepared)
    resumed = sum(len(c.written) + len(c.dropped) for c in commits)
    done = {i for c in commits for i in (*c.written, *c.dropped)}
    todo = [s for s in plan if s.sample_id not in done]
    new: list[Commit] = []
    if todo:
        ray.init(ignore_reinit_error=True, log_to_driver=False)
        metadata = {b"dataset-factory": json.dumps({"recipe": recipe.name, "content_key": recipe.content_key()}).encode()}
        try:
            new = stream_samples(recipe, todo, location.uri, metadata)
        except Exception as exc:  # a model that would not load, or storage that failed beyond its retries
            cause = pipeline_failure(exc)
            if cause is None:
                raise
            raise BuildError(f"{cause} (committed parts are kept; the same command resumes)") from None
    commits += new
    _check_complete(plan, commits)
    manifest = build_manifest(prepared, commits)
    preview = _preview(prepared, manifest["files"])
    location.write_bytes(MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    card = write_card(location, manifest)
    stage_seconds: dict[str, float] = {}
    for commit in new:
        for stage, seconds in commit.seconds.items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
    notes = [f"deleted {len(orphans)} orphan part(s) of an interrupted run"] if orphans else []
    return Summary(out=location.uri, planned=len(plan), written=manifest["counts"]["written"],
                   dropped=manifest["counts"]["dropped"], new_this_run=sum(len(c.written) + len(c.dropped) for c in new),
                   resumed_from=resumed, wall_seconds=time.perf_counter() - start, stage_seconds=stage_seconds,
                   bytes_written=sum(f["bytes"] for f in manifest["files"]), files=len(manifest["files"]),
                   preview=preview, manifest=location.url(MANIFEST_FILE), card=card, notes=notes)

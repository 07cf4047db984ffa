"""The build: plan -> generate -> label -> encode -> write, streamed by Ray Data.

``prepare_build`` does every check that can fail (recipe, plan, output, models) before
any model loads or anything is written. ``run_build`` resumes whatever the output
already holds, streams the missing samples through the actor pools, and finishes
with the manifest and the preview.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

import numpy as np
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from factory.pipeline.plan import Sample, all_attempts, build_plan, next_attempts, open_followed, plan_batch, plan_digest
from factory.pipeline.recipe import TORCHVISION_WEIGHTS, LabelerConfig, Recipe
from factory.core.cluster import actor_resources, cluster_gpus, init_ray
from factory.core.conventions import BACKGROUND, IGNORE, TINY
from factory.core.errors import FactoryError
from factory.core.loading import ModelLoadError, pipeline_failure
from factory.core.storage import (
    Location,
    StorageError,
    absolute_model_source,
    access_refused,
    check_model_source,
    check_reachable,
    first_line,
)
from factory.core.vocab import get_vocabulary
from factory.dataset.batch import LABEL_COLUMNS
from factory.dataset.card import write_card
from factory.dataset.layout import BUILD_FILE, COMMIT_DIR, DATA_DIR, FORMAT, MANIFEST_FILE, PREVIEW_FILE
from factory.dataset.preview import preview_png
from factory.dataset.write import Commit, encode_batch, read_commits, write_part
from factory.diffusion.steps import capture_call_index

logger = logging.getLogger(__name__)

_VERSIONED = ("dataset-factory", "torch", "torchvision", "diffusers", "transformers", "ray", "pyarrow")


class BuildError(FactoryError, RuntimeError):
    """The output cannot be built or resumed as asked; the message is one line."""


@dataclass
class Prepared:
    recipe: Recipe
    plan: list[Sample]
    location: Location
    notes: list[str] = field(default_factory=list)  # what the user should know before the run
    follows: dict | None = None  # the followed dataset (recipe.follow), as the manifest records it
    claimed: bool = False  # build.json is this run's: a model-load failure before any commit takes it back


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
    plan = build_plan(recipe)
    notes, follows = recipe.notes, None
    if recipe.follow is not None:  # its plan is the followed set's samples, never more than num_samples
        followed = open_followed(recipe.follow).manifest
        follows = {"dataset": recipe.follow, "name": followed["name"], "content_key": followed["content_key"]}
    elif recipe.num_samples is not None and recipe.num_samples > len(plan):
        notes.append(f"num_samples {recipe.num_samples} is more than the recipe plans: building all {len(plan)}")
    location = check_reachable(recipe.output)
    check_model_source(recipe.generator.model, "model_index.json")
    if recipe.quality.model and recipe.quality.model != TINY:
        check_model_source(recipe.quality.model, "config.json")
    if recipe.annotator.checkpoint:
        notes += _check_annotator(recipe)
    elif not recipe.source.enabled:
        _check_labeler(recipe.labeler)
    if recipe.agreement.enabled:
        _check_labeler(recipe.agreement.labeler)
    build = {"content_key": recipe.content_key(), "recipe": recipe.model_dump(mode="json")}
    try:
        claimed = not location.exists(BUILD_FILE)
        if not claimed:
            previous = json.loads(location.read_bytes(BUILD_FILE))
            if previous["content_key"] != build["content_key"]:
                raise BuildError(f"{recipe.output} holds a dataset of a different recipe "
                                 f"({previous['recipe']['name']}, key {previous['content_key']}); "
                                 f"use another --out or the same recipe")
            if previous["recipe"].get("follow") != recipe.follow:  # another set of samples with the same key
                raise BuildError(f"{recipe.output} holds a build with follow {previous['recipe'].get('follow')}; "
                                 f"use another --out or the same follow")
            build = previous  # keep the first run's record; num_samples etc. may differ now
            planned = {s.sample_id for s in all_attempts(plan, recipe)}
            outside = sum(1 for c in read_commits(location) for i in (*c.written, *c.dropped) if i not in planned)
            if outside and recipe.source.enabled:  # an image's id is its name and content
                raise BuildError(f"{recipe.output} holds {outside} samples of images no longer in "
                                 f"{recipe.source.images} (removed, renamed or changed since); restore them, or "
                                 f"write to another --out")
            if outside:
                raise BuildError(f"{recipe.output} holds {outside} samples outside this plan (were num_samples "
                                 f"or attempts larger before?); use the same or larger --num-samples and --attempts")
        location.write_bytes(BUILD_FILE, json.dumps(build, indent=2).encode())
    except OSError as exc:
        what = "no permission to write to" if access_refused(exc) else "cannot write to"
        raise StorageError(f"{what} {recipe.output}: {first_line(exc)}") from None
    return Prepared(recipe, plan, location, notes, follows, claimed)


def _check_annotator(recipe: Recipe) -> list[str]:
    """The checkpoint must exist, read the features this build makes (same generator model and
    total steps; it captures at the checkpoint's step), and, for a dataset declared for a split,
    never have seen that split's unseen classes. Other generation differences are returned as
    notes for the user."""
    # Imported here: only an annotating build needs grounding (and torch) before its models load.
    from factory.core.checkpoints import CheckpointError
    from grounding.checkpoint import (
        check_generation,
        classes_seen,
        generation_record,
        read_grounding_metadata,
        training_generation,
    )

    uri = recipe.annotator.checkpoint
    try:
        metadata = read_grounding_metadata(uri)
        trained = training_generation(uri, metadata)
    except CheckpointError as exc:
        raise BuildError(str(exc)) from None
    # This build captures at the checkpoint's step: only the rest of its generation can differ.
    used = generation_record(recipe.model_dump(mode="json"), trained["capture_step"])
    features, others = check_generation(trained, used)
    if features:
        raise BuildError(f"grounding checkpoint {uri} reads features this build does not make: "
                         f"{'; '.join(features)} (its training data vs this recipe)")
    if recipe.split is not None:
        vocabulary = get_vocabulary(recipe.vocabulary)
        shown = sorted(set(classes_seen(metadata, vocabulary)) & set(vocabulary.unseen(recipe.split)))
        if shown:
            raise BuildError(f"grounding checkpoint {uri} was trained on {', '.join(shown)}, unseen classes of "
                             f"split {recipe.split}, which this dataset is declared for; annotate with a module "
                             f"trained on split {recipe.split}'s seen classes")
    return [f"grounding checkpoint {uri} was trained on images made otherwise: {'; '.join(others)} "
            f"(its training data vs this recipe)"] if others else []


def _accelerator_resources(recipe: Recipe) -> dict[str, float]:
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


@dataclass(frozen=True)
class StageSpec:
    """One model stage inside the model actor, and the batch columns it reads and adds
    (``factory.dataset.batch``). ``stage`` is a Ray Data callable class, or its
    "module:Class" path, imported in the actor: the driver never loads model code."""
    stage: type | str
    kwargs: dict
    batch_size: int  # most samples per call
    reads: tuple[str, ...]
    adds: tuple[str, ...]


_LABELS = (*LABEL_COLUMNS, "label_seconds")


def model_stages(recipe: Recipe) -> list[StageSpec]:
    """The recipe's model stages, in order: generate then label, generate-and-annotate, or read real
    images and label them; a second labeler's agreement; quality."""
    gen = recipe.generator.model_copy(update={"model": absolute_model_source(recipe.generator.model)})
    lab = _absolute_labeler(recipe.labeler)
    annotator = recipe.annotator.model_copy(update={"checkpoint": absolute_model_source(recipe.annotator.checkpoint)})
    attempts = recipe.pool.load_attempts
    if recipe.source.enabled:  # real images: read, into the U-Net, labelled by their masks or the module
        source = recipe.source.model_copy(update={"images": absolute_model_source(recipe.source.images)})
        stages = [StageSpec("factory.pipeline.real:ImageStage",
                            {"generator": gen, "source": source, "capture": recipe.capture, "annotator": annotator,
                             "vocabulary": recipe.vocabulary, "fast": recipe.fast, "load_attempts": attempts},
                            gen.batch_size,
                            reads=("source_image", "prompt", "seed", "classes", "class_words"),
                            adds=("image", "psnr", "generate_seconds", "timestep", "latent", "features_<r>",
                                  *_LABELS))]
    elif annotator.enabled:  # the module reads the generator's own U-Net features, DAAM its attention
        stages = [StageSpec("factory.pipeline.annotate:AnnotateStage",
                            {"generator": gen, "annotator": annotator, "vocabulary": recipe.vocabulary,
                             "fast": recipe.fast, "load_attempts": attempts}, gen.batch_size,
                            reads=("prompt", "seed", "classes", "class_words"),
                            adds=("image", "generate_seconds", *_LABELS))]
    else:
        capture = ("timestep", "latent", "features_<r>", "ufeatures_<r>", "daam")
        stages = [StageSpec("factory.pipeline.generate:GenerateStage",
                            {"config": gen, "capture": recipe.capture, "fast": recipe.fast, "load_attempts": attempts},
                            gen.batch_size,
                            reads=("prompt", "seed", "class_words"), adds=("image", "generate_seconds", *capture)),
                  StageSpec("factory.pipeline.label:LabelStage",
                            {"config": lab, "vocabulary": recipe.vocabulary, "image_size": min(gen.height, gen.width),
                             "load_attempts": attempts}, lab.batch_size,
                            reads=("image", "classes"), adds=_LABELS)]
    if recipe.agreement.enabled:
        check = recipe.agreement.model_copy(update={"labeler": _absolute_labeler(recipe.agreement.labeler)})
        stages.append(StageSpec("factory.pipeline.agreement:AgreementStage",
                                {"config": check, "vocabulary": recipe.vocabulary,
                                 "image_size": min(gen.height, gen.width), "load_attempts": attempts},
                                check.labeler.batch_size,
                                reads=("image", "classes", "class_bits", "label", "drop_reason"),
                                adds=("agreement", "label", "drop_reason", "label_seconds")))
    if recipe.quality.model:
        stages.append(StageSpec("factory.pipeline.quality:QualityStage",
                                {"model": absolute_model_source(recipe.quality.model), "load_attempts": attempts},
                                lab.batch_size,
                                reads=("image",), adds=("quality",)))
    return stages


def model_ids(recipe: Recipe) -> dict[str, str]:
    """What the `generator` and `labeler` columns and the manifest name as the models."""
    generator = recipe.generator.model
    if recipe.source.enabled:  # the image is the source's; the generator's U-Net made the features
        generator = f"{recipe.source.format}:{recipe.source.images} ({recipe.source.route} by {generator})"
    ids = {"generator": generator, "labeler": _labeler_id(recipe)}
    if recipe.agreement.enabled:
        ids["agreement"] = _detector_id(recipe.agreement.labeler)
    return ids


def _check_labeler(lab: LabelerConfig) -> None:
    """Its model files exist, when named by path (one-line StorageError otherwise)."""
    saved = "config.json" if lab.model == "open_vocabulary" else None  # a save_pretrained folder
    if lab.weights not in (None, TORCHVISION_WEIGHTS):
        check_model_source(lab.weights, saved)
    if lab.sam:
        check_model_source(lab.sam, "config.json")


def _absolute_labeler(lab: LabelerConfig) -> LabelerConfig:
    """The labeler's model files as every node finds them."""
    return lab.model_copy(update={"weights": absolute_model_source(lab.weights), "sam": absolute_model_source(lab.sam)})


def resolve_stage(stage: type | str) -> type:
    """A StageSpec's class, imported from its "module:Class" path when it is one."""
    if isinstance(stage, type):
        return stage
    module, name = stage.split(":")
    return getattr(importlib.import_module(module), name)


class ModelActor:
    """Ray Data actor: every model a sample needs, in one process on one GPU, then encoding.

    The labeler needs a few percent of the generator's time, so a pool of its own would
    hold GPUs that mostly idle (and one GPU could not host both pools); here every GPU
    does both, and only PNG bytes cross the object store. Two calls run at once. By default
    one lock keeps the models to one batch at a time, and the other call encodes its finished
    batch meanwhile, off the GPU's critical path. With ``overlap`` each phase of each stage
    (a stage's ``phases``: the generator's denoise and decode) has a lock and a CUDA stream of
    its own, so batch k decodes and is labelled while batch k+1 denoises.
    """

    def __init__(self, stages: list[StageSpec], encode: dict, overlap: bool = False, static_batch: bool = False):
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


def _encode_options(recipe: Recipe, models: dict[str, str] | None) -> dict:
    vocabulary, writer, ids = get_vocabulary(recipe.vocabulary), recipe.writer, models or model_ids(recipe)
    return {"image_format": writer.image_format, "jpeg_quality": writer.jpeg_quality,
            "class_indices": {c.name: c.index for c in vocabulary.classes}, "generator": ids["generator"],
            "labeler": ids["labeler"]}  # the row's columns; the agreement labeler is the manifest's


def write_concurrency(gpus: int) -> int:
    """Write tasks in flight: one per 4 model actors, at least 2."""
    return max(2, gpus // 4)


def stream_samples(recipe: Recipe, todo: list[Sample], out: str, metadata: dict[bytes, bytes], *,
                   stages: list[StageSpec] | None = None, models: dict[str, str] | None = None,
                   actor: type = ModelActor, on_commit: Callable[[Commit], None] | None = None) -> list[Commit]:
    """The Ray Data pipeline over the samples still to make; returns their commits.

    One pool of model actors (``stages``, default ``model_stages(recipe)``, then encoding),
    then write tasks. ``models`` names the models in the rows (default ``model_ids(recipe)``);
    ``actor``: a ModelActor subclass (bench/scaling.py's holds its encoding as time).
    ``on_commit``: called with each commit as its part is written (the progress bar).
    """
    gen, writer, pool = recipe.generator, recipe.writer, recipe.pool
    rows = [s.row() for s in todo]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // gen.batch_size)))
    actors = ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size,
                                        max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    ds = ds.map_batches(actor, batch_size=gen.batch_size, compute=actors, batch_format="numpy",
                        fn_constructor_kwargs={"stages": stages or model_stages(recipe),
                                               "encode": _encode_options(recipe, models),
                                               "overlap": recipe.fast.overlap,
                                               "static_batch": recipe.fast.static_batch},
                        **_accelerator_resources(recipe))
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


def make_samples_here(recipe: Recipe, todo: list[Sample], out: str, metadata: dict[bytes, bytes], *,
                      stages: list[StageSpec] | None = None, models: dict[str, str] | None = None,
                      on_commit: Callable[[Commit], None] | None = None) -> list[Commit]:
    """What ``stream_samples`` does, in this process and one part at a time, without Ray: for
    small sets made on one machine (the procedural source), where a Ray actor's one CPU would
    halve the torch threads. The same model actor, encoding and part writer."""
    actor = ModelActor(stages or model_stages(recipe), _encode_options(recipe, models),
                       static_batch=recipe.fast.static_batch)  # one call at a time: nothing to overlap
    commits = []
    for start in range(0, len(todo), recipe.writer.rows_per_file):
        batch = plan_batch(todo[start:start + recipe.writer.rows_per_file])
        commit = write_part(actor(batch), out=out, metadata=metadata).column("commit")[0].as_py()
        commits.append(Commit.from_json(commit.encode()))
        if on_commit:
            on_commit(commits[-1])
    return commits


def _make(prepared: Prepared, todo: list[Sample], metadata: dict[bytes, bytes],
          stages: list[StageSpec] | None, models: dict[str, str], in_process: bool,
          on_commit: Callable[[Commit], None]) -> list[Commit]:
    """One round of samples, here or through Ray; their commits."""
    recipe, out = prepared.recipe, prepared.location.uri
    try:
        if in_process:
            return make_samples_here(recipe, todo, out, metadata, stages=stages, models=models, on_commit=on_commit)
        init_ray()
        return stream_samples(recipe, todo, out, metadata, stages=stages, models=models, on_commit=on_commit)
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


def _labeler_id(recipe: Recipe) -> str:
    if recipe.source.enabled and not recipe.annotator.enabled:
        return f"masks:{recipe.source.format}"
    if recipe.annotator.daam:
        return "daam"
    if recipe.annotator.checkpoint:
        return f"grounding:{recipe.annotator.checkpoint}"
    return _detector_id(recipe.labeler)


def _detector_id(lab: LabelerConfig) -> str:
    return ":".join([lab.model, *filter(None, (lab.weights, lab.sam))])


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


def outcomes(commits: list[Commit]) -> dict[str, str]:
    """Sample id -> "" when written, its drop reason when dropped."""
    found: dict[str, str] = {}
    for commit in commits:
        for sample_id, reason in (*((i, "") for i in commit.written), *commit.dropped.items()):
            if sample_id in found:
                raise BuildError(f"sample {sample_id} is committed twice (two builds writing one output?)")
            found[sample_id] = reason
    return found


def _check_complete(prepared: Prepared, made: dict[str, str]) -> None:
    missing = len(next_attempts(prepared.plan, prepared.recipe, made))
    if missing:
        raise BuildError(f"{missing} planned samples were not written; run the same command again to resume")


def attempt_counts(plan: list[Sample], recipe: Recipe, made: dict[str, str]) -> dict[str, dict[str, int]]:
    """Per class: plan entries naming it, samples attempted, entries kept and given up."""
    counts: dict[str, dict[str, int]] = {}
    attempts = {entry.index: [] for entry in plan}
    for sample in all_attempts(plan, recipe):
        if sample.sample_id in made:
            attempts[sample.index].append(made[sample.sample_id])
    for entry in plan:
        tried = attempts[entry.index]
        kept = "" in tried
        for name in entry.classes:
            count = counts.setdefault(name, dict.fromkeys(("planned", "attempted", "kept", "given_up"), 0))
            count["planned"] += 1
            count["attempted"] += len(tried)
            count["kept"] += kept
            count["given_up"] += not kept
    return counts


def build_manifest(prepared: Prepared, commits: list[Commit], models: dict[str, str]) -> dict:
    recipe, plan = prepared.recipe, prepared.plan
    vocabulary = get_vocabulary(recipe.vocabulary)
    made = outcomes(commits)
    dropped: dict[str, int] = {}
    for reason in filter(None, made.values()):
        dropped[reason] = dropped.get(reason, 0) + 1
    files = sorted(({"path": c.file, "rows": c.rows, "bytes": c.bytes, "sha256": c.sha256}
                    for c in commits if c.file), key=lambda f: f["path"])
    written = sum(f["rows"] for f in files)
    return {
        "format": FORMAT,
        "name": recipe.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.model_dump(mode="json"),
        "content_key": recipe.content_key(),
        "plan": {"samples": len(plan), "digest": plan_digest(plan),
                 "prompted_classes": prompted_classes(plan, vocabulary.names)},
        **({"follows": prepared.follows} if prepared.follows else {}),
        "vocabulary": {**vocabulary.definition(), "background": BACKGROUND, "ignore": IGNORE},
        "models": models,
        "versions": _versions(),
        # planned: plan entries; attempted: samples made for them (replacements too); written: kept
        # samples (one per entry at most); given_up: entries whose every attempt was dropped
        "counts": {"planned": len(plan), "attempted": len(made), "written": written, "dropped": dropped,
                   "given_up": len(plan) - written},
        "per_class": attempt_counts(plan, recipe, made),
        "capture": _capture_info(recipe, commits),
        "labels": label_provenance(recipe, models["labeler"]),
        **({"agreement": agreement_summary(recipe, commits, models["agreement"])} if recipe.agreement.enabled else {}),
        **({"presence": presence_summary(recipe, commits)} if any(c.presence for c in commits) else {}),
        "files": files,
    }


def agreement_summary(recipe: Recipe, commits: list[Commit], checker: str) -> dict:
    """Per class, how the second labeler's masks agreed with the labels (IoU) over every sample
    made, dropped ones too: the manifest's "agreement", which the card shows."""
    ious: dict[str, list[float]] = {}
    for commit in commits:
        for name, values in commit.agreement.items():
            ious.setdefault(name, []).extend(values)
    c, vocabulary = recipe.agreement, get_vocabulary(recipe.vocabulary)
    return {"labeler": checker, "min_iou": c.min_iou, "action": c.action, "classes": {
        name: {"samples": len(values), "mean": float(np.mean(values)), "median": float(np.median(values)),
               "below": int(np.sum(np.array(values) < c.min_iou))}
        for name, values in sorted(ious.items(), key=lambda item: vocabulary.lookup(item[0]).index)}}


def presence_summary(recipe: Recipe, commits: list[Commit]) -> dict:
    """Per class, how often the annotator judged it present and absent over every sample made
    (dropped ones too), and the spread of its presence scores: the manifest's "presence", which
    the card shows, so that a user sees the module's own signal without a judge."""
    scores: dict[str, list[float]] = {}
    for commit in commits:
        for name, values in commit.presence.items():
            scores.setdefault(name, []).extend(values)
    threshold, vocabulary = recipe.annotator.presence_threshold, get_vocabulary(recipe.vocabulary)
    return {"threshold": threshold, "classes": {
        name: {"samples": len(values), "present": int(np.sum(np.array(values) >= threshold)),
               "absent": int(np.sum(np.array(values) < threshold)),
               **dict(zip(("p10", "median", "p90"), np.percentile(values, [10, 50, 90]).round(4).tolist()))}
        for name, values in sorted(scores.items(), key=lambda item: vocabulary.lookup(item[0]).index)}}


def label_provenance(recipe: Recipe, labeler: str) -> dict:
    """Which classes' labels came from a labeler trained on that class (manifest "labels").

    An oracle labeler (Mask R-CNN, the procedural world's drawing) was trained on, or knows,
    every class it labels, and a real image's own masks annotate every class; the grounding
    annotator knows only its checkpoint's classes (matched by their words, ``classes_seen``);
    DAAM, which reads the generator's attention and trains nothing, none. A second labeler that acts on the labels (``agreement.min_iou`` > 0)
    chose which labels were kept with its knowledge of every class (a Mask R-CNN oracle, or an
    open-vocabulary model trained on the web), so it counts as trained on all of them. Protocol-II
    reads this, and where each image's class list came from (``class_lists``), to refuse a
    "zero-shot" segmenter trained on labels of its unseen classes.
    """
    names = get_vocabulary(recipe.vocabulary).names
    if recipe.annotator.checkpoint:
        from grounding.checkpoint import classes_seen, read_grounding_metadata  # only annotating builds need it

        metadata = read_grounding_metadata(recipe.annotator.checkpoint)
        vocabulary = get_vocabulary(recipe.vocabulary)
        trained, kind = set(classes_seen(metadata, vocabulary)), "annotator"
        # a split of another vocabulary (a user's classes drawn as the module's) says nothing of this one's
        split = metadata["split"] if metadata.get("vocabulary", {}).get("name", vocabulary.name) == vocabulary.name else None
    elif recipe.annotator.daam:
        trained, kind, split = set(), "daam", None
    elif recipe.source.enabled:
        trained, kind, split = set(names), "masks", None
    else:
        trained, kind, split = set(names), "oracle", None
    chosen_by = None
    if recipe.agreement.enabled and recipe.agreement.min_iou > 0:
        trained, split, chosen_by = set(names), None, _detector_id(recipe.agreement.labeler)
    return {"labeler": labeler, "kind": kind, "trained_split": split,
            "trained": {name: name in trained for name in names}, "class_lists": class_lists(recipe),
            **({"chosen_by": chosen_by} if chosen_by else {})}


def class_lists(recipe: Recipe) -> str:
    """Where each image's class list (the classes it is labelled for) came from: "prompt", the
    plan's; "user", a folder source's ``classes`` or ``classes_file``; "ground_truth", the masks or
    tags of a voc, voc_aug, coco or dataset source, which say which images show a class even when
    its labels come from a zero-shot annotator."""
    if not recipe.source.enabled:
        return "prompt"
    return "user" if recipe.source.format == "folder" else "ground_truth"


def prompted_classes(plan: list[Sample], names: tuple[str, ...]) -> list[str]:
    """The classes any prompt of the plan names, in vocabulary order (`names`): a prompt names
    exactly its entry's classes (templates must hold their placeholders, a prompt file's classes
    are in braces). The inductive setting refuses a set whose prompts named an unseen class."""
    named = {name for sample in plan for name in sample.classes}
    return [name for name in names if name in named]


def _capture_info(recipe: Recipe, commits: list[Commit]) -> dict | None:
    """How to read the triplet columns: what was captured when, and each column's fp16 shape."""
    capture = recipe.capture
    if capture.features == "none" and not capture.attention:
        return None
    info = {"features": capture.features, "attention": capture.attention, "dtype": "float16",
            "shapes": next((c.capture_shapes for c in commits if c.capture_shapes), {})}
    if capture.features != "none":
        info.update(steps_remaining=capture.step,
                    unet_call=capture_call_index(recipe.generator.steps, capture.step, recipe.generator.scheduler))
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


def run_build(prepared: Prepared, *, stages: list[StageSpec] | None = None,
              models: dict[str, str] | None = None, in_process: bool = False) -> Summary:
    """Make what the output lacks of the plan, then the manifest, preview and card.

    ``stages`` and ``models``: the model stages and their names, when not the recipe's
    (``model_stages``, ``model_ids``); the procedural source and the benchmarks pass theirs.
    ``in_process``: without Ray (``make_samples_here``)."""
    recipe, plan, location = prepared.recipe, prepared.plan, prepared.location
    models = models or model_ids(recipe)
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
                made_now = _make(prepared, todo, metadata, stages, models, in_process,
                                 on_commit=_settles(bar, todo, recipe.tries))
                made |= outcomes(made_now)
                new += made_now
        except KeyboardInterrupt:
            ray.shutdown()  # now: the errors of actors stopped mid-call would print after the job's last line
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

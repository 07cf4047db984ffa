"""Protocol-II training of the segmenter on synthetic (and real) data, data-parallel on Ray Train.

The driver (`prepare_training`) does every check that needs no model: datasets and their
vocabulary, the split, whether the setting is honest about the labels (below), the init
checkpoint, backbone and text weights, the output, and whether the output's checkpoint can be
resumed; last, for a fresh text head, it embeds the class names (`segmenter.text`).
`run_training` then streams the training rows (Ray Data, `segmenter.data`) to the Ray Train
workers, one equal shard of each dataset each (DDP needs equal step counts), and every worker
runs `train_loop_per_worker`.

One iteration is one optimizer step on `batch_size` samples over all workers. With both
synthetic and real data, every batch holds exactly `real_fraction` real samples (each worker
draws its part of the batch from its two shards), whatever the two sets' sizes; each dataset
holds every pass over it that the run reads, each pass in its own order and with its own crops,
all drawn from the run's seed (`segmenter.data`: one worker trains the same weights twice). The optimisation is
MaskFormer's standard one around the paper's numbers (Li et al. 2023, section 5): AdamW, lr 1e-4,
weight decay 1e-4, a poly schedule (power 0.9), the backbone at 0.1 x lr, and the gradient
norm of the whole model clipped at 0.01. On CUDA the forward runs under autocast (bf16, or
fp16 with loss scaling).

Settings:

- "transductive" (the paper's) trains on every synthetic image and label as made;
- "inductive" sets the pixels of the split's unseen classes to 255 (ignored) in synthetic
  labels and embeds only the seen class names, so no unseen class is ever a target or a
  name; it needs the text head (`model.head: text`), the only one that can score a class
  added at test time;
- "supervised" trains like "transductive" but claims no zero-shot result: an upper bound
  with oracle labels (a labeler trained on the unseen classes).

The two zero-shot settings refuse synthetic data whose labels of the split's unseen classes
(of every split when none is set) came from a labeler trained on them (the manifest's
record, `DatasetSource.supervised_classes`) or whose class lists, which say which images
show them, came from ground truth (an annotated VOC/COCO source); the inductive setting also
refuses a set whose prompts named one; both refuse an init checkpoint of another setting or
split. Real images (Model-D) have their unseen pixels ignored, never trained as background,
except in the supervised setting: there they are a real-data reference, every class labelled
(where synthetic data stands against real, as FreeMask, Yang et al. 2023, reports it).

Rank 0 writes `<out>/last/` (``segmenter.checkpoint``) every `checkpoint_every`
iterations and at the end; a rerun of the same command resumes from it: weights, optimizer
state, iteration. With `snapshot_every`, it also keeps the weights at every such iteration in
`<out>/iteration-<n>/` (``snapshot_name``), each an evaluable checkpoint: a training curve of one
schedule, where retraining to each length would change the poly schedule itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import ray
import ray.train
import ray.train.torch
import torch
from torch import Tensor, nn

from factory.core.checkpoints import METADATA_FILE, CheckpointError, check_same_run, load_optimizer_state
from factory.core.distributed import all_reduce_mean, fit
from factory.core.storage import absolute_uri, check_model_source, check_reachable, open_location
from factory.core.vocab import Vocabulary, get_vocabulary
from factory.dataset.source import DatasetError, DatasetSource
from segmenter.checkpoint import load_segmenter_checkpoint, read_segmenter_metadata, save_segmenter_checkpoint
from segmenter.config import RUN_IDENTITY, SegmenterModelConfig, SegmenterTrainConfig
from segmenter.data import (
    Augment,
    batch_parts,
    check_zero_shot,
    data_split,
    mixed_batches,
    normalize,
    passes_for,
    real_set_size,
    real_training_dataset,
    synthetic_dataset,
)
from segmenter.model import Segmenter, batch_targets, load_backbone_weights
from segmenter.text import TEMPLATE, check_text_encoder, encode_class_names

logger = logging.getLogger(__name__)


@dataclass
class TrainingPlan:
    """What every worker needs, decided once by the driver."""
    config: SegmenterTrainConfig
    vocabulary: Vocabulary
    split: int | None
    synthetic_rows: int
    real_rows: int
    model: SegmenterModelConfig  # the fresh start's, init's or the resumed checkpoint's
    resume: bool  # from <out>/last
    done_iterations: int
    class_embeddings: dict[str, list[float]] | None  # a fresh text head's: class name -> its text embedding
    data_labels: dict | None  # the synthetic data manifest's record of who labelled what ("labels")

    @property
    def unseen(self) -> list[str] | None:
        return None if self.split is None else list(self.vocabulary.unseen(self.split))

    def unseen_indices(self) -> list[int]:
        return [self.vocabulary.lookup(name).index for name in self.unseen or []]

    def worker_config(self) -> dict:
        seen = None if self.split is None else list(self.vocabulary.seen(self.split))
        return {"config": self.config.model_dump(mode="json"), "model": self.model.model_dump(mode="json"),
                "resume": self.resume, "class_embeddings": self.class_embeddings, "metadata": {
                    "vocabulary": self.vocabulary.definition(), "setting": self.config.setting,
                    "zero_shot": self.config.setting != "supervised", "split": self.split, "seen": seen,
                    "unseen": self.unseen, "data_labels": self.data_labels}}


@dataclass
class TrainingSummary:
    out: str
    iterations: int  # done in all
    resumed_from: int  # done before this run
    synthetic_rows: int
    real_rows: int
    last: str

    def report(self) -> str:
        lines = [f"\nSegmenter trained: {self.out}",
                 f"  samples    {self.synthetic_rows} synthetic, {self.real_rows} real"]
        if self.iterations > self.resumed_from:
            resumed = f" (resumed after iteration {self.resumed_from})" if self.resumed_from else ""
            lines.append(f"  iterations {self.iterations - self.resumed_from} run now{resumed}; "
                         f"{self.iterations} done")
        else:
            lines.append(f"  iterations all {self.iterations} were already done; nothing to train")
        return "\n".join([*lines, f"  checkpoint {self.last}"])


def _absolute_paths(config: SegmenterTrainConfig) -> SegmenterTrainConfig:
    update = {name: absolute_uri(getattr(config, name)) for name in ("data", "init", "out")}
    if config.real:
        update["real"] = config.real.model_copy(update={"root": absolute_uri(config.real.root)})
    model = {"backbone_weights": absolute_uri(config.model.backbone_weights)}
    if config.model.text_encoder and os.path.exists(config.model.text_encoder):  # not tiny, s3:// or a hub id
        model["text_encoder"] = absolute_uri(config.model.text_encoder)  # recorded for evaluation elsewhere
    update["model"] = config.model.model_copy(update=model)
    return config.model_copy(update=update)


def _init_model(config: SegmenterTrainConfig, vocabulary: Vocabulary, init: dict, split: int | None
                ) -> SegmenterModelConfig:
    """The init checkpoint's model, if this run can continue it: same preset, head, labels,
    setting and (for a zero-shot setting) split."""
    model = SegmenterModelConfig.model_validate(init["model"])
    if model.preset != config.model.preset:
        raise CheckpointError(f"init {config.init} holds a {model.preset} model; set model.preset: {model.preset}")
    if model.head != config.model.head:
        raise CheckpointError(f"init {config.init} has the {model.head} head; set model.head: {model.head}")
    if model.num_labels != len(vocabulary) + 1:
        raise CheckpointError(f"init {config.init} predicts {model.num_labels} labels, the {vocabulary.name} "
                              f"vocabulary has {len(vocabulary) + 1} with background")
    if init["setting"] != config.setting:
        raise CheckpointError(f"init {config.init} was trained {init['setting']}; a {config.setting} run must "
                              f"start from a {config.setting} checkpoint")
    if config.setting != "supervised" and init["split"] is not None and init["split"] != split:
        raise CheckpointError(f"init {config.init} was trained for split {init['split']}, so the unseen classes "
                              f"of split {split} are not zero-shot for it")
    return model


def _fresh_model(config: SegmenterTrainConfig, vocabulary: Vocabulary, split: int | None
                 ) -> tuple[SegmenterModelConfig, dict[str, list[float]] | None]:
    """A fresh start's model config and, for the text head, the embeddings of the class names it
    trains on: the seen ones when inductive, else all. Loads the text encoder: call it last."""
    head, embeddings = {}, None
    if config.model.head == "text":
        names = vocabulary.seen(split) if config.setting == "inductive" else vocabulary.names
        vectors = encode_class_names(config.model.text_encoder, vocabulary, names)
        embeddings = dict(zip(names, vectors.tolist()))
        head = {"head": "text", "text_encoder": config.model.text_encoder, "text_template": TEMPLATE,
                "text_dim": vectors.shape[1]}
    if config.model.preset == "real":
        frozen = bool(config.model.backbone_weights)
        return SegmenterModelConfig.real(len(vocabulary) + 1, frozen_backbone_norm=frozen, **head), embeddings
    small = SegmenterModelConfig.world if config.model.preset == "world" else SegmenterModelConfig.tiny
    return small(len(vocabulary) + 1, **head), embeddings


def prepare_training(config: SegmenterTrainConfig) -> TrainingPlan:
    """Every check that needs no model; raises DatasetError, StorageError or CheckpointError (one line)."""
    config = _absolute_paths(config)
    source = DatasetSource.open(config.data) if config.data else None
    real_rows, real_vocabulary = real_set_size(config.real) if config.real else (0, None)
    init = read_segmenter_metadata(config.init) if config.init else None
    vocabularies = {name for name in (source and source.vocabulary.name, real_vocabulary and real_vocabulary.name,
                                      init and init["vocabulary"]["name"]) if name}
    if len(vocabularies) > 1:
        raise DatasetError(f"data, real images and init use different vocabularies: {', '.join(sorted(vocabularies))}")
    vocabulary = (source and source.vocabulary) or real_vocabulary

    split = config.split or (source and data_split(source)) or (init and init["split"])
    if split is None and (config.setting == "inductive" or (config.real and config.setting != "supervised")):
        why = "the inductive setting ignores" if config.setting == "inductive" else "real images ignore"
        raise DatasetError(f"{why} the unseen classes of a split, and none is set: pass --split 1..3")
    if split is not None:
        try:
            vocabulary.unseen(split)
        except ValueError as exc:
            raise DatasetError(str(exc)) from None

    if source:
        check_zero_shot(source, config.setting, split)

    synthetic_rows = source.rows if source else 0
    for name, per_worker in batch_parts(config, config.num_workers).items():
        rows, needed = (synthetic_rows if name == "synthetic" else real_rows), per_worker * config.num_workers
        if rows < needed:  # every worker's equal shard must fill its part of a batch
            raise DatasetError(f"{rows} {name} training samples are fewer than the {needed} that each step of "
                               f"batch_size {config.batch_size} takes from them")
    model = _init_model(config, vocabulary, init, split) if init else None
    if config.model.backbone_weights:
        check_model_source(config.model.backbone_weights)
    if config.model.text_encoder and not init:
        check_text_encoder(config.model.text_encoder)

    location = check_reachable(config.out)
    resume, done = location.exists(f"last/{METADATA_FILE}"), 0
    if resume:
        saved = read_segmenter_metadata(location.url("last"))
        check_same_run(config.out, saved["train"], config.model_dump(mode="json"), RUN_IDENTITY)
        model, done = SegmenterModelConfig.model_validate(saved["model"]), saved["iteration"]
    embeddings = None
    if model is None:
        model, embeddings = _fresh_model(config, vocabulary, split)
    data_labels = source.manifest.get("labels") if source else None
    return TrainingPlan(config, vocabulary, split, synthetic_rows, real_rows, model, resume, done, embeddings,
                        data_labels)


def training_datasets(plan: TrainingPlan) -> dict[str, ray.data.Dataset]:
    """The Ray Train datasets: "synthetic" and/or "real" training rows."""
    config = plan.config
    parts = batch_parts(config, config.num_workers)

    def augment(ignore: list[int]) -> Augment:
        return Augment(config.crop_size, config.crop_scale, ignore, config.seed)

    def passes(name: str, rows: int) -> range:
        return passes_for(rows, parts[name] * config.num_workers, plan.done_iterations, config.iterations)

    datasets = {}
    if config.data:
        ignore = plan.unseen_indices() if config.setting == "inductive" else []
        datasets["synthetic"] = synthetic_dataset(DatasetSource.open(config.data), augment(ignore),
                                                  passes("synthetic", plan.synthetic_rows))
    if config.real:
        ignore = [] if config.setting == "supervised" else plan.unseen_indices()
        datasets["real"] = real_training_dataset(config.real.format, config.real.root, config.real.split,
                                                 plan.vocabulary.spec(), plan.real_rows, augment(ignore),
                                                 passes("real", plan.real_rows), readers=config.readers)
    return datasets


def snapshot_name(iteration: int) -> str:
    """The folder, inside a run's out, of its snapshot at `iteration` (``snapshot_every``)."""
    return f"iteration-{iteration:06d}"


def summarize(plan: TrainingPlan) -> TrainingSummary:
    last = open_location(plan.config.out).url("last")
    return TrainingSummary(out=plan.config.out, iterations=read_segmenter_metadata(last)["iteration"],
                           resumed_from=plan.done_iterations, synthetic_rows=plan.synthetic_rows,
                           real_rows=plan.real_rows, last=last)


def check_data_cpus(config: SegmenterTrainConfig) -> None:
    """The data pipeline needs CPUs beside the workers' (a task reading synthetic rows, an actor
    per real-image reader); without them Ray would wait for ever."""
    needed = (1 if config.data else 0) + (config.readers if config.real else 0)
    total = ray.cluster_resources().get("CPU", 0)
    spare = total - config.num_workers * config.cpus_per_worker
    if spare < needed:
        raise DatasetError(f"the cluster's {total:g} CPUs leave {spare:g} beside {config.num_workers} worker(s) of "
                        f"{config.cpus_per_worker:g}; reading data needs {needed} (1 for synthetic rows, 1 per "
                        f"real-image reader): lower cpus_per_worker or readers")


def run_training(plan: TrainingPlan) -> TrainingSummary:
    """Train the remaining iterations on Ray Train (joins the cluster ray.init finds, or starts one)."""
    config = plan.config
    if plan.done_iterations < config.iterations:
        if not ray.is_initialized():  # ignore_reinit_error would log a line each time
            ray.init()
        check_data_cpus(config)
        fit(train_loop_per_worker, plan.worker_config(), num_workers=config.num_workers, use_gpu=config.use_gpu,
            cpus_per_worker=config.cpus_per_worker, datasets=training_datasets(plan), preserve_order=True)
    return summarize(plan)


# ---------------------------------------------------------------- worker side

def make_optimizer(model: Segmenter, config: SegmenterTrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable weights: group 0 the backbone (lr x backbone_lr_factor), group 1 the rest."""
    backbone = {id(p) for p in model.backbone.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in backbone]},
              {"params": [p for p in trainable if id(p) not in backbone]}]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def set_learning_rates(optimizer: torch.optim.Optimizer, config: SegmenterTrainConfig, iteration: int) -> None:
    """The poly schedule at `iteration` (steps done so far)."""
    factor = (1 - iteration / config.iterations) ** config.poly_power
    for group, base in zip(optimizer.param_groups, (config.lr * config.backbone_lr_factor, config.lr)):
        group.update(lr=base * factor, weight_decay=config.weight_decay)


def _mixed_precision(device: torch.device, enabled: bool):
    """(autocast context, gradient scaler): a no-op pair off CUDA; fp16 needs loss scaling, bf16 not."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext(), torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor, *,
               num_labels: int, autocast=contextlib.nullcontext(), scaler: torch.amp.GradScaler | None = None,
               clip_grad_norm: float | None = None) -> float:
    """One optimizer step on uint8 images (B, H, W, 3) and label maps (B, H, W); returns the loss."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    mask_labels, class_labels = batch_targets(labels, num_labels)
    with autocast:
        loss = model(normalize(images), mask_labels, class_labels).loss
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def setup_model(config: SegmenterTrainConfig, worker_config: dict, vocabulary: Vocabulary, last: str,
                device: torch.device) -> tuple[Segmenter, torch.optim.Optimizer, dict]:
    """The model and its optimizer: resumed from `last`, started from init, or fresh; and the run's
    progress: {"start": iterations done, "log"}."""
    progress = {"start": 0, "log": []}
    if worker_config["resume"]:
        model, saved = load_segmenter_checkpoint(last)
        progress = {"start": saved["iteration"], "log": saved["log"]}
    elif config.init:
        model, _ = load_segmenter_checkpoint(config.init)
    else:
        torch.manual_seed(config.seed)  # the same start on every rank (DDP copies rank 0's anyway)
        model = Segmenter(SegmenterModelConfig.model_validate(worker_config["model"]))
        if config.model.backbone_weights:
            load_backbone_weights(model, config.model.backbone_weights)
        if embeddings := worker_config["class_embeddings"]:
            model.add_class_embeddings([vocabulary.lookup(name).index for name in embeddings],
                                       torch.tensor(list(embeddings.values())))
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    if worker_config["resume"]:
        load_optimizer_state(last, optimizer, saved)
    return model, optimizer, progress


class LossWindow:
    """The loss and speed of the steps since the last log line."""

    def __init__(self):
        self.loss, self.steps, self.start = 0.0, 0, time.perf_counter()

    def add(self, loss: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1

    def close(self, iteration: int, device: torch.device) -> dict:
        """The window's log entry (its loss averaged over all workers); starts the next window."""
        entry = {"iteration": iteration, "loss": all_reduce_mean(self.loss, self.steps, device),
                 "iterations_per_second": self.steps / (time.perf_counter() - self.start)}
        self.__init__()
        return entry


def train_loop_per_worker(worker_config: dict) -> None:
    """One Ray Train worker (TorchTrainer's train_loop_per_worker); see the module docstring."""
    config = SegmenterTrainConfig.model_validate(worker_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    last = open_location(config.out).url("last")
    vocabulary = get_vocabulary(worker_config["metadata"]["vocabulary"])
    model, optimizer, progress = setup_model(config, worker_config, vocabulary, last, device)
    start, log = progress["start"], progress["log"]
    trained = ray.train.torch.prepare_model(model)
    autocast, scaler = _mixed_precision(device, config.mixed_precision)
    parts = batch_parts(config, world)
    batches = mixed_batches({name: ray.train.get_dataset_shard(name) for name in parts}, parts, rank, config.seed)
    num_labels = model.config.num_labels
    text_classes = [vocabulary.by_index(i).name for i in model.known_classes] if model.config.head == "text" else None

    window = LossWindow()
    for iteration in range(start + 1, config.iterations + 1):
        images, labels = next(batches)
        set_learning_rates(optimizer, config, iteration - 1)
        window.add(train_step(trained, optimizer, images, labels, num_labels=num_labels, autocast=autocast,
                              scaler=scaler, clip_grad_norm=config.clip_grad_norm))
        finished = iteration == config.iterations
        if iteration % config.log_every == 0 or finished:
            log.append(window.close(iteration, device))
            if rank == 0:
                # Ray Train shows worker logs on the driver (a print is echoed twice there).
                logger.info(f"iteration {iteration}/{config.iterations}  loss {log[-1]['loss']:.4f}  "
                            f"{log[-1]['iterations_per_second']:.2f} it/s")
        save_last = iteration % config.checkpoint_every == 0 or finished
        snapshot = config.snapshot_every is not None and iteration % config.snapshot_every == 0
        if rank == 0 and (save_last or snapshot):
            metadata = {**worker_config["metadata"], "iteration": iteration, "resumed_from": start, "log": log,
                        "text_classes": text_classes, "train": config.model_dump(mode="json")}
            if snapshot:
                save_segmenter_checkpoint(open_location(config.out).url(snapshot_name(iteration)), model, None,
                                          metadata)
            if save_last:
                save_segmenter_checkpoint(last, model, optimizer, metadata)

"""Protocol-I training of the grounding module on a triplet dataset, data-parallel on Ray Train.

The driver (`prepare_training`) does every check that needs no model: datasets, classes,
the train/validation rows, the output, and whether the output's checkpoint can be resumed.
Each Ray Train worker (`train_loop_per_worker`) then reads its own share of those rows
straight from the Parquet files (`TripletSource.take`, file by file, only the columns
the Featurizer needs) and keeps it in memory: a latent-mode row is ~40 kB, and U-Net
features are recomputed on the worker's own device, next to the module being trained.
Workers get equal step counts (a shorter share wraps around), as DDP needs. ``mix`` adds
more triplet sets made alike (real images' triplets beside generated ones: the papers'
"sim+real"), each worker taking its share of every set.

Each epoch: train (Adam, as in the papers), then validation mIoU over classes, one log line,
and checkpoints (``grounding.checkpoint``) written by rank 0, local or s3://: ``<out>/last/``
every epoch and ``<out>/best/`` when the validation mIoU rises. A rerun resumes from last/
(best/ when last/ is damaged).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from factory.core.checkpoints import METADATA_FILE, check_same_run
from factory.core.distributed import all_reduce_mean, fit
from factory.core.storage import Location, absolute_model_source, absolute_uri, check_reachable, open_location
from grounding.checkpoint import (
    read_grounding_metadata,
    restore_grounding_checkpoint,
    resume_point,
    save_grounding_checkpoint,
)
from grounding.config import RUN_IDENTITY, GroundingTrainConfig, grounding_model_config
from grounding.data import (DatasetError, Featurizer, TripletSource, confusable_classes, in_validation,
                            with_negatives)
from grounding.losses import grounding_loss, presence_loss
from grounding.metrics import IoUCounts, PresenceCounts, count_batch
from grounding.model import GroundingModule

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- driver side

@dataclass
class TrainingPlan:
    """What every worker needs, decided once by the driver."""
    config: GroundingTrainConfig
    classes: list[str]  # canonical names trained on
    train_rows: list[int]  # positions in config.data
    mix_rows: list[list[int]]  # positions in each of config.mix
    val_rows: list[int]  # positions in config.val (or config.data)
    resume: str | None  # "last" or "best" folder of config.out, None for a fresh start
    done_epochs: int
    generator: str  # the set's generator, a local path made absolute

    def worker_config(self) -> dict:
        return {"config": self.config.model_dump(mode="json"), "classes": self.classes,
                "train_rows": self.train_rows, "mix_rows": self.mix_rows, "val_rows": self.val_rows,
                "resume": self.resume,
                "generator": self.generator}


@dataclass
class TrainingSummary:
    out: str
    epochs: int
    resumed_from: int  # epochs done before this run
    trained: int  # epochs run now
    train_samples: int
    val_samples: int
    best_epoch: int | None
    best_miou: float | None
    best: str | None  # checkpoint URI
    last: str

    def report(self) -> str:
        lines = [f"\nGrounding module trained: {self.out}",
                 f"  samples   {self.train_samples} training, {self.val_samples} validation"]
        if self.trained:
            resumed = f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""
            lines.append(f"  epochs    {self.trained} run now{resumed}; {self.epochs} done")
        else:
            lines.append(f"  epochs    all {self.epochs} were already done; nothing to train")
        if self.best is None:
            lines.append("  best      none (no validation class had a mask)")
        else:
            lines += [f"  best      epoch {self.best_epoch}, val mIoU {self.best_miou:.4f}",
                      f"  checkpoint {self.best}"]
        return "\n".join([*lines, f"  last      {self.last}"])


def resolve_classes(config: GroundingTrainConfig, source: TripletSource) -> list[str]:
    """Canonical names of the trained classes, checked against the dataset's vocabulary."""
    vocabulary = source.vocabulary
    split = config.split or source.split
    if config.classes == "seen" and split is None:
        raise DatasetError(f"classes: seen needs a split, and {source.uri} was built without one; "
                        f"pass --split 1..3 or --classes all")
    try:
        if split is not None:
            vocabulary.unseen(split)  # checks the split
        if config.classes == "all":
            return list(vocabulary.names)
        if config.classes == "seen":
            return list(vocabulary.seen(split))
        return [vocabulary.lookup(name).name for name in config.classes]
    except ValueError as exc:  # an unknown split or class name
        raise DatasetError(str(exc)) from None


def _usable_rows(source: TripletSource, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Sample ids and which rows name only trained classes."""
    index = source.read(["sample_id", "classes"])
    allowed = set(classes)
    usable = np.array([set(names) <= allowed for names in index.column("classes").to_pylist()], dtype=bool)
    return index.column("sample_id").to_pylist(), usable


def prepare_training(config: GroundingTrainConfig) -> TrainingPlan:
    """Every check that needs no model; raises DatasetError, StorageError or CheckpointError (one line)."""
    config = config.model_copy(update={"data": absolute_uri(config.data), "out": absolute_uri(config.out),
                                       "val": config.val and absolute_uri(config.val),
                                       "mix": config.mix and [absolute_uri(uri) for uri in config.mix]})
    source = TripletSource.open(config.data)
    val_source = TripletSource.open(config.val) if config.val else source
    mixed = [TripletSource.open(uri) for uri in config.mix or []]
    for other in (val_source, *mixed):  # one Featurizer serves every set, so they must be featurized alike
        for what, ours, theirs in (("generator", source.generator, other.generator),
                                   ("capture mode", source.mode, other.mode),
                                   ("total steps", source.generation["steps"], other.generation["steps"]),
                                   ("capture step", source.capture_step, other.capture_step),
                                   ("vocabulary", source.vocabulary.name, other.vocabulary.name),
                                   ("image size", source.image_size, other.image_size)):
            if ours != theirs:
                raise DatasetError(f"{other.uri} differs from {source.uri} in {what}: {theirs} vs {ours}")
    if source.image_size[0] != source.image_size[1]:
        raise DatasetError(f"{source.uri} has {source.image_size[0]}x{source.image_size[1]} images; "
                        f"the grounding module makes square masks")
    classes = resolve_classes(config, source)
    ids, usable = _usable_rows(source, classes)
    if config.val:
        train = usable
        _, val = _usable_rows(val_source, classes)
    else:
        held = in_validation(ids, config.val_fraction)
        train, val = usable & ~held, usable & held
    mix_rows = [np.flatnonzero(_usable_rows(other, classes)[1]).tolist() for other in mixed]
    if train.sum() + sum(map(len, mix_rows)) < config.num_workers:
        raise DatasetError(f"{source.uri}: {train.sum()} training samples name only the {len(classes)} trained "
                        f"classes; need at least num_workers={config.num_workers}")
    if not val.any():
        raise DatasetError(f"no validation samples name only the trained classes "
                        f"({'in ' + val_source.uri if config.val else f'val_fraction {config.val_fraction}'})")
    location = check_reachable(config.out)
    resume, done = resume_point(location), 0
    if resume is not None:
        name, metadata = resume
        check_same_run(config.out, metadata["train"], config.model_dump(mode="json"), RUN_IDENTITY)
        done = metadata["epoch"]
    return TrainingPlan(config, classes, np.flatnonzero(train).tolist(), mix_rows, np.flatnonzero(val).tolist(),
                        resume and resume[0], done, absolute_model_source(source.generator))


def summarize(plan: TrainingPlan) -> TrainingSummary:
    location = open_location(plan.config.out)
    last = read_grounding_metadata(location.url("last"))
    best = read_grounding_metadata(location.url("best")) if location.exists(f"best/{METADATA_FILE}") else None
    return TrainingSummary(
        out=plan.config.out, epochs=last["epoch"], resumed_from=plan.done_epochs,
        trained=last["epoch"] - plan.done_epochs, train_samples=len(plan.train_rows) + sum(map(len, plan.mix_rows)),
        val_samples=len(plan.val_rows), best_epoch=best and best["epoch"],
        best_miou=best and best["metrics"]["val_miou"], best=best and location.url("best"),
        last=location.url("last"))


def run_training(plan: TrainingPlan) -> TrainingSummary:
    """Train the remaining epochs on Ray Train (joins the cluster ray.init finds, or starts one)."""
    config = plan.config
    if plan.done_epochs < config.epochs:
        fit(train_loop_per_worker, plan.worker_config(), num_workers=config.num_workers, use_gpu=config.use_gpu)
    return summarize(plan)


# ---------------------------------------------------------------- worker side

@dataclass
class WorkerData:
    """A worker's share of the rows, kept in memory, and the featurizer that makes its batches."""
    source: TripletSource
    featurizer: Featurizer
    classes: list[str]  # trained on
    confusable: dict[str, list[str]] | None  # the classes hard negatives are drawn from, per named class
    train_rows: pa.Table
    val_rows: pa.Table
    steps_rows: int  # rows every worker trains on per epoch (a shorter share wraps: equal step counts)
    batch_size: int  # this worker's part of a step


def load_data(config: GroundingTrainConfig, worker_config: dict, rank: int, world: int,
              device: torch.device) -> WorkerData:
    source = TripletSource.open(config.data)
    val_source = TripletSource.open(config.val) if config.val else source
    featurizer = Featurizer(source, config.model.text, ignore_empty=config.ignore_empty,
                            classes=worker_config["classes"], device=device, generator=worker_config["generator"])
    shares = [source.take(worker_config["train_rows"][rank::world], source.columns)]
    shares += [TripletSource.open(uri).take(rows[rank::world], source.columns)
               for uri, rows in zip(config.mix or [], worker_config["mix_rows"])]
    rows = len(worker_config["train_rows"]) + sum(map(len, worker_config["mix_rows"]))
    confusable = (confusable_classes(featurizer, source.vocabulary, worker_config["classes"],
                                     source.recipe["prompts"], config.confusable) if config.confusable else None)
    return WorkerData(source, featurizer, worker_config["classes"], confusable, pa.concat_tables(shares),
                      val_source.take(worker_config["val_rows"][rank::world], source.columns),
                      math.ceil(rows / world), config.batch_size // world)


def setup_module(config: GroundingTrainConfig, data: WorkerData, rank: int, device: torch.device,
                 resume: str | None) -> tuple[GroundingModule, torch.optim.Optimizer, dict]:
    """The module and its optimizer, fresh or as the checkpoint `resume` left them, and the run's
    progress: {"start": first epoch to run, "best", "history"}."""
    model_config = grounding_model_config(config.model, data.featurizer.feature_channels(),
                                          data.featurizer.text_dim, data.source.image_size[0])
    # DDP copies rank 0's initial weights to every worker; per-rank seeds only vary dropout.
    torch.manual_seed(config.seed + rank)
    module = GroundingModule(model_config).to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if resume is None:
        return module, optimizer, {"start": 1, "best": {"epoch": None, "val_miou": None}, "history": []}
    saved = restore_grounding_checkpoint(resume, module, optimizer)
    for group in optimizer.param_groups:  # the command line may change them between runs
        group.update(lr=config.lr, weight_decay=config.weight_decay)
    return module, optimizer, {"start": saved["epoch"] + 1, "best": saved["best"], "history": saved["history"]}


def set_learning_rate(optimizer: torch.optim.Optimizer, config: GroundingTrainConfig, epochs_done: float) -> None:
    """`config.lr`, constant or on a cosine from it to 0 over all epochs (a function of progress alone,
    so a resumed run continues the same curve)."""
    factor = 0.5 * (1 + math.cos(math.pi * epochs_done / config.epochs)) if config.schedule == "cosine" else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.lr * factor


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: WorkerData,
                    config: GroundingTrainConfig, epoch: int, rank: int, device: torch.device) -> float:
    """One pass over the worker's share, in an order of its own; the mean loss over all workers."""
    model.train()
    order = np.random.default_rng([config.seed, epoch, rank]).permutation(len(data.train_rows))
    order = np.resize(order, data.steps_rows)
    total, steps = 0.0, 0
    negatives = np.random.default_rng([config.seed, epoch, rank, 1])
    share = config.negatives if config.model.presence != "none" else 0.0  # only a presence head learns from them
    source = data.source
    for i in range(0, data.steps_rows, data.batch_size):
        set_learning_rate(optimizer, config, epoch - 1 + i / data.steps_rows)
        rows = with_negatives(data.train_rows.take(order[i:i + data.batch_size]), data.classes, source.vocabulary,
                              source.recipe["prompts"], share, negatives, data.confusable)
        batch = data.featurizer(rows)
        logits, presence = model(batch.features, batch.class_embeddings, batch.class_mask, with_presence=True)
        loss = grounding_loss(logits, batch.targets, batch.valid, config.loss, batch.ignore)
        if presence is not None:
            loss = loss + config.presence_weight * presence_loss(presence, batch.present, batch.named)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
    return all_reduce_mean(total, steps, device)


@torch.no_grad()
def validate(module: GroundingModule, data: WorkerData, device: torch.device) -> tuple[IoUCounts, PresenceCounts]:
    """IoU and presence counts of the worker's validation rows, summed over all workers."""
    if dist.is_initialized():  # validate exactly the module rank 0 saves (batch-norm statistics)
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
    module.eval()
    iou, presence = IoUCounts(), PresenceCounts()
    names = data.source.vocabulary.names
    for start in range(0, len(data.val_rows), data.batch_size):
        batch = data.featurizer(data.val_rows.slice(start, data.batch_size))
        count_batch(iou, presence, module.predict(batch.features, batch.class_embeddings, batch.class_mask),
                    batch, names)
    if dist.is_initialized():
        # exact integer counts in a fixed layout: a class per row, then the presence cells
        totals = torch.tensor([iou.pixels.get(name, [0, 0]) for name in names]
                              + [presence.counts[:2], presence.counts[2:]], dtype=torch.int64, device=device)
        dist.all_reduce(totals)
        *pixels, (tp, fp), (fn, tn) = totals.tolist()
        iou = IoUCounts({name: counts for name, counts in zip(names, pixels) if counts[1]})
        presence = PresenceCounts((tp, fp, fn, tn))
    return iou, presence


def save(out: Location, module: GroundingModule, optimizer: torch.optim.Optimizer, metadata: dict,
         improved: bool) -> None:
    """last/ every epoch, best/ when the validation mIoU rose."""
    save_grounding_checkpoint(out.url("last"), module, optimizer, metadata)
    if improved:
        save_grounding_checkpoint(out.url("best"), module, optimizer, metadata)


def train_loop_per_worker(worker_config: dict) -> None:
    """One Ray Train worker (TorchTrainer's train_loop_per_worker); see the module docstring."""
    config = GroundingTrainConfig.model_validate(worker_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    out = open_location(config.out)
    data = load_data(config, worker_config, rank, world, device)
    resume = worker_config["resume"] and out.url(worker_config["resume"])
    module, optimizer, progress = setup_module(config, data, rank, device, resume)
    start, best, history = progress["start"], progress["best"], progress["history"]
    model = ray.train.torch.prepare_model(module)
    source = data.source
    for epoch in range(start, config.epochs + 1):
        train_loss = train_one_epoch(model, optimizer, data, config, epoch, rank, device)
        iou, presence = validate(module, data, device)
        per_class = iou.iou(source.vocabulary.names)
        miou = sum(per_class.values()) / len(per_class) if per_class else float("nan")
        improved = not math.isnan(miou) and (best["val_miou"] is None or miou > best["val_miou"])
        if improved:
            best = {"epoch": epoch, "val_miou": miou}
        history.append({"epoch": epoch, "train_loss": train_loss, "val_miou": miou})
        if rank == 0:
            metadata = {
                "epoch": epoch, "metrics": {"train_loss": train_loss, "val_miou": miou, "val_iou": per_class,
                                            "val_presence": presence.rates()},
                "best": best, "history": history, "resumed_from": start - 1,
                "text": config.model.text.model_dump(), "generation": source.generation,
                "capture": source.manifest["capture"], "vocabulary": source.manifest["vocabulary"],
                "classes": data.classes, "split": config.split or source.split, "train": config.model_dump(mode="json")}
            save(out, module, optimizer, metadata, improved)
            best_text = "none" if best["epoch"] is None else f"{best['val_miou']:.4f} (epoch {best['epoch']})"
            # Ray Train shows worker logs on the driver (a print is echoed twice there).
            found = "  ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in presence.rates().items())
            logger.info(f"epoch {epoch}/{config.epochs}  loss {train_loss:.4f}  val mIoU {miou:.4f}  "
                        f"masked named classes: {found}  best {best_text}")
        ray.train.report({"epoch": epoch, "train_loss": train_loss, "val_miou": miou})

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from factory.core.checkpoints import METADATA_FILE, CheckpointError, check_same_run, load_optimizer_state, read_tensors
from factory.core.distributed import all_reduce_mean, fit
from factory.core.storage import absolute_model_source, absolute_uri, check_reachable, open_location
from grounding.checkpoint import read_grounding_metadata, resume_point, save_grounding_checkpoint
from grounding.config import GroundingModelConfig
from grounding.data import Batch, DatasetError, Featurizer, TextConfig, TripletSource, in_validation, with_negatives
from grounding.losses import grounding_loss, presence_loss
from grounding.model import GroundingModule

logger = logging.getLogger(__name__)


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: Literal["tiny", "world", "real"] = Field(
        "tiny", description="module sizes: 'tiny' (tests, CPU), 'world' (the mini world's generator, CPU) or "
        "'real' (the paper's: D=240, d_e=512, 3 decoder layers); feature channels, text width and mask size "
        "come from the dataset")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="decoder dropout; null: the preset's (0.1)")
    presence: Literal["none", "query", "region", "match"] = Field(
        "region", description="a presence head (grounding.model), trained on every named seen class, found or not, "
        "so that a class the image lacks gets no mask: 'region' reads the class query and what its mask covers, "
        "'match' that region's cosine with the class's text embedding, 'query' the query alone; 'none': the "
        "papers' module")
    text: TextConfig = TextConfig()


class GroundingTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="triplet dataset: local folder or s3:// prefix")
    mix: list[str] | None = Field(None, description="more triplet datasets trained on whole with data, made "
                                  "alike (e.g. real images' triplets: the papers' sim+real); validation stays data's")
    val: str | None = Field(None, description="validation triplet dataset; null: hold out val_fraction of data")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of data held out for validation "
                                "(by sample_id hash) when val is null")
    out: str = Field(description="checkpoint folder: local or s3://; a rerun resumes from it")
    model: ModelSection = ModelSection()
    loss: Literal["bce", "bce+logcosh_dice"] = Field("bce+logcosh_dice", description="BCE (Li et al. "
                                                     "2023) or BCE + log-cosh Dice (Simoncini and Ankit)")
    ignore_empty: bool = Field(True, description="classes with an empty oracle mask do not count in the mask loss "
                               "(Li et al. 2023, Table 3); the presence loss counts them, as absent")
    presence_weight: float = Field(1.0, ge=0.0, description="weight of the presence loss beside the mask loss")
    negatives: float = Field(1.0, ge=0.0, le=1.0, description="share of training samples also asked about one "
                             "trained class they do not name (prompt and text name it; an empty target, presence "
                             "0): the hard negatives of an annotated image's class list")
    classes: Literal["seen", "all"] | list[str] = Field(
        "seen", description="classes trained on: 'seen' of the split, 'all', or a list of names; samples "
        "naming any other class are left out, so unseen classes are never shown")
    split: int | None = Field(None, description="seen/unseen split; null: the dataset recipe's split")
    epochs: int = Field(10, ge=1, description="epochs in all (a resumed run continues up to this)")
    batch_size: int = Field(8, ge=1, description="samples per step over all workers")
    lr: float = Field(1e-4, gt=0.0, description="Adam learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="Adam weight decay")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    use_gpu: Literal["auto"] | bool = Field("auto", description="'auto': a GPU per worker if the cluster has GPUs")
    seed: int = Field(0, ge=0, description="module initialisation and sample order")

    @field_validator("classes", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("seen", "all"):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("mix", mode="before")
    @classmethod
    def _comma_uris(cls, value: Any) -> Any:
        return [uri.strip() for uri in value.split(",") if uri.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _divisible(self) -> "GroundingTrainConfig":
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}")
        return self


# Changing these makes a different experiment: such an output is not resumed.
_RUN_IDENTITY = ("data", "mix", "val", "val_fraction", "model", "classes", "split", "ignore_empty")


def grounding_model_config(section: ModelSection, feature_channels: dict[int, int], text_dim: int,
                           image_size: int) -> GroundingModelConfig:
    """The preset's sizes on this dataset: its feature resolutions (the preset's reduce widths,
    coarsest first), its text encoder's width, and masks at the image size (as the paper)."""
    preset = getattr(GroundingModelConfig, section.preset)()
    widths = [preset.reduce_channels[r] for r in sorted(preset.reduce_channels)]
    if len(widths) != len(feature_channels):
        raise ValueError(f"preset {section.preset} fuses {len(widths)} feature resolutions, the dataset "
                         f"has {sorted(feature_channels)}")
    sizes = dict(feature_channels=feature_channels, reduce_channels=dict(zip(sorted(feature_channels), widths)),
                 text_dim=text_dim, mask_resolution=image_size, fuse_resolution=None)
    if section.dropout is not None:
        sizes["dropout"] = section.dropout
    sizes["presence"] = section.presence
    return GroundingModelConfig(**{**preset.model_dump(), **sizes})


class IoUTotals:
    """Protocol-I IoU: per class, intersection and union over the pixels of valid slots that the
    label map does not mark 255; prediction = sigmoid > 0.5 (empty where the presence head judges
    the class absent). mIoU is the mean over classes with a non-empty union. Beside it, how often a
    named class got a mask when the oracle found it (true/false positives, false negatives)."""

    def __init__(self, class_names: Sequence[str], device: torch.device | str = "cpu"):
        self.names = list(class_names)  # label index i is names[i - 1]; 0 is background
        self.intersection = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=device)
        self.union = torch.zeros_like(self.intersection)
        self.presence = torch.zeros(3, dtype=torch.float64, device=device)  # tp, fp, fn

    def update(self, predicted: Tensor, batch: Batch) -> None:
        masked = predicted.flatten(2).any(dim=2)
        truth = batch.present
        self.presence += torch.stack([(masked & truth)[batch.named].sum(), (masked & ~truth)[batch.named].sum(),
                                      (~masked & truth)[batch.named].sum()]).double()
        counted = ~batch.ignore[:, None].expand_as(predicted)[batch.valid]
        predicted, targets = predicted[batch.valid], batch.targets[batch.valid].bool()
        index = batch.class_indices[batch.valid]
        self.intersection.index_add_(0, index, (predicted & targets & counted).flatten(1).sum(1).double())
        self.union.index_add_(0, index, ((predicted | targets) & counted).flatten(1).sum(1).double())

    def all_reduce(self) -> None:
        if dist.is_initialized():
            for totals in (self.intersection, self.union, self.presence):
                dist.all_reduce(totals)

    def presence_scores(self) -> dict[str, float | None]:
        """Precision and recall of "the class got a mask" against the oracle's found flags."""
        tp, fp, fn = self.presence.tolist()
        return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None}

    def per_class(self) -> dict[str, float]:
        return {self.names[i - 1]: float(self.intersection[i] / self.union[i])
                for i in range(1, len(self.union)) if self.union[i] > 0}

    def miou(self) -> float:
        ious = list(self.per_class().values())
        return sum(ious) / len(ious) if ious else float("nan")


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
        check_same_run(config.out, metadata["train"], config.model_dump(mode="json"), _RUN_IDENTITY)
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

@torch.no_grad()
def validate(module: GroundingModule, featurizer: Featurizer, rows, batch_size: int,
             class_names: Sequence[str], device: torch.device) -> IoUTotals:
    """IoU totals of `rows` (this worker's share), summed over all workers."""
    module.eval()
    totals = IoUTotals(class_names, device)
    for start in range(0, len(rows), batch_size):
        batch = featurizer(rows.slice(start, batch_size))
        totals.update(module.predict(batch.features, batch.class_embeddings, batch.class_mask), batch)
    totals.all_reduce()
    return totals


def train_loop_per_worker(worker_config: dict) -> None:
    """One Ray Train worker (TorchTrainer's train_loop_per_worker); see the module docstring."""
    config = GroundingTrainConfig.model_validate(worker_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    source = TripletSource.open(config.data)
    val_source = TripletSource.open(config.val) if config.val else source
    classes = worker_config["classes"]
    featurizer = Featurizer(source, config.model.text, ignore_empty=config.ignore_empty, classes=classes,
                            device=device, generator=worker_config["generator"])
    model_config = grounding_model_config(config.model, featurizer.feature_channels(), featurizer.text_dim,
                                          source.image_size[0])
    # DDP copies rank 0's initial weights to every worker; per-rank seeds only vary dropout.
    torch.manual_seed(config.seed + rank)
    module = GroundingModule(model_config).to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    out = open_location(config.out)
    start, best, history = 1, {"epoch": None, "val_miou": None}, []
    if worker_config["resume"]:
        uri = out.url(worker_config["resume"])
        saved = read_grounding_metadata(uri)
        if GroundingModelConfig.model_validate(saved["model"]) != model_config:
            raise CheckpointError(f"{uri} holds a module of other sizes than this dataset and preset give")
        module.load_state_dict(read_tensors(uri, saved, "model"))
        load_optimizer_state(uri, optimizer, saved)
        for group in optimizer.param_groups:  # the command line may change them between runs
            group.update(lr=config.lr, weight_decay=config.weight_decay)
        start, best, history = saved["epoch"] + 1, saved["best"], saved["history"]
    model = ray.train.torch.prepare_model(module)

    shares = [source.take(worker_config["train_rows"][rank::world], source.columns)]
    shares += [TripletSource.open(uri).take(rows[rank::world], source.columns)
               for uri, rows in zip(config.mix or [], worker_config["mix_rows"])]
    train_rows = pa.concat_tables(shares)
    val_rows = val_source.take(worker_config["val_rows"][rank::world], source.columns)
    per_worker = math.ceil((len(worker_config["train_rows"]) + sum(map(len, worker_config["mix_rows"]))) / world)
    local_batch = config.batch_size // world
    names = source.vocabulary.names
    for epoch in range(start, config.epochs + 1):
        model.train()
        order = np.random.default_rng([config.seed, epoch, rank]).permutation(len(train_rows))
        order = np.resize(order, per_worker)  # equal step counts on every worker
        total, steps = 0.0, 0
        negatives = np.random.default_rng([config.seed, epoch, rank, 1])
        share = config.negatives if config.model.presence != "none" else 0.0  # only a presence head learns from them
        for i in range(0, per_worker, local_batch):
            rows = with_negatives(train_rows.take(order[i:i + local_batch]), classes, source.vocabulary,
                                  source.recipe["prompts"], share, negatives)
            batch = featurizer(rows)
            logits, presence = model(batch.features, batch.class_embeddings, batch.class_mask, with_presence=True)
            loss = grounding_loss(logits, batch.targets, batch.valid, config.loss, batch.ignore)
            if presence is not None:
                loss = loss + config.presence_weight * presence_loss(presence, batch.present, batch.named)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        train_loss = all_reduce_mean(total, steps, device)
        if dist.is_initialized():  # validate exactly the module rank 0 saves (batch-norm statistics)
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)
        totals = validate(module, featurizer, val_rows, local_batch, names, device)
        miou = totals.miou()
        improved = not math.isnan(miou) and (best["val_miou"] is None or miou > best["val_miou"])
        if improved:
            best = {"epoch": epoch, "val_miou": miou}
        history.append({"epoch": epoch, "train_loss": train_loss, "val_miou": miou})
        if rank == 0:
            metadata = {
                "epoch": epoch, "metrics": {"train_loss": train_loss, "val_miou": miou, "val_iou": totals.per_class(),
                                            "val_presence": totals.presence_scores()},
                "best": best, "history": history, "resumed_from": start - 1,
                "text": config.model.text.model_dump(), "generation": source.generation,
                "capture": source.manifest["capture"], "vocabulary": source.manifest["vocabulary"],
                "classes": classes, "split": config.split or source.split, "train": config.model_dump(mode="json")}
            save_grounding_checkpoint(out.url("last"), module, optimizer, metadata)
            if improved:
                save_grounding_checkpoint(out.url("best"), module, optimizer, metadata)
            best_text = "none" if best["epoch"] is None else f"{best['val_miou']:.4f} (epoch {best['epoch']})"
            # Ray Train shows worker logs on the driver (a print is echoed twice there).
            found = "  ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in totals.presence_scores().items())
            logger.info(f"epoch {epoch}/{config.epochs}  loss {train_loss:.4f}  val mIoU {miou:.4f}  "
                        f"masked named classes: {found}  best {best_text}")
        ray.train.report({"epoch": epoch, "train_loss": train_loss, "val_miou": miou})

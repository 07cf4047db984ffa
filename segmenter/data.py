"""The segmenter's training data as Ray Data datasets, and the training transform.

- Synthetic factory datasets (README, "Output"), local or s3://: `factory.reader`'s Ray Data
  reader over the files its manifest lists, the `image` and `label` columns, file order
  shuffled on every pass, decoded by the reader's decoders inside the augmentation call.
- Real datasets (`factory.dataset.real`: VOC, COCO): sample positions, in blocks of 16 whose
  order is shuffled on every pass, read by a pool of actors that each hold one reader
  (COCO's parses its annotation file once per actor). Their root must be readable on
  every node.

Both go through the same transform in Ray Data tasks: random resized crop to the crop size,
horizontal flip, colour jitter; label maps by nearest neighbour, so their values (and 255)
stay as they are. Rows come out as {"image": uint8 (S, S, 3), "label": uint8 (S, S)}:
normalisation (`normalize`) happens on the training device, so a quarter of the bytes
travel.

Everything random comes from the run's seed, so that a run given its seed reads the same
batches twice: the datasets hold every pass the run needs, each pass's file (or sample) order
drawn from (seed, pass); a row's crop, flip and jitter from (seed, pass, the row's identity:
its sample id, or its position in a real list), not from where it falls; Ray Data keeps that
order (`preserve_order`), and each worker's local shuffle is seeded. With one training worker the
batches are the same on every run; with several, Ray Data hands blocks to whichever worker
asks first, so which worker trains on which rows is not.

Ignoring classes (`ignore_classes`, pixels to 255) is how unseen classes stay out of
training: the inductive setting does it to synthetic labels, Model-D to real ones.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Container, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from PIL import Image
from torch import Tensor

from factory.core.storage import first_line
from factory.core.vocab import Vocabulary
from factory.dataset.codec import decode_image, decode_label
from factory.dataset.real import ignore_classes, real_dataset, voc_val_overlap
from factory.dataset.source import DatasetError, DatasetSource
from segmenter.config import RealSection, SegmenterTrainConfig

# The backbone's ImageNet pretraining statistics (torchvision's and transformers' ResNets alike).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT_RATIOS = (3 / 4, 4 / 3)  # of the random resized crop, as torchvision's
JITTER = 0.4  # brightness, contrast and saturation factors from [0.6, 1.4], as ColorJitter(0.4, 0.4, 0.4)
ROWS_PER_CALL = 16
MAX_BLOCKS = 1000  # of the item lists below: a small set trained long makes many passes, each block one object
SHUFFLE_BUFFER = 64  # rows each worker shuffles locally, on top of the per-pass file/sample order


def random_resized_crop(image: np.ndarray, label: np.ndarray, size: int, scale: tuple[float, float],
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random box of `scale` (fraction of the area) and aspect ratio 3/4..4/3, resized to
    size x size: the image bilinearly, the label map by nearest neighbour."""
    height, width = label.shape
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1])))
        crop_w, crop_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            break
    else:  # an image too elongated for these ratios: all of it
        crop_h, crop_w = height, width
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    box = (left, top, left + crop_w, top + crop_h)
    image = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=box)
    label = Image.fromarray(label).resize((size, size), Image.Resampling.NEAREST, box=box)
    return np.asarray(image), np.asarray(label)


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = JITTER) -> np.ndarray:
    """Brightness, contrast and saturation, each by a factor from [1 - strength, 1 + strength]."""
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = np.clip(image.astype(np.float32) * brightness, 0, 255)
    mean = float((x @ luma).mean())
    x = np.clip((x - mean) * contrast + mean, 0, 255)
    gray = (x @ luma)[..., None]
    x = np.clip((x - gray) * saturation + gray, 0, 255)
    return np.round(x).astype(np.uint8)


def train_transform(image: np.ndarray, label: np.ndarray, *, size: int, scale: tuple[float, float],
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB (H, W, 3) and label map (H, W) -> a random crop of size x size, maybe flipped,
    colour jittered; the label map keeps its values (255 included)."""
    image, label = random_resized_crop(image, label, size, scale, rng)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return color_jitter(image, rng), np.ascontiguousarray(label)


def normalize(images: Tensor) -> Tensor:
    """uint8 RGB (B, H, W, 3) on any device -> float32 (B, 3, H, W), ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


@dataclass(frozen=True)
class Augment:
    """The training transform's settings and the run's seed; `ignore`: class indices whose pixels become 255."""
    crop_size: int
    crop_scale: tuple[float, float]
    ignore: list[int]
    seed: int

    def rng(self, epoch: int, identity: str) -> np.random.Generator:
        """A row's draws: from the seed, the pass and the row's identity, not its place in a batch."""
        digest = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "little")
        return np.random.default_rng([self.seed, epoch, digest])

    def __call__(self, rows) -> dict[str, np.ndarray]:
        """(image, label, pass, identity) rows -> a training batch."""
        images, labels = [], []
        for image, label, epoch, identity in rows:
            image, label = train_transform(image, ignore_classes(label, self.ignore), size=self.crop_size,
                                           scale=self.crop_scale, rng=self.rng(epoch, identity))
            images.append(image)
            labels.append(label)
        return {"image": np.stack(images), "label": np.stack(labels)}


def pass_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Pass `epoch`'s order of `n` files or samples, the same on every run of `seed`."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def transform_synthetic(batch: dict[str, np.ndarray], *, fs, augment: Augment) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch of (pass, file) items -> that file's training rows, in chunks (module docstring)."""
    for epoch, path in zip(batch["pass"], batch["path"]):
        table = pq.read_table(path, filesystem=fs, columns=["sample_id", "image", "label"])
        for start in range(0, table.num_rows, ROWS_PER_CALL):
            chunk = table.slice(start, ROWS_PER_CALL).to_pydict()
            yield augment((decode_image(image), decode_label(label), int(epoch), sample_id)
                          for image, label, sample_id in zip(chunk["image"], chunk["label"], chunk["sample_id"]))


class RealSamples:
    """Ray Data actor: batches of (pass, sample position "id") -> training rows of a real dataset."""

    def __init__(self, *, format: str, root: str, split: str, vocabulary: str, augment: Augment):
        self.reader = real_dataset(format, root, split, vocabulary)
        self.augment = augment

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = ((self.reader[int(i)], int(epoch), str(int(i))) for epoch, i in zip(batch["pass"], batch["id"]))
        return self.augment((s.image, s.label, epoch, identity) for s, epoch, identity in samples)


def synthetic_dataset(source: DatasetSource, augment: Augment, passes: range) -> ray.data.Dataset:
    """Training rows of a factory dataset: each of `passes` reads every file once, in that pass's order."""
    paths = [source.location.path(path) for path in source.files]
    items = [{"pass": p, "path": paths[k]} for p in passes for k in pass_order(augment.seed, p, len(paths))]
    return ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS)).map_batches(
        transform_synthetic, batch_size=1, batch_format="numpy",
        fn_kwargs={"fs": source.location.fs, "augment": augment})


def real_training_dataset(format: str, root: str, split: str, vocabulary: str | dict, size: int, augment: Augment,
                          passes: range, *, readers: int) -> ray.data.Dataset:
    """Training rows of a real dataset of `size` samples, each of `passes` in its own order, read by up
    to `readers` actors. The positions are made in the driver: no task competes with the readers and
    the training workers for CPUs."""
    items = [{"pass": p, "id": int(i)} for p in passes for i in pass_order(augment.seed, p, size)]
    positions = ray.data.from_items(items, override_num_blocks=min(math.ceil(len(items) / ROWS_PER_CALL), MAX_BLOCKS))
    return positions.map_batches(
        RealSamples, batch_size=ROWS_PER_CALL, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=readers),
        fn_constructor_kwargs={"format": format, "root": root, "split": split, "vocabulary": vocabulary,
                               "augment": augment})


def passes_for(rows: int, rows_per_step: int, done: int, steps: int) -> range:
    """The passes over a dataset of `rows` rows that steps `done + 1 .. steps` read, `rows_per_step`
    rows each over all workers, and one more for the rows a worker's share leaves short. A resumed
    run starts at the pass its steps had reached (its batches are not an uninterrupted run's)."""
    return range(done * rows_per_step // rows, math.ceil(steps * rows_per_step / rows) + 1)


def real_set_size(real: RealSection) -> tuple[int, Vocabulary]:
    """The number of a real training set's images and its vocabulary; refuses a list holding VOC val images."""
    try:
        reader = real_dataset(real.format, real.root, real.split, real.vocabulary)
        leaked = voc_val_overlap(reader) if real.format != "coco" else []
    except (OSError, ValueError) as exc:
        raise DatasetError(f"real {real.format} images: {first_line(exc)}") from None
    if leaked:
        raise DatasetError(f"real {real.format} {real.split} lists {len(leaked)} images of VOC val, the evaluation "
                           f"set (first: {leaked[0]}): train on a list without them")
    return len(reader), reader.vocabulary


def data_split(source: DatasetSource) -> int | None:
    """The split a synthetic set was made for: its recipe's, else its annotator's training split."""
    return source.split or source.manifest.get("labels", {}).get("trained_split")


def _class_lists(manifest: dict) -> str:
    """Where each image's class list came from (manifest "labels"). A manifest from before the
    record says it through its recipe's source, from which the build decides it: no source,
    the prompts; a folder, the user; any other format, its ground truth."""
    if "class_lists" in manifest["labels"]:
        return manifest["labels"]["class_lists"]
    source = manifest["recipe"].get("source") or {}
    if not source.get("images"):
        return "prompt"
    return "user" if source.get("format", "folder") == "folder" else "ground_truth"


def _prompted_classes(source: DatasetSource) -> set[str]:
    """The classes the plan's prompts named (manifest "plan"). A manifest from before the record
    names the same classes in its per-class counts, as every prompt names exactly its plan
    entry's classes."""
    manifest = source.manifest
    if "prompted_classes" in manifest.get("plan", {}):
        return set(manifest["plan"]["prompted_classes"])
    if "per_class" not in manifest:
        raise DatasetError(f"{source.uri} does not record which classes its prompts named (built by an older "
                           f"version): rebuild it")
    return set(manifest["per_class"])


def check_zero_shot(source: DatasetSource, setting: str, split: int | None) -> None:
    """Refuse a zero-shot setting on a set that knew its unseen classes: their labels came from a
    labeler trained on them, or which images show them (the class lists) from ground truth; and
    the inductive setting on a set whose prompts named one (ZS3, Bucher et al. 2019; Li et al.
    2023: no unseen class name at training time). With no split, evaluation may score any, so
    every split's unseen classes count."""
    if setting == "supervised":
        return
    vocabulary, manifest = source.vocabulary, source.manifest
    splits = [split] if split is not None else range(1, len(vocabulary.unseen_splits) + 1)
    unseen = {name for k in splits for name in vocabulary.unseen(k)}
    which = f"split {split}" if split is not None else "the splits; no split is set"
    name = manifest.get("name") or source.uri

    def among(classes: Container[str]) -> str:  # the unseen ones, in vocabulary order
        return ", ".join(n for n in vocabulary.names if n in unseen and n in classes)

    if leaked := among(source.supervised_classes):
        raise DatasetError(f"{name}: labels of unseen classes {leaked} ({which}) come from a labeler "
                           f"trained on them; this is not zero-shot. Train on an annotated set, or pass --setting "
                           f"supervised for an oracle upper bound")
    if _class_lists(manifest) == "ground_truth":  # per_class is older than real-image sources
        if shown := among({n for n, counts in manifest["per_class"].items() if counts["kept"]}):
            raise DatasetError(f"{name}: which images show unseen classes {shown} ({which}) comes from the "
                               f"source's ground truth (its masks or tags); this is not zero-shot. Train on "
                               f"generated images or your own class lists, or pass --setting supervised")
    if setting == "inductive" and (named := among(_prompted_classes(source))):
        raise DatasetError(f"{name}: its prompts name unseen classes {named} ({which}); the inductive setting "
                           f"sees no unseen class name in training. Build the set from the seen classes "
                           f"(classes: seen), or pass --setting transductive")


def batch_parts(config: SegmenterTrainConfig, world: int) -> dict[str, int]:
    """Samples each of `world` workers takes per step from each training dataset."""
    per_worker = config.batch_size // world
    if not config.real:
        return {"synthetic": per_worker}
    if not config.data:
        return {"real": per_worker}
    real = round(per_worker * config.real_fraction)
    return {"synthetic": per_worker - real, "real": real}


def endless_batches(shard, batch_size: int, name: str, rank: int, seed: int) -> Iterator[dict]:
    """Batches of one dataset shard for ever: it holds every pass the run needs, and is read again
    should a worker's share still run out."""
    for repeat in itertools.count():
        empty = True
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                              local_shuffle_seed=hash_seed(seed, rank, repeat)):
            empty = False
            yield batch
        if empty:
            raise DatasetError(f"worker {rank}'s {name} data shard holds fewer than {batch_size} rows")


def hash_seed(*parts: int) -> int:
    """One 32-bit seed from several (Ray Data's local shuffle takes a single integer)."""
    return int(np.random.default_rng(list(parts)).integers(2**32))


def mixed_batches(shards: dict, parts: dict[str, int], rank: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """A worker's (images, labels) of every step: `parts[name]` rows of each dataset's shard,
    concatenated in the order of `parts` (the real rows last)."""
    streams = [endless_batches(shards[name], rows, name, rank, seed) for name, rows in parts.items()]
    while True:
        batches = [next(stream) for stream in streams]
        yield tuple(torch.cat([batch[column] for batch in batches]) for column in ("image", "label"))

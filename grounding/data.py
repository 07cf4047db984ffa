"""Triplet rows -> grounding module inputs; shared by training, evaluation and annotation.

A triplet dataset is a factory build with U-Net capture on (README, "Output"): each row
holds a prompt, its classes, one oracle mask per class, the label map (no loss and no
metric counts its 255 pixels: the labeler's unsure band, or all it left unclaimed), and
either the U-Net features (``features_<r>`` columns, fp16) or the latent they come from
(``latent`` + ``timestep``).
``TripletSource`` reads the dataset; ``Featurizer`` owns the frozen generator parts
(tokenizer, text encoders and, for latent datasets, the U-Net: Stable Diffusion's or SDXL's)
and turns a table of rows into a ``Batch``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from factory.core.conventions import IGNORE, is_held_out
from factory.core.devices import pick_dtype
from factory.core.options import fill_template
from factory.core.vocab import Vocabulary
from factory.dataset.batch import MAX_CLASSES
from factory.dataset.codec import decode_label, decode_png, encode_mask
from factory.dataset.source import DatasetError, DatasetSource
from factory.diffusion.features import feature_channels, from_fp16_bytes, unet_features
from factory.diffusion.pipelines import encode_texts, load_pipeline, unet_conditioning
from factory.diffusion.tokens import class_embeddings, class_token_positions
from grounding.checkpoint import generation_record
from grounding.config import TextConfig

ROW_COLUMNS = ["sample_id", "prompt", "classes", "class_words", "class_indices", "masks", "found", "label"]


def in_validation(sample_ids: Sequence[str], fraction: float) -> np.ndarray:
    """Which samples are held out for validation (``factory.core.conventions.is_held_out``)."""
    return np.array([is_held_out(i, fraction) for i in sample_ids], dtype=bool)


class TripletSource(DatasetSource):
    """A triplet dataset: a finished dataset with U-Net capture columns, and their layout."""

    @classmethod
    def open(cls, uri: str, *, allow_empty: bool = False) -> TripletSource:
        source = super().open(uri, allow_empty=allow_empty)
        if not source.capture or source.capture["features"] == "none":  # DAAM heat maps alone are no triplets
            raise DatasetError(f"{uri} has no U-Net capture columns (built with capture.features: none); "
                               f"build it with --capture.features latent")
        return source

    @property
    def mode(self) -> Literal["latent", "tensors"]:
        return self.capture["features"]

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(shape) for name, shape in self.capture["shapes"].items()}

    @property
    def capture_step(self) -> int:
        return self.capture["steps_remaining"]

    @property
    def generator(self) -> str:
        return self.recipe["generator"]["model"]

    @property
    def generation(self) -> dict:
        """How the images were made, as a grounding checkpoint records its training data's
        (``grounding.checkpoint.generation_record``)."""
        return generation_record(self.recipe, self.capture_step)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.recipe["generator"]["height"], self.recipe["generator"]["width"]

    @property
    def stored_features(self) -> dict[int, str]:
        """Resolution -> column of the stored U-Net features (none in latent mode)."""
        return {int(name.removeprefix("features_")): name for name in self.shapes if name.startswith("features_")}

    @property
    def feature_columns(self) -> list[str]:
        return ["latent", "timestep"] if self.mode == "latent" else list(self.stored_features.values())

    @property
    def columns(self) -> list[str]:
        """What a Featurizer reads (images are left on disk)."""
        return ROW_COLUMNS + self.feature_columns


def text_class_embeddings(pipe, text: TextConfig, prompts: Sequence[str],
                          class_words: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
    """(B, O, d) class embeddings and (B, O) mask: each class word's tokens averaged, in the
    text that `text` makes from the prompt and class words. Shared with the annotator."""
    texts = [text.render(p, w) for p, w in zip(prompts, class_words)]
    positions = [class_token_positions(pipe.tokenizer, t, w) for t, w in zip(texts, class_words)]
    return class_embeddings(encode_texts(pipe, texts), positions)


def confusable_classes(featurizer: Featurizer, vocabulary: Vocabulary, classes: Sequence[str],
                       prompts: dict[str, str], k: int) -> dict[str, list[str]]:
    """Each of `classes` -> the `k` others whose class embeddings, each class alone in the set's
    one-class prompt, are nearest to its own (cosine): the classes a text most easily confuses with
    it, whose absence is the hardest to tell (in the mini world, a colour or a shape in common)."""
    words = [[vocabulary.lookup(name).natural] for name in classes]
    texts = [fill_template(prompts["one"], prompts["two"], w) for w in words]
    embeddings, _ = text_class_embeddings(featurizer.pipe, featurizer.text, texts, words)
    unit = torch.nn.functional.normalize(embeddings[:, 0].float(), dim=-1)
    similarity = (unit @ unit.T).fill_diagonal_(-2.0).cpu()  # never a class's own neighbour
    order = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :k]
    return {name: [classes[j] for j in row] for name, row in zip(classes, order.tolist())}


def with_negatives(rows: pa.Table, classes: Sequence[str], vocabulary: Vocabulary, prompts: dict[str, str],
                   share: float, rng: np.random.Generator,
                   confusable: dict[str, list[str]] | None = None) -> pa.Table:
    """Hard negatives for the presence head: each row, with probability `share`, is also asked about
    one of `classes` that it does not name, at a random place in its class list, as an annotated
    image is asked about every class of a user's list. With `confusable` (``confusable_classes``)
    that class is one of a named class's nearest, where there is one; otherwise any. The prompt is
    made again from the set's templates (`prompts`: its recipe's one/two), so that latent-mode U-Net
    features, recomputed from it, are conditioned on the added class as an annotated image's are;
    its mask is empty and it is not found (a target of the presence loss only)."""
    if not share:
        return rows
    out = rows.to_pylist()
    for row in out:
        others = [name for name in classes if name not in row["classes"]]
        if confusable:
            near = {n for named in row["classes"] for n in confusable.get(named, ())}
            others = [name for name in others if name in near] or others
        if rng.random() >= share or not others or len(row["classes"]) >= MAX_CLASSES:
            continue
        added = vocabulary.lookup(others[rng.integers(len(others))])
        at = int(rng.integers(len(row["classes"]) + 1))
        empty = {**row["masks"][0], "bytes": encode_mask(np.zeros_like(decode_png(row["masks"][0]["bytes"])))}
        for column, value in (("classes", added.name), ("class_words", added.natural), ("found", False),
                              ("class_indices", added.index), ("masks", empty)):
            row[column] = [*row[column][:at], value, *row[column][at:]]
        row["prompt"] = fill_template(prompts["one"], prompts["two"], row["class_words"])
    return pa.Table.from_pylist(out, schema=rows.schema)


@dataclass
class Batch:
    """Grounding module inputs and targets; O = the most classes of any row, padded."""
    features: dict[int, Tensor]  # resolution -> (B, C_r, r, r)
    class_embeddings: Tensor  # (B, O, d) mean text-encoder state of each class word's tokens
    class_mask: Tensor  # (B, O) real class slots
    class_indices: Tensor  # (B, O) vocabulary label index per slot, 0 for padding
    targets: Tensor  # (B, O, H, W) float oracle masks
    valid: Tensor  # (B, O) slots the mask loss and the metrics count
    present: Tensor  # (B, O) the oracle found the class (its mask is not empty): the presence target
    named: Tensor  # (B, O) real slots of the allowed classes, found or not: those the presence loss counts
    ignore: Tensor  # (B, H, W) pixels 255 in the label map: neither positive nor negative for any slot

    def to(self, device: torch.device | str) -> "Batch":
        tensors = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "features"}
        return Batch(features={r: t.to(device) for r, t in self.features.items()}, **tensors)


def _padded(rows: list[list], fill, dtype: torch.dtype) -> Tensor:
    most = max(len(row) for row in rows)
    return torch.tensor([list(row) + [fill] * (most - len(row)) for row in rows], dtype=dtype)


class Featurizer:
    """Frozen generator parts (Stable Diffusion or SDXL) that turn triplet rows into a Batch.

    `classes` restricts the valid slots to those class names (seen classes for training;
    None: all). With `ignore_empty`, classes whose oracle mask is empty are not valid
    ("training without zero masks", Li et al. 2023, Table 3: 71.18 -> 83.19 one-object unseen).
    """

    def __init__(self, source: TripletSource, text: TextConfig, *, ignore_empty: bool = True,
                 classes: Collection[str] | None = None, device: torch.device | str = "cpu",
                 generator: str | None = None):
        self.source, self.text = source, text
        self.ignore_empty = ignore_empty
        self.allowed = None if classes is None else set(classes)
        self.device = torch.device(device)
        # `generator`: the set's generator as the driver resolved it (a local path made absolute:
        # Ray Train workers run in their own working directory).
        self.pipe = load_pipeline(generator or source.generator, self.device, pick_dtype("auto", self.device))
        if source.mode == "tensors":
            self.pipe.unet = None  # the features are stored; only the text encoder is needed

    @cached_property
    def text_dim(self) -> int:
        """Width of the class embeddings: the text states the generator conditions on (SD 1.5's 768,
        SDXL's two encoders side by side, 768 + 1280), measured on one text, as channels are."""
        return int(encode_texts(self.pipe, [""]).shape[-1])

    def conditioning(self, prompts: list[str]) -> dict:
        """The U-Net's keyword arguments for `prompts`, as the generation's conditional branch had them
        (SDXL's size ids: the set's images')."""
        return unet_conditioning(self.pipe, prompts, *self.source.image_size)

    def feature_channels(self) -> dict[int, int]:
        """Channels per resolution of this dataset's features: stored shapes, or one U-Net pass
        on a zero latent (the capture code, not a table, decides what a U-Net gives)."""
        if self.source.mode == "tensors":
            return {r: self.source.shapes[name][0] for r, name in self.source.stored_features.items()}
        latent = torch.zeros(1, *self.source.shapes["latent"], device=self.device, dtype=self.pipe.unet.dtype)
        return feature_channels(unet_features(self.pipe.unet, latent, 0, self.conditioning([""])))

    def features(self, rows: pa.Table) -> dict[int, Tensor]:
        """Stored features decoded, or recomputed by one U-Net pass on the stored latent,
        conditioned on the prompt as in the generation's conditional branch."""
        shapes = self.source.shapes
        if self.source.mode == "tensors":
            return {r: torch.from_numpy(np.stack([from_fp16_bytes(b, shapes[name])
                                                  for b in rows.column(name).to_pylist()])).to(self.device)
                    for r, name in self.source.stored_features.items()}
        timesteps = set(rows.column("timestep").to_pylist())
        if len(timesteps) != 1:
            raise ValueError(f"rows of one batch must share a capture timestep, got {sorted(timesteps)}")
        arrays = [from_fp16_bytes(b, shapes["latent"]) for b in rows.column("latent").to_pylist()]
        unet = self.pipe.unet
        latent = torch.from_numpy(np.stack(arrays)).to(self.device, unet.dtype)
        features = unet_features(unet, latent, timesteps.pop(), self.conditioning(rows.column("prompt").to_pylist()))
        return {r: t.clone() for r, t in features.items()}  # clones leave inference mode: trainable inputs

    def __call__(self, rows: pa.Table) -> Batch:
        prompts = rows.column("prompt").to_pylist()
        words = rows.column("class_words").to_pylist()
        classes = rows.column("classes").to_pylist()
        found = rows.column("found").to_pylist()
        embeddings, class_mask = text_class_embeddings(self.pipe, self.text, prompts, words)
        masks = [[decode_png(m["bytes"]).astype(bool) for m in row] for row in rows.column("masks").to_pylist()]
        # 255 in the label map (an instance in the unsure band; every unclaimed pixel when a class
        # was not found) is neither a class nor background: no class's target counts those pixels.
        labels = rows.column("label").to_pylist()
        ignore = torch.from_numpy(np.stack([decode_label(label) == IGNORE for label in labels]))
        height, width = masks[0][0].shape
        targets = torch.zeros(len(masks), class_mask.shape[1], height, width)
        valid, present, named = (torch.zeros(class_mask.shape, dtype=torch.bool) for _ in range(3))
        for b, row in enumerate(masks):
            for o, mask in enumerate(row):
                targets[b, o] = torch.from_numpy(mask)
                named[b, o] = self.allowed is None or classes[b][o] in self.allowed
                present[b, o] = bool(found[b][o]) and bool(mask.any())
                valid[b, o] = (found[b][o] and named[b, o] and not (self.ignore_empty and not mask.any()))
        return Batch(features=self.features(rows), class_embeddings=embeddings, class_mask=class_mask,
                     class_indices=_padded(rows.column("class_indices").to_pylist(), 0, torch.long),
                     targets=targets, valid=valid, present=present, named=named, ignore=ignore).to(self.device)

"""Real images as a build's source: which images there are, the classes each is asked about,
and their pixels (and masks, where the source has them), at the generator's size.

``open_images`` checks a recipe's ``source`` completely on the driver (the plan is its listing)
and ``ImageReader.load`` is what the model actor calls. Formats:

- ``folder``: .png/.jpg/.jpeg files directly in a local folder or an s3:// prefix, no masks; the
  classes are the recipe's, or per image from ``source.classes_file`` (local or s3://). Every file is decoded
  while planning, so an unreadable one is a one-line error before any model loads.
- ``voc``, ``voc_aug``, ``coco``: the readers of ``factory.dataset.real``; each image's classes
  are those its masks show.
- ``dataset``: a finished factory dataset; each row's classes and label map.

With masks, an image showing a class outside the recipe's selection, no class at all, or more
than a sample may hold is left out of the plan (and counted in ``skipped``), as grounding
training leaves out samples that name a class it does not train on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from factory.build.recipe import Recipe, RecipeError, SourceConfig
from factory.core.storage import StorageError, first_line, open_location, split_file_uri
from factory.core.vocab import UnknownClassError, Vocabulary
from factory.dataset.batch import MAX_CLASSES
from factory.dataset.codec import decode_image, decode_label
from factory.dataset.real import real_dataset
from factory.dataset.source import DatasetError, DatasetSource

SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class SourceImage:
    ref: str  # the image within its source: file name, VOC/COCO image id, or dataset sample id
    classes: tuple[str, ...]  # canonical names, in vocabulary order


@dataclass
class ImageListing:
    """A recipe's real images, sorted by ref: the plan's entries."""
    images: list[SourceImage]
    skipped: dict[str, int] = field(default_factory=dict)  # images left out of the plan, by reason


@dataclass
class ImageReader:
    """Reads a recipe's real images by ref, in the model actor."""
    config: SourceConfig
    vocabulary: str

    @property
    def has_masks(self) -> bool:
        return self.config.format != "folder"

    def load(self, refs: Sequence[str], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, H, W, 3) uint8 images resized to `size` (bilinear) and, with masks, (N, H, W) uint8
        label maps (nearest)."""
        pairs = [_resized(image, label, size) for image, label in self._read(refs)]
        images = np.stack([image for image, _ in pairs])
        return images, (np.stack([label for _, label in pairs]) if self.has_masks else None)

    def _read(self, refs: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        if self.config.format == "folder":
            return [(decode_image({"bytes": self._opened.read_bytes(ref)}), None) for ref in refs]
        if self.config.format == "dataset":
            source, position = self._opened
            rows = source.take([position[ref] for ref in refs], ["sample_id", "image", "label"]).to_pylist()
            by_id = {row["sample_id"]: row for row in rows}  # take returns position order
            return [(decode_image(by_id[ref]["image"]), decode_label(by_id[ref]["label"]))
                    for ref in refs]
        reader, position = self._opened
        return [(sample.image, sample.label) for sample in (reader[position[ref]] for ref in refs)]

    @cached_property
    def _opened(self):
        """What `_read` reads from, opened once per actor: a Location, or a reader and each ref's position."""
        c = self.config
        if c.format == "folder":
            return open_location(c.images)
        if c.format == "dataset":
            source = DatasetSource.open(c.images)
            ids = source.read(["sample_id"]).column("sample_id").to_pylist()
            return source, {sample_id: k for k, sample_id in enumerate(ids)}
        reader = real_dataset(c.format, c.images, c.split, self.vocabulary)
        return reader, {image_id: k for k, image_id in enumerate(reader.ids)}


def open_images(recipe: Recipe, selected: list[str], vocabulary: Vocabulary) -> ImageListing:
    """The recipe's images and their classes (`selected`: the recipe's class selection);
    RecipeError (one line) when the source cannot be read, holds no image, or names an unknown class."""
    c = recipe.source
    try:
        if c.format == "folder":
            return ImageListing(_folder_images(c, selected, vocabulary))
        if c.format == "dataset":
            source = DatasetSource.open(c.images)
            if source.vocabulary != vocabulary:
                raise RecipeError(f"{c.images} is a {source.vocabulary.name} dataset; the recipe's vocabulary "
                                  f"is {vocabulary.name}")
            table = source.read(["sample_id", "classes"])
            named = zip(table.column("sample_id").to_pylist(), table.column("classes").to_pylist())
            shown = {ref: [vocabulary.lookup(name).index for name in names] for ref, names in named}
        else:
            reader = real_dataset(c.format, c.images, c.split, vocabulary.spec())
            with ThreadPoolExecutor(16) as pool:
                shown = dict(zip(reader.ids, pool.map(reader.present, range(len(reader)))))
    except RecipeError:
        raise
    except (OSError, ValueError, StorageError, DatasetError) as exc:
        raise RecipeError(f"cannot read source.images {c.images}: {first_line(exc)}") from None
    images, skipped = [], {}
    allowed = {vocabulary.lookup(name).index for name in selected}
    for ref in sorted(shown):
        indices = sorted(set(shown[ref]))
        reason = ("no class" if not indices else "a class outside the selection" if not set(indices) <= allowed
                  else f"more than {MAX_CLASSES} classes" if len(indices) > MAX_CLASSES else None)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            images.append(SourceImage(ref, tuple(vocabulary.classes[i - 1].name for i in indices)))
    if not images:
        raise RecipeError(f"source.images {c.images} has no image to plan ({len(shown)} listed; left out: "
                          f"{', '.join(f'{n} with {why}' for why, n in skipped.items()) or 'none'})")
    return ImageListing(images, skipped)


def _folder_images(c: SourceConfig, selected: list[str], vocabulary: Vocabulary) -> list[SourceImage]:
    location = open_location(c.images)
    infos = location.fs.get_file_info(pafs.FileSelector(location.root, allow_not_found=True))
    files = sorted(info.base_name for info in infos if info.type == pafs.FileType.File
                   and info.base_name.lower().endswith(SUFFIXES) and not info.base_name.startswith("."))
    if not files:
        raise RecipeError(f"no images in {c.images} ({', '.join(SUFFIXES)} files directly inside it)")
    if c.classes_file:
        folder, file_name = split_file_uri(c.classes_file)
        named = json.loads(open_location(folder).read_bytes(file_name))
        if not isinstance(named, dict):
            raise ValueError(f"{c.classes_file}: expected a JSON object {{image file name: [class names]}}")
        missing = [name for name in files if name not in named]
        if missing:
            raise RecipeError(f"{len(missing)} images have no entry in {c.classes_file} (first: {missing[0]})")
        classes = {name: named[name] for name in files}
    else:
        if len(selected) > MAX_CLASSES:
            raise RecipeError(f"{len(selected)} classes for every image; a sample holds at most {MAX_CLASSES}: "
                              f"narrow classes, or name each image's in source.classes_file")
        classes = dict.fromkeys(files, selected)
    with ThreadPoolExecutor(16) as pool:  # decode every file now, not halfway through the build
        failures = [f for f in pool.map(lambda name: _unreadable(location, name), files) if f]
    if failures:
        raise RecipeError(f"{len(failures)} of {len(files)} images cannot be read; first: {failures[0]}")
    images = []
    for name in files:
        if not classes[name]:
            raise RecipeError(f"{c.classes_file}: {name} names no class")
        try:
            indices = sorted({vocabulary.lookup(word).index for word in classes[name]})
        except UnknownClassError as exc:
            raise RecipeError(f"{c.classes_file}: {name}: {exc}") from None
        if len(indices) > MAX_CLASSES:
            raise RecipeError(f"{c.classes_file}: {name} names {len(indices)} classes; at most {MAX_CLASSES}")
        images.append(SourceImage(name, tuple(vocabulary.classes[i - 1].name for i in indices)))
    return images


def _unreadable(location, name: str) -> str | None:
    try:
        decode_image({"bytes": location.read_bytes(name)})
    except (OSError, ValueError, StorageError) as exc:
        return f"{location.url(name)}: {first_line(exc)}"
    return None


def _resized(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
    height, width = size
    if image.shape[:2] != (height, width):
        image = np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        if label is not None:
            label = np.array(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))
    return image, label


def class_masks(label: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """(O, H, W) bool masks of a label map's classes (its 255 pixels belong to none)."""
    return np.stack([label == index for index in indices])

"""Real images as a build's source: which images there are, the classes each is asked about,
and their pixels (and masks, where the source has them), at the generator's size.

``open_images`` checks a recipe's ``source`` completely on the driver (the plan is its listing)
and ``ImageReader.load`` is what the model actor calls. Formats:

- ``folder``: .png/.jpg/.jpeg files directly in a local folder or an s3:// prefix, no masks; the
  classes are the recipe's, or per image from ``source.classes_file`` (local or s3://). Every file is decoded
  and hashed while planning, so an unreadable one is a one-line error before any model loads, and an image
  is known by its name and content (``SourceImage.identity``), never by its place in the listing.
- ``voc``, ``voc_aug``, ``coco``: the readers of ``factory.dataset.real``; each image's classes
  are those its masks show.
- ``dataset``: a finished factory dataset; each row's classes and label map.

With masks, an image showing a class outside the recipe's selection, no class at all, or more
than a sample may hold is left out of the plan (and counted in ``skipped``), as grounding
training leaves out samples that name a class it does not train on.

An output folder equal to or inside ``source.images`` is refused (a folder's dataset would read its own
preview as an image on the next run), unless it already holds a build of this recipe.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from factory.core.conventions import IGNORE
from factory.core.storage import StorageError, first_line, open_location, split_file_uri
from factory.core.vocab import UnknownClassError, Vocabulary
from factory.dataset.batch import MAX_CLASSES
from factory.dataset.codec import decode_image, decode_label
from factory.dataset.layout import BUILD_FILE, PREVIEW_FILE
from factory.dataset.real import real_dataset
from factory.dataset.source import DatasetError, DatasetSource
from factory.pipeline.recipe import Recipe, RecipeError
from factory.pipeline.sections import SourceConfig

SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class SourceImage:
    ref: str  # the image within its source: file name, VOC/COCO image id, or dataset sample id
    classes: tuple[str, ...]  # canonical names, in vocabulary order
    content: str = ""  # a folder file's sha256; a VOC/COCO image or a dataset's sample is fixed by its ref

    @property
    def identity(self) -> str:
        """What the image is, wherever it sorts: its ref, and a folder file's content."""
        return f"{self.ref}:{self.content}" if self.content else self.ref


@dataclass
class ImageListing:
    """A recipe's real images, sorted by ref: the plan's entries."""
    images: list[SourceImage]
    skipped: dict[str, int] = field(default_factory=dict)  # images left out of the plan, by reason
    ignored: list[str] = field(default_factory=list)  # a folder's files that are not .png/.jpg/.jpeg

    def warnings(self, images: str) -> list[str]:
        """One line per kind of thing left out of the plan."""
        lines = []
        if self.skipped:
            lines.append(f"{images}: left out of the plan: "
                         f"{', '.join(f'{n} images with {why}' for why, n in self.skipped.items())}")
        if self.ignored:
            lines.append(f"{images}: skipped {_ignored(self.ignored)}")
        return lines


@dataclass
class ImageReader:
    """Reads a recipe's real images by ref, in the model actor."""
    config: SourceConfig
    vocabulary: str

    @property
    def has_masks(self) -> bool:
        return self.config.format != "folder"

    def load(self, refs: Sequence[str], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(N, H, W, 3) uint8 images fitted to `size` by ``source.resize`` (bilinear), with masks
        (N, H, W) uint8 label maps (nearest), and (N, 2) the images' original (height, width)."""
        read = self._read(refs)
        original = np.array([image.shape[:2] for image, _ in read], np.int64)
        pairs = [fit_image(image, label, size, self.config.resize) for image, label in read]
        images = np.stack([image for image, _ in pairs])
        return images, (np.stack([label for _, label in pairs]) if self.has_masks else None), original

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
        into_source = _check_output(recipe)
        if c.format == "folder":
            return _folder_images(c, selected, vocabulary, skip={PREVIEW_FILE} if into_source else set())
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


def _check_output(recipe: Recipe) -> bool:
    """Whether the output is the source folder itself (allowed only for a build of this recipe there
    already); RecipeError when it is that folder or inside it otherwise."""
    images, out = open_location(recipe.source.images), open_location(recipe.output)
    if type(images.fs) is not type(out.fs) or not (out.root + "/").startswith(images.root + "/"):
        return False
    if out.exists(BUILD_FILE) and json.loads(out.read_bytes(BUILD_FILE)).get("content_key") == recipe.content_key():
        return out.root == images.root
    where = "is" if out.root == images.root else "is inside"
    raise RecipeError(f"output {recipe.output} {where} source.images {recipe.source.images}: write the dataset "
                      f"to another folder (--out)")


def _folder_images(c: SourceConfig, selected: list[str], vocabulary: Vocabulary, skip: set[str]) -> ImageListing:
    location = open_location(c.images)
    kind = location.fs.get_file_info(location.root).type
    if kind == pafs.FileType.NotFound:
        raise RecipeError(f"source.images {c.images} not found")
    if kind != pafs.FileType.Directory:
        raise RecipeError(f"source.images {c.images} is a file; name the folder that holds the images")
    infos = location.fs.get_file_info(pafs.FileSelector(location.root))
    names = sorted(info.base_name for info in infos if info.type == pafs.FileType.File
                   and not info.base_name.startswith(".") and info.base_name not in skip)
    files = [name for name in names if name.lower().endswith(SUFFIXES)]
    ignored = [name for name in names if not name.lower().endswith(SUFFIXES)]
    if not files:
        raise RecipeError(f"no images in {c.images} ({', '.join(SUFFIXES)} files directly inside it"
                          + (f"; skipped {_ignored(ignored)})" if ignored else ")"))
    if c.classes_file:
        classes, lines = _classes_file(c.classes_file)
        missing = [name for name in files if name not in classes]
        if missing:
            raise RecipeError(f"{len(missing)} images have no entry in {c.classes_file} (first: {missing[0]})")
    else:
        if len(selected) > MAX_CLASSES:
            raise RecipeError(f"{len(selected)} classes for every image; a sample holds at most {MAX_CLASSES}: "
                              f"narrow classes, or name each image's in source.classes_file")
        classes, lines = dict.fromkeys(files, selected), {}
    with ThreadPoolExecutor(16) as pool:  # decode every file now, not halfway through the build
        read = list(pool.map(lambda name: _content(location, name), files))
    failures = [failure for _, failure in read if failure]
    if failures:
        raise RecipeError(f"{len(failures)} of {len(files)} images cannot be read; first: {failures[0]}")
    images = []
    for name, (content, _) in zip(files, read):
        where = f"{c.classes_file}:{lines[name]}: {name}" if name in lines else f"{c.classes_file}: {name}"
        if not classes[name]:
            raise RecipeError(f"{where} names no class")
        try:
            indices = sorted({vocabulary.lookup(word).index for word in classes[name]})
        except UnknownClassError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        if len(indices) > MAX_CLASSES:
            raise RecipeError(f"{where} names {len(indices)} classes; at most {MAX_CLASSES}")
        images.append(SourceImage(name, tuple(vocabulary.classes[i - 1].name for i in indices), content))
    return ImageListing(images, ignored=ignored)


def _ignored(names: list[str]) -> str:
    """'3 files not read as images (2 .gif, 1 .webp): a.gif, b.gif, c.webp'; at most 5 named."""
    extensions = Counter(name.rpartition(".")[2].lower() if "." in name else "(none)" for name in names)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{len(names)} files not read as images ({', '.join(f'{n} .{ext}' for ext, n in extensions.items())}; "
            f"only {', '.join(SUFFIXES)} are): {shown}")


def _classes_file(uri: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """{image file name: [class names]} from a JSON classes file, and the line of each entry;
    RecipeError naming the file (and line) otherwise."""
    try:
        folder, name = split_file_uri(uri)
        location = open_location(folder)
        if not location.exists(name):
            raise RecipeError(f"classes file {uri} not found")
        text = location.read_bytes(name).decode()
    except (OSError, StorageError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read classes file {uri}: {first_line(exc)}") from None
    try:
        named = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{uri}:{exc.lineno}: not JSON: {exc.msg}") from None
    if not isinstance(named, dict):
        raise RecipeError(f"{uri}: expected a JSON object {{image file name: [class names]}}, "
                          f"found a {type(named).__name__}")
    lines = {}
    for image, value in named.items():
        # The entry's line: where its key first stands before a colon (a duplicate key's last value wins).
        found = re.search(re.escape(json.dumps(image, ensure_ascii=False)) + r"\s*:", text)
        if found:
            lines[image] = text.count("\n", 0, found.start()) + 1
        if not isinstance(value, list) or not all(isinstance(word, str) for word in value):
            where = f"{uri}:{lines[image]}" if image in lines else uri
            raise RecipeError(f"{where}: {image}: expected a list of class names, found {json.dumps(value)[:60]}")
    return named, lines


def _content(location, name: str) -> tuple[str, str | None]:
    """(sha256 of the file, "") or ("", why it cannot be read as an image)."""
    try:
        data = location.read_bytes(name)
        decode_image({"bytes": data})
    except (OSError, ValueError, StorageError) as exc:
        return "", f"{location.url(name)}: {first_line(exc)}"
    return hashlib.sha256(data).hexdigest(), None


def fit_image(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int], resize: str = "squash"):
    """`image` (bilinear) and its `label` (nearest) at `size` (height, width): 'squash' resizes them
    whole, 'crop' cuts the centre at the target's aspect ratio first, 'pad' fits them whole inside
    and fills the rest with black (label 255, ignore)."""
    height, width = size
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image, label
    box, inner = None, (width, height)
    if resize == "crop":
        scale = max(height / h, width / w)
        dh, dw = (h - height / scale) / 2, (w - width / scale) / 2
        box = (dw, dh, w - dw, h - dh)
    elif resize == "pad":
        scale = min(height / h, width / w)
        inner = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.array(Image.fromarray(image).resize(inner, Image.Resampling.BILINEAR, box=box))
    if label is not None:
        label = np.array(Image.fromarray(label).resize(inner, Image.Resampling.NEAREST, box=box))
    if resize == "pad":
        top, left = (height - inner[1]) // 2, (width - inner[0]) // 2
        image = np.pad(image, ((top, height - inner[1] - top), (left, width - inner[0] - left), (0, 0)))
        if label is not None:
            label = np.pad(label, ((top, height - inner[1] - top), (left, width - inner[0] - left)),
                           constant_values=IGNORE)
    return image, label


def class_masks(label: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """(O, H, W) bool masks of a label map's classes (its 255 pixels belong to none)."""
    return np.stack([label == index for index in indices])

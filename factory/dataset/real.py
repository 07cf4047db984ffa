"""Readers of real annotated datasets: the benchmarks of Protocol-II, and the real images a build can read.

Both readers yield ``Sample(image_id, image, label)``: ``image`` is RGB uint8 (H, W, 3),
``label`` uint8 (H, W) with 0 = background, 1..N = the class index of the project's
vocabulary (``factory.vocab``) and 255 = ignore.

- ``VOCSegmentation``: PASCAL VOC 2012 ``SegmentationClass`` palette PNGs. Their palette
  indices are the labels already (1..20 in VOC order, 255 on object borders); the PNGs
  are never converted to RGB, which would give colours instead of classes.
- ``VOCAugSegmentation``: VOC's augmented training set, the SBD masks (Hariharan et al.
  2011) converted to VOC's labels, as the ZS3 literature trains on: 10,582 images listed
  in ``ImageSets/Segmentation/train_aug.txt``, masks in ``SegmentationClassAug/`` (the
  usual layout of the converted set; its PNGs are greyscale or palette PNGs of indices),
  images in ``JPEGImages/``.
- ``COCOSemantic``: COCO 2017 instance annotations turned into semantic maps with
  pycocotools. Choices, as the papers do not spell them out:

  * Categories map by official COCO id to the COCO vocabulary (79 classes).
  * "mouse" pixels become 255 (ignore): the project dropped the class (factory/core/vocab.py),
    so no prediction can be right there, and calling them background would punish a
    segmenter that labels the object as something.
  * Crowd annotations (``iscrowd=1``, RLE) count as their class: the pixels do show it.
  * Overlaps: annotations are drawn in order of decreasing mask area (ties by annotation
    id), each over the earlier ones, so small objects lying on large ones stay visible.
  * Pixels of no annotation are background (0), including COCO "stuff" regions.

``ignore_classes`` sets chosen classes to 255, for fine-tuning on seen classes only and
the inductive setting; ``real_dataset`` picks a reader by format name.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from pycocotools.coco import COCO as COCOApi

from factory.core.conventions import IGNORE
from factory.core.pairs import read_image_ids
from factory.core.vocab import COCO, COCO_CATEGORIES, COCO_DROPPED_IDS, VOC, Vocabulary, get_vocabulary
from factory.core.vocab_files import read_vocabulary

PathLike = str | os.PathLike




@dataclass(frozen=True)
class Sample:
    image_id: str      # VOC image id, or the COCO image's file name without ".jpg"
    image: np.ndarray  # uint8 (H, W, 3), RGB
    label: np.ndarray  # uint8 (H, W): 0 background, 1..N classes, 255 ignore


def _read_rgb(path: Path) -> np.ndarray:
    # Some COCO images are greyscale JPEGs. No EXIF transpose: annotations refer to the
    # pixels as stored.
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def _require_files(files: list[Path], directory: Path) -> None:
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed images have no file in {directory} "
                                f"(first: {missing[0]})")


class VOCSegmentation:
    """PASCAL VOC 2012 semantic segmentation; ``root`` is ``VOCdevkit/VOC2012``.

    ``split`` names a list in ``ImageSets/Segmentation`` (train, val, trainval). ``vocabulary``
    names the classes of the label indices: VOC's, or another of 20 classes in the same layout
    (the mini world's drawn benchmark, ``shapes``).
    """

    label_folder = "SegmentationClass"
    label_modes: ClassVar[dict[str, str]] = {"P": "palette"}  # PNG modes read as indices; colours (RGB) would not be classes

    def __init__(self, root: PathLike, split: str = "val", vocabulary: Vocabulary = VOC) -> None:
        self.root = Path(root)
        self.split = split
        self.vocabulary = vocabulary
        listing = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not self.root.is_dir():
            raise FileNotFoundError(f"VOC root not found: {self.root}")
        if not listing.is_file():
            raise FileNotFoundError(f"VOC split {split!r} has no image list: {listing}")
        self.ids = read_image_ids(listing)
        _require_files([self._image_path(i) for i in self.ids], self.root / "JPEGImages")
        _require_files([self._label_path(i) for i in self.ids], self.root / self.label_folder)

    def _image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def _label_path(self, image_id: str) -> Path:
        return self.root / self.label_folder / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def present(self, i: int) -> list[int]:
        """The class indices in image i's label map (not background or ignore), read without the image."""
        with Image.open(self._label_path(self.ids[i])) as png:
            values = np.unique(np.array(png))
        return [int(v) for v in values if 0 < v <= len(self.vocabulary)]

    def __getitem__(self, i: int) -> Sample:
        image_id = self.ids[i]
        image = _read_rgb(self._image_path(image_id))
        path = self._label_path(image_id)
        with Image.open(path) as png:
            if png.mode not in self.label_modes:
                raise ValueError(f"{path}: expected a {' or '.join(self.label_modes.values())} PNG of class "
                                 f"indices, got mode {png.mode}")
            label = np.array(png)
        unknown = np.setdiff1d(label, [*range(len(self.vocabulary) + 1), IGNORE])
        if unknown.size:
            raise ValueError(f"{path}: label values {unknown.tolist()} are no {self.vocabulary.name} class index")
        if label.shape != image.shape[:2]:
            raise ValueError(f"{path}: label size {label.shape} differs from image size "
                             f"{image.shape[:2]}")
        return Sample(image_id, image, label)


class VOCAugSegmentation(VOCSegmentation):
    """VOC's augmented training set (SBD): ``root`` is ``VOCdevkit/VOC2012`` holding
    ``SegmentationClassAug/``; ``split`` names a list in ``ImageSets/Segmentation``
    (train_aug: 10,582 images)."""

    label_folder = "SegmentationClassAug"
    label_modes: ClassVar[dict[str, str]] = {"L": "greyscale", "P": "palette"}  # converted masks come either way

    def __init__(self, root: PathLike, split: str = "train_aug", vocabulary: Vocabulary = VOC) -> None:
        super().__init__(root, split, vocabulary)


def voc_val_overlap(dataset: VOCSegmentation) -> list[str]:
    """Image ids of a VOC training list that are also in VOC val (the evaluation set), when
    ``ImageSets/Segmentation/val.txt`` is there."""
    val = dataset.root / "ImageSets" / "Segmentation" / "val.txt"
    if dataset.split == "val" or not val.is_file():
        return []
    listed = set(read_image_ids(val))
    return [i for i in dataset.ids if i in listed]


class COCOSemantic:
    """COCO 2017 instances as semantic maps over the project's 79-class COCO vocabulary.

    ``root`` holds ``<split>/*.jpg``; ``annotations`` defaults to
    ``root/annotations/instances_<split>.json``. Every image of the file is a sample (also
    those without annotations: all background), in COCO image id order.
    """

    vocabulary: Vocabulary = COCO

    def __init__(self, root: PathLike, split: str = "val2017",
                 annotations: PathLike | None = None) -> None:
        self.root = Path(root)
        self.split = split
        default = self.root / "annotations" / f"instances_{split}.json"
        self.annotations = Path(annotations) if annotations is not None else default
        self.image_dir = self.root / split
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image directory not found: {self.image_dir}")
        if not self.annotations.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotations}")
        try:
            # pycocotools prints progress lines; readers stay quiet.
            with contextlib.redirect_stdout(io.StringIO()):
                self._coco = COCOApi(str(self.annotations))
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise ValueError(f"{self.annotations}: not a COCO instances file ({exc!r})") from None
        self._labels = self._category_labels()
        self._image_ids = sorted(self._coco.imgs)
        files = [self.image_dir / self._coco.imgs[i]["file_name"] for i in self._image_ids]
        _require_files(files, self.image_dir)
        self.ids = [f.stem for f in files]

    def _category_labels(self) -> dict[int, int]:
        """Label value of each category id of the file, checked against the official ids."""
        official = dict(COCO_CATEGORIES)
        index = {c.coco_id: c.index for c in COCO.classes}
        labels = {}
        for category_id, category in self._coco.cats.items():
            # Guard against files with non-official ids (e.g. re-numbered 1..80).
            if official.get(category_id) != category["name"]:
                raise ValueError(f"{self.annotations}: category id {category_id} is "
                                 f"{category['name']!r}, expected the official COCO id of "
                                 f"that name")
            labels[category_id] = IGNORE if category_id in COCO_DROPPED_IDS else index[category_id]
        return labels

    def __len__(self) -> int:
        return len(self.ids)

    def present(self, i: int) -> list[int]:
        """The class indices annotated in image i (not the dropped class), read from the annotations alone."""
        labels = {self._labels.get(a["category_id"], IGNORE) for a in self._coco.imgToAnns[self._image_ids[i]]}
        return sorted(label for label in labels if label != IGNORE)

    def __getitem__(self, i: int) -> Sample:
        coco_image_id = self._image_ids[i]
        info = self._coco.imgs[coco_image_id]
        image = _read_rgb(self.image_dir / info["file_name"])
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"{self.image_dir / info['file_name']}: size {image.shape[:2]} "
                             f"differs from the annotation file's "
                             f"{(info['height'], info['width'])}")
        return Sample(self.ids[i], image, self._semantic_map(coco_image_id, image.shape[:2]))

    def _semantic_map(self, coco_image_id: int, shape: tuple[int, int]) -> np.ndarray:
        masks = []
        for annotation in self._coco.imgToAnns[coco_image_id]:
            category_id = annotation["category_id"]
            if category_id not in self._labels:
                raise ValueError(f"{self.annotations}: annotation {annotation['id']} has "
                                 f"category id {category_id}, which the file does not list")
            mask = self._coco.annToMask(annotation).astype(bool)
            masks.append((-int(mask.sum()), annotation["id"], self._labels[category_id], mask))
        label = np.zeros(shape, dtype=np.uint8)
        for _, _, value, mask in sorted(masks, key=lambda m: m[:2]):
            label[mask] = value
        return label


def ignore_classes(label: np.ndarray, indices: Iterable[int]) -> np.ndarray:
    """A copy of ``label`` with the pixels of the given class indices set to 255 (ignore)."""
    ignored = label.copy()
    ignored[np.isin(label, list(indices))] = IGNORE
    return ignored


READERS = {"voc": VOCSegmentation, "voc_aug": VOCAugSegmentation, "coco": COCOSemantic}
DEFAULT_SPLITS = {"voc": "val", "voc_aug": "train_aug", "coco": "val2017"}


def real_dataset(format: str, root: PathLike, split: str | None = None,
                 vocabulary: str | dict | None = None) -> VOCSegmentation | COCOSemantic:
    """The reader of a real dataset: ``format`` "voc", "voc_aug" or "coco"; ``split`` defaults
    to val (voc_aug: train_aug); ``vocabulary`` of the VOC layouts (a built-in name, a vocabulary
    file or a definition) defaults to voc."""
    if format not in READERS:
        raise ValueError(f"unknown dataset format {format!r} (choices: {', '.join(READERS)})")
    split = split or DEFAULT_SPLITS[format]
    if format == "coco":
        if vocabulary not in (None, COCO.name):
            raise ValueError(f"the coco format holds the coco vocabulary, not {vocabulary}")
        return COCOSemantic(root, split)
    if isinstance(vocabulary, dict):
        return READERS[format](root, split, get_vocabulary(vocabulary))
    return READERS[format](root, split, read_vocabulary(vocabulary or VOC.name))

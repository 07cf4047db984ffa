"""Co-appearing category pairs: classes that occur together in one real image.

The papers use them for two-object prompts (142 pairs for PASCAL VOC, 1,559 for
COCO, Li et al. 2023, supplementary B.2). They are derived from the real annotation files:

- ``pairs_from_voc_annotations``: VOC ``Annotations/*.xml`` (every object counts,
  also "difficult" ones).
- ``pairs_from_voc_segmentation``: VOC ``SegmentationClass/*.png``.
- ``pairs_from_coco``: COCO ``instances_*.json``.

Each returns a ``Counter`` mapping a pair to the number of images it occurs in, so
callers can drop rare pairs; the pair list is its keys. A pair is a tuple of two
different canonical class names ordered by vocabulary index. ``save_pairs`` and
``load_pairs`` read and write the pair list as a small TSV file.
"""

from __future__ import annotations

import itertools
import json
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from factory.core.conventions import IGNORE  # void pixels on object borders in SegmentationClass PNGs
from factory.core.vocab import COCO, VOC, Vocabulary

Pair = tuple[str, str]
PathLike = str | os.PathLike



def _count(images: Iterable[Iterable[str]], vocabulary: Vocabulary) -> Counter[Pair]:
    """Count, for each pair, the images whose class set contains both classes."""
    counts: Counter[Pair] = Counter()
    for classes in images:
        ordered = sorted(set(classes), key=lambda name: vocabulary.lookup(name).index)
        counts.update(itertools.combinations(ordered, 2))
    return counts


def read_image_ids(path: PathLike) -> list[str]:
    """Image ids of a VOC ``ImageSets`` file (first column; ``Main`` lists have two)."""
    return [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]


def _files(directory: PathLike, suffix: str, image_ids: Iterable[str] | None) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory not found: {directory}")
    if image_ids is None:
        return sorted(directory.glob(f"*{suffix}"))
    files = [directory / f"{image_id}{suffix}" for image_id in image_ids]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed images have no file in {directory} "
                                f"(first: {missing[0]})")
    return files


def _voc_xml_classes(path: Path) -> set[str]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not a VOC annotation file ({exc})") from None
    # Direct <object><name> only: person objects also hold <part><name>head</name>.
    names = [obj.findtext("name", "").strip() for obj in root.findall("object")]
    try:
        return {VOC.lookup(name).name for name in names}
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def pairs_from_voc_annotations(annotations_dir: PathLike,
                               image_ids: Iterable[str] | None = None) -> Counter[Pair]:
    """Pairs in VOC ``Annotations/<id>.xml`` files (all files, or only ``image_ids``)."""
    files = _files(annotations_dir, ".xml", image_ids)
    return _count((_voc_xml_classes(f) for f in files), VOC)


def _voc_png_classes(path: Path) -> set[str]:
    with Image.open(path) as image:
        # Class labels are the palette indices; converting to RGB would give colours.
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path}: expected a palette PNG of class indices, "
                             f"got mode {image.mode}")
        labels = np.unique(np.array(image))
    try:
        return {VOC.by_index(int(i)).name for i in labels if i not in (0, IGNORE)}
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def pairs_from_voc_segmentation(segmentation_dir: PathLike,
                                image_ids: Iterable[str] | None = None) -> Counter[Pair]:
    """Pairs in VOC ``SegmentationClass/<id>.png`` label maps (all, or only ``image_ids``)."""
    files = _files(segmentation_dir, ".png", image_ids)
    return _count((_voc_png_classes(f) for f in files), VOC)


def pairs_from_coco(instances_json_path: PathLike,
                    vocabulary: Vocabulary = COCO) -> Counter[Pair]:
    """Pairs in a COCO ``instances_*.json``, for the classes of ``vocabulary``.

    Categories map by official COCO id; ids outside the vocabulary (the dropped
    "mouse", or non-VOC classes when ``vocabulary`` is VOC) are skipped. Crowd
    annotations count: the class is present in the image.
    """
    path = Path(instances_json_path)
    with path.open() as f:
        data = json.load(f)
    if not isinstance(data, dict) or not {"annotations", "categories"} <= data.keys():
        raise ValueError(f"{path}: not a COCO instances file (no annotations/categories)")
    by_id = {c.coco_id: c for c in vocabulary.classes}
    for category in data["categories"]:
        expected = by_id.get(category["id"])
        # Guard against files with non-official ids (e.g. re-numbered 1..80).
        if expected is not None and category["name"] != expected.detector:
            raise ValueError(f"{path}: category id {category['id']} is {category['name']!r}, "
                             f"the official COCO id of {expected.detector!r}")
    per_image: dict[int, set[str]] = {}
    for annotation in data["annotations"]:
        found = by_id.get(annotation["category_id"])
        if found is not None:
            per_image.setdefault(annotation["image_id"], set()).add(found.name)
    return _count(per_image.values(), vocabulary)


def _canonical(pair: Iterable[str], vocabulary: Vocabulary) -> Pair:
    a, b = sorted((vocabulary.lookup(name) for name in pair), key=lambda c: c.index)
    if a is b:
        raise ValueError(f"pair of {a.name!r} with itself")
    return a.name, b.name


def all_pairs(class_names: Iterable[str], vocabulary: Vocabulary) -> list[Pair]:
    """Every unordered pair of the given classes: the fallback without annotations."""
    classes = sorted({vocabulary.lookup(n) for n in class_names}, key=lambda c: c.index)
    return [(a.name, b.name) for a, b in itertools.combinations(classes, 2)]


def _sort_key(pair: Pair, vocabulary: Vocabulary) -> tuple[int, int]:
    return vocabulary.lookup(pair[0]).index, vocabulary.lookup(pair[1]).index


def save_pairs(path: PathLike, pairs_with_counts: Mapping[Pair, int],
               vocabulary: Vocabulary, source: str) -> None:
    """Write ``class_a<TAB>class_b<TAB>images`` lines under two ``#`` header lines."""
    counts = {_canonical(pair, vocabulary): n for pair, n in pairs_with_counts.items()}
    lines = [f"# vocabulary: {vocabulary.name}", f"# source: {source}"]
    lines += [f"{a}\t{b}\t{counts[a, b]}"
              for a, b in sorted(counts, key=lambda p: _sort_key(p, vocabulary))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def load_pairs(path: PathLike, vocabulary: Vocabulary) -> list[Pair]:
    """Read a pair file (``save_pairs`` format; the count column is optional).

    Names go through ``vocabulary.lookup``, so natural names and either order work;
    duplicates are collapsed. Errors name the file and line.
    """
    pairs: set[Pair] = set()
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        where = f"{path}:{number}"
        if line.startswith("# vocabulary:"):
            declared = line.split(":", 1)[1].strip()
            if declared != vocabulary.name:
                raise ValueError(f"{where}: pairs of vocabulary {declared!r}, "
                                 f"expected {vocabulary.name!r}")
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) not in (2, 3) or (len(fields) == 3 and not fields[2].isdigit()):
            raise ValueError(f"{where}: expected 'class_a<TAB>class_b[<TAB>images]', "
                             f"got {line!r}")
        try:
            pairs.add(_canonical(fields[:2], vocabulary))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return sorted(pairs, key=lambda p: _sort_key(p, vocabulary))


class DerivePairsOptions(BaseModel):
    """The options of ``jobs/derive_pairs.py``: one source of real annotations, one output file."""
    model_config = ConfigDict(extra="forbid", strict=True)

    voc_annotations: str | None = Field(None, description="VOC Annotations directory of <id>.xml files")
    voc_segmentation: str | None = Field(None, description="VOC SegmentationClass directory of <id>.png label maps")
    coco_instances: str | None = Field(None, description="COCO instances_*.json file")
    image_list: str | None = Field(None, description="VOC ImageSets file: use only the listed image ids "
                                   "(null: every file in the directory)")
    min_images: int = Field(1, ge=1, description="keep pairs that occur in at least this many images")
    out: str = Field(description="output pair file (TSV), e.g. pairs/voc.tsv")

    @model_validator(mode="after")
    def _one_source(self) -> DerivePairsOptions:
        given = [s for s in (self.voc_annotations, self.voc_segmentation, self.coco_instances) if s]
        if len(given) != 1:
            raise ValueError("give exactly one of --voc-annotations, --voc-segmentation, --coco-instances")
        if self.image_list and self.coco_instances:
            raise ValueError("--image-list applies only to --voc-annotations/--voc-segmentation")
        return self


def derive_pairs(options: DerivePairsOptions) -> tuple[dict[Pair, int], Vocabulary]:
    """The pairs found in at least `min_images` images, written to `out`; ValueError (one line)
    on unreadable or empty input."""
    image_ids = read_image_ids(options.image_list) if options.image_list else None
    if options.coco_instances:
        vocabulary, source = COCO, f"coco-instances {options.coco_instances}"
        counts = pairs_from_coco(options.coco_instances)
    elif options.voc_annotations:
        vocabulary, source = VOC, f"voc-annotations {options.voc_annotations}"
        counts = pairs_from_voc_annotations(options.voc_annotations, image_ids)
    else:
        vocabulary, source = VOC, f"voc-segmentation {options.voc_segmentation}"
        counts = pairs_from_voc_segmentation(options.voc_segmentation, image_ids)
    if options.image_list:
        source += f", images listed in {options.image_list}"
    source += f", min-images {options.min_images}"
    kept = {pair: n for pair, n in counts.items() if n >= options.min_images}
    if not kept:
        raise ValueError(f"no pairs found in at least {options.min_images} images ({source})")
    try:
        save_pairs(options.out, kept, vocabulary, source)
    except OSError as exc:
        raise ValueError(f"cannot write {options.out}: {exc}") from None
    return kept, vocabulary

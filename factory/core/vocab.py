"""Class vocabularies (PASCAL VOC, COCO, and the mini world's shapes) and their seen/unseen splits.

Source: the supplementary material of Li et al. (ICCV 2023), section B.1, Table 1. Every class carries the names the different parts of the
system need: the dataset's identifier, the natural name used in prompts, the
label-map index, and the COCO id / class name the oracle detector predicts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cached_property

# Official COCO category ids and names (80 classes; the ids have gaps up to 90).
# torchvision's COCO detectors predict these ids as labels.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"),
    (6, "bus"), (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"),
    (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"), (15, "bench"),
    (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"),
    (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"),
    (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
    (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
    (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
    (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"),
    (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"),
    (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)
_COCO_ID = {name: coco_id for coco_id, name in COCO_CATEGORIES}

# Dropped from the COCO vocabulary (Li et al. 2023, supplementary B.1): Stable Diffusion draws a rodent for
# "mouse" while the detector only knows the computer mouse, so it never finds one.
# Real COCO "mouse" pixels must become ignore, hence the ids are kept too.
COCO_DROPPED: tuple[str, ...] = ("mouse",)
COCO_DROPPED_IDS: tuple[int, ...] = tuple(_COCO_ID[name] for name in COCO_DROPPED)  # (74,)

# The VOC identifiers that differ from the COCO name of the same class.
VOC_TO_COCO: dict[str, str] = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "motorbike": "motorcycle",
    "pottedplant": "potted plant",
    "sofa": "couch",
    "tvmonitor": "tv",
}
_COCO_TO_VOC = {coco: voc for voc, coco in VOC_TO_COCO.items()}

# Standard VOC order: index i here is label i in SegmentationClass PNGs (0 = background).
VOC_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# Prompt names where the identifier reads badly (natural names prompt better than identifiers).
_VOC_NATURAL = {"diningtable": "dining table", "pottedplant": "potted plant",
                "tvmonitor": "tv monitor"}
_COCO_NATURAL = {"tv": "tv monitor"}


class UnknownClassError(ValueError):
    """A class name that the vocabulary does not know."""


@dataclass(frozen=True)
class ClassInfo:
    name: str      # canonical identifier: VOC identifier or official COCO name
    natural: str   # name used in prompts
    index: int     # label-map index, 1-based (0 is background)
    coco_id: int   # the oracle detector's label: the official COCO category id (shapes: its own index)
    detector: str  # the COCO detector's class name


def _key(name: str) -> str:
    # "Potted_Plant", "potted plant" and "pottedplant" are the same class.
    return "".join(name.lower().replace("_", " ").replace("-", " ").split())


@dataclass(frozen=True)
class Vocabulary:
    name: str
    classes: tuple[ClassInfo, ...]
    unseen_splits: tuple[tuple[str, ...], ...]  # split k (1-based) is unseen_splits[k - 1]

    def __post_init__(self) -> None:
        if [c.index for c in self.classes] != list(range(1, len(self.classes) + 1)):
            raise ValueError(f"vocabulary {self.name}: indices must be 1..{len(self.classes)}")
        for k, unseen in enumerate(self.unseen_splits, start=1):
            unknown = sorted(set(unseen) - set(self.names))
            if unknown or len(set(unseen)) != len(unseen):
                raise ValueError(f"vocabulary {self.name} split {k}: unseen list has "
                                 f"unknown {unknown} or duplicate names")
        self._aliases  # build it now so an ambiguous alias fails at import time

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    @cached_property
    def _aliases(self) -> dict[str, ClassInfo]:
        aliases: dict[str, ClassInfo] = {}
        for c in self.classes:
            spellings = {c.name, c.natural, c.detector, _COCO_TO_VOC.get(c.detector, c.name)}
            for key in map(_key, spellings):
                if aliases.setdefault(key, c) is not c:
                    raise ValueError(f"vocabulary {self.name}: '{key}' names two classes")
        return aliases

    def lookup(self, name: str) -> ClassInfo:
        """Class by canonical, natural, detector or VOC name (case, spaces, _ ignored)."""
        found = self._aliases.get(_key(name))
        if found is not None:
            return found
        close = difflib.get_close_matches(_key(name), self._aliases, n=5, cutoff=0.6)
        suggestions = list(dict.fromkeys(self._aliases[k].name for k in close))[:3]
        hint = f" (did you mean: {', '.join(suggestions)}?)" if suggestions else ""
        raise UnknownClassError(f"unknown class {name!r} in vocabulary {self.name}{hint}")

    def by_index(self, index: int) -> ClassInfo:
        if not 1 <= index <= len(self.classes):
            raise ValueError(f"class index {index} out of range 1..{len(self.classes)} "
                             f"in vocabulary {self.name}")
        return self.classes[index - 1]

    def unseen(self, split: int) -> tuple[str, ...]:
        if split not in range(1, len(self.unseen_splits) + 1):
            valid = ", ".join(str(k) for k in range(1, len(self.unseen_splits) + 1))
            raise ValueError(f"unknown split {split!r} for vocabulary {self.name} "
                             f"(valid splits: {valid})")
        unseen = set(self.unseen_splits[split - 1])
        return tuple(n for n in self.names if n in unseen)

    def seen(self, split: int) -> tuple[str, ...]:
        unseen = set(self.unseen(split))
        return tuple(n for n in self.names if n not in unseen)


VOC = Vocabulary(
    name="voc",
    classes=tuple(
        ClassInfo(name=name, natural=_VOC_NATURAL.get(name, name), index=i,
                  coco_id=_COCO_ID[VOC_TO_COCO.get(name, name)],
                  detector=VOC_TO_COCO.get(name, name))
        for i, name in enumerate(VOC_NAMES, start=1)
    ),
    unseen_splits=(
        ("tvmonitor", "car", "dog", "sofa", "train"),
        ("horse", "motorbike", "person", "pottedplant", "sheep"),
        ("bus", "cat", "chair", "cow", "diningtable"),
    ),
)

COCO = Vocabulary(
    name="coco",
    classes=tuple(
        ClassInfo(name=name, natural=_COCO_NATURAL.get(name, name), index=i,
                  coco_id=coco_id, detector=name)
        for i, (coco_id, name) in enumerate(
            ((cid, n) for cid, n in COCO_CATEGORIES if n not in COCO_DROPPED), start=1)
    ),
    # Table 1 writes VOC spellings (aeroplane, sofa, ...); these are the COCO names.
    # Its "bench" right after "chair" is a typo for "couch": split 3's unseen list has
    # it, and without it splits 1 and 2 would have 64 seen classes and a bench twice.
    unseen_splits=(
        ("airplane", "train", "parking meter", "cat", "bear", "suitcase", "frisbee",
         "snowboard", "fork", "sandwich", "hot dog", "toilet", "toaster", "hair drier"),
        ("laptop", "remote", "keyboard", "cell phone", "microwave", "oven", "sink",
         "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "toothbrush"),
        ("banana", "apple", "orange", "broccoli", "carrot", "pizza", "donut", "cake",
         "chair", "couch", "potted plant", "bed", "dining table", "tv"),
    ),
)

# The mini world (world/draw.py): drawn 64x64 images whose 20 classes are a colour and
# a shape, named in words. Each split's five unseen classes are a "diagonal" of the colour x
# shape grid, so every colour word and every shape word of an unseen class also names three or
# four seen classes: zero-shot by composition, the role CLIP's knowledge of words plays for VOC.
# Its oracle is a detector trained on the world itself, whose labels are the indices.
SHAPE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white")
SHAPE_FORMS: tuple[str, ...] = ("disc", "square", "triangle", "cross")
SHAPES = Vocabulary(
    name="shapes",
    classes=tuple(
        ClassInfo(name=f"{colour}_{form}", natural=f"{colour} {form}", index=i, coco_id=i, detector=f"{colour} {form}")
        for i, (colour, form) in enumerate(((c, f) for c in SHAPE_COLOURS for f in SHAPE_FORMS), start=1)
    ),
    unseen_splits=tuple(
        tuple(f"{colour}_{SHAPE_FORMS[(i + k) % len(SHAPE_FORMS)]}" for i, colour in enumerate(SHAPE_COLOURS))
        for k in range(3)
    ),
)

VOCABULARIES: dict[str, Vocabulary] = {v.name: v for v in (VOC, COCO, SHAPES)}


def get_vocabulary(name: str) -> Vocabulary:
    vocabulary = VOCABULARIES.get(name.strip().lower())
    if vocabulary is None:
        raise ValueError(f"unknown vocabulary {name!r} (choices: {', '.join(VOCABULARIES)})")
    return vocabulary

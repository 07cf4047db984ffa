"""Class vocabularies and their seen/unseen splits: the built-in PASCAL VOC, COCO and the mini world's
shapes, and user-defined ones from their definitions (read from a YAML or TSV file by ``vocab_files``).

Source of the built-in splits: the supplementary material of Li et al. (ICCV 2023), section B.1,
Table 1. Every class carries the names the different parts of the system need: the dataset's
identifier, the natural name used in prompts, more names for an open-vocabulary labeler, the
label-map index, and the COCO id / class name the oracle detector predicts.

A user-defined vocabulary travels as its definition (``Vocabulary.definition``, a JSON mapping):
inside the recipe, the manifest and the segmenter's checkpoint, so a dataset or a model never
depends on the file it was first read from. ``get_vocabulary`` takes either form.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from factory.core.conventions import IGNORE

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


class VocabularyError(ValueError):
    """A vocabulary definition that cannot be used; the message is one line. ``at`` is where in the
    definition (("classes", 0, "natural"), ("unseen", 1), ...), so that a file's reader names the line."""

    def __init__(self, message: str, at: tuple = ()):
        super().__init__(message)
        self.at = at


RESERVED = ("background", "ignore")  # label 0 and 255: every label map's, never a class's


@dataclass(frozen=True)
class ClassInfo:
    name: str      # canonical identifier: VOC identifier or official COCO name
    natural: str   # name used in prompts
    index: int     # label-map index, 1-based (0 is background)
    coco_id: int   # the oracle detector's label: the official COCO category id (shapes: its own index); 0: none
    detector: str  # the oracle detector's class name; "" when it has none (user-defined classes)
    synonyms: tuple[str, ...] = ()  # more names an open-vocabulary labeler is asked for (its masks join the class's)


def _key(name: str) -> str:
    # "Potted_Plant", "potted plant" and "pottedplant" are the same class.
    return "".join(name.lower().replace("_", " ").replace("-", " ").split())


@dataclass(frozen=True)
class Vocabulary:
    name: str
    classes: tuple[ClassInfo, ...]
    unseen_splits: tuple[tuple[str, ...], ...]  # split k (1-based) is unseen_splits[k - 1]
    pairs: tuple[tuple[str, str], ...] = ()  # co-appearing pairs named with the vocabulary (recipe pairs: vocabulary)
    detector_space: str = "coco"  # whose classes ClassInfo.detector names: "coco" or "shapes" (the mini world's)

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
            spellings = {c.name, c.natural, c.detector or c.name, _COCO_TO_VOC.get(c.detector, c.name)}
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
        if not self.unseen_splits:
            raise ValueError(f"vocabulary {self.name} has no seen/unseen splits (its file names no unseen classes)")
        if split not in range(1, len(self.unseen_splits) + 1):
            valid = ", ".join(str(k) for k in range(1, len(self.unseen_splits) + 1))
            raise ValueError(f"unknown split {split!r} for vocabulary {self.name} "
                             f"(valid splits: {valid})")
        unseen = set(self.unseen_splits[split - 1])
        return tuple(n for n in self.names if n in unseen)

    def seen(self, split: int) -> tuple[str, ...]:
        unseen = set(self.unseen(split))
        return tuple(n for n in self.names if n not in unseen)

    @property
    def builtin(self) -> bool:
        return VOCABULARIES.get(self.name) is self

    def spec(self) -> str | dict[str, Any]:
        """What ``get_vocabulary`` takes back: a built-in one's name, else the definition."""
        return self.name if self.builtin else self.definition()

    def definition(self) -> dict[str, Any]:
        """The whole vocabulary as JSON; ``get_vocabulary`` reads it back."""
        return {"name": self.name, "detector": self.detector_space,
                "classes": [{"index": c.index, "name": c.name, "natural": c.natural, "synonyms": list(c.synonyms),
                             "detector": c.detector} for c in self.classes],
                "unseen": [list(split) for split in self.unseen_splits], "pairs": [list(p) for p in self.pairs]}


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
    detector_space="shapes",
)

VOCABULARIES: dict[str, Vocabulary] = {v.name: v for v in (VOC, COCO, SHAPES)}
DEFINITION_SUFFIXES = (".yaml", ".yml", ".tsv")


def get_vocabulary(spec: str | dict[str, Any]) -> Vocabulary:
    """A built-in vocabulary by name, or a definition (``Vocabulary.definition``, a vocabulary
    file's mapping). A definition named like a built-in one is the built-in one: the manifests of
    datasets built before definitions existed name their vocabulary with a partial definition."""
    if isinstance(spec, dict):
        return VOCABULARIES.get(str(spec.get("name", ""))) or define_vocabulary(spec)
    vocabulary = VOCABULARIES.get(spec.strip().lower())
    if vocabulary is None:
        raise ValueError(f"unknown vocabulary {spec!r} (choices: {', '.join(VOCABULARIES)}, or a "
                         f"{'/'.join(DEFINITION_SUFFIXES)} file)")
    return vocabulary


def define_vocabulary(definition: dict[str, Any]) -> Vocabulary:
    """A user-defined vocabulary from its definition; ValueError (one line) when it is not valid."""
    return _from_definition(json.dumps(definition, sort_keys=True))


@lru_cache(maxsize=64)
def _from_definition(text: str) -> Vocabulary:
    d = json.loads(text)
    name = d.get("name")
    if not isinstance(name, str) or not name.strip():
        raise VocabularyError("a vocabulary needs a name", ("name",))
    if name.lower() in VOCABULARIES:
        raise VocabularyError(f"vocabulary name {name!r} is a built-in vocabulary's; name yours otherwise", ("name",))
    unknown = sorted(set(d) - {"name", "detector", "classes", "unseen", "pairs"})
    if unknown:
        raise VocabularyError(f"vocabulary {name}: unknown keys {unknown} (name, detector, classes, unseen, pairs)",
                              (unknown[0],))
    space = d.get("detector") or "coco"
    if space not in ("coco", "shapes"):
        raise VocabularyError(f"vocabulary {name}: detector {space!r} is not coco or shapes", ("detector",))
    entries = d.get("classes") or []
    if not isinstance(entries, list) or not entries:
        raise VocabularyError(f"vocabulary {name} has no classes" if not entries else
                              f"vocabulary {name}: classes is a list of classes, not {entries!r}", ("classes",))
    classes = [_class_info(name, position, entry, get_vocabulary(space))
               for position, entry in enumerate(entries, start=1)]
    _check_unique(name, "name", [c.name for c in classes])
    _check_unique(name, "index", [c.index for c in classes])
    _check_synonyms(name, classes)
    indices = sorted(c.index for c in classes)
    if indices != list(range(1, len(classes) + 1)):
        raise VocabularyError(f"vocabulary {name}: indices {indices} must be 1..{len(classes)}, each once (label maps "
                              f"and the segmenter's outputs are dense)", ("classes",))
    classes.sort(key=lambda c: c.index)
    try:
        by_name = Vocabulary(name, tuple(classes), ())
    except ValueError as exc:  # a word that names two classes
        raise VocabularyError(str(exc), ("classes",)) from None
    unseen = tuple(_names(by_name, "unseen", k, split) for k, split in enumerate(_lists(name, d, "unseen")))
    pairs = tuple(_names(by_name, "pairs", k, pair) for k, pair in enumerate(_lists(name, d, "pairs")))
    for k, split in enumerate(unseen):
        if not split or len(set(split)) == len(classes):
            raise VocabularyError(f"vocabulary {name}: unseen split {k + 1} must name at least one class and leave "
                                  f"one seen", ("unseen", k))
    for k, pair in enumerate(pairs):
        if len(pair) != 2 or pair[0] == pair[1]:
            raise VocabularyError(f"vocabulary {name}: a pair is two different classes", ("pairs", k))
    return Vocabulary(name, tuple(classes), unseen, pairs, space)


def _lists(vocabulary: str, d: dict[str, Any], key: str) -> list[list]:
    """``unseen`` or ``pairs``: a list of lists of class names (a bare string would be read letter by letter)."""
    value = d.get(key) or []
    example = "[[a, b]]" if key == "pairs" else "[[a], [b, c]]"
    if not isinstance(value, list):
        raise VocabularyError(f"vocabulary {vocabulary}: {key} is a list of lists of classes, {example}, "
                              f"not {value!r}", (key,))
    for k, item in enumerate(value):
        if not isinstance(item, list):
            raise VocabularyError(f"vocabulary {vocabulary}: {key} is a list of lists of classes, {example}; "
                                  f"item {k + 1} is {item!r}", (key, k))
    return value


def _names(vocabulary: Vocabulary, key: str, k: int, names: list) -> tuple[str, ...]:
    try:
        return tuple(vocabulary.lookup(str(n)).name for n in names)
    except UnknownClassError as exc:
        raise VocabularyError(f"vocabulary {vocabulary.name}: {exc}", (key, k)) from None


def _class_info(vocabulary: str, position: int, entry: Any, space: Vocabulary) -> ClassInfo:
    at = ("classes", position - 1)
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
        raise VocabularyError(f"vocabulary {vocabulary}: class {position} needs a name", at)
    name = entry["name"].strip()
    if _key(name) in RESERVED:
        raise VocabularyError(f"vocabulary {vocabulary}: class name {name!r} is reserved (every label map has "
                              f"background, 0, and ignore, 255); name the class otherwise", (*at, "name"))
    unknown = sorted(set(entry) - {"name", "natural", "synonyms", "index", "detector"})
    if unknown:
        raise VocabularyError(f"vocabulary {vocabulary}: class {name} has unknown keys {unknown} "
                              f"(name, natural, synonyms, index, detector)", (*at, unknown[0]))
    index = entry.get("index", position)
    if not isinstance(index, int) or isinstance(index, bool) or index in (0, IGNORE) or not 0 < index < IGNORE:
        raise VocabularyError(f"vocabulary {vocabulary}: class {name} has index {index!r}; indices are 1..254 "
                              f"(0 is background, 255 ignore)", (*at, "index"))
    natural = entry.get("natural", name.replace("_", " "))
    if not isinstance(natural, str) or not natural.strip():  # a prompt would lose the class's words
        raise VocabularyError(f"vocabulary {vocabulary}: class {name}'s natural is empty; give the words that prompt "
                              f"it, or leave natural out (the name, _ as spaces)", (*at, "natural"))
    synonyms = entry.get("synonyms") or []
    if not isinstance(synonyms, list) or not all(isinstance(s, str) and s.strip() for s in synonyms):
        instead = f", [{synonyms}], not {synonyms!r}" if isinstance(synonyms, str) else ""  # not letter by letter
        raise VocabularyError(f"vocabulary {vocabulary}: class {name}'s synonyms are a list of names{instead}",
                              (*at, "synonyms"))
    detector, coco_id = "", 0
    if entry.get("detector"):
        try:
            target = space.lookup(str(entry["detector"]))
        except UnknownClassError as exc:
            raise VocabularyError(f"vocabulary {vocabulary}: class {name}'s detector: {exc}", (*at, "detector")) from None
        detector, coco_id = target.detector, target.coco_id
    return ClassInfo(name=name, natural=natural.strip(), index=index, coco_id=coco_id, detector=detector,
                     synonyms=tuple(s.strip() for s in synonyms))


def _check_synonyms(vocabulary: str, classes: list[ClassInfo]) -> None:
    """A synonym names its class only: an open-vocabulary labeler's masks for it join that class."""
    owner = {_key(word): c.name for c in classes for word in (c.name, c.natural)}
    for position, c in enumerate(classes):
        for synonym in c.synonyms:
            other = owner.setdefault(_key(synonym), c.name)
            if other != c.name:
                raise VocabularyError(f"vocabulary {vocabulary}: class {c.name}'s synonym {synonym!r} also names "
                                      f"class {other}; a word names one class", ("classes", position, "synonyms"))


def _check_unique(vocabulary: str, what: str, values: list) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise VocabularyError(f"vocabulary {vocabulary}: {what} {', '.join(map(str, repeated))} given twice",
                              ("classes", len(values) - 1 - values[::-1].index(repeated[0])))

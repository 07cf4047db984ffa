import pytest

from factory.core.vocab import (
    COCO,
    COCO_DROPPED,
    COCO_DROPPED_IDS,
    SHAPES,
    VOC,
    UnknownClassError,
    define_vocabulary,
    get_vocabulary,
)

# Table 1 of seeds/000 (B.1), verbatim: (seen, unseen) per split.
SEED_TABLE = {
    "voc": [
        ("aeroplane, bicycle, bird, boat, bottle, bus, cat, chair, cow, diningtable, horse, "
         "motorbike, person, pottedplant, sheep", "tvmonitor, car, dog, sofa, train"),
        ("tvmonitor, car, dog, sofa, train, aeroplane, bicycle, bird, boat, bottle, bus, "
         "cat, chair, cow, diningtable", "horse, motorbike, person, pottedplant, sheep"),
        ("horse, motorbike, person, pottedplant, sheep, tvmonitor, car, dog, sofa, train, "
         "aeroplane, bicycle, bird, boat, bottle", "bus, cat, chair, cow, diningtable"),
    ],
    "coco": [
        ("person, bicycle, car, motorbike, bus, truck, boat, traffic light, fire hydrant, "
         "stop sign, bench, bird, dog, horse, sheep, cow, elephant, zebra, giraffe, backpack, "
         "umbrella, handbag, tie, skis, sports ball, kite, baseball bat, baseball glove, "
         "skateboard, surfboard, tennis racket, bottle, wine glass, cup, knife, spoon, bowl, "
         "banana, apple, orange, broccoli, carrot, pizza, donut, cake, chair, bench, "
         "pottedplant, bed, diningtable, tvmonitor, laptop, remote, keyboard, cell phone, "
         "microwave, oven, sink, refrigerator, book, clock, vase, scissors, teddy bear, "
         "toothbrush",
         "aeroplane, train, parking meter, cat, bear, suitcase, frisbee, snowboard, fork, "
         "sandwich, hot dog, toilet, toaster, hair drier"),
        ("aeroplane, train, parking meter, cat, bear, suitcase, frisbee, snowboard, fork, "
         "sandwich, hot dog, toilet, toaster, hair drier, person, bicycle, car, motorbike, "
         "bus, truck, boat, traffic light, fire hydrant, stop sign, bench, bird, dog, horse, "
         "sheep, cow, elephant, zebra, giraffe, backpack, umbrella, handbag, tie, skis, "
         "sports ball, kite, baseball bat, baseball glove, skateboard, surfboard, "
         "tennis racket, bottle, wine glass, cup, knife, spoon, bowl, banana, apple, orange, "
         "broccoli, carrot, pizza, donut, cake, chair, bench, pottedplant, bed, diningtable, "
         "tvmonitor",
         "laptop, remote, keyboard, cell phone, microwave, oven, sink, refrigerator, book, "
         "clock, vase, scissors, teddy bear, toothbrush"),
        ("laptop, remote, keyboard, cell phone, microwave, oven, sink, refrigerator, book, "
         "clock, vase, scissors, teddy bear, toothbrush, aeroplane, train, parking meter, "
         "cat, bear, suitcase, frisbee, snowboard, fork, sandwich, hot dog, toilet, toaster, "
         "hair drier, person, bicycle, car, motorbike, bus, truck, boat, traffic light, "
         "fire hydrant, stop sign, bench, bird, dog, horse, sheep, cow, elephant, zebra, "
         "giraffe, backpack, umbrella, handbag, tie, skis, sports ball, kite, baseball bat, "
         "baseball glove, skateboard, surfboard, tennis racket, bottle, wine glass, cup, "
         "knife, spoon, bowl",
         "banana, apple, orange, broccoli, carrot, pizza, donut, cake, chair, bench, "
         "pottedplant, bed, diningtable, tvmonitor"),
    ],
}

VOC_ORDER = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
             "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
             "sheep", "sofa", "train", "tvmonitor"]


def seed_names(cell, vocabulary):
    """Canonical names of a table cell; the table's 'bench' after 'chair' means couch."""
    tokens = [t.strip() for t in cell.split(",")]
    fixed = ["couch" if t == "bench" and i and tokens[i - 1] == "chair" else t
             for i, t in enumerate(tokens)]
    return [vocabulary.lookup(t).name for t in fixed]


def test_sizes_and_indices():
    assert len(VOC) == 20 and len(COCO) == 79
    assert list(VOC.names) == VOC_ORDER
    assert [c.index for c in VOC.classes] == list(range(1, 21))
    assert [c.index for c in COCO.classes] == list(range(1, 80))
    assert VOC.by_index(12).name == "dog" and VOC.by_index(20).name == "tvmonitor"
    with pytest.raises(ValueError, match="out of range 1..20"):
        VOC.by_index(21)


def test_coco_drops_mouse_and_keeps_official_order():
    assert COCO_DROPPED == ("mouse",) and COCO_DROPPED_IDS == (74,)
    assert "mouse" not in COCO.names
    ids = [c.coco_id for c in COCO.classes]
    assert ids == sorted(ids) and len(set(ids)) == 79 and 74 not in ids
    assert COCO.names[0] == "person" and COCO.names[-1] == "toothbrush"
    # Contiguous indices: laptop (id 73) is 64th, remote (id 75) follows it as 65th.
    assert COCO.lookup("laptop").index == 64 and COCO.lookup("remote").index == 65


@pytest.mark.parametrize("vocabulary,seen,unseen", [(VOC, 15, 5), (COCO, 65, 14)])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_every_split_partitions_the_vocabulary(vocabulary, seen, unseen, split):
    s, u = vocabulary.seen(split), vocabulary.unseen(split)
    assert (len(s), len(u)) == (seen, unseen)
    assert len(set(s)) == seen and len(set(u)) == unseen
    assert set(s) | set(u) == set(vocabulary.names)
    assert not set(s) & set(u)


@pytest.mark.parametrize("vocabulary", [VOC, COCO])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_splits_match_the_seed_table(vocabulary, split):
    seen_cell, unseen_cell = SEED_TABLE[vocabulary.name][split - 1]
    seen, unseen = seed_names(seen_cell, vocabulary), seed_names(unseen_cell, vocabulary)
    assert len(seen) == len(set(seen)) and len(unseen) == len(set(unseen))
    assert set(vocabulary.seen(split)) == set(seen)
    assert set(vocabulary.unseen(split)) == set(unseen)


def test_split_one_unseen_lists_from_the_spec():
    assert VOC.unseen(1) == ("car", "dog", "sofa", "train", "tvmonitor")  # vocabulary order
    assert set(COCO.unseen(1)) == {
        "airplane", "train", "parking meter", "cat", "bear", "suitcase", "frisbee",
        "snowboard", "fork", "sandwich", "hot dog", "toilet", "toaster", "hair drier"}
    assert "couch" in COCO.seen(1) and "couch" in COCO.unseen(3)


def test_voc_names_map_to_the_coco_detector():
    expected = {"aeroplane": ("airplane", 5), "diningtable": ("dining table", 67),
                "motorbike": ("motorcycle", 4), "pottedplant": ("potted plant", 64),
                "sofa": ("couch", 63), "tvmonitor": ("tv", 72), "person": ("person", 1),
                "dog": ("dog", 18)}
    for voc_name, (detector, coco_id) in expected.items():
        info = VOC.lookup(voc_name)
        assert (info.detector, info.coco_id) == (detector, coco_id)
        assert COCO.lookup(detector).coco_id == coco_id
    for c in VOC.classes:  # every VOC class is a COCO class with the same detector id
        assert COCO.lookup(c.detector).coco_id == c.coco_id


def test_official_coco_ids():
    official = {"person": 1, "airplane": 5, "couch": 63, "tv": 72, "dining table": 67,
                "potted plant": 64, "toothbrush": 90, "hair drier": 89, "laptop": 73}
    assert {name: COCO.lookup(name).coco_id for name in official} == official
    assert all(c.detector == c.name for c in COCO.classes)


def test_natural_names():
    assert [VOC.lookup(n).natural for n in ("diningtable", "pottedplant", "tvmonitor", "dog")] \
        == ["dining table", "potted plant", "tv monitor", "dog"]
    assert COCO.lookup("tv").natural == "tv monitor"
    assert COCO.lookup("dining table").natural == "dining table"


@pytest.mark.parametrize("vocabulary,spelling,canonical", [
    (VOC, "Dining Table", "diningtable"),
    (VOC, "potted_plant", "pottedplant"),
    (VOC, "tv monitor", "tvmonitor"),
    (VOC, "TV", "tvmonitor"),
    (VOC, "couch", "sofa"),
    (VOC, "airplane", "aeroplane"),
    (VOC, "motorcycle", "motorbike"),
    (COCO, "tvmonitor", "tv"),
    (COCO, "sofa", "couch"),
    (COCO, "aeroplane", "airplane"),
    (COCO, "motorbike", "motorcycle"),
    (COCO, "pottedplant", "potted plant"),
    (COCO, "Teddy_Bear", "teddy bear"),
])
def test_lookup_accepts_alternative_spellings(vocabulary, spelling, canonical):
    assert vocabulary.lookup(spelling).name == canonical


def test_unknown_class_is_one_line_with_a_suggestion():
    with pytest.raises(UnknownClassError) as info:
        VOC.lookup("dgo")
    assert str(info.value) == "unknown class 'dgo' in vocabulary voc (did you mean: dog?)"
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownClassError, match=r"^unknown class 'mouse' in vocabulary coco"):
        COCO.lookup("mouse")
    with pytest.raises(UnknownClassError) as info:
        COCO.lookup("giraffe" * 3)
    assert "\n" not in str(info.value)


def test_unknown_split_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        VOC.seen(4)
    assert str(info.value) == "unknown split 4 for vocabulary voc (valid splits: 1, 2, 3)"
    with pytest.raises(ValueError, match="valid splits"):
        COCO.unseen(0)


def test_get_vocabulary():
    assert get_vocabulary("voc") is VOC and get_vocabulary("COCO") is COCO
    with pytest.raises(ValueError) as info:
        get_vocabulary("ade20k")
    assert str(info.value) == "unknown vocabulary 'ade20k' (choices: voc, coco, shapes, or a .yaml/.yml/.tsv file)"


def test_shapes_splits_are_compositional():
    """Five unseen classes per split, disjoint across splits; each unseen class's colour word and
    shape word also name at least three seen classes (zero-shot by composition)."""
    from factory.core.vocab import SHAPE_COLOURS, SHAPE_FORMS

    assert len(SHAPES) == len(SHAPE_COLOURS) * len(SHAPE_FORMS) == 20
    unseen = [set(SHAPES.unseen(k)) for k in (1, 2, 3)]
    assert all(len(u) == 5 for u in unseen) and len(set.union(*unseen)) == 15  # disjoint
    for k in (1, 2, 3):
        seen_words = [name.split("_") for name in SHAPES.seen(k)]
        for name in SHAPES.unseen(k):
            colour, form = name.split("_")
            assert sum(c == colour for c, _ in seen_words) >= 3 and sum(f == form for _, f in seen_words) >= 3
    assert SHAPES.lookup("Red Disc").name == "red_disc" and SHAPES.lookup("red_disc").natural == "red disc"


# ---- user-defined vocabularies


def _classes(*entries):
    return {"name": "mine", "classes": list(entries)}


@pytest.mark.parametrize("definition, message", [
    (_classes(), "vocabulary mine has no classes"),
    ({"classes": ["a"]}, "a vocabulary needs a name"),
    ({"name": "voc", "classes": ["a"]}, "vocabulary name 'voc' is a built-in vocabulary's; name yours otherwise"),
    (_classes("a", "a"), "vocabulary mine: name a given twice"),
    (_classes({"name": "a", "index": 1}, {"name": "b", "index": 1}), "vocabulary mine: index 1 given twice"),
    (_classes({"name": "a", "index": 0}),
     "vocabulary mine: class a has index 0; indices are 1..254 (0 is background, 255 ignore)"),
    (_classes({"name": "a", "index": 255}),
     "vocabulary mine: class a has index 255; indices are 1..254 (0 is background, 255 ignore)"),
    (_classes("a", {"name": "b", "index": 3}),
     "vocabulary mine: indices [1, 3] must be 1..2, each once (label maps and the segmenter's outputs are dense)"),
    (_classes("a", {"name": "b", "natural": "a"}), "vocabulary mine: 'a' names two classes"),
    (_classes({"name": "a", "colour": "red"}),
     "vocabulary mine: class a has unknown keys ['colour'] (name, natural, synonyms, index, detector)"),
    (_classes({"name": "a", "synonyms": "b"}), "vocabulary mine: class a's synonyms are a list of names, [b], not 'b'"),
    (_classes({"name": "a", "detector": "forklift"}),
     "vocabulary mine: class a's detector: unknown class 'forklift' in vocabulary coco (did you mean: fork?)"),
    ({**_classes("a", "b"), "unseen": [["c"]]}, "vocabulary mine: unknown class 'c' in vocabulary mine"),
    ({**_classes("a", "b"), "unseen": [["a", "b"]]},
     "vocabulary mine: unseen split 1 must name at least one class and leave one seen"),
    ({**_classes("a", "b"), "pairs": [["a", "a"]]}, "vocabulary mine: a pair is two different classes"),
    ({**_classes("a"), "detector": "ade"}, "vocabulary mine: detector 'ade' is not coco or shapes"),
])
def test_bad_vocabularies_are_one_line_errors(definition, message):
    with pytest.raises(ValueError) as info:
        define_vocabulary(definition)
    assert str(info.value) == message


def test_explicit_indices_order_the_classes():
    mine = define_vocabulary(_classes({"name": "a", "index": 2}, {"name": "b", "index": 1, "detector": "dog"}))
    assert mine.names == ("b", "a") and mine.by_index(1).name == "b"
    assert (mine.lookup("b").coco_id, mine.lookup("b").detector) == (18, "dog")

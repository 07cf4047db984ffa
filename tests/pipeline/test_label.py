import numpy as np
import pytest

from factory.core.conventions import IGNORE
from factory.core.vocab import COCO, VOC
from factory.dataset.batch import CLASS_NOT_FOUND, pack_masks
from factory.detection.detections import Detections
from factory.detection.maskrcnn import coco_to_vocabulary
from factory.pipeline.label import LabelStage, label_classes, semantic_label_map
from factory.pipeline.sections import LabelerConfig

H = W = 8
DOG, CAT, PERSON = VOC.lookup("dog"), VOC.lookup("cat"), VOC.lookup("person")


def box(y0, y1, x0, x1, value=1.0):
    mask = np.zeros((H, W), np.float32)
    mask[y0:y1, x0:x1] = value
    return mask


def detections(*instances, vocabulary=VOC):
    """instances: (COCO id, score, mask), as the COCO detector relabels them for `vocabulary`."""
    if not instances:
        return Detections(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, H, W), np.float32))
    ids, scores, masks = zip(*instances)
    classes = coco_to_vocabulary(vocabulary)[np.array(ids, np.int64)]
    return Detections(classes, np.array(scores, np.float32), np.stack(masks))


def run(dets, classes, *, score=0.5, mask=0.5, ignore=None, unclaimed=None):
    labels, owner, band = label_classes(dets, classes, score_threshold=score, mask_threshold=mask,
                                        ignore_threshold=ignore)
    if unclaimed is None:
        unclaimed = 0 if all(label.found for label in labels) else IGNORE
    return labels, semantic_label_map(labels, owner, band, unclaimed=unclaimed)


def test_vocabulary_indices_used_here():
    assert (DOG.index, DOG.coco_id) == (12, 18)
    assert (CAT.index, CAT.coco_id) == (8, 17)


def test_all_instances_of_a_prompt_class_are_merged():
    dets = detections((18, 0.9, box(0, 3, 0, 3)), (18, 0.7, box(5, 8, 5, 8)))
    (dog,), label = run(dets, [DOG])
    assert dog.found and dog.instances == 2
    assert dog.score == pytest.approx(0.9)
    assert dog.mask.sum() == 9 + 9
    assert dog.mask[:3, :3].all() and dog.mask[5:, 5:].all()
    assert label.dtype == np.uint8 and label.shape == (H, W)
    assert (label[:3, :3] == 12).all() and (label[5:, 5:] == 12).all()
    assert (label[dog.mask == 0] == 0).all()  # everything else background
    assert set(np.unique(label)) == {0, 12}


def test_instance_below_threshold_is_not_merged():
    dets = detections((18, 0.9, box(0, 3, 0, 3)), (18, 0.3, box(5, 8, 5, 8)))
    (dog,), label = run(dets, [DOG], score=0.5)
    assert dog.instances == 1 and dog.score == pytest.approx(0.9)
    assert not dog.mask[5:, 5:].any()
    assert (label[5:, 5:] == 0).all() and (label[:3, :3] == 12).all()
    # Exactly at the threshold counts.
    (dog,), _ = run(detections((18, 0.5, box(0, 2, 0, 2))), [DOG], score=0.5)
    assert dog.found


def test_non_prompt_classes_are_background():
    dets = detections((18, 0.9, box(0, 3, 0, 3)), (1, 0.99, box(3, 8, 0, 8)), (17, 0.95, box(0, 8, 6, 8)))
    (dog,), label = run(dets, [DOG])
    assert dog.instances == 1
    assert set(np.unique(label)) == {0, 12}
    assert (label[3:, :6] == 0).all()


def test_class_not_detected():
    (dog,), label = run(detections((17, 0.9, box(0, 8, 0, 8))), [DOG], unclaimed=0)
    assert not dog.found and dog.instances == 0 and dog.score == 0.0 and not dog.mask.any()
    assert (label == 0).all()
    # Nothing detected at all: still maps of the image's size.
    (dog,), label = run(detections(), [DOG])
    assert not dog.found and dog.mask.shape == (H, W)
    assert label.shape == (H, W) and (label == IGNORE).all()
    assert pack_masks(dog.mask[None]).shape == (H, W)


def test_overlap_goes_to_the_higher_score():
    # Dog (0.8) on the left half, cat (0.9) on the right half, overlapping in columns 3..4.
    dets = detections((18, 0.8, box(0, 8, 0, 5)), (17, 0.9, box(0, 8, 3, 8)))
    (dog, cat), label = run(dets, [DOG, CAT])
    assert (label[:, :3] == 12).all()
    assert (label[:, 3:] == 8).all()
    # Both class masks keep the overlap; only the label map must choose.
    assert dog.mask[:, 3:5].all() and cat.mask[:, 3:5].all()
    # The other way round: order of classes does not matter, scores do.
    dets = detections((18, 0.95, box(0, 8, 0, 5)), (17, 0.9, box(0, 8, 3, 8)))
    for order in ([DOG, CAT], [CAT, DOG]):
        _, label = run(dets, order)
        assert (label[:, :5] == 12).all() and (label[:, 5:] == 8).all()


def test_overlap_within_one_class_keeps_the_class():
    dets = detections((18, 0.6, box(0, 6, 0, 6)), (18, 0.9, box(2, 8, 2, 8)), (17, 0.7, box(2, 4, 2, 4)))
    (dog, cat), label = run(dets, [DOG, CAT])
    assert (label[2:4, 2:4] == 12).all()  # the 0.9 dog beats the 0.7 cat
    assert cat.found and dog.instances == 2


def test_ignore_band():
    dets = detections((18, 0.9, box(0, 3, 0, 3)),
                      (18, 0.3, box(4, 8, 4, 8)),    # in [0.2, 0.5): ignore
                      (18, 0.1, box(0, 2, 6, 8)),    # below the band: background
                      (1, 0.3, box(4, 8, 0, 3)),     # not a prompt class: background
                      (18, 0.35, box(1, 3, 1, 3)))   # in the band but claimed by the 0.9 dog
    (dog,), label = run(dets, [DOG], score=0.5, ignore=0.2)
    assert dog.instances == 1
    assert (label[4:, 4:] == IGNORE).all()
    assert (label[:2, 6:] == 0).all()
    assert (label[4:, :3] == 0).all()
    assert (label[:3, :3] == 12).all()
    # Without an ignore threshold the band is background.
    _, label = run(dets, [DOG], score=0.5)
    assert (label[4:, 4:] == 0).all()


def test_missing_class_makes_unclaimed_pixels_ignore():
    dets = detections((18, 0.9, box(0, 3, 0, 3)))
    labels, label = run(dets, [DOG, CAT])
    assert [label.found for label in labels] == [True, False]
    assert (label[:3, :3] == 12).all()
    outside = np.ones((H, W), bool)
    outside[:3, :3] = False
    assert (label[outside] == IGNORE).all()


def test_mask_threshold_binarises_soft_masks():
    soft = np.zeros((H, W), np.float32)
    soft[0:2] = 0.4
    soft[2:4] = 0.5
    soft[4:6] = 0.6
    dets = detections((18, 0.9, soft))
    (dog,), label = run(dets, [DOG], mask=0.5)
    assert not dog.mask[0:2].any() and dog.mask[2:6].all() and not dog.mask[6:].any()
    assert (label[2:6] == 12).all() and (label[:2] == 0).all()
    (dog,), _ = run(dets, [DOG], mask=0.3)
    assert dog.mask[:6].all()


def test_pack_masks_round_trip():
    rng = np.random.default_rng(0)
    labels, _ = run(detections((18, 0.9, box(0, 4, 0, 8)), (17, 0.8, box(2, 8, 3, 6))), [DOG, CAT])
    bits = pack_masks(np.stack([label.mask for label in labels]))
    assert bits.dtype == np.uint8 and bits.shape == (H, W)
    for k, label in enumerate(labels):
        assert np.array_equal((bits >> k) & 1 == 1, label.mask)
    assert bits.max() == 3  # overlap holds both bits
    # Arbitrary masks, up to 8 classes.
    masks = rng.random((8, H, W)) > 0.5
    bits = pack_masks(masks)
    for k in range(8):
        assert np.array_equal(((bits >> k) & 1).astype(bool), masks[k])


@pytest.mark.parametrize("name,coco_id", [("sofa", 63), ("tvmonitor", 72), ("aeroplane", 5),
                                          ("diningtable", 67), ("pottedplant", 64), ("motorbike", 4)])
def test_voc_classes_match_coco_ids(name, coco_id):
    info = VOC.lookup(name)
    assert info.coco_id == coco_id
    (found,), label = run(detections((coco_id, 0.9, box(0, 4, 0, 4)), (coco_id + 1, 0.9, box(4, 8, 4, 8))),
                          [info])
    assert found.found and found.instances == 1
    assert (label[:4, :4] == info.index).all() and (label[4:, 4:] == 0).all()


def test_coco_vocabulary_indices():
    couch = COCO.lookup("couch")
    (found,), label = run(detections((63, 0.9, box(0, 4, 0, 4)), vocabulary=COCO), [couch])
    assert found.found and (label[:4, :4] == couch.index).all() and couch.index != 63


# ------------------------------------------------------------------- LabelStage

COW = VOC.lookup("cow")  # the random tiny detector predicts COCO id 21 (cow) almost everywhere


def batch(n=3, size=64, classes=(["cow"], ["cat", "cow"], ["pottedplant"])):
    rng = np.random.default_rng(0)
    column = np.empty(n, dtype=object)
    column[:] = list(classes)[:n]
    return {  # what GenerateStage hands on: the plan's Sample fields plus image and timing
        "sample_id": np.array([f"{i:07d}-abcdef01" for i in range(n)], dtype=object),
        "index": np.arange(n, dtype=np.int64),
        "classes": column,
        "class_words": column.copy(),
        "prompt": np.array([f"a photograph of a {' and a '.join(c)}" for c in column], dtype=object),
        "seed": np.arange(n, dtype=np.int64) + 100,
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "generate_seconds": np.zeros(n),
    }


def stage(**config):
    return LabelStage(LabelerConfig(model="tiny", **config), "voc", 64)


def test_label_stage_outputs():
    assert COW.coco_id == 21
    out = stage(score_threshold=0.01, on_missing="drop")(batch())
    n = 3
    assert out["label"].shape == (n, 64, 64) and out["label"].dtype == np.uint8
    assert out["class_bits"].shape == (n, 64, 64) and out["class_bits"].dtype == np.uint8
    for key in ("scores", "instances", "found"):
        assert out[key].dtype == object and len(out[key]) == n
        assert [len(v) for v in out[key]] == [1, 2, 1]
    assert out["scores"][1].dtype == np.float32 and out["instances"][1].dtype == np.int16
    assert out["label_seconds"].shape == (n,)
    # The input columns travel on.
    assert out["prompt"][1] == "a photograph of a cat and a cow" and out["image"].shape == (n, 64, 64, 3)
    # Sample 0: the cow is found, the sample is complete.
    assert out["found"][0].tolist() == [True] and out["instances"][0][0] > 0 and out["scores"][0][0] >= 0.01
    assert out["drop_reason"][0] == ""
    assert set(np.unique(out["label"][0])) == {0, COW.index}
    assert np.array_equal(out["label"][0] == COW.index, out["class_bits"][0] == 1)
    # Sample 1: cow found, cat missing -> dropped; the found cow still has its mask bit (bit 1).
    assert out["found"][1].tolist() == [False, True] and out["drop_reason"][1] == CLASS_NOT_FOUND
    assert ((out["class_bits"][1] >> 1) & 1).any() and not (out["class_bits"][1] & 1).any()
    assert set(np.unique(out["label"][1])) <= {COW.index, IGNORE}
    # Sample 2: nothing found.
    assert out["found"][2].tolist() == [False] and out["drop_reason"][2] == CLASS_NOT_FOUND


def test_label_stage_drops_sample_whose_class_is_missing():
    out = stage(score_threshold=1.0, on_missing="drop")(batch())
    assert out["drop_reason"].tolist() == [CLASS_NOT_FOUND] * 3
    assert all(not f.any() for f in out["found"])


def test_label_stage_keeps_missing_class_as_ignore():
    out = stage(score_threshold=1.0, on_missing="ignore")(batch())
    assert out["drop_reason"].tolist() == ["", "", ""]
    assert out["label"].shape == (3, 64, 64)
    assert (out["label"] == IGNORE).all()
    assert (out["class_bits"] == 0).all()
    assert all((s == 0).all() and (i == 0).all() for s, i in zip(out["scores"], out["instances"]))


def test_label_stage_is_deterministic():
    a = stage(score_threshold=0.01)(batch())
    b = stage(score_threshold=0.01)(batch())
    assert np.array_equal(a["label"], b["label"]) and np.array_equal(a["class_bits"], b["class_bits"])
    assert all(np.array_equal(x, y) for x, y in zip(a["scores"], b["scores"]))


def test_label_stage_policy_with_a_stub_detector():
    """The stage's rules on hand-made detections: merge, overlap, ignore band, drop policy."""
    size = 8

    def square(y0, y1, x0, x1):
        mask = np.zeros((size, size), np.float32)
        mask[y0:y1, x0:x1] = 1.0
        return mask

    dog, cat = DOG.index, CAT.index
    found_all = Detections(np.array([dog, dog, cat], np.int64), np.array([0.9, 0.8, 0.7], np.float32),
                           np.stack([square(0, 4, 0, 4), square(4, 8, 4, 8), square(0, 4, 4, 8)]))
    cat_only = Detections(np.array([cat, dog], np.int64), np.array([0.9, 0.3], np.float32),
                          np.stack([square(0, 4, 0, 4), square(4, 8, 4, 8)]))
    nothing = Detections(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, size, size), np.float32))

    for policy in ("drop", "ignore"):
        labeler = stage(score_threshold=0.5, ignore_threshold=0.2, on_missing=policy)
        asked = []
        labeler.detector = lambda images, classes: asked.append(classes) or [found_all, cat_only, nothing]
        out = labeler(batch(size=size, classes=(["dog", "cat"], ["dog", "cat"], ["dog"])))
        assert asked == [[[DOG, CAT], [DOG, CAT], [DOG]]]  # each image is asked for its prompt's classes
        reason = "" if policy == "ignore" else CLASS_NOT_FOUND
        assert out["drop_reason"].tolist() == ["", reason, reason]
        complete, partial, empty = out["label"]
        assert (complete[:4, :4] == 12).all() and (complete[4:, 4:] == 12).all()  # both dogs
        assert (complete[:4, 4:] == 8).all() and (complete[4:, :4] == 0).all()
        assert out["instances"][0].tolist() == [2, 1]
        assert out["scores"][0].tolist() == pytest.approx([0.9, 0.7])
        # Dog missing: its weak instance is in the ignore band, the rest unclaimed -> 255.
        expected = np.full((size, size), IGNORE, np.uint8)
        expected[:4, :4] = 8
        assert np.array_equal(partial, expected)
        assert out["found"][1].tolist() == [False, True]
        assert empty.shape == (size, size) and (empty == IGNORE).all()
        assert out["class_bits"][0][0, 0] == 1 and out["class_bits"][0][0, 7] == 2


def test_kept_instance_with_an_empty_mask_does_not_count_as_found():
    faint = box(0, 4, 0, 4, value=0.2)  # below the mask threshold everywhere
    (dog,), label = run(detections((18, 0.9, faint)), [DOG])
    assert not dog.found and dog.instances == 0
    assert (label == IGNORE).all()  # missing class: no pixel may be called background


def test_instance_with_score_zero_still_owns_its_pixels():
    (dog,), label = run(detections((18, 0.0, box(0, 2, 0, 2))), [DOG], score=0.0)
    assert dog.found and (label[:2, :2] == 12).all()

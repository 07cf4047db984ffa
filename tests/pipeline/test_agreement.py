import numpy as np
import pytest
from test_label import batch

from factory.core.conventions import IGNORE
from factory.dataset.batch import pack_masks
from factory.pipeline.agreement import DISAGREE, AgreementStage, apply_agreement, mask_iou, unpack_masks
from factory.pipeline.label import LabelStage
from factory.pipeline.recipe import RecipeError, load_recipe
from factory.pipeline.sections import AgreementConfig, LabelerConfig


def masks(*boxes, size=8):
    out = np.zeros((len(boxes), size, size), bool)
    for k, (top, left, bottom, right) in enumerate(boxes):
        out[k, top:bottom, left:right] = True
    return out


def test_mask_iou():
    a, b = masks((0, 0, 4, 4), (2, 0, 6, 4))
    assert mask_iou(a, b) == pytest.approx(8 / 24)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0  # both say the class is not there
    assert mask_iou(a, np.zeros_like(a)) == 0.0


def test_unpack_reverses_pack():
    m = masks((0, 0, 4, 4), (2, 2, 8, 8), (5, 0, 6, 1))
    assert np.array_equal(unpack_masks(pack_masks(m), 3), m)


def test_drop_and_ignore_act_on_the_disagreeing_class_only():
    first = masks((0, 0, 4, 4), (4, 4, 8, 8))  # class 7 top left, class 9 bottom right
    second = masks((0, 0, 4, 4), (0, 4, 4, 8))  # agrees on 7, puts 9 top right
    label = np.zeros((8, 8), np.uint8)
    label[first[0]], label[first[1]] = 7, 9
    kept, iou, reason = apply_agreement(label, [7, 9], first, second, min_iou=0.5, action="drop")
    assert iou.tolist() == [1.0, 0.0] and reason == DISAGREE and kept is label
    assert apply_agreement(label, [7, 9], first, second, min_iou=0.0, action="drop")[2] == ""  # record only
    ignored, _, reason = apply_agreement(label, [7, 9], first, second, min_iou=0.5, action="ignore")
    assert reason == ""
    expected = label.copy()
    expected[first[1] | second[1]] = IGNORE  # where either labeler put class 9
    assert np.array_equal(ignored, expected) and (ignored == 7).sum() == 16


def labelled(config: LabelerConfig) -> dict:
    return LabelStage(config, "voc", 64)(batch())


def test_a_labeler_checked_by_itself_agrees_everywhere():
    config = LabelerConfig(model="tiny", score_threshold=0.0, on_missing="ignore")
    out = AgreementStage(AgreementConfig(labeler=config, min_iou=1.0), "voc", 64)(labelled(config))
    assert [iou.tolist() for iou in out["agreement"]] == [[1.0], [1.0, 1.0], [1.0]]
    assert list(out["drop_reason"]) == ["", "", ""]


def test_a_stricter_second_labeler_disagrees_and_the_threshold_acts():
    first = LabelerConfig(model="tiny", score_threshold=0.0, mask_threshold=0.3, on_missing="ignore")
    second = first.model_copy(update={"mask_threshold": 0.6})
    made = labelled(first)
    recorded = AgreementStage(AgreementConfig(labeler=second), "voc", 64)({k: v.copy() for k, v in made.items()})
    ious = np.concatenate(list(recorded["agreement"]))
    assert (ious < 1).any() and (ious == 1).any()  # the random masks' values sit near 0.5
    assert np.array_equal(recorded["label"], made["label"])  # min_iou 0: nothing changes

    cut = 0.5
    dropped = AgreementStage(AgreementConfig(labeler=second, min_iou=cut), "voc", 64)(
        {k: v.copy() for k, v in made.items()})
    assert [reason == DISAGREE for reason in dropped["drop_reason"]] == [bool((iou < cut).any())
                                                                         for iou in recorded["agreement"]]
    ignored = AgreementStage(AgreementConfig(labeler=second, min_iou=cut, action="ignore"), "voc", 64)(
        {k: v.copy() for k, v in made.items()})
    for i, iou in enumerate(recorded["agreement"]):
        assert ((ignored["label"][i] == IGNORE).sum() > (made["label"][i] == IGNORE).sum()) == bool((iou < cut).any())


def test_agreement_recipe_checks():
    with pytest.raises(RecipeError, match="min_iou needs a second labeler"):
        load_recipe("tiny", {"agreement.min_iou": 0.5})
    with pytest.raises(RecipeError, match="needs weights"):
        load_recipe("tiny", {"agreement.labeler": {"model": "maskrcnn_small"}})
    key = load_recipe("tiny").content_key()
    checked = load_recipe("tiny", {"agreement.labeler": {"model": "tiny"}, "agreement.min_iou": 0.5})
    assert checked.agreement.enabled and checked.content_key() != key
    assert load_recipe("tiny", {"agreement.labeler": {"model": "tiny", "batch_size": 16},
                                "agreement.min_iou": 0.5}).content_key() == checked.content_key()

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from factory.pipeline.detect import (
    COCO_LABELS,
    Detections,
    MaskRCNNDetector,
    build_maskrcnn,
    coco_to_vocabulary,
    load_detector,
    paste_masks,
    tiny_maskrcnn,
)
from factory.pipeline.recipe import LabelerConfig
from factory.core.vocab import COCO, COCO_CATEGORIES, VOC

CPU = torch.device("cpu")
COCO_IDS = {coco_id for coco_id, _ in COCO_CATEGORIES}


def images(n=2, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def detect(config, batch, size=64):
    return MaskRCNNDetector(config, COCO, size, CPU)(batch)


def same(a: list[Detections], b: list[Detections]) -> bool:
    return all(np.array_equal(x.classes, y.classes) and np.array_equal(x.scores, y.scores)
               and np.array_equal(x.masks, y.masks) for x, y in zip(a, b, strict=True))


def other_tiny_state():
    """Random weights other than build_maskrcnn's own (it seeds 0)."""
    torch.manual_seed(1234)
    state = tiny_maskrcnn(64).state_dict()
    # Shift the class logits so that the loaded model's outputs differ visibly.
    bias = state["roi_heads.box_predictor.cls_score.bias"]
    state["roi_heads.box_predictor.cls_score.bias"] = bias + torch.linspace(0, 3, bias.numel())
    return {k: v.contiguous() for k, v in state.items()}


def test_tiny_detections():
    batch = images(2)
    out = detect(LabelerConfig(score_threshold=0.0), batch)
    assert len(out) == 2
    for d in out:
        assert isinstance(d, Detections)
        k = len(d.classes)
        assert k > 0
        assert d.classes.dtype == np.int64 and d.scores.dtype == np.float32 and d.masks.dtype == np.float32
        assert d.scores.shape == (k,) and d.masks.shape == (k, 64, 64)
        assert ((d.classes >= 0) & (d.classes <= len(COCO))).all()  # 0: a COCO class outside the vocabulary
        assert ((d.scores >= 0) & (d.scores <= 1)).all()
        assert d.masks.min() >= 0.0 and d.masks.max() <= 1.0
        assert k <= 20  # box_detections_per_img of the tiny model
    # Deterministic: the same random weights on every actor.
    assert same(out, detect(LabelerConfig(score_threshold=0.0), batch))


def test_tiny_nothing_above_threshold():
    (d,) = detect(LabelerConfig(score_threshold=1.0), images(1))
    assert d.classes.shape == (0,) and d.scores.shape == (0,) and d.masks.shape == (0, 64, 64)


def test_tiny_other_image_size():
    out = detect(LabelerConfig(score_threshold=0.0), images(1, size=32), size=32)
    assert out[0].masks.shape[1:] == (32, 32)


def test_coco_ids_become_vocabulary_indices():
    table = coco_to_vocabulary(VOC)
    assert table[18] == VOC.lookup("dog").index and table[63] == VOC.lookup("sofa").index  # COCO "couch"
    assert table[1] == VOC.lookup("person").index and table[27] == 0  # backpack: not a VOC class
    assert table[74] == 0 == coco_to_vocabulary(COCO)[74]  # "mouse", dropped from the COCO vocabulary


def test_load_detector():
    detector = load_detector(LabelerConfig(), VOC, 64, CPU)
    assert callable(detector) and len(detector(images(1))) == 1


def test_tiny_weights_by_path_safetensors(tmp_path):
    state = other_tiny_state()
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    config = LabelerConfig(model="tiny", weights=str(path), score_threshold=0.0)
    model = build_maskrcnn(config, 64)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    batch = images(2, seed=3)
    torch.manual_seed(1234)
    reference = tiny_maskrcnn(64)
    reference.load_state_dict(state)
    reference.roi_heads.score_thresh = 0.0
    reference.transform = model.transform  # masks pasted at their boxes' exact positions
    reference.eval()
    with torch.inference_mode():
        expected = reference([torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in batch])
    got = detect(config, batch)
    for e, g in zip(expected, got, strict=True):
        assert np.array_equal(coco_to_vocabulary(COCO)[e["labels"].numpy()], g.classes)
        assert np.array_equal(e["scores"].numpy(), g.scores)
        assert np.array_equal(e["masks"][:, 0].numpy(), g.masks)
    # And differently from the built-in random weights.
    assert not same(got, detect(LabelerConfig(score_threshold=0.0), batch))


def test_tiny_weights_by_path_pth(tmp_path):
    state = other_tiny_state()
    st_path, pth_path, nested_path = (tmp_path / "w.safetensors", tmp_path / "w.pth", tmp_path / "nested.pth")
    save_file(state, str(st_path))
    torch.save(state, pth_path)
    torch.save({"model": state, "epoch": 3}, nested_path)  # torchvision reference-script checkpoint
    batch = images(2, seed=4)
    from_st = detect(LabelerConfig(weights=str(st_path), score_threshold=0.0), batch)
    from_pth = detect(LabelerConfig(weights=str(pth_path), score_threshold=0.0), batch)
    from_nested = detect(LabelerConfig(weights=str(nested_path), score_threshold=0.0), batch)
    assert same(from_st, from_pth) and same(from_st, from_nested)


def test_pth_is_read_without_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        build_maskrcnn(LabelerConfig(weights=str(path)), 64)


def test_masks_are_pasted_as_torchvision_pastes_them_at_the_exact_box():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    masks = torch.rand(2, 1, 28, 28)
    # Padded by a cell (28 -> 30 cells), these boxes span whole pixels, where torchvision's paste is exact.
    whole = torch.tensor([[1.0, 1.0, 29.0, 29.0], [15.0, 29.0, 43.0, 57.0]])
    assert torch.allclose(paste_masks(masks, whole, (64, 64)), paste_masks_in_image(masks, whole, (64, 64)), atol=1e-5)
    # A box half a pixel right and down moves its mask as far (torchvision's paste truncates the box: none).
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for shift in (0.25, 0.5, 0.75):
        pasted = paste_masks(masks[:1], whole[:1] + shift, (64, 64))[0, 0]
        centroid = torch.stack([(pasted * ys).sum(), (pasted * xs).sum()]) / pasted.sum()
        still = paste_masks(masks[:1], whole[:1], (64, 64))[0, 0]
        assert torch.allclose(centroid - torch.stack([(still * ys).sum(), (still * xs).sum()]) / still.sum(),
                              torch.tensor([shift, shift]), atol=0.02)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"backbone.0.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ValueError) as info:  # torch's own message: a line per tensor
        build_maskrcnn(LabelerConfig(weights=str(path)), 64)
    message = str(info.value)
    assert "\n" not in message and message.startswith("the weights do not fit tiny: ")
    assert "(backbone.0.weight: [3, 3] in the file, [16, 3, 3, 3] in the model); give weights trained as tiny" \
        in message


def test_real_architecture_loads_weights_by_path(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    torch.manual_seed(99)
    source = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=COCO_LABELS)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "maskrcnn_v2.safetensors"
    save_file(state, str(path))
    del source
    config = LabelerConfig(model="maskrcnn_resnet50_fpn_v2", weights=str(path),
                           score_threshold=0.6, nms_threshold=0.45)
    model = build_maskrcnn(config, 512)
    assert model.roi_heads.box_predictor.cls_score.out_features == 91
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 91
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # Not just build_maskrcnn's own seeded initialisation.
    key = "roi_heads.box_predictor.cls_score.weight"
    torch.manual_seed(0)
    unloaded = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=COCO_LABELS)
    assert not torch.equal(unloaded.state_dict()[key], loaded[key])
    assert not model.training
    assert model.roi_heads.score_thresh == 0.6 and model.roi_heads.nms_thresh == 0.45


@pytest.mark.parametrize("score,ignore,nms,expected", [
    (0.5, None, 0.5, 0.5),
    (0.7, 0.3, 0.4, 0.3),
    (0.05, None, 0.6, 0.05),
    (0.5, 0.0, 0.5, 0.0),  # an ignore threshold of 0 keeps every candidate
])
def test_thresholds_reach_roi_heads(score, ignore, nms, expected):
    model = build_maskrcnn(LabelerConfig(score_threshold=score, ignore_threshold=ignore, nms_threshold=nms), 64)
    assert model.roi_heads.score_thresh == pytest.approx(expected)
    assert model.roi_heads.nms_thresh == pytest.approx(nms)
    assert not model.training


def test_ignore_threshold_lets_weaker_candidates_through():
    # The random tiny model scores about 1/91 per class: nothing reaches 0.5.
    batch = images(1, seed=5)
    (strict,) = detect(LabelerConfig(score_threshold=0.5), batch)
    (wide,) = detect(LabelerConfig(score_threshold=0.5, ignore_threshold=0.0), batch)
    assert len(strict.scores) == 0
    assert len(wide.scores) > 0 and (wide.scores < 0.5).all()


ORACLE = "models/shapes-oracle/model.safetensors"


def test_the_mini_worlds_oracle_keeps_its_head_for_your_own_classes(tmp_path):
    """signs.yaml names 3 of the 20 shapes classes: the shipped 21-way oracle loads as trained, and
    its labels of those shapes become the vocabulary's indices; every other shape is none (0)."""
    from factory.core.vocab import SHAPES, read_vocabulary

    signs = read_vocabulary("jobs/recipes/vocabularies/signs.yaml")
    detector = MaskRCNNDetector(LabelerConfig(model="maskrcnn_small", weights=ORACLE), signs, 64, CPU)
    assert detector.model.roi_heads.box_predictor.cls_score.out_features == 1 + len(SHAPES)
    mapped = {int(label): int(detector.classes[label]) for label in range(1, len(SHAPES) + 1)}
    assert {SHAPES.by_index(label).name: index for label, index in mapped.items() if index} == {
        "red_disc": signs.lookup("stop_sign").index, "yellow_triangle": signs.lookup("warning_sign").index,
        "blue_square": signs.lookup("info_sign").index}


import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from factory.core.conventions import RECIPE_DIR, SMALL, TINY
from factory.core.vocab import COCO, SHAPES, VOC
from factory.core.vocab_files import read_vocabulary
from factory.detection.detections import Detections
from factory.detection.maskrcnn import (
    COCO_LABELS,
    MaskRCNNDetector,
    build_maskrcnn,
    coco_to_vocabulary,
    tiny_maskrcnn,
)

CPU = torch.device("cpu")


def images(n=2, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def detect(batch, size=64, **options):
    return MaskRCNNDetector(TINY, COCO, size, CPU, **options)(batch)


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
    out = detect(batch, score_threshold=0.0)
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
    assert same(out, detect(batch, score_threshold=0.0))


def test_tiny_nothing_above_threshold():
    (d,) = detect(images(1), score_threshold=1.0)
    assert d.classes.shape == (0,) and d.scores.shape == (0,) and d.masks.shape == (0, 64, 64)


def test_tiny_other_image_size():
    out = detect(images(1, size=32), size=32, score_threshold=0.0)
    assert out[0].masks.shape[1:] == (32, 32)


def test_coco_ids_become_vocabulary_indices():
    table = coco_to_vocabulary(VOC)
    assert table[18] == VOC.lookup("dog").index and table[63] == VOC.lookup("sofa").index  # COCO "couch"
    assert table[1] == VOC.lookup("person").index and table[27] == 0  # backpack: not a VOC class
    assert table[74] == 0 == coco_to_vocabulary(COCO)[74]  # "mouse", dropped from the COCO vocabulary


def test_tiny_weights_by_path_safetensors(tmp_path):
    state = other_tiny_state()
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    model = build_maskrcnn(TINY, 64, weights=str(path), score_threshold=0.0)
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
    got = detect(batch, weights=str(path), score_threshold=0.0)
    for e, g in zip(expected, got, strict=True):
        assert np.array_equal(coco_to_vocabulary(COCO)[e["labels"].numpy()], g.classes)
        assert np.array_equal(e["scores"].numpy(), g.scores)
        assert np.array_equal(e["masks"][:, 0].numpy(), g.masks)
    # And differently from the built-in random weights.
    assert not same(got, detect(batch, score_threshold=0.0))


def test_tiny_weights_by_path_pth(tmp_path):
    state = other_tiny_state()
    st_path, pth_path, nested_path = (tmp_path / "w.safetensors", tmp_path / "w.pth", tmp_path / "nested.pth")
    save_file(state, str(st_path))
    torch.save(state, pth_path)
    torch.save({"model": state, "epoch": 3}, nested_path)  # torchvision reference-script checkpoint
    batch = images(2, seed=4)
    from_st = detect(batch, weights=str(st_path), score_threshold=0.0)
    from_pth = detect(batch, weights=str(pth_path), score_threshold=0.0)
    from_nested = detect(batch, weights=str(nested_path), score_threshold=0.0)
    assert same(from_st, from_pth) and same(from_st, from_nested)


def test_pth_is_read_without_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        build_maskrcnn(TINY, 64, weights=str(path))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"backbone.0.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ValueError) as info:  # torch's own message: a line per tensor
        build_maskrcnn(TINY, 64, weights=str(path))
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
    model = build_maskrcnn("maskrcnn_resnet50_fpn_v2", 512, weights=str(path), score_threshold=0.6,
                           nms_threshold=0.45)
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


ORACLE = "models/shapes-oracle/model.safetensors"


def test_the_mini_worlds_oracle_keeps_its_head_for_your_own_classes():
    """signs.yaml names 3 of the 20 shapes classes: the shipped 21-way oracle loads as trained, and
    its labels of those shapes become the vocabulary's indices; every other shape is none (0)."""
    signs = read_vocabulary(str(RECIPE_DIR / "vocabularies" / "signs.yaml"))
    detector = MaskRCNNDetector(SMALL, signs, 64, CPU, weights=ORACLE)
    assert detector.model.roi_heads.box_predictor.cls_score.out_features == 1 + len(SHAPES)
    mapped = {int(label): int(detector.classes[label]) for label in range(1, len(SHAPES) + 1)}
    assert {SHAPES.by_index(label).name: index for label, index in mapped.items() if index} == {
        "red_disc": signs.lookup("stop_sign").index, "yellow_triangle": signs.lookup("warning_sign").index,
        "blue_square": signs.lookup("info_sign").index}

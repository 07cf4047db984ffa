import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from factory.build.annotate import AnnotateStage, annotation_label_map
from factory.build.recipe import AnnotatorConfig, GeneratorConfig
from factory.core.conventions import IGNORE
from factory.dataset.codec import decode_png
from grounding.checkpoint import save_grounding_checkpoint
from grounding.config import GroundingModelConfig
from grounding.data import TextConfig
from grounding.model import GroundingModule
from jobs import build_dataset

TINY_CHANNELS = {16: 288, 32: 192}  # the tiny U-Net's capture (tests/diffusion/test_features.py)


def test_label_map_takes_the_most_probable_class_above_threshold():
    p = np.zeros((2, 2, 3), np.float32)
    p[0] = [[0.9, 0.6, 0.2], [0.1, 0.45, 0.0]]  # dog
    p[1] = [[0.7, 0.8, 0.1], [0.2, 0.1, 0.0]]  # cat
    label = annotation_label_map(p, [12, 8], threshold=0.5)
    assert label.tolist() == [[12, 8, 0], [0, 0, 0]]
    banded = annotation_label_map(p, [12, 8], threshold=0.5, ignore_below=0.3)
    assert banded.tolist() == [[12, 8, 0], [0, IGNORE, 0]]  # 0.45: unsure, neither class nor background


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny module in the training code's checkpoint format."""
    path = tmp_path_factory.mktemp("grounding") / "best"
    module = GroundingModule(GroundingModelConfig.tiny(feature_channels=TINY_CHANNELS, mask_resolution=64))
    save_grounding_checkpoint(str(path), module, None, {
        "epoch": 0, "text": TextConfig().model_dump(), "generator": "tiny", "capture": {"features": "latent", "steps_remaining": 2},
        "vocabulary": {"name": "voc"}, "classes": ["dog", "cat"]})
    return str(path)


def test_annotate_stage_labels_the_prompt_classes(checkpoint):
    stage = AnnotateStage(GeneratorConfig(steps=4, height=64, width=64, guidance_scale=5.0),
                          AnnotatorConfig(checkpoint=checkpoint, threshold=0.5, on_missing="ignore"), "voc")
    batch = {"prompt": np.array(["a photograph of a dog", "a photograph of a cat and a bus"], dtype=object),
             "class_words": np.array([["dog"], ["cat", "bus"]], dtype=object),
             "classes": np.array([["dog"], ["cat", "bus"]], dtype=object), "seed": np.array([1, 2])}
    out = stage(batch)
    assert out["image"].shape == (2, 64, 64, 3) and out["label"].shape == (2, 64, 64)
    assert set(np.unique(out["label"][1])) <= {0, IGNORE, 8, 6}  # background, ignore, cat, bus
    assert [len(s) for s in out["scores"]] == [1, 2]
    for bits, found in zip(out["class_bits"], out["found"]):
        assert all(bool(((bits >> k) & 1).any()) == f for k, f in enumerate(found))


def test_checkpoint_of_another_generator_is_refused_before_models_load(checkpoint, tmp_path, capsys, monkeypatch):
    from factory.build import pipeline
    monkeypatch.setattr(pipeline, "stream_samples", lambda *a, **k: pytest.fail("models loaded"))
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    assert build_dataset.main(["--out", str(tmp_path / "o"), "--annotator.checkpoint", checkpoint,
                               "--generator.model", str(tmp_path / "sd")]) == 2
    assert "reads features of generator 'tiny'" in capsys.readouterr().err
    assert build_dataset.main(["--out", str(tmp_path / "o"), "--annotator.checkpoint", str(tmp_path / "none")]) == 2
    assert "no readable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_annotated_build(ray_cluster, checkpoint, tmp_path):
    out = tmp_path / "seg"
    assert build_dataset.main(["--out", str(out), "--num-samples", "6", "--generator.steps", "4",
                               "--annotator.checkpoint", checkpoint, "--annotator.on-missing", "ignore"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["labeler"] == f"grounding:{checkpoint}"
    assert manifest["counts"]["written"] == 6
    rows = [r for f in manifest["files"] for r in pq.read_table(out / f["path"]).to_pylist()]
    for row in rows:
        label = decode_png(row["label"]["bytes"])
        assert set(np.unique(label)) <= {0, IGNORE, *row["class_indices"]}
        assert row["labeler"] == f"grounding:{checkpoint}"

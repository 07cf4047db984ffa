"""The open-vocabulary labeler (factory/pipeline/openvocab.py) through its real loading path: tiny
random SAM 3, OWLv2 + SAM and Grounding DINO + SAM 2, saved with save_pretrained and loaded by
folder or by s3:// prefix, then labelled by label.py's rules. Random weights find nothing in
particular, so the thresholds are 0 here: what is checked is who is asked for what, and how
the answers are labelled."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from factory.core.conventions import IGNORE
from factory.core.loading import ModelLoadError
from factory.core.options import ConfigError
from factory.core.vocab import VOC
from factory.detection.detections import Detections
from factory.pipeline.labelers import load_detector
from factory.pipeline.label import LabelStage
from factory.pipeline.openvocab import (
    MAX_INSTANCES,
    class_queries,
    save_tiny_detector_and_sam,
    save_tiny_sam3,
)
from factory.pipeline.sections import LabelerConfig

CPU = torch.device("cpu")
DOG, CAT, PERSON = VOC.lookup("dog"), VOC.lookup("cat"), VOC.lookup("person")
# Tiny Grounding DINO takes about a second a call on 2 cores (deformable attention in plain PyTorch).
ROUTES = ("sam3", "owlv2+sam", pytest.param("grounding-dino+sam2", marks=pytest.mark.slow))
EVERYTHING = {"score_threshold": 0.0, "nms_threshold": 1.0}  # every candidate through: random weights


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict[str, str]]:
    """labeler.weights (and labeler.sam) of each route, saved once."""
    root = tmp_path_factory.mktemp("openvocab")
    owlv2, sam = save_tiny_detector_and_sam(root, "owlv2", "sam")
    grounding_dino, sam2 = save_tiny_detector_and_sam(root, "grounding-dino", "sam2")
    return {"sam3": {"weights": save_tiny_sam3(root / "sam3")}, "owlv2+sam": {"weights": owlv2, "sam": sam},
            "grounding-dino+sam2": {"weights": grounding_dino, "sam": sam2}}


def labeler(models: dict[str, str], **config) -> LabelerConfig:
    return LabelerConfig(model="open_vocabulary", **models, **config)


def detect(models, images, classes, **config) -> list[Detections]:
    return load_detector(labeler(models, **config), VOC, 64, CPU)(images, classes)


def images(n: int = 3, height: int = 64, width: int = 80, seed: int = 0) -> np.ndarray:
    # not square: OWLv2 and SAM pad to a square, Grounding DINO does not; boxes must come back right
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def test_each_class_is_asked_by_its_name_and_synonyms():
    hound = replace(DOG, synonyms=("puppy", "hound"))
    texts, indices = class_queries([hound, CAT])
    assert texts == ["dog", "puppy", "hound", "cat"] and indices.tolist() == [DOG.index] * 3 + [CAT.index]
    # a text two classes share is asked once, for the first
    texts, indices = class_queries([CAT, replace(DOG, synonyms=("cat",))])
    assert texts == ["cat", "dog"] and indices.tolist() == [CAT.index, DOG.index]
    texts, indices = class_queries([])
    assert texts == [] and indices.shape == (0,)


@pytest.mark.parametrize("route", ROUTES)
def test_instances_of_the_asked_classes_only(route, saved):
    batch, asked = images(), [[DOG, CAT], [CAT], [PERSON]]
    found = detect(saved[route], batch, asked, **EVERYTHING)
    assert len(found) == 3
    for detections, classes in zip(found, asked):
        k = len(detections.classes)
        assert 0 < k <= MAX_INSTANCES
        assert detections.classes.dtype == np.int64 and detections.scores.dtype == np.float32
        assert detections.masks.dtype == np.float32 and detections.masks.shape == (k, 64, 80)
        assert set(detections.classes.tolist()) <= {info.index for info in classes}
        assert ((detections.scores >= 0) & (detections.scores <= 1)).all()
        assert detections.masks.min() >= 0.0 and detections.masks.max() <= 1.0
    assert {DOG.index, CAT.index} <= set(found[0].classes.tolist())  # both classes of image 0 answered
    again = detect(saved[route], batch, asked, **EVERYTHING)  # the saved weights, not a fresh draw
    assert all(np.array_equal(a.scores, b.scores) and np.array_equal(a.masks, b.masks) for a, b in zip(found, again))


@pytest.mark.parametrize("route", ROUTES)
def test_candidates_reach_down_to_the_lowest_threshold(route, saved):
    (everything,) = detect(saved[route], images(1), [[DOG, CAT]], **EVERYTHING)
    cut = float(np.median(everything.scores))
    expected = everything.scores[everything.scores >= cut]  # best first either way
    (above,) = detect(saved[route], images(1), [[DOG, CAT]], score_threshold=cut, nms_threshold=1.0)
    assert np.array_equal(above.scores, expected)
    # the ignore band's instances reach label.py too, which makes them 255
    (band,) = detect(saved[route], images(1), [[DOG, CAT]], score_threshold=1.0, ignore_threshold=cut,
                     nms_threshold=1.0)
    assert np.array_equal(band.scores, expected)


def test_sam3_asks_every_synonym(saved):
    """Tiny SAM 3 decodes 5 instances per text: a class with two synonyms gets 15, all its own."""
    hound = replace(DOG, synonyms=("puppy", "hound"))
    (plain,) = detect(saved["sam3"], images(1), [[DOG]], **EVERYTHING)
    (synonyms,) = detect(saved["sam3"], images(1), [[hound]], **EVERYTHING)
    assert len(plain.classes) == 5 and len(synonyms.classes) == 15
    assert (synonyms.classes == DOG.index).all()


@pytest.mark.parametrize("route", ["sam3", "owlv2+sam"])
def test_what_a_synonym_finds_is_its_class(route, saved):
    """A synonym 'cat' of dog: the instances that 'cat' finds come back as dog's."""
    pet = replace(DOG, synonyms=("cat",))
    (as_cat,) = detect(saved[route], images(1), [[CAT]], **EVERYTHING)
    (as_pet,) = detect(saved[route], images(1), [[pet]], **EVERYTHING)
    assert (as_cat.classes == CAT.index).all() and (as_pet.classes == DOG.index).all()
    if route == "sam3":  # every (image, text) pair is decoded on its own: the cat's instances are among them
        assert all(np.isclose(as_pet.scores, score, atol=1e-5).any() for score in as_cat.scores)
    else:  # OWLv2 scores each box by its best text: asking 'dog' too can only raise it
        assert len(as_pet.scores) == len(as_cat.scores)
        assert (np.sort(as_pet.scores) >= np.sort(as_cat.scores) - 1e-6).all()


def batch_of(classes: list[list[str]], seed: int = 0) -> dict[str, np.ndarray]:
    column = np.empty(len(classes), dtype=object)
    column[:] = classes
    return {"classes": column, "image": images(len(classes), seed=seed)}


@pytest.mark.parametrize("route", ROUTES)
def test_label_stage_makes_label_maps(route, saved):
    asked = [["dog", "cat"], ["person"], ["cat"]]
    out = LabelStage(labeler(saved[route], **EVERYTHING), "voc", 64)(batch_of(asked))
    assert out["label"].shape == (3, 64, 80) and out["label"].dtype == np.uint8
    for label, names, found, instances in zip(out["label"], asked, out["found"], out["instances"]):
        indices = {VOC.lookup(name).index for name in names}
        assert set(np.unique(label).tolist()) <= indices | {0, IGNORE}
        assert len(found) == len(names) and (instances > 0).all()  # score 0: every class has instances
    assert {DOG.index, CAT.index} & set(np.unique(out["label"][0]).tolist())  # some pixel of a prompt class


def test_label_stage_drops_what_it_does_not_find(saved):
    out = LabelStage(labeler(saved["sam3"], score_threshold=1.0), "voc", 64)(batch_of([["dog"]]))
    assert out["found"][0].tolist() == [False] and out["drop_reason"][0] != ""
    kept = LabelStage(labeler(saved["sam3"], score_threshold=1.0, on_missing="ignore"), "voc", 64)(
        batch_of([["dog"]]))
    assert kept["drop_reason"][0] == "" and (kept["label"][0] == IGNORE).all()


def upload(folder: str, bucket: str, prefix: str, endpoint: str) -> str:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for file in Path(folder).iterdir():
        s3.upload_file(str(file), bucket, f"{prefix}/{file.name}")
    return f"s3://{bucket}/{prefix}"


@pytest.mark.slow  # an S3 server and two downloads
@pytest.mark.parametrize("route", ["sam3", "owlv2+sam"])
def test_loaded_from_s3_as_from_a_folder(route, saved, bucket, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_CACHE", str(tmp_path / "cache"))
    remote = {field: upload(folder, bucket, f"models/{route}/{field}", s3_endpoint)
              for field, folder in saved[route].items()}
    batch, asked = images(2), [[DOG, CAT], [PERSON]]
    local, from_s3 = detect(saved[route], batch, asked, **EVERYTHING), detect(remote, batch, asked, **EVERYTHING)
    for a, b in zip(local, from_s3, strict=True):
        assert np.array_equal(a.classes, b.classes) and np.array_equal(a.scores, b.scores)
        assert np.array_equal(a.masks, b.masks)


def test_model_types_are_checked_when_loading(saved):
    """The recipe cannot know what a folder holds; loading says, in one line."""
    sam3, owlv2 = saved["sam3"]["weights"], saved["owlv2+sam"]
    cases = [({"weights": sam3, "sam": owlv2["sam"]}, "is SAM 3, which makes its own masks: remove labeler.sam"),
             ({"weights": owlv2["weights"]}, "is a owlv2 detector: set labeler.sam to a SAM or SAM 2 model"),
             ({"weights": owlv2["sam"], "sam": owlv2["sam"]}, "is a sam model; open_vocabulary takes sam3, owlv2 or "
              "grounding-dino"),
             ({"weights": owlv2["weights"], "sam": sam3}, "labeler.sam .* is a sam3 model; it takes sam or sam2")]
    for models, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            load_detector(labeler(models), VOC, 64, CPU)
        assert "\n" not in str(error.value)
    # in the build, the actor's start-up fails with that line
    with pytest.raises(ModelLoadError, match="remove labeler.sam") as error:
        LabelStage(labeler({"weights": sam3, "sam": owlv2["sam"]}), "voc", 64, load_attempts=1)
    assert "\n" not in str(error.value)


@pytest.mark.slow  # a build on the local Ray cluster
def test_a_build_labels_your_own_classes_by_name_and_checks_them(ray_cluster, saved, tmp_path):
    """warehouse.tsv's classes, which no COCO detector knows, labelled by SAM 3 in the model actor
    and checked by OWLv2 + SAM: the rows, the label maps and the manifest name both labelers."""
    import json

    import pyarrow.parquet as pq

    from factory.core.vocab_files import read_vocabulary
    from factory.dataset.codec import decode_png
    from jobs import build_dataset

    warehouse = read_vocabulary(str(Path(__file__).resolve().parents[2] / "factory/recipes/vocabularies/warehouse.tsv"))
    second = saved["owlv2+sam"]
    out = tmp_path / "warehouse"
    assert build_dataset.main([
        "--out", str(out), "--recipe", "tiny", "--vocabulary", "vocabularies/warehouse.tsv", "--num-samples", "6",
        "--generator.steps", "2", "--writer.preview-samples", "0", "--labeler.model", "open_vocabulary",
        "--labeler.weights", saved["sam3"]["weights"], "--labeler.score-threshold", "0", "--labeler.batch-size", "3",
        "--agreement.labeler", f"{{model: open_vocabulary, weights: {second['weights']}, sam: {second['sam']}, "
                               f"score_threshold: 0.0, nms_threshold: 1.0}}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["labeler"] == f"open_vocabulary:{saved['sam3']['weights']}"
    assert manifest["models"]["agreement"] == f"open_vocabulary:{second['weights']}:{second['sam']}"
    rows = pq.read_table(out / "data").to_pylist()
    assert len(rows) == 6 and {name for row in rows for name in row["classes"]} <= set(warehouse.names)
    for row in rows:
        assert row["found"] == [True] * len(row["classes"])  # threshold 0: every asked class has instances
        values = set(np.unique(decode_png(row["label"]["bytes"])).tolist())
        assert values <= {0, IGNORE, *row["class_indices"]} and values & set(row["class_indices"])
        assert len(row["agreement"]) == len(row["classes"]) and all(0.0 <= v <= 1.0 for v in row["agreement"])
    assert set(manifest["agreement"]["classes"]) <= set(warehouse.names)

"""The build's wiring without Ray (factory/build/pipeline.py): the stages a recipe runs, what they
read and add, and what prepare_build tells the user before any model loads."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from factory.build.pipeline import label_provenance, model_stages, prepare_build, resolve_stage, run_build
from factory.build.recipe import load_recipe
from factory.core.vocab import get_vocabulary
from factory.dataset.batch import LABEL_COLUMNS, PLAN_COLUMNS
from factory.dataset.codec import decode_image


def test_stages_of_an_oracle_build_read_what_the_stages_before_them_add():
    recipe = load_recipe("tiny", {"quality": {"model": "tiny"}})
    stages = model_stages(recipe)
    assert [resolve_stage(s.stage).__name__ for s in stages] == ["GenerateStage", "LabelStage", "QualityStage"]
    available = set(PLAN_COLUMNS)
    for spec in stages:
        assert set(spec.reads) <= available, spec
        available |= set(spec.adds)
    assert set(LABEL_COLUMNS) <= available
    assert [s.batch_size for s in stages] == [recipe.generator.batch_size, recipe.labeler.batch_size,
                                              recipe.labeler.batch_size]


def test_an_annotating_build_has_one_model_stage(tmp_path):
    recipe = load_recipe("tiny", {"annotator": {"checkpoint": str(tmp_path / "ck")}})
    (stage,) = model_stages(recipe)
    assert stage.stage == "factory.build.annotate:AnnotateStage" and set(LABEL_COLUMNS) <= set(stage.adds)


def test_labels_record_which_classes_the_labeler_was_trained_on(tmp_path):
    from grounding.checkpoint import save_grounding_checkpoint
    from grounding.config import GroundingModelConfig
    from grounding.model import GroundingModule

    voc = get_vocabulary("voc").names
    oracle = label_provenance(load_recipe("tiny"), "maskrcnn")
    assert oracle["kind"] == "oracle" and oracle["trained"] == {name: True for name in voc}

    checkpoint = str(tmp_path / "best")
    module = GroundingModule(GroundingModelConfig.tiny(feature_channels={16: 8, 32: 8}, mask_resolution=16))
    save_grounding_checkpoint(checkpoint, module, None, {"epoch": 1, "classes": ["dog", "cat"], "train": {"split": 1}})
    annotated = label_provenance(load_recipe("tiny", {"annotator": {"checkpoint": checkpoint}}), "grounding")
    assert annotated["kind"] == "annotator" and annotated["trained_split"] == 1
    assert {name for name, trained in annotated["trained"].items() if trained} == {"dog", "cat"}
    assert annotated["trained"].keys() == set(voc)


def test_more_samples_than_planned_is_said(tmp_path):
    prepared = prepare_build(load_recipe("tiny", {"num_samples": 1000, "out": str(tmp_path / "ds")}))
    assert prepared.notes == ["num_samples 1000 is more than the recipe plans: building all 210"]
    assert len(prepared.plan) == 210  # 20 classes and 190 pairs, one each
    assert prepare_build(load_recipe("tiny", {"num_samples": 5, "out": str(tmp_path / "ds2")})).notes == []


@pytest.mark.slow
def test_in_process_and_ray_builds_make_the_same_samples(ray_cluster, tmp_path):
    """The same plan, models and encoding either way. Pixels may differ in the last bit: a Ray
    actor holding one CPU runs torch on one thread, this process on more, and float sums in
    another order round differently."""
    overrides = {"num_samples": 6, "generator.steps": 2, "generator.batch_size": 4, "writer.rows_per_file": 4}
    rows = {}
    for mode, in_process in (("ray", False), ("here", True)):
        recipe = load_recipe("tiny", {**overrides, "out": str(tmp_path / mode)})
        assert run_build(prepare_build(recipe), in_process=in_process).written == 6
        rows[mode] = {row["sample_id"]: row for row in pq.read_table(tmp_path / mode / "data").to_pylist()}
    assert rows["ray"].keys() == rows["here"].keys()
    for sample_id, row in rows["ray"].items():
        here = rows["here"][sample_id]
        assert [row[k] for k in PLAN_COLUMNS] == [here[k] for k in PLAN_COLUMNS]
        difference = np.abs(decode_image(row["image"]).astype(int) - decode_image(here["image"]).astype(int))
        assert difference.max() <= 2 and difference.mean() < 0.01

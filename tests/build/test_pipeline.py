"""The build's wiring without Ray (factory/build/pipeline.py): the stages a recipe runs, what they
read and add, and what prepare_build tells the user before any model loads."""

from __future__ import annotations

from factory.build.pipeline import model_stages, prepare_build, resolve_stage
from factory.build.recipe import load_recipe
from factory.dataset.batch import LABEL_COLUMNS, PLAN_COLUMNS


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


def test_more_samples_than_planned_is_said(tmp_path):
    prepared = prepare_build(load_recipe("tiny", {"num_samples": 1000, "out": str(tmp_path / "ds")}))
    assert prepared.notes == ["num_samples 1000 is more than the recipe plans: building all 210"]
    assert len(prepared.plan) == 210  # 20 classes and 190 pairs, one each
    assert prepare_build(load_recipe("tiny", {"num_samples": 5, "out": str(tmp_path / "ds2")})).notes == []

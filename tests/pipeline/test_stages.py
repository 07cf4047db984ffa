"""The model stages a recipe runs (factory/pipeline/stages.py): what each reads and adds."""

import pytest

from factory.dataset.batch import LABEL_COLUMNS, PLAN_COLUMNS
from factory.pipeline.annotate import AnnotateStage
from factory.pipeline.recipe import load_recipe
from factory.pipeline.stages import model_stages, resolve_stage


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


@pytest.mark.parametrize("annotator", [{"checkpoint": "ck"}, {"daam": True}])
def test_an_annotating_build_has_one_model_stage(annotator):
    (stage,) = model_stages(load_recipe("tiny", {"annotator": annotator}))
    assert resolve_stage(stage.stage) is AnnotateStage and set(LABEL_COLUMNS) <= set(stage.adds)

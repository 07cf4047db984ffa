"""bench/generator_flops.py: its counts are the constants of the cost model, its steps and guidance the recipes'."""

from __future__ import annotations

import pytest

from bench import generator_flops
from factory.pipeline.cost import COUNTED
from factory.pipeline.recipe import load_recipe

RECIPES = {"SD 1.5": "voc-oracle", "SDXL base 1.0": "sdxl-oracle", "SD 3.5 Large": "sd35-open-vocabulary",
           "FLUX.1-dev": "flux-open-vocabulary"}


def assert_as_in_the_cost_model(rows):
    counted = {c.name: c for c in COUNTED}
    for row in rows:
        in_cost = counted[row.generator.name]
        assert in_cost.family is row.generator.family
        for fitted, written in ((row.counted.denoiser, in_cost.denoiser), (row.counted.vae, in_cost.vae)):
            for side in (row.side, 2 * row.side):
                assert written.at(side, side) == pytest.approx(fitted.at(side, side), rel=1e-4)
        assert in_cost.text == pytest.approx(row.counted.text, rel=1e-4)
        assert row.fit < 1e-9  # the three counts' polynomial predicts the fourth


def test_sd15_counts_are_the_cost_models(capsys):
    rows = generator_flops.main(["--generators", "SD 1.5"])
    assert_as_in_the_cost_model(rows)
    assert "| SD 1.5 | 512 | 0.86B |" in capsys.readouterr().out


def test_default_steps_and_guidance_are_the_recipes():
    for generator in generator_flops.GENERATORS:
        if generator.name in RECIPES:
            g = load_recipe(RECIPES[generator.name]).generator
            assert (generator.steps, generator.guidance) == (g.steps, g.guidance_scale)
            assert generator.family.size == g.height == g.width


@pytest.mark.slow
def test_every_generator_counts_as_the_cost_model_says():
    assert_as_in_the_cost_model(generator_flops.main([]))

"""bench/few_step.py's sampler settings: each captures at the mini world's noise level (timestep 81)."""

import argparse

import pytest

from bench.few_step import capture_timestep, generation, parse_sampler
from factory.pipeline.recipe import load_recipe


@pytest.mark.parametrize("scheduler,steps,step,timestep", [
    ("ddim", 25, 3, 81),  # the mini world's own capture
    ("ddim", 50, 5, 81),  # the paper's t=5 of 50
    ("dpm++", 25, 5, 80),
    ("dpm++", 12, 5, 83),  # DPM-Solver++-12's last call
    ("lcm", 4, 5, 259),  # LCM-4 comes no closer
])
def test_each_sampler_captures_nearest_the_reference_noise_level(scheduler, steps, step, timestep):
    overrides = generation(scheduler, steps)
    assert overrides == {"generator.scheduler": scheduler, "generator.steps": steps, "capture.step": step}
    assert capture_timestep(scheduler, steps, step) == timestep
    load_recipe("shapes-triplets", overrides)  # a valid recipe: the step is checked against its reference


def test_a_sampler_is_name_and_steps():
    assert parse_sampler("dpm++:12") == ("dpm++", 12)
    for bad in ("dpm++", "euler:12", "ddim:0", "ddim:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME:STEPS"):
            parse_sampler(bad)

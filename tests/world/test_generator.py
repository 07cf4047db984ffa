"""The mini world's generator trainer (world/generator.py): the real Stable Diffusion classes,
trained a few steps, resumed, exported as a pipeline folder and loaded by the build's loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from factory.core.vocab import SHAPE_COLOURS, SHAPE_FORMS, SHAPES
from factory.diffusion.pipelines import generate, load_pipeline
from world.generator import GeneratorTrainConfig, GeneratorTraining, drawn_batch, world_tokenizer
from world.utils import prompt_of


def test_every_world_word_is_one_token():
    tokenizer = world_tokenizer()
    for word in (*SHAPE_COLOURS, *SHAPE_FORMS, "photograph"):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer(prompt_of(("red_disc", "blue_cross"))).input_ids
    assert len(ids) == 12 <= tokenizer.model_max_length  # 10 words and the two special tokens


def test_batches_are_a_function_of_seed_and_step():
    pixels, prompts = drawn_batch(0, 3, 8, 0.5)
    again, same = drawn_batch(0, 3, 8, 0.5)
    assert np.array_equal(pixels.numpy(), again.numpy()) and prompts == same
    assert pixels.shape == (8, 3, 64, 64) and -1 <= pixels.min() and pixels.max() <= 1
    assert prompts != drawn_batch(0, 4, 8, 0.5)[1]
    assert all(p.startswith("a photograph of a ") for p in prompts)


@pytest.mark.slow  # two short trainings and two exports with sample grids: about 15 s
def test_training_resumes_and_exports_a_loadable_pipeline(tmp_path):
    config = GeneratorTrainConfig(out=str(tmp_path / "out"), work=str(tmp_path / "work"), vae_steps=2,
                                  unet_steps=2, batch_size=2, save_every=2, quality_images=2, sample_steps=2)
    first = GeneratorTraining(config).run()
    assert (first.vae_step, first.unet_step) == (2, 2)
    resumed = GeneratorTraining(config.model_copy(update={"unet_steps": 3}))
    assert (resumed.vae_step, resumed.unet_step) == (2, 2)  # continued, not restarted
    assert [r[:2] for r in resumed.log.records] == [["vae", 1], ["vae", 2], ["unet", 1], ["unet", 2]]
    resumed.run()
    assert resumed.unet_step == 3

    out = tmp_path / "out"
    for name in ("model_index.json", "loss.png", "samples.png", "README.md"):
        assert (out / name).is_file(), name
    quality = json.loads((out / "training.json").read_text())["quality"]
    assert quality["unet_steps"] == 3 and quality["vae_psnr_db"] > 0
    assert quality["oracle_finds"]["images"] == 4  # measured by the shipped oracle: 2 one-object, 2 two-object
    pipe = load_pipeline(str(out))  # the build's own loader, as for SD 1.5
    assert pipe.vae.config.scaling_factor == pytest.approx(resumed.parts["vae"].config.scaling_factor)
    assert pipe.tokenizer.model_max_length == 16
    images = generate(pipe, [prompt_of((SHAPES.names[0],))], [0], steps=2, guidance_scale=4.0, height=64, width=64)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8

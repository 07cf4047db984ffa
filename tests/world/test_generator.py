"""The mini world's generator trainer (world/generator.py): the real Stable Diffusion classes,
trained a few steps, resumed, exported as a pipeline folder and loaded by the build's loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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


@pytest.mark.slow  # three short trainings and three exports with sample grids: about 20 s
def test_training_resumes_exports_a_loadable_pipeline_and_continues_from_it(tmp_path):
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
    finds = quality["oracle_finds"]
    assert finds["images"] == 4  # measured by the shipped oracle: 2 one-object, 2 two-object
    assert {"daam_inside", "daam_outside"} <= set(finds)  # NaN where the oracle found nothing
    pipe = load_pipeline(str(out))  # the build's own loader, as for SD 1.5
    assert pipe.vae.config.scaling_factor == pytest.approx(resumed.parts["vae"].config.scaling_factor)
    assert pipe.tokenizer.model_max_length == 16
    images = generate(pipe, [prompt_of((SHAPES.names[0],))], [0], steps=2, guidance_scale=4.0, height=64, width=64)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8

    # A new run started from the export: its weights, its VAE kept (stage 1 skipped), its record kept;
    # here with the text encoder kept as it starts.
    later = GeneratorTraining(GeneratorTrainConfig(
        init=str(out), out=str(tmp_path / "later"), work=str(tmp_path / "later-work"), vae_steps=2, unet_steps=1,
        batch_size=2, save_every=1, quality_images=2, sample_steps=2, train_text_encoder=False))
    assert (later.vae_step, later.unet_step) == (2, 0)
    exported = pipe.unet.state_dict()
    for name, tensor in later.parts["unet"].state_dict().items():
        assert np.allclose(tensor.numpy(), exported[name].float().numpy()), name
    assert later.parts["vae"].config.scaling_factor == pipe.vae.config.scaling_factor
    unet_before = {k: v.clone() for k, v in later.parts["unet"].state_dict().items()}
    later.run()
    assert any(not torch.equal(v, unet_before[k]) for k, v in later.parts["unet"].state_dict().items())
    for name, tensor in later.parts["text_encoder"].state_dict().items():
        assert np.allclose(tensor.numpy(), pipe.text_encoder.state_dict()[name].float().numpy()), name
    record = json.loads((tmp_path / "later" / "training.json").read_text())
    assert record["continued_from"]["folder"] == str(out)
    assert record["continued_from"]["quality"]["unet_steps"] == 3
    assert "## Started from" in (tmp_path / "later" / "README.md").read_text()
    assert GeneratorTraining(later.config).unet_step == 1  # a rerun resumes the new run, not the export

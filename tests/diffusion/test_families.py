"""Every generator family through one contract: saved as a diffusers folder, read back by its
model_index.json, loaded by the same path as a real SDXL, SD 3.5 or FLUX.1, and generating images
that depend on their own prompt and seed only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from factory.diffusion.families import FAMILIES, FLUX, SD, SD3, SDXL, GeneratorError, read_generator
from factory.diffusion.fast import apply_fast_paths
from factory.diffusion.pipelines import decode, denoise, family_of, generate, load_pipeline
from factory.diffusion.tiny import save_tiny_pipeline, tiny_pipeline
from factory.core.storage import StorageError

ALL = list(FAMILIES.values())
PROMPTS = ["a photograph of a dog", "a photograph of a cat and a bus"]
SEEDS = [3, 11]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("generators")
    return {family: save_tiny_pipeline(root / family.key, family) for family in ALL}


def scheduler_of(family) -> str:
    return "flow" if family.flow else "ddim"


def run(pipe, prompts, seeds, steps=3):
    return generate(pipe, prompts, seeds, steps=steps, guidance_scale=4.0, height=64, width=64)


@pytest.mark.parametrize("family", ALL, ids=lambda f: f.key)
def test_the_family_is_read_from_the_saved_config(folders, family):
    saved = read_generator(folders[family])
    assert saved.family is family
    # the tiny VAE halves the image once; SD 3.5 patches and FLUX.1 packs latents 2x2 on top
    assert saved.multiple == (4 if family.flow else 2)
    with open(f"{folders[family]}/model_index.json") as file:
        assert json.load(file)["_class_name"] == family.pipeline


def test_real_sizes_are_read_from_the_vae_and_patch_configs(tmp_path):
    for family, patch, expected in ((SD, None, 8), (SDXL, None, 8), (SD3, 2, 16), (FLUX, None, 16)):
        folder = tmp_path / family.key
        (folder / "vae").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": family.pipeline}))
        (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
        if patch:
            (folder / "transformer").mkdir()
            (folder / "transformer" / "config.json").write_text(json.dumps({"patch_size": patch}))
        assert read_generator(str(folder)).multiple == expected, family.key


def test_an_unsupported_pipeline_and_a_missing_one_are_one_line(tmp_path):
    (tmp_path / "kandinsky").mkdir()
    (tmp_path / "kandinsky" / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    with pytest.raises(GeneratorError, match="is a KandinskyV22Pipeline, which this factory does not run; "
                                             "supported: StableDiffusionPipeline"):
        read_generator(str(tmp_path / "kandinsky"))
    with pytest.raises(StorageError, match=f"model not found: {tmp_path}/none/model_index.json"):
        read_generator(str(tmp_path / "none"))


@pytest.mark.parametrize("family", ALL, ids=lambda f: f.key)
def test_each_family_loads_and_draws_images_of_its_own_seed_and_prompt(folders, family):
    pipe = load_pipeline(str(folders[family]), scheduler=scheduler_of(family))
    assert family_of(pipe) is family
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler if family.flow else DDIMScheduler)
    both = run(pipe, PROMPTS, SEEDS)
    assert both.shape == (2, 64, 64, 3) and both.dtype == np.uint8
    # sample 1 alone: its own seed and prompt decide it, not its batch (float rounding at most)
    alone = run(pipe, PROMPTS[1:], SEEDS[1:])[0]
    assert np.abs(alone.astype(int) - both[1]).max() <= 1
    # and a fresh load draws the same images
    again = run(load_pipeline(str(folders[family]), scheduler=scheduler_of(family)), PROMPTS, SEEDS)
    assert np.array_equal(again, both)
    other_seed = run(pipe, PROMPTS[:1], [SEEDS[0] + 1])[0]
    assert np.abs(other_seed.astype(int) - both[0]).mean() > 1


@pytest.mark.parametrize("family", ALL, ids=lambda f: f.key)
def test_denoised_latents_are_on_the_vae_grid(folders, family):
    pipe = load_pipeline(str(folders[family]), scheduler=scheduler_of(family))
    latents = denoise(pipe, PROMPTS, SEEDS, steps=2, guidance_scale=4.0, height=64, width=64)
    assert tuple(latents.shape) == (2, pipe.vae.config.latent_channels, 32, 32)  # FLUX.1's packed tokens unpacked
    assert decode(pipe, latents).shape == (2, 64, 64, 3)


def test_flux_guidance_is_one_pass_and_changes_the_image(folders):
    pipe = load_pipeline(str(folders[FLUX]), scheduler="flow")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]),
                                               with_kwargs=True)
    low = generate(pipe, PROMPTS[:1], SEEDS[:1], steps=2, guidance_scale=1.0, height=64, width=64)
    high = generate(pipe, PROMPTS[:1], SEEDS[:1], steps=2, guidance_scale=6.0, height=64, width=64)
    assert calls == [1, 1, 1, 1]  # distilled guidance: no [unconditional; conditional] pair
    assert not np.array_equal(low, high)


def test_sdxl_keeps_its_vae_in_float32_under_float16(folders):
    pipe = load_pipeline(str(folders[SDXL]), dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    sd = load_pipeline(str(folders[SD]), dtype=torch.float16)  # SD 1.x decodes in float16, as its pipeline does
    assert sd.vae.dtype == torch.float16


def test_sdxl_ddim_never_clips_latents(folders):
    """SDXL saves an Euler config without clip_sample; DDIM's default would clip its latents to [-1, 1]."""
    pipe = load_pipeline(str(folders[SDXL]), scheduler="ddim")
    assert not pipe.scheduler.config.clip_sample and not pipe.scheduler.config.set_alpha_to_one
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1


@pytest.fixture
def fresh_compiler():
    """Every diffusers model's forward runs through one wrapper function, whose compiled variants count
    against one recompile limit per process: this test's two transformers must not use up other tests' share."""
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", [SD3, FLUX], ids=lambda f: f.key)
def test_a_compiled_transformer_draws_the_eager_images(folders, family, fresh_compiler):
    eager = load_pipeline(str(folders[family]), scheduler="flow")
    reference = run(eager, PROMPTS[:1], SEEDS[:1], steps=2)
    fast = apply_fast_paths(load_pipeline(str(folders[family]), scheduler="flow"), compile="default",
                            backend="aot_eager", channels_last=True)
    assert hasattr(fast.transformer, "_orig_mod")
    assert np.abs(run(fast, PROMPTS[:1], SEEDS[:1], steps=2).astype(int) - reference).max() <= 1
    with pytest.raises(ValueError, match="fast.attention math is for U-Nets"):
        apply_fast_paths(eager, attention="math")


def test_the_tiny_recipe_generator_is_the_tiny_sd():
    pipe = load_pipeline("tiny")
    assert family_of(pipe) is SD and read_generator("tiny").family is SD
    fresh = tiny_pipeline()
    fresh.set_progress_bar_config(disable=True)
    assert np.array_equal(run(pipe, PROMPTS[:1], SEEDS[:1]), run(fresh, PROMPTS[:1], SEEDS[:1]))

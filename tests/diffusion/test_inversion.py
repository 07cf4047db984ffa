"""Real images into the U-Net (factory/diffusion/inversion.py), on the shipped world generator:
a drawn image, inverted under its prompt, is regenerated from its inversion."""

from pathlib import Path

import numpy as np
import pytest
import torch

from factory.core.vocab import SHAPES
from factory.diffusion.families import SDXL
from factory.diffusion.features import unet_features
from factory.diffusion.inversion import (
    ddim_invert,
    image_features,
    noised_latents,
    reconstruction_psnr,
    vae_latents,
)
from factory.diffusion.pipelines import generate, load_pipeline, unet_conditioning
from factory.diffusion.tiny import save_tiny_pipeline
from world.draw import SIZE, draw
from world.utils import prompt_of

GENERATOR = str(Path(__file__).resolve().parents[2] / "models" / "shapes-generator")
# Drawn benchmark images (never seen in training): one object, two objects, one object.
ITEMS = [((SHAPES.names[0],), 1), ((SHAPES.names[8], SHAPES.names[13]), 5), ((SHAPES.names[17],), 7)]


@pytest.fixture(scope="module")
def world():
    pipe = load_pipeline(GENERATOR)
    images = np.stack([draw(list(classes), seed, "benchmark")[0] for classes, seed in ITEMS])
    return pipe, images, [prompt_of(classes) for classes, _ in ITEMS]


@pytest.mark.slow  # 25 steps each way through the world's generator: about a minute on 2 cores
def test_ddim_inversion_regenerates_the_image(world):
    """The paper's setting, 50 steps at guidance 1. Measured: 25.4, 19.3, 20.9 dB from the
    inversion; 17.1, 15.2, 13.1 dB from a random seed's noise with the same prompt (the first
    generator: 25.4, 26.0, 22.4 against 16.1, 14.5, 12.3)."""
    pipe, images, prompts = world
    noise = ddim_invert(pipe, vae_latents(pipe, images), prompts, steps=50)
    assert noise.shape == (3, 4, SIZE // 4, SIZE // 4) and 0.6 < noise.std() < 1.2  # noise-like, not a latent
    kwargs = {"steps": 50, "guidance_scale": 1.0, "height": SIZE, "width": SIZE}
    inverted = reconstruction_psnr(images, generate(pipe, prompts, None, latents=noise, **kwargs))
    random = reconstruction_psnr(images, generate(pipe, prompts, [11, 12, 13], **kwargs))
    assert inverted.mean() >= 20 and (inverted >= random + 3).all(), (inverted, random)


def test_guided_inversion_and_its_cost(world, monkeypatch):
    pipe, images, prompts = world
    calls = []
    monkeypatch.setattr(pipe.unet, "forward", _counting(pipe.unet.forward, calls))
    noise = ddim_invert(pipe, vae_latents(pipe, images[:1]), prompts[:1], steps=10, guidance_scale=3.0)
    assert noise.shape == (1, 4, SIZE // 4, SIZE // 4) and torch.isfinite(noise).all()
    assert calls == [2] * 10  # one call per step, unconditional and conditional rows together


def test_noised_latents_follow_their_seeds_at_the_capture_timestep(world):
    pipe, images, _ = world
    latents = vae_latents(pipe, images)
    a, t = noised_latents(pipe, latents, [4, 5, 6], steps=25, remaining=3)
    b, _ = noised_latents(pipe, latents[1:], [5, 6], steps=25, remaining=3)
    pipe.scheduler.set_timesteps(25)
    assert t == int(pipe.scheduler.timesteps[22])  # the 23rd of 25 calls: 3 steps remain
    torch.testing.assert_close(a[1:], b)  # a sample's noise is its seed's, whatever its batch


def test_generate_takes_seeds_or_latents_not_both(world):
    pipe, _, prompts = world
    kwargs = {"steps": 2, "guidance_scale": 1.0, "height": SIZE, "width": SIZE}
    with pytest.raises(ValueError, match="one of them"):
        generate(pipe, prompts[:1], [1], latents=torch.zeros(1, 4, 16, 16), **kwargs)
    with pytest.raises(ValueError, match="one of them"):
        generate(pipe, prompts[:1], None, **kwargs)


def test_both_routes_give_the_features_one_pass_on_their_latent_gives(world, monkeypatch):
    """The captured latent and timestep are what a triplet set stores: one U-Net pass on them (the
    Featurizer's) must give the features again. Inversion: 2 x steps calls; noised: one."""
    pipe, images, prompts = world
    for route, expected_calls in (("inversion", 2 * 10), ("noised", 1)):
        calls = []
        monkeypatch.setattr(pipe.unet, "forward", _counting(pipe.unet.forward, calls))
        got = image_features(pipe, images, prompts, [4, 5, 6], route=route, steps=10, remaining=3)
        monkeypatch.undo()
        assert len(calls) == expected_calls and set(calls) == {3}  # no guidance: one row per image
        pipe.scheduler.set_timesteps(10)
        assert got.timestep == int(pipe.scheduler.timesteps[7])  # the call with 3 of 10 steps left
        again = unet_features(pipe.unet, got.latent, got.timestep, unet_conditioning(pipe, prompts, SIZE, SIZE))
        assert sorted(again) == sorted(got.features)
        for r in again:
            torch.testing.assert_close(again[r], got.features[r], rtol=1e-4, atol=1e-4)
        assert (got.regenerated is None) == (route == "noised")
    with pytest.raises(ValueError, match="unknown route 'pixels'"):
        image_features(pipe, images, prompts, [4, 5, 6], route="pixels", steps=10, remaining=3)


# ---- SDXL: every U-Net call of both routes carries its pooled text and the image's size ids

SDXL_PROMPTS = ["a photograph of a dog", "a photograph of a cat and a bus"]
SIZE_IDS = [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]  # original size, crop (0, 0), target size: the 64x64 image's


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The tiny SDXL as a build loads it, and two of its own images as the real images."""
    pipe = load_pipeline(save_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", SDXL))
    return pipe, generate(pipe, SDXL_PROMPTS, [1, 2], steps=2, guidance_scale=5.0, height=64, width=64)


def test_both_routes_on_sdxl_give_the_features_one_pass_on_their_latent_gives(sdxl, monkeypatch):
    pipe, images = sdxl
    for route, expected_calls in (("inversion", 2 * 4), ("noised", 1)):
        calls = []
        monkeypatch.setattr(pipe.unet, "forward", _keeping_kwargs(pipe.unet.forward, calls))
        got = image_features(pipe, images, SDXL_PROMPTS, [4, 5], route=route, steps=4, remaining=2)
        monkeypatch.undo()
        assert len(calls) == expected_calls
        for kwargs in calls:
            assert kwargs["encoder_hidden_states"].shape == (2, 77, 64)
            assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [SIZE_IDS] * 2
        assert {r: tuple(t.shape) for r, t in got.features.items()} == {16: (2, 288, 16, 16), 32: (2, 192, 32, 32)}
        again = unet_features(pipe.unet, got.latent, got.timestep, unet_conditioning(pipe, SDXL_PROMPTS, 64, 64))
        for r in again:
            torch.testing.assert_close(again[r], got.features[r], rtol=1e-4, atol=1e-4)


def test_guided_inversion_on_sdxl_guides_against_its_zeroed_text(sdxl, monkeypatch):
    """SDXL's pipeline guides against zeros, not the empty prompt's states (force_zeros_for_empty_prompt):
    the inversion's unconditional rows are the generation's."""
    pipe, images = sdxl
    calls = []
    monkeypatch.setattr(pipe.unet, "forward", _keeping_kwargs(pipe.unet.forward, calls))
    noise = ddim_invert(pipe, vae_latents(pipe, images[:1]), SDXL_PROMPTS[:1], steps=2, guidance_scale=3.0)
    assert noise.shape == (1, 4, 32, 32) and torch.isfinite(noise).all() and len(calls) == 2
    for kwargs in calls:
        text, added = kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]
        assert not text[0].any() and not added["text_embeds"][0].any()  # rows [unconditional; conditional]
        assert text[1].any() and added["text_embeds"][1].any()
        assert added["time_ids"].tolist() == [SIZE_IDS] * 2


def _keeping_kwargs(forward, calls: list):
    def kept(sample, *args, **kwargs):
        calls.append(kwargs)
        return forward(sample, *args, **kwargs)
    return kept


def _counting(forward, calls: list):
    def counted(sample, *args, **kwargs):
        calls.append(len(sample))
        return forward(sample, *args, **kwargs)
    return counted

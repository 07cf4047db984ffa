"""Real images into the U-Net (factory/diffusion/inversion.py), on the shipped world generator:
a drawn image, inverted under its prompt, is regenerated from its inversion."""

from pathlib import Path

import numpy as np
import pytest
import torch

from factory.core.vocab import SHAPES
from factory.diffusion.features import unet_features
from factory.diffusion.inversion import (
    ddim_invert,
    image_features,
    noised_latents,
    reconstruction_psnr,
    vae_latents,
)
from factory.diffusion.pipelines import encode_texts, generate, load_pipeline
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
    """The paper's setting, 50 steps at guidance 1. Measured: 25.4, 26.0, 22.4 dB from the
    inversion; 16.1, 14.5, 12.3 dB from a random seed's noise with the same prompt."""
    pipe, images, prompts = world
    noise = ddim_invert(pipe, vae_latents(pipe, images), prompts, steps=50)
    assert noise.shape == (3, 4, SIZE // 4, SIZE // 4) and 0.6 < noise.std() < 1.2  # noise-like, not a latent
    kwargs = {"steps": 50, "guidance_scale": 1.0, "height": SIZE, "width": SIZE}
    inverted = reconstruction_psnr(images, generate(pipe, prompts, None, latents=noise, **kwargs))
    random = reconstruction_psnr(images, generate(pipe, prompts, [11, 12, 13], **kwargs))
    assert inverted.mean() >= 22 and (inverted >= random + 5).all(), (inverted, random)


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
        again = unet_features(pipe.unet, got.latent, got.timestep, encode_texts(pipe, prompts))
        assert sorted(again) == sorted(got.features)
        for r in again:
            torch.testing.assert_close(again[r], got.features[r], rtol=1e-4, atol=1e-4)
        assert (got.regenerated is None) == (route == "noised")
    with pytest.raises(ValueError, match="unknown route 'pixels'"):
        image_features(pipe, images, prompts, [4, 5, 6], route="pixels", steps=10, remaining=3)


def _counting(forward, calls: list):
    def counted(sample, *args, **kwargs):
        calls.append(len(sample))
        return forward(sample, *args, **kwargs)
    return counted

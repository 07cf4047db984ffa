import numpy as np
import pytest
import torch

from factory.diffusion.features import (
    FeatureCapture,
    block_recorder,
    capture_modules,
    feature_channels,
    from_fp16_bytes,
    to_fp16_bytes,
    unet_features,
)
from factory.diffusion.families import SDXL
from factory.diffusion.pipelines import generate, load_pipeline, unet_conditioning
from factory.diffusion.tiny import save_tiny_pipeline, tiny_pipeline
from factory.diffusion.steps import capture_call_index
from factory.pipeline.generate import GenerateStage
from factory.pipeline.sections import CaptureConfig, GeneratorConfig

PROMPTS = ["a photograph of a dog", "a photograph of a cat and a sofa", "a photograph of a bus"]
SEEDS = [11, 22, 33]
STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def run(pipe, prompts, seeds, call, **kwargs):
    with FeatureCapture(pipe.unet, call, batch=len(prompts), **kwargs) as capture:
        images = generate(pipe, prompts, seeds, steps=STEPS, guidance_scale=5.0, height=64, width=64)
    return capture, images


def test_call_index_counts_steps_before_the_end():
    assert capture_call_index(50, 5) == 45  # the paper's t=5 of 50
    assert capture_call_index(50, 50) == 0 and capture_call_index(50, 1) == 49
    with pytest.raises(ValueError, match="outside 1..50"):
        capture_call_index(50, 51)


def test_features_are_grouped_by_resolution_for_each_sample(pipe):
    capture, _ = run(pipe, PROMPTS, SEEDS, call=2)
    # tiny U-Net: 32x32 latent, one down level; input, middle and output blocks all captured
    assert feature_channels(capture.features) == {16: 288, 32: 192}
    assert all(t.shape[0] == 3 and t.shape[-1] == r for r, t in capture.features.items())
    assert capture.latent.shape == (3, 4, 32, 32)
    assert capture.timestep == int(pipe.scheduler.timesteps[2])
    assert capture.calls == STEPS


def test_sample_features_do_not_depend_on_batch_mates(pipe):
    """The reference code mixed samples up for batch > 1; sample i must be sample i."""
    batched, _ = run(pipe, PROMPTS, SEEDS, call=1)
    for i in range(3):
        alone, _ = run(pipe, PROMPTS[i:i + 1], SEEDS[i:i + 1], call=1)
        for r in batched.features:
            torch.testing.assert_close(alone.features[r][0], batched.features[r][i], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batched.features[32][0], batched.features[32][1])


def test_conditional_and_unconditional_halves_differ(pipe):
    capture, _ = run(pipe, PROMPTS, SEEDS, call=1, keep_unconditional=True)
    assert capture.unconditional[32].shape == capture.features[32].shape
    assert not torch.allclose(capture.unconditional[32], capture.features[32])


def test_one_pass_on_the_stored_latent_gives_the_captured_features(pipe):
    capture, _ = run(pipe, PROMPTS, SEEDS, call=3)
    embeddings = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    again = unet_features(pipe.unet, capture.latent, capture.timestep, {"encoder_hidden_states": embeddings})
    for r in again:
        torch.testing.assert_close(again[r], capture.features[r], atol=1e-4, rtol=1e-4)


def test_capture_leaves_the_image_unchanged_and_removes_its_hooks(pipe):
    plain = generate(pipe, PROMPTS, SEEDS, steps=STEPS, guidance_scale=5.0, height=64, width=64)
    _, captured = run(pipe, PROMPTS, SEEDS, call=0)
    np.testing.assert_array_equal(plain, captured)
    # The block hooks stay (a compiled U-Net traces them once), switched off; the call counters go.
    recorder = block_recorder(pipe.unet)
    assert not recorder.recording and not recorder.outputs
    assert all(len(m._forward_hooks) == 1 for m in capture_modules(pipe.unet))
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks
    generate(pipe, PROMPTS[:1], SEEDS[:1], steps=1, guidance_scale=5.0, height=64, width=64)
    assert not recorder.outputs  # nothing recorded outside a capture


def test_missed_call_is_an_error(pipe):
    capture, _ = run(pipe, PROMPTS[:1], SEEDS[:1], call=STEPS + 3)
    with pytest.raises(RuntimeError, match="never happened"):
        capture.features


def test_fp16_bytes_round_trip():
    array = np.random.default_rng(0).normal(size=(3, 4, 4)).astype(np.float32)
    back = from_fp16_bytes(to_fp16_bytes(torch.from_numpy(array)), (3, 4, 4))
    np.testing.assert_allclose(back, array, atol=2e-3)


@pytest.mark.parametrize("mode", ["latent", "tensors"])
def test_generate_stage_adds_capture_columns(mode):
    stage = GenerateStage(GeneratorConfig(steps=STEPS, height=64, width=64, guidance_scale=5.0),
                          CaptureConfig(features=mode, step=2, unconditional=mode == "tensors"))
    batch = stage({"prompt": np.array(PROMPTS[:2], dtype=object), "seed": np.array(SEEDS[:2])})
    assert batch["image"].shape == (2, 64, 64, 3)
    assert (batch["timestep"] == int(stage.pipe.scheduler.timesteps[STEPS - 2])).all()
    if mode == "latent":
        assert batch["latent"].shape == (2, 4, 32, 32) and batch["latent"].dtype == np.float16
    else:
        assert batch["features_16"].shape == (2, 288, 16, 16) and batch["features_32"].dtype == np.float16
        assert batch["ufeatures_32"].shape == (2, 192, 32, 32)


# ---- SDXL: the same capture, its U-Net conditioned on pooled text and size ids as well

@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> str:
    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", SDXL)


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    return load_pipeline(sdxl_folder)  # as a build loads it: DDIM on its saved noise schedule


def test_one_pass_with_sdxls_conditioning_gives_the_captured_features(sdxl):
    """SDXL's U-Net also reads the second encoder's pooled text and the image's size ids (Podell et al.,
    2023, section 2.2): unet_conditioning gives them as the pipeline does, so one pass on the stored
    latent gives the generation's features again, and other size ids give other features."""
    capture, _ = run(sdxl, PROMPTS, SEEDS, call=2)
    assert feature_channels(capture.features) == {16: 288, 32: 192}  # two levels, as the tiny SD's
    conditioning = unet_conditioning(sdxl, PROMPTS, 64, 64)
    assert conditioning["encoder_hidden_states"].shape == (3, 77, 64)  # two 32-wide encoders side by side
    assert conditioning["added_cond_kwargs"]["text_embeds"].shape == (3, 32)
    assert conditioning["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 3
    again = unet_features(sdxl.unet, capture.latent, capture.timestep, conditioning)
    for r in again:
        torch.testing.assert_close(again[r], capture.features[r], atol=1e-4, rtol=1e-4)
    resized = unet_features(sdxl.unet, capture.latent, capture.timestep, unet_conditioning(sdxl, PROMPTS, 128, 128))
    assert not torch.allclose(resized[32], capture.features[32], atol=1e-3)


@pytest.mark.parametrize("mode", ["latent", "tensors"])
def test_generate_stage_captures_sdxl(sdxl_folder, mode):
    stage = GenerateStage(GeneratorConfig(model=sdxl_folder, steps=STEPS, height=64, width=64, guidance_scale=5.0),
                          CaptureConfig(features=mode, step=2, attention=True))
    batch = stage({"prompt": np.array(PROMPTS[1:], dtype=object), "seed": np.array(SEEDS[1:]),
                   "class_words": np.array([["cat", "sofa"], ["bus"]], dtype=object)})
    assert batch["image"].shape == (2, 64, 64, 3)
    if mode == "latent":
        assert batch["latent"].shape == (2, 4, 32, 32)
    else:
        assert batch["features_16"].shape == (2, 288, 16, 16) and batch["features_32"].shape == (2, 192, 32, 32)
    assert [maps.shape for maps in batch["daam"]] == [(2, 32, 32), (1, 32, 32)]  # DAAM from the same call

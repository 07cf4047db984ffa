import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from factory.diffusion.daam import DAAM_THRESHOLD, CrossAttentionRecorder, daam_masks
from factory.diffusion.pipelines import generate, tiny_pipeline
from factory.diffusion.tokens import class_token_positions

SETTINGS = dict(steps=3, guidance_scale=5.0, height=64, width=64)
PROMPTS = [("a photograph of a dog", ["dog"]), ("a photograph of a cat and a bus", ["cat", "bus"])]
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def positions(pipe, cases):
    return [class_token_positions(pipe.tokenizer, prompt, words) for prompt, words in cases]


def record(pipe, cases, seeds, steps=None, **overrides):
    with CrossAttentionRecorder(pipe, steps=steps) as recorder:
        images = generate(pipe, [prompt for prompt, _ in cases], seeds, **{**SETTINGS, **overrides})
    return images, recorder


@pytest.fixture(scope="module")
def batch(pipe):
    images, recorder = record(pipe, PROMPTS, SEEDS)
    return images, recorder, recorder.heatmaps(positions(pipe, PROMPTS))


def test_image_unchanged_by_the_recorder(pipe, batch):
    without = generate(pipe, [prompt for prompt, _ in PROMPTS], SEEDS, **SETTINGS)
    assert np.array_equal(batch[0], without)


def test_heatmaps(batch):
    _, recorder, maps = batch
    assert maps.shape == (2, 2, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    for b, o in [(0, 0), (1, 0), (1, 1)]:
        assert maps[b, o].max() == 1 and maps[b, o].std() > 0
    assert not maps[0, 1].any()  # sample 0 names one class: its second slot is padding
    assert recorder.step == SETTINGS["steps"] - 1
    assert {pixels: tuple(s.shape) for pixels, s in recorder.sums.items()} == {32 * 32: (2, 1024, 77),
                                                                               16 * 16: (2, 256, 77)}


def test_sample_maps_come_from_the_sample_alone(pipe, batch):
    for i in range(2):
        _, alone = record(pipe, PROMPTS[i:i + 1], SEEDS[i:i + 1])
        [maps] = alone.heatmaps(positions(pipe, PROMPTS[i:i + 1]))
        assert np.allclose(maps, batch[2][i, :len(maps)], atol=1e-5)


def test_step_range_records_only_those_steps(pipe, batch):
    one = PROMPTS[1:]
    _, everything = record(pipe, one, SEEDS[1:])
    _, first = record(pipe, one, SEEDS[1:], steps=range(0, 1))
    _, rest = record(pipe, one, SEEDS[1:], steps=range(1, 3))
    for pixels, total in everything.sums.items():
        assert not torch.allclose(first.sums[pixels], total)
        assert torch.allclose(first.sums[pixels] + rest.sums[pixels], total, atol=1e-5)


def test_without_guidance_every_row_is_recorded(pipe):
    _, recorder = record(pipe, PROMPTS, SEEDS, guidance_scale=1.0, steps=range(0, 1))
    assert not recorder.guided
    assert all(s.shape[0] == 2 for s in recorder.sums.values())


def test_non_square_latents(pipe):
    _, recorder = record(pipe, PROMPTS[:1], SEEDS[:1], height=64, width=96)
    assert recorder.heatmaps(positions(pipe, PROMPTS[:1])).shape == (1, 1, 32, 48)


def test_processors_restored(pipe):
    before = pipe.unet.attn_processors
    with pytest.raises(RuntimeError, match="boom"):
        with CrossAttentionRecorder(pipe):
            inside = pipe.unet.attn_processors
            raise RuntimeError("boom")
    for name, processor in before.items():
        assert pipe.unet.attn_processors[name] is processor
        assert (inside[name] is processor) == name.endswith("attn1.processor")


def test_processor_on_a_hand_built_case(pipe):
    """Output: the layer's own processor's, exactly; recording: head-averaged softmax(QK^T/sqrt(d))
    of the conditional row."""
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, attn.query_dim, generator=generator)  # rows: [unconditional; conditional]
    context = torch.randn(2, 77, attn.cross_attention_dim, generator=generator)
    with torch.no_grad(), CrossAttentionRecorder(pipe) as recorder:
        recorder.guided = True
        out = pipe.unet.attn_processors[name](attn, hidden, encoder_hidden_states=context)
        assert torch.equal(out, AttnProcessor2_0()(attn, hidden, encoder_hidden_states=context))
        assert torch.allclose(out, AttnProcessor()(attn, hidden, encoder_hidden_states=context), atol=1e-6)

        heads, dim = attn.heads, attn.inner_dim // attn.heads
        query = attn.to_q(hidden[1]).reshape(16, heads, dim).transpose(0, 1)
        key = attn.to_k(context[1]).reshape(77, heads, dim).transpose(0, 1)
        expected = (query @ key.transpose(1, 2) / dim ** 0.5).softmax(-1).mean(0)
    assert list(recorder.sums) == [16] and recorder.sums[16].shape == (1, 16, 77)
    assert torch.allclose(recorder.sums[16][0], expected, atol=1e-6)


def test_heatmaps_need_a_recording(pipe):
    with pytest.raises(RuntimeError, match="no cross-attention recorded"):
        CrossAttentionRecorder(pipe).heatmaps([[[5]]])


def test_daam_masks():
    maps = np.zeros((1, 2, 2, 2), dtype=np.float32)
    maps[0, 0] = [[1.0, 0.5], [0.4, 0.0]]
    masks = daam_masks(maps)
    assert DAAM_THRESHOLD == 0.4 and masks.dtype == bool
    assert masks[0, 0].tolist() == [[True, True], [False, False]] and not masks[0, 1].any()
    assert daam_masks(maps, threshold=0.45)[0, 0].tolist() == [[True, True], [False, False]]
    assert daam_masks(maps, threshold=0.3)[0, 0].tolist() == [[True, True], [True, False]]
    big = daam_masks(maps, size=(8, 8))
    assert big.shape == (1, 2, 8, 8) and big[0, 0, 0, 0] and not big[0, 0, -1, -1] and not big[0, 1].any()


def test_daam_masks_of_recorded_maps(batch):
    images, _, maps = batch
    masks = daam_masks(maps, size=images.shape[1:3])
    assert masks.shape == (2, 2, 64, 64)
    assert masks[1].any(axis=(1, 2)).all() and not masks[0, 1].any()

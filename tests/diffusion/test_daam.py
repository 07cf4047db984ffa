import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from factory.diffusion.daam import DAAM_THRESHOLD, CrossAttentionRecorder, daam_masks, is_daam_layer
from factory.diffusion.families import SDXL
from factory.diffusion.pipelines import generate, load_pipeline, sd15_unet, sdxl_unet
from factory.diffusion.tiny import save_tiny_pipeline, tiny_pipeline
from factory.diffusion.tokens import class_token_positions

SETTINGS = dict(steps=3, guidance_scale=5.0, height=64, width=64)
PROMPTS = [("a photograph of a dog", ["dog"]), ("a photograph of a cat and a bus", ["cat", "bus"])]
SEEDS = [11, 12]
# The tiny U-Net's DAAM layers: one cross-attention layer in the down block, two in the up
# block, all at 32x32; its mid block (16x16) is left out, as the reference's locator does.
TINY_LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
               "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
               "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"]


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


# --- The reference (castorini/daam 0.2), step by step in plain torch, and the old baseline ---

def reference_word_map(calls: dict[str, list[torch.Tensor]], native: int, tokens: list[int]) -> torch.Tensor:
    """daam/trace.py and daam/heatmap.py for one guided prompt. `calls[layer]`: per time step,
    the layer's (2 * heads, h*w, context) attention probabilities, rows [unconditional; conditional]."""
    raw = {}  # RawHeatMapCollection: (factor, layer, head) -> map summed over time
    for layer, steps in calls.items():
        for x in steps:
            factor = int(math.sqrt(native * native // x.shape[1]))  # UNetCrossAttentionHooker.__call__
            if factor == 8:
                continue
            h = w = int(math.sqrt(x.size(1)))  # _unravel_attn
            maps = []
            for map_ in x.permute(2, 0, 1):
                map_ = map_.view(map_.size(0), h, w)
                maps.append(map_[map_.size(0) // 2:])  # filter out unconditional
            maps = torch.stack(maps, 0).permute(1, 0, 2, 3)  # (heads, tokens, h, w)
            for head, heat_map in enumerate(maps):
                key = (factor, layer, head)
                raw[key] = raw.get(key, 0.0) + heat_map
    merges = [F.interpolate(m.unsqueeze(1), size=(native, native), mode="bicubic").clamp_(min=0)
              for m in raw.values()]  # compute_global_heat_map
    maps = torch.stack(merges, dim=0).mean(0)[:, 0]
    return maps[tokens].mean(0)  # compute_word_heat_map


def reference_expand(word_map: torch.Tensor, size: tuple[int, int], threshold: float | None = None) -> torch.Tensor:
    """WordHeatMap.expand_as(image, threshold=...)."""
    im = F.interpolate(word_map.unsqueeze(0).unsqueeze(0).float(), size=size, mode="bicubic")
    im = (im - im.min()) / (im.max() - im.min() + 1e-8)
    if threshold:
        im = (im > threshold).float()
    return im.squeeze()


def old_mask(calls: dict[str, list[torch.Tensor]], native: int, tokens: list[int], size: tuple[int, int]):
    """The baseline this module replaced: heads averaged, summed per resolution, bilinear to the
    latent, divided by the maximum, bilinear to the image, > 0.4."""
    total = 0
    for steps in calls.values():
        for x in steps:
            heads = x.shape[0] // 2
            m = x[heads:].mean(0)  # (h*w, tokens)
            side = int(math.sqrt(m.shape[0]))
            grid = m.T.reshape(1, -1, side, side)
            total = total + F.interpolate(grid, size=(native, native), mode="bilinear", align_corners=False)
    heat = total[0, tokens].mean(0)
    heat = heat / heat.max()
    up = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return up > 0.4


def hand_calls(seed: int = 3, heads: int = 2, steps: int = 2, context: int = 3, rows: int = 2):
    """Two layers of different resolution (4x4 and 2x2 on a 4x4 latent), `heads` heads,
    `steps` time steps, a `context`-token prompt, guided rows [unconditional; conditional]."""
    generator = torch.Generator().manual_seed(seed)
    layers = {TINY_LAYERS[0]: 16, TINY_LAYERS[1]: 4}
    return {name: [(3 * torch.randn(rows * heads, pixels, context, generator=generator)).softmax(-1)
                   for _ in range(steps)] for name, pixels in layers.items()}


def test_heat_map_and_mask_match_the_reference_by_hand(pipe):
    calls, tokens, image = hand_calls(), [1, 2], (8, 8)
    recorder = CrossAttentionRecorder(pipe)  # never entered: the calls are fed by hand
    recorder.native_pixels, recorder.latent_size, recorder.guided = 16, (4, 4), True
    for step in range(2):
        for name, steps in calls.items():
            recorder.step = step
            recorder.record(name, steps[step], heads=2)
    assert {name: tuple(s.shape) for name, s in recorder.sums.items()} == {
        TINY_LAYERS[0]: (1, 2, 16, 3), TINY_LAYERS[1]: (1, 2, 4, 3)}
    maps = recorder.heatmaps([[tokens]])
    assert maps.shape == (1, 1, 4, 4)

    word = reference_word_map(calls, native=4, tokens=tokens)
    stored = (word - word.min()) / (word.max() - word.min() + 1e-8)
    assert torch.allclose(torch.from_numpy(maps[0, 0]), stored, atol=1e-6)
    assert maps.min() == 0 and maps.max() == pytest.approx(1)

    expected = reference_expand(word, image, threshold=DAAM_THRESHOLD).bool().numpy()
    masks = daam_masks(maps, size=image)
    assert masks.shape == (1, 1, 8, 8) and np.array_equal(masks[0, 0], expected)
    assert 0 < expected.sum() < expected.size
    # Stored as the build stores it (fp16): the same mask but where the map is within fp16 of tau.
    normalised = reference_expand(word, image).numpy()
    near = np.abs(normalised - DAAM_THRESHOLD) < 2e-3
    assert np.array_equal(daam_masks(maps.astype(np.float16), size=image)[0, 0][~near], expected[~near])

    # The hand computation tells the reference from what it replaced: the old baseline's mask
    # differs, and so does the heat map without the clamp after bicubic upsampling.
    assert not np.array_equal(old_mask(calls, 4, tokens, image).numpy(), expected)
    unclamped = F.interpolate(calls[TINY_LAYERS[1]][0][2:].permute(0, 2, 1).reshape(2, 3, 2, 2), size=(4, 4),
                              mode="bicubic")
    assert unclamped.min() < 0  # bicubic undershoot, which the reference clamps away


def test_min_max_normalisation_and_threshold():
    maps = np.zeros((1, 2, 2, 2), dtype=np.float32)
    maps[0, 0] = 0.5 + 0.5 * np.array([[1.0, 0.6], [0.2, 0.0]])  # minimum 0.5, not 0
    masks = daam_masks(maps)
    assert DAAM_THRESHOLD == 0.4 and masks.dtype == bool
    # min-max: [[1, 0.6], [0.2, 0]] > 0.4; dividing by the maximum alone would keep every pixel
    assert masks[0, 0].tolist() == [[True, True], [False, False]] and not masks[0, 1].any()
    assert (maps[0, 0] / maps[0, 0].max() > DAAM_THRESHOLD).all()
    assert daam_masks(maps, threshold=0.6)[0, 0].tolist() == [[True, False], [False, False]]  # strictly above
    assert daam_masks(maps, threshold=0.1)[0, 0].tolist() == [[True, True], [True, False]]
    assert not daam_masks(np.full((1, 1, 2, 2), 0.7, np.float32)).any()  # a constant map: nothing stands out


def test_masks_upsample_bicubically():
    maps = np.zeros((1, 1, 3, 3), dtype=np.float32)
    maps[0, 0] = [[0.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.0, 0.9, 0.0]]
    big = daam_masks(maps, size=(12, 12))
    up = F.interpolate(torch.from_numpy(maps), size=(12, 12), mode="bicubic", align_corners=False)
    expected = ((up - up.min()) / (up.max() - up.min() + 1e-8) > DAAM_THRESHOLD).numpy()
    assert big.shape == (1, 1, 12, 12) and np.array_equal(big, expected)
    bilinear = F.interpolate(torch.from_numpy(maps), size=(12, 12), mode="bilinear", align_corners=False)
    assert not np.array_equal(big, (bilinear / bilinear.max() > DAAM_THRESHOLD).numpy())


def test_layers_and_resolutions_as_the_reference(pipe):
    """Down and up blocks' cross-attention, not the mid block; maps at 1/8 of the native latent
    side left out. SD 1.5 at 512 px: the 64, 32 and 16 maps of 15 layers; at 256 px (32x32
    latents) the reference's factor rule drops the 8x8 maps of down_blocks.2 and up_blocks.1."""
    assert [name for name in pipe.unet.attn_processors if is_daam_layer(name)] == TINY_LAYERS
    with torch.device("meta"):
        unet = sd15_unet()
    sd15 = types.SimpleNamespace(unet=unet, do_classifier_free_guidance=True)
    for side, kept in [(64, {4096: 5, 1024: 5, 256: 5}), (32, {1024: 5, 256: 5})]:
        # on the meta device: shapes only, no weights, no arithmetic
        with torch.no_grad(), CrossAttentionRecorder(sd15) as recorder, torch.device("meta"):
            unet(torch.empty(2, 4, side, side), torch.tensor([10, 10]), encoder_hidden_states=torch.empty(2, 77, 768))
        assert recorder.native_pixels == 64 * 64
        assert not any(name.startswith("mid_block") for name in recorder.sums)
        pixels = [s.shape[2] for s in recorder.sums.values()]
        assert {p: pixels.count(p) for p in set(pixels)} == kept
        assert all(s.shape[:2] == (1, 8) for s in recorder.sums.values())


def test_image_unchanged_by_the_recorder(pipe, batch):
    without = generate(pipe, [prompt for prompt, _ in PROMPTS], SEEDS, **SETTINGS)
    assert np.array_equal(batch[0], without)


def test_heatmaps(batch):
    _, recorder, maps = batch
    assert maps.shape == (2, 2, 32, 32) and maps.dtype == np.float32
    for b, o in [(0, 0), (1, 0), (1, 1)]:  # min-max normalised
        assert maps[b, o].min() == 0 and maps[b, o].max() == pytest.approx(1) and maps[b, o].std() > 0
    assert not maps[0, 1].any()  # sample 0 names one class: its second slot is padding
    assert recorder.step == SETTINGS["steps"] - 1
    assert {name: tuple(s.shape) for name, s in recorder.sums.items()} == {name: (2, 8, 1024, 77)
                                                                            for name in TINY_LAYERS}


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
    for name, total in everything.sums.items():
        assert not torch.allclose(first.sums[name], total)
        assert torch.allclose(first.sums[name] + rest.sums[name], total, atol=1e-5)


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
        assert (inside[name] is processor) == (name not in TINY_LAYERS)


def test_processor_on_a_hand_built_case(pipe):
    """Output: the layer's own processor's, exactly; recording: per head, softmax(QK^T/sqrt(d))
    of the conditional row."""
    name = TINY_LAYERS[0]
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 1024, attn.query_dim, generator=generator)  # rows: [unconditional; conditional]
    context = torch.randn(2, 77, attn.cross_attention_dim, generator=generator)
    with torch.no_grad(), CrossAttentionRecorder(pipe) as recorder:
        recorder.guided = True
        out = pipe.unet.attn_processors[name](attn, hidden, encoder_hidden_states=context)
        assert torch.equal(out, AttnProcessor2_0()(attn, hidden, encoder_hidden_states=context))
        assert torch.allclose(out, AttnProcessor()(attn, hidden, encoder_hidden_states=context), atol=1e-6)

        heads, dim = attn.heads, attn.inner_dim // attn.heads
        query = attn.to_q(hidden[1]).reshape(1024, heads, dim).transpose(0, 1)
        key = attn.to_k(context[1]).reshape(77, heads, dim).transpose(0, 1)
        expected = (query @ key.transpose(1, 2) / dim ** 0.5).softmax(-1)
    assert list(recorder.sums) == [name] and recorder.sums[name].shape == (1, heads, 1024, 77)
    assert torch.allclose(recorder.sums[name][0], expected, atol=1e-6)


def test_heatmaps_need_a_recording(pipe):
    with pytest.raises(RuntimeError, match="no cross-attention recorded"):
        CrossAttentionRecorder(pipe).heatmaps([[[5]]])


def test_daam_masks_of_recorded_maps(batch):
    images, _, maps = batch
    masks = daam_masks(maps, size=images.shape[1:3])
    assert masks.shape == (2, 2, 64, 64)
    assert masks[1].any(axis=(1, 2)).all() and not masks[0, 1].any()


# ---- SDXL: cross-attention only at its lower levels, text states of two encoders side by side

# The tiny SDXL's DAAM layers: two transformer layers in its second down block (16x16) and in each of
# the two attention blocks of its first up block; its first level has no attention, its mid block is left out.
TINY_SDXL_LAYERS = [f"{block}.attentions.{a}.transformer_blocks.{t}.attn2.processor"
                    for block, blocks in (("down_blocks.1", 1), ("up_blocks.0", 2)) for a in range(blocks)
                    for t in range(2)]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return load_pipeline(save_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", SDXL))


def test_sdxl_heat_maps(sdxl):
    images, recorder = record(sdxl, PROMPTS, SEEDS)
    assert np.array_equal(images, generate(sdxl, [prompt for prompt, _ in PROMPTS], SEEDS, **SETTINGS))
    assert [name for name in sdxl.unet.attn_processors if is_daam_layer(name)] == TINY_SDXL_LAYERS
    assert {name: tuple(s.shape) for name, s in recorder.sums.items()} == {name: (2, 4, 256, 77)
                                                                            for name in TINY_SDXL_LAYERS}
    maps = recorder.heatmaps(positions(sdxl, PROMPTS))
    assert maps.shape == (2, 2, 32, 32)  # on the latent grid, upsampled from the 16x16 attention
    for b, o in [(0, 0), (1, 0), (1, 1)]:  # min-max normalised (the 1e-8 shows: the random maps vary little)
        assert maps[b, o].min() == 0 and maps[b, o].max() == pytest.approx(1, abs=1e-4) and maps[b, o].std() > 0
    assert not maps[0, 1].any()
    assert daam_masks(maps, size=(64, 64))[1].any(axis=(1, 2)).all()


def test_sdxl_layers_and_resolutions():
    """SDXL base's U-Net at 1024 px (a 128x128 latent, its sample_size): cross-attention at 64x64 (2
    transformer layers per block) and 32x32 (10 per block), 60 layers, none at the factor 8 the
    reference drops; its mid block's 10 are left out."""
    with torch.device("meta"):
        unet = sdxl_unet()
    pipe = types.SimpleNamespace(unet=unet, do_classifier_free_guidance=True)
    with torch.no_grad(), CrossAttentionRecorder(pipe) as recorder, torch.device("meta"):
        unet(torch.empty(2, 4, 128, 128), torch.tensor([10, 10]), encoder_hidden_states=torch.empty(2, 77, 2048),
             added_cond_kwargs={"text_embeds": torch.empty(2, 1280), "time_ids": torch.empty(2, 6)})
    assert recorder.native_pixels == 128 * 128
    assert not any(name.startswith("mid_block") for name in recorder.sums)
    pixels = [s.shape[2] for s in recorder.sums.values()]
    assert {p: pixels.count(p) for p in set(pixels)} == {64 * 64: 10, 32 * 32: 50}

"""DAAM, the paper's baseline: cross-attention heat maps as segmentation (Tang et al.,
"What the DAAM: Interpreting Stable Diffusion Using Cross Attention", ACL 2023), computed
as its reference implementation (castorini/daam 0.2: daam/trace.py, daam/heatmap.py) does.

The reference, step by step, and where each step happens here:

1. Layers: every cross-attention layer (`attn2`) of the U-Net's down and up blocks; the
   mid block is not hooked (its `UNetCrossAttentionLocator` skips it), and maps whose
   shape factor sqrt(native_latent_pixels // pixels) is 8 are dropped. The native latent
   is the U-Net's `sample_size` squared (the reference's `latent_hw`: 64x64 for SD 1.x and
   SD 2 base, 96x96 for SD 2-v, 128x128 for SDXL). For SD 1.x at 512 px this keeps the 64, 32
   and 16 maps of the down and up blocks and leaves out the 8x8 mid block. SDXL's U-Net has
   cross-attention at its second and third levels only: at 1024 px its 64 and 32 maps, 60
   layers (2 and 10 transformer layers per attention block there). -> `CrossAttentionRecorder`.
2. Time: the conditional half of each call's probabilities, per layer and head, summed
   over every denoising step (`RawHeatMapCollection.update`). -> `record`, all steps by
   default, as the build records them.
3. Space (`compute_global_heat_map`, default factors, no head or layer restriction):
   each layer's and head's time-summed (tokens, h, w) map upsampled *bicubically* to the
   latent grid, clamped at 0 (bicubic undershoot), then the mean over all layers and heads.
   -> `global_heat_maps`.
4. Word (`compute_word_heat_map`): the mean over the word's token positions. -> `heatmaps`.
5. Segmentation (`WordHeatMap.expand_as(image, threshold=0.4)`): the word map upsampled
   bicubically to the image, min-max normalised, (x - min) / (max - min + 1e-8), and
   binarised at tau = 0.4 with `>`. -> `daam_masks`.

Where the stored format changes the order (equivalent): the dataset keeps each class's
word map on the latent grid in fp16, so `heatmaps` min-max normalises it there (to
[0, 1], which fp16 holds well), and `daam_masks` upsamples the stored map bicubically and
min-max normalises it again before thresholding. Bicubic weights sum to one, so upsampling
commutes with x -> (x - a) / s, and min-max of an affine image of a map is min-max of the
map: the masks are the reference's up to fp16 rounding and the 1e-8 in the denominator.

Where we differ from the reference, on purpose:
- Batches: the reference hooks one prompt per call and takes the second half of the
  rows as conditional; here each sample's map comes from its own conditional row (and
  from every row without classifier-free guidance, where the reference would keep half
  the heads).
- Upsampling target: the reference upsamples to the *native* latent square (64x64 for
  SD 1.x) whatever the image size; here to the latent grid of the generation (the same
  at the native size, which the recipes use, and right for non-square images).
- Precision: sums are float32 (the reference sums fp16 maps in fp16 for fp16 pipelines).

Usage, one generation per recorder:

    with CrossAttentionRecorder(pipe) as recorder:
        images = generate(pipe, prompts, seeds, ...)
    maps = recorder.heatmaps([class_token_positions(pipe.tokenizer, p, w) for p, w in ...])
    masks = daam_masks(maps, size=images.shape[1:3])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import Attention

# The paper's tau, and the reference's `plot_mask_heat_map` / `expand_as(threshold=...)` value.
DAAM_THRESHOLD = 0.4
# The reference drops maps at 1/8 of the native latent side (`factor != 8` in its hooker).
SKIPPED_FACTOR = 8
# The reference's `expand_as` normalisation: (x - min) / (max - min + EPSILON).
EPSILON = 1e-8


def _attention_probs(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
    """(rows * heads, pixels, tokens) attention probabilities, computed as diffusers'
    AttnProcessor computes the ones it multiplies the values with."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    batch_size, sequence_length, _ = encoder_hidden_states.shape
    attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
    return attn.get_attention_scores(query, key, attention_mask)


def _pixels(hidden_states: torch.Tensor) -> int:
    return hidden_states.shape[-2] * hidden_states.shape[-1] if hidden_states.ndim == 4 else hidden_states.shape[1]


class _RecordingAttnProcessor:
    """Records a cross-attention layer's probabilities, then runs the layer's own processor.

    The output comes from the original processor untouched, so the image is bit for bit the
    one made without the recorder. Pipelines default to AttnProcessor2_0 (fused
    scaled_dot_product_attention), whose output differs from an explicit softmax-then-bmm
    in the last bits, enough to flip uint8 pixels; the price is one extra query/key
    projection per recorded cross-attention call.
    """

    def __init__(self, recorder: CrossAttentionRecorder, name: str, processor):
        self.recorder = recorder
        self.name = name
        self.processor = processor

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if self.recorder.recording and self.recorder.enters(_pixels(hidden_states)):
            probs = _attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            self.recorder.record(self.name, probs, attn.heads)
        return self.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, temb=temb)


def is_daam_layer(processor_name: str) -> bool:
    """Whether DAAM hooks this attention processor: the cross-attention (`attn2`) layers of
    the down and up blocks; the reference's locator leaves the mid block out."""
    return processor_name.endswith("attn2.processor") and processor_name.startswith(("down_blocks.", "up_blocks."))


def _grid(pixels: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a U-Net level with `pixels` positions: each downsampling halves, rounding up."""
    h, w = latent_size
    while h * w > pixels:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != pixels:
        raise ValueError(f"{pixels} attention positions do not match a {latent_size} latent")
    return h, w


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map of (..., H, W) min-max normalised as the reference's `expand_as`:
    (x - min) / (max - min + 1e-8); an all-constant map becomes all zero."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low + EPSILON)


def global_heat_maps(maps: Iterable[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(B, tokens, H, W) float32: the reference's `compute_global_heat_map` (default factors,
    all heads and layers, no per-token normalisation).

    `maps`: per layer, its (B, heads, tokens, h, w) attention maps summed over time steps.
    Each layer's and head's map is upsampled bicubically to `size` (the latent grid),
    clamped at 0, and the mean is taken over all layers and heads together."""
    total, count = None, 0
    for layer in maps:
        batch, heads, tokens, h, w = layer.shape
        up = F.interpolate(layer.float().reshape(batch, heads * tokens, h, w), size=tuple(size), mode="bicubic",
                           align_corners=False).clamp_(min=0)
        up = up.reshape(batch, heads, tokens, *size).sum(dim=1)
        total = up if total is None else total + up
        count += heads
    if total is None:
        raise ValueError("no heat maps to aggregate")
    return total / count


class CrossAttentionRecorder:
    """Records the cross-attention maps of the conditional prompts during one generation.

    A context manager: on entry it puts a recording processor on every DAAM layer
    (`is_daam_layer`), leaves the rest alone and counts U-Net calls as denoising steps; on
    exit it puts the original processors back. Per layer it keeps the (B, heads, h*w,
    tokens) probabilities summed over the recorded steps, as the reference keeps one sum per
    (layer, head): its clamp comes after each layer's and head's upsampling, so the heads
    cannot be merged earlier.

    `steps`: indices (0 = first denoising step) of the steps to record, e.g. range(0, 10);
    None, the default and the build's setting, records all of them as the reference does.
    """

    def __init__(self, pipe: DiffusionPipeline, steps: Sequence[int] | None = None):
        self.pipe = pipe
        self.steps = steps
        self.step = -1  # index of the current denoising step
        self.guided = False  # whether the U-Net batch is [unconditional; conditional]
        self.latent_size: tuple[int, int] | None = None
        sample_size = pipe.unet.config.sample_size
        # The reference's `latent_hw`, against which it measures each map's shape factor.
        self.native_pixels = (sample_size * sample_size if isinstance(sample_size, int)
                              else int(sample_size[0]) * int(sample_size[1]))
        self.sums: dict[str, torch.Tensor] = {}  # processor name -> (B, heads, h*w, tokens)
        self._original = None
        self._hook = None

    def __enter__(self) -> CrossAttentionRecorder:
        unet = self.pipe.unet
        self._original = unet.attn_processors
        unet.set_attn_processor({
            name: _RecordingAttnProcessor(self, name, processor) if is_daam_layer(name) else processor
            for name, processor in self._original.items()})
        self._hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self._hook.remove()
        self.pipe.unet.set_attn_processor(self._original)

    def _on_unet_call(self, unet, args, kwargs) -> None:
        self.step += 1
        self.guided = self.pipe.do_classifier_free_guidance
        sample = args[0] if args else kwargs["sample"]
        self.latent_size = tuple(sample.shape[-2:])

    @property
    def recording(self) -> bool:
        return self.steps is None or self.step in self.steps

    def enters(self, pixels: int) -> bool:
        """Whether maps of `pixels` positions enter DAAM: the reference's shape factor,
        int(sqrt(native_pixels // pixels)), is not 8."""
        return math.isqrt(self.native_pixels // pixels) != SKIPPED_FACTOR

    def record(self, name: str, attention_probs: torch.Tensor, heads: int) -> None:
        """Add one call's (rows * heads, h*w, tokens) probabilities to layer `name`'s sum."""
        if not self.enters(attention_probs.shape[1]):
            return
        probs = attention_probs.unflatten(0, (-1, heads))
        if self.guided:
            # Rows are [unconditional; conditional]: sample i's map is conditional row i.
            probs = probs[probs.shape[0] // 2:]
        probs = probs.float()
        if name in self.sums:
            self.sums[name] += probs
        else:
            self.sums[name] = probs.clone()

    def heatmaps(self, positions: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
        """float32 (B, O, H_lat, W_lat): per sample and class, the reference's word heat map
        (`global_heat_maps`, then the mean over the class's token positions) on the latent
        grid, min-max normalised (`daam_masks` normalises again after upsampling; see the
        module docstring). `positions[b]` are sample b's classes
        (factory.diffusion.tokens.class_token_positions); O is the largest class count, and
        missing classes are all-zero maps."""
        if not self.sums:
            raise RuntimeError("no cross-attention recorded: generate inside the recorder's `with` block")
        layers = []
        for s in self.sums.values():
            h, w = _grid(s.shape[2], self.latent_size)
            layers.append(s.transpose(2, 3).unflatten(3, (h, w)))  # (B, heads, tokens, h, w)
        batch = layers[0].shape[0]
        if len(positions) != batch:
            raise ValueError(f"{len(positions)} position lists for {batch} recorded samples")
        height, width = self.latent_size
        most = max((len(classes) for classes in positions), default=0)
        out = np.zeros((batch, most, height, width), dtype=np.float32)
        if most == 0:
            return out
        total = global_heat_maps(layers, self.latent_size)  # (B, tokens, H, W)
        for b, classes in enumerate(positions):
            for o, tokens in enumerate(classes):
                out[b, o] = min_max(total[b, list(tokens)].mean(dim=0)).cpu().numpy()
        return out


def daam_scores(heatmaps: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """float32 (B, O, H, W) in [0, 1]: the reference's `expand_as(image)` before its threshold:
    each heat map upsampled bicubically to `size` (the image's (H, W); None keeps the heat
    maps' size), then min-max normalised. All-zero (padding) maps stay zero."""
    maps = torch.from_numpy(np.ascontiguousarray(heatmaps, dtype=np.float32))
    if size is not None and tuple(size) != tuple(maps.shape[-2:]):
        maps = F.interpolate(maps, size=tuple(size), mode="bicubic", align_corners=False)
    return min_max(maps).numpy()


def daam_masks(heatmaps: np.ndarray, threshold: float = DAAM_THRESHOLD,
               size: tuple[int, int] | None = None) -> np.ndarray:
    """bool (B, O, H, W): the reference's `expand_as(image, threshold=tau)`, `daam_scores > tau`.
    All-zero (padding) maps give empty masks."""
    return daam_scores(heatmaps, size) > threshold

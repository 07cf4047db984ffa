"""DAAM, the paper's baseline: cross-attention heat maps as segmentation (Tang et al.,
"What the DAAM: Interpreting Stable Diffusion Using Cross Attention").

Every cross-attention layer of the U-Net attends from each latent pixel to the 77
prompt tokens. Averaged over heads, upsampled to the latent grid and summed over
layers and denoising steps, the map of a class's tokens shows where the class is drawn.

Usage, one generation per recorder:

    with CrossAttentionRecorder(pipe) as recorder:
        images = generate(pipe, prompts, seeds, ...)
    maps = recorder.heatmaps([class_token_positions(pipe.tokenizer, p, w) for p, w in ...])
    masks = daam_masks(maps, size=images.shape[1:3])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention

# Tang et al. binarise normalised heat maps at tau = 0.4 (their daam_to_mask script's default).
DAAM_THRESHOLD = 0.4


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


class _RecordingAttnProcessor:
    """Records a cross-attention layer's probabilities, then runs the layer's own processor.

    The output comes from the original processor untouched, so the image is bit for bit the
    one made without the recorder. Pipelines default to AttnProcessor2_0 (fused
    scaled_dot_product_attention), whose output differs from an explicit softmax-then-bmm
    in the last bits, enough to flip uint8 pixels; the price is one extra query/key
    projection per cross-attention call, while recording.
    """

    def __init__(self, recorder: CrossAttentionRecorder, processor):
        self.recorder = recorder
        self.processor = processor

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if self.recorder.recording:
            probs = _attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            self.recorder.record(probs, attn.heads)
        return self.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, temb=temb)


def _grid(pixels: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a U-Net level with `pixels` positions: each downsampling halves, rounding up."""
    h, w = latent_size
    while h * w > pixels:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != pixels:
        raise ValueError(f"{pixels} attention positions do not match a {latent_size} latent")
    return h, w


class CrossAttentionRecorder:
    """Records the cross-attention maps of the conditional prompts during one generation.

    A context manager: on entry it puts a recording processor on every cross-attention
    layer (`...attn2.processor`), leaves self-attention alone and counts U-Net calls as
    denoising steps; on exit it puts the original processors back.

    `steps`: indices (0 = first denoising step) of the steps to record, e.g. range(0, 10);
    None records all of them.
    """

    def __init__(self, pipe: StableDiffusionPipeline, steps: Sequence[int] | None = None):
        self.pipe = pipe
        self.steps = steps
        self.step = -1  # index of the current denoising step
        self.guided = False  # whether the U-Net batch is [unconditional; conditional]
        self.latent_size: tuple[int, int] | None = None
        # One running sum (B, h*w, tokens) per attention resolution, keyed by h*w: summing
        # before upsampling equals upsampling each map, as upsampling is linear.
        self.sums: dict[int, torch.Tensor] = {}
        self._original = None
        self._hook = None

    def __enter__(self) -> CrossAttentionRecorder:
        unet = self.pipe.unet
        self._original = unet.attn_processors
        unet.set_attn_processor({
            name: _RecordingAttnProcessor(self, processor) if name.endswith("attn2.processor") else processor
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

    def record(self, attention_probs: torch.Tensor, heads: int) -> None:
        """Add one call's (rows * heads, h*w, tokens) probabilities to its resolution's sum."""
        probs = attention_probs.unflatten(0, (-1, heads))
        if self.guided:
            # Rows are [unconditional; conditional]: sample i's map is conditional row i.
            probs = probs[probs.shape[0] // 2:]
        maps = probs.float().mean(dim=1)
        pixels = maps.shape[1]
        if pixels in self.sums:
            self.sums[pixels] += maps
        else:
            self.sums[pixels] = maps.clone()

    def heatmaps(self, positions: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
        """float32 (B, O, H_lat, W_lat): per sample and class, the mean over the class's
        token positions of the summed maps, divided by its maximum (an all-zero map stays
        zero). `positions[b]` are sample b's classes (factory.tokens.class_token_positions);
        O is the largest class count, and missing classes are all-zero maps."""
        if not self.sums:
            raise RuntimeError("no cross-attention recorded: generate inside the recorder's `with` block")
        height, width = self.latent_size
        total = 0
        for pixels, maps in self.sums.items():
            h, w = _grid(pixels, self.latent_size)
            grid = maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], h, w)
            total = total + F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        if len(positions) != total.shape[0]:
            raise ValueError(f"{len(positions)} position lists for {total.shape[0]} recorded samples")
        most = max((len(classes) for classes in positions), default=0)
        out = np.zeros((len(positions), most, height, width), dtype=np.float32)
        for b, classes in enumerate(positions):
            for o, tokens in enumerate(classes):
                heat = total[b, list(tokens)].mean(dim=0)
                peak = heat.max()
                out[b, o] = (heat / peak if peak > 0 else heat).cpu().numpy()
        return out


def daam_masks(heatmaps: np.ndarray, threshold: float = DAAM_THRESHOLD,
               size: tuple[int, int] | None = None) -> np.ndarray:
    """bool (B, O, H, W): normalised heat maps above `threshold`, after bilinear upsampling
    to `size` (the image's (H, W); None keeps the heat maps' size)."""
    maps = torch.from_numpy(np.ascontiguousarray(heatmaps, dtype=np.float32))
    if size is not None and tuple(size) != tuple(maps.shape[-2:]):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return (maps > threshold).numpy()

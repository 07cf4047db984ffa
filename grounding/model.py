"""The grounding module: U-Net features + class embeddings -> one mask per class.

Visual encoder (fuse the per-resolution U-Net features into a map F of D channels),
a transformer decoder whose queries are the class embeddings and whose keys/values
are patches of F, and an MLP giving one D-dim mask embedding per class; a class's
mask logits are the dot product of its embedding with F at each pixel (Li et al. 2023, supplementary A).
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grounding.config import GroundingModelConfig


def _mlp(*dims: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class MixConv(nn.Module):
    """Two 3x3 convs with a residual connection and batch norm (pre-activation, as in the
    reference code's SegBlock, which comes from BigDatasetGAN).

    The papers call the norm "conditional batch norm" after BigDatasetGAN, where it is
    conditioned on the class. The reference code passes no condition (y=None), and the
    features all come from one fixed denoising step (t=5), so a timestep-conditioned norm
    would learn one constant scale and shift: an ordinary affine BatchNorm. Hence no
    timestep input.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)  # norm2 cancels a bias
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        # The shortcut takes the normalised input: reduced U-Net features have arbitrary scale.
        x = self.norm1(x)
        h = self.conv2(F.relu(self.norm2(self.conv1(F.relu(x)))))
        return h + self.shortcut(x)


class GroundingModule(nn.Module):
    def __init__(self, config: GroundingModelConfig):
        super().__init__()
        self.config = config
        self.resolutions = sorted(config.feature_channels)  # coarsest first
        # 1x1 convs feed a batch norm, which cancels their bias.
        self.reduce = nn.ModuleDict({
            str(r): nn.Conv2d(config.feature_channels[r], config.reduce_channels[r], 1, bias=False)
            for r in self.resolutions})
        # One Mix-conv after each concat; the widths grow, and the last one outputs D.
        concat_widths = list(accumulate(config.reduce_channels[r] for r in self.resolutions))[1:]
        out_widths = concat_widths[:-1] + [config.fused_dim]
        self.mix = nn.ModuleList(MixConv(i, o) for i, o in zip(concat_widths, out_widths))

        d_e, p = config.embed_dim, config.patch_size
        self.visual_proj = _mlp(p * p * config.fused_dim, d_e, d_e)
        self.text_proj = _mlp(config.text_dim, d_e, d_e)
        layer = nn.TransformerDecoderLayer(d_e, config.decoder_heads, dim_feedforward=4 * d_e,
                                           dropout=config.dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, config.decoder_layers, norm=nn.LayerNorm(d_e))
        self.mask_mlp = _mlp(d_e, d_e, d_e, config.fused_dim)

    def encode_visual(self, features: dict[int, Tensor]) -> Tensor:
        """Fuse {resolution: (B, C_r, r, r)} into F: (B, D, fuse_resolution, fuse_resolution)."""
        if set(features) != set(self.resolutions):
            raise ValueError(f"expected features at resolutions {self.resolutions}, got {sorted(features)}")
        coarsest = self.resolutions[0]
        dtype = self.reduce[str(coarsest)].weight.dtype  # features may be stored in half precision
        x = self.reduce[str(coarsest)](features[coarsest].to(dtype))
        for r, mix in zip(self.resolutions[1:], self.mix):
            x = F.interpolate(x, size=r, mode="bilinear", align_corners=False)
            x = mix(torch.cat([x, self.reduce[str(r)](features[r].to(dtype))], dim=1))
        if x.shape[-1] != self.config.fuse_resolution:
            x = F.interpolate(x, size=self.config.fuse_resolution, mode="bilinear", align_corners=False)
        return x

    def forward(self, features: dict[int, Tensor], class_embeddings: Tensor, class_mask: Tensor) -> Tensor:
        """Mask logits (B, O, mask_resolution, mask_resolution) for class embeddings (B, O, text_dim);
        class_mask (B, O) marks the real slots. Logits of padded slots are meaningless."""
        fused = self.encode_visual(features)
        p = self.config.patch_size
        # Non-overlapping p x p patches -> (B, N, p*p*D). No positional encoding (nor in the
        # reference): localisation comes from the per-pixel dot product with F below.
        tokens = F.unfold(fused, p, stride=p).transpose(1, 2)
        memory = self.visual_proj(tokens)
        queries = self.text_proj(class_embeddings.to(memory.dtype))
        # Padded slots are masked as self-attention keys, so they cannot reach real slots;
        # cross-attention and the feed-forward act per slot. A sample with no real slot
        # would have nothing to attend to (NaN), so its slots see each other instead.
        padding = ~class_mask & class_mask.any(dim=1, keepdim=True)
        decoded = self.decoder(queries, memory, tgt_key_padding_mask=padding)
        mask_embeddings = self.mask_mlp(decoded)
        logits = torch.einsum("bod,bdhw->bohw", mask_embeddings, fused)
        # Bilinear upsampling is linear, so upsampling the logits equals the dot product with
        # an upsampled F (what the reference code does) at O/D of the cost.
        return F.interpolate(logits, size=self.config.mask_resolution, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(self, features: dict[int, Tensor], class_embeddings: Tensor, class_mask: Tensor) -> Tensor:
        """Bool masks (B, O, H, W): sigmoid(logits) > 0.5, i.e. logits > 0; padded slots are empty.
        Put the module in eval mode first."""
        logits = self(features, class_embeddings, class_mask)
        return (logits > 0) & class_mask[:, :, None, None]

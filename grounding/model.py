"""The grounding module: U-Net features + class embeddings -> one mask per class.

Visual encoder (fuse the per-resolution U-Net features into a map F of D channels),
a transformer decoder whose queries are the class embeddings and whose keys/values
are patches of F, and an MLP giving one D-dim mask embedding per class; a class's
mask logits are the dot product of its embedding with F at each pixel (Li et al. 2023, supplementary A).

With ``config.presence``, a presence head gives one more logit per class: whether the class is
in the image at all. The papers' module has no such output and paints a mask for every class it
is asked about; recognition decoupled from localisation, a presence head trained with hard
negatives, is SAM 3's (Carion et al. 2025). Trained on classes the prompt named but the generator
did not draw, it lets the annotator give an absent class no pixels. Two heads: "query" reads the
decoded class query alone; "region" also reads what the class's own mask covers (F averaged under
the mask's probabilities), so it asks whether the region the mask found is that class, as
MaskFormer classifies a mask (Cheng et al. 2021); "match" scores the cosine similarity of that
region with the class's text embedding, as ZegFormer classifies a segment (Ding et al. 2022), so
its only class-specific input is the text. The region's weights are detached: the presence loss
does not move the masks.
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
        self.presence_mlp = {"query": _mlp(d_e, d_e, 1), "region": _mlp(3 * d_e, d_e, 1)}.get(config.presence)
        self.region_proj = nn.Linear(config.fused_dim, d_e) if config.presence in ("region", "match") else None
        if config.presence == "match":
            self.text_key = nn.Linear(config.text_dim, d_e)
            # a learned temperature and offset turn a cosine in [-1, 1] into a logit
            self.match_scale = nn.Parameter(torch.tensor(10.0))
            self.match_bias = nn.Parameter(torch.tensor(-5.0))

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

    def forward(self, features: dict[int, Tensor], class_embeddings: Tensor, class_mask: Tensor, *,
                with_presence: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """Mask logits (B, O, mask_resolution, mask_resolution) for class embeddings (B, O, text_dim);
        class_mask (B, O) marks the real slots. Logits of padded slots are meaningless.
        ``with_presence``: (mask logits, presence logits (B, O) or None without a presence head)."""
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
        coarse = torch.einsum("bod,bdhw->bohw", mask_embeddings, fused)
        # Bilinear upsampling is linear, so upsampling the logits equals the dot product with
        # an upsampled F (what the reference code does) at O/D of the cost.
        logits = F.interpolate(coarse, size=self.config.mask_resolution, mode="bilinear", align_corners=False)
        if not with_presence:
            return logits
        return logits, self._presence(decoded, coarse, fused, class_embeddings)

    def _presence(self, decoded: Tensor, coarse: Tensor, fused: Tensor, class_embeddings: Tensor) -> Tensor | None:
        """(B, O) presence logits from the decoded queries (B, O, d_e) and, for the region and match
        heads, F (B, D, h, w) averaged under each class's mask probabilities (coarse logits (B, O, h, w));
        the match head compares that region with the class embeddings (B, O, text_dim)."""
        if self.config.presence == "none":
            return None
        if self.region_proj is None:
            return self.presence_mlp(decoded).squeeze(-1)
        weights = torch.sigmoid(coarse.detach())
        pooled = torch.einsum("bohw,bdhw->bod", weights, fused) / weights.sum(dim=(2, 3))[..., None].clamp(min=1e-6)
        region = self.region_proj(pooled)
        if self.config.presence == "match":
            key = F.normalize(self.text_key(class_embeddings.to(region.dtype)), dim=-1)
            return self.match_scale * (F.normalize(region, dim=-1) * key).sum(-1) + self.match_bias
        return self.presence_mlp(torch.cat([decoded, region, decoded * region], dim=-1)).squeeze(-1)

    @torch.no_grad()
    def predict(self, features: dict[int, Tensor], class_embeddings: Tensor, class_mask: Tensor,
                presence_threshold: float | None = 0.5) -> Tensor:
        """Bool masks (B, O, H, W): sigmoid(logits) > 0.5, i.e. logits > 0; padded slots are empty,
        and so is a class whose presence score is below `presence_threshold` (with a presence head;
        None: every class gets its mask, as the papers' module). Put the module in eval mode first."""
        logits, presence = self(features, class_embeddings, class_mask, with_presence=True)
        gated = presence is not None and presence_threshold is not None
        keep = class_mask & (torch.sigmoid(presence) >= presence_threshold) if gated else class_mask
        return (logits > 0) & keep[:, :, None, None]

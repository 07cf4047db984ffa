"""Capture: U-Net block outputs at one denoising step, grouped by spatial resolution.

The grounding module reads Stable Diffusion's own features (Li et al., ICCV 2023, section 4.2): the
outputs of every input block, the middle block and every output block (LDM's terms;
in diffusers: ``conv_in``, each down block's layers and downsampler, ``mid_block``,
each up block's layers and upsampler), concatenated per resolution. SDXL's U-Net has the same
blocks at three resolutions instead of four (32, 64 and 128 at 1024 px).

Features are captured by forward hooks in the same U-Net call that makes the image (a compiled
U-Net too: the hooks are compiled in).
With classifier-free guidance that call's batch is [unconditional; conditional], and
sample i's features are row i of its half (the reference code interleaved samples
for batch > 1). The latent and timestep of that call are kept too: one U-Net pass on
them (``unet_features``) gives the same features again, which is how a dataset can
store 32 kB of latent instead of tens of MB of features per sample, and how features
of real, ungenerated images are made (encode, noise to the step, one pass).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn


def capture_modules(unet: nn.Module) -> list[nn.Module]:
    """The blocks whose outputs are captured, in U-Net order."""
    modules: list[nn.Module] = [unet.conv_in]
    for block in unet.down_blocks:
        modules += list(getattr(block, "attentions", None) or block.resnets)  # resnet+attention = one LDM block
        modules += list(block.downsamplers or [])
    modules.append(unet.mid_block)
    for block in unet.up_blocks:
        modules += list(getattr(block, "attentions", None) or block.resnets)
        modules += list(block.upsamplers or [])
    return modules


def _tensor(output) -> torch.Tensor:
    if isinstance(output, tuple):  # transformer blocks inside diffusers' blocks return (sample,)
        return output[0]
    return getattr(output, "sample", output)


class _BlockRecorder:
    """Forward hooks on a U-Net's captured blocks, installed once and left in place.

    A compiled U-Net traces the hooks it has at its first call and never sees hooks added
    later, so they must be there from the start; their one flag is the only state they read,
    so the U-Net compiles to two graphs (recording or not) and never breaks into eager code.
    """

    def __init__(self, unet: nn.Module):
        self.recording = False
        self.outputs: list[torch.Tensor] = []  # one list, cleared: a new one would be a new guard
        for module in capture_modules(unet):
            module.register_forward_hook(self._record)

    def _record(self, module, args, output):
        if self.recording:
            self.outputs.append(_tensor(output).detach())


_RECORDERS: weakref.WeakKeyDictionary[nn.Module, _BlockRecorder] = weakref.WeakKeyDictionary()


def block_recorder(unet: nn.Module) -> _BlockRecorder:
    """The U-Net's recorder (of the module inside, when ``unet`` is compiled), made at first use;
    ``factory.diffusion.fast`` makes it before compiling."""
    inner = getattr(unet, "_orig_mod", unet)
    if inner not in _RECORDERS:
        _RECORDERS[inner] = _BlockRecorder(inner)
    return _RECORDERS[inner]


class FeatureCapture:
    """Keeps the block outputs, input latent and timestep of one U-Net call.

    ``unet`` is what the pipeline calls (the module, or its compiled wrapper): hooks on it count
    the calls, outside any compiled graph, and switch the block recorder on for call ``call``.
    ``batch`` is the number of samples; a U-Net batch of twice that is a guidance batch
    [unconditional; conditional]. ``features``/``unconditional`` map a resolution to a
    (batch, channels, r, r) tensor, blocks concatenated in U-Net order.
    """

    def __init__(self, unet: nn.Module, call: int, batch: int, keep_unconditional: bool = False):
        self.unet, self.call, self.batch, self.keep_unconditional = unet, call, batch, keep_unconditional
        self.calls = 0
        self.latent: torch.Tensor | None = None
        self.timestep: int | None = None
        self._outputs: list[torch.Tensor] = []
        self._handles: list = []
        self._recorder = block_recorder(unet)

    def __enter__(self) -> "FeatureCapture":
        self._handles.append(self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True))
        self._handles.append(self.unet.register_forward_hook(self._after_unet))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recorder.recording = False
        self._recorder.outputs.clear()

    def _before_unet(self, module, args, kwargs):
        if self.calls == self.call:
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            self.latent = sample[-self.batch:].detach().clone()  # both halves hold the same latent
            self.timestep = int(torch.as_tensor(timestep).reshape(-1)[0])
            self._recorder.outputs.clear()
            self._recorder.recording = True

    def _after_unet(self, module, args, output):
        if self._recorder.recording:
            self._outputs = list(self._recorder.outputs)
            self._recorder.recording = False
            self._recorder.outputs.clear()
        self.calls += 1

    def _grouped(self, rows: slice) -> dict[int, torch.Tensor]:
        groups: dict[int, list[torch.Tensor]] = {}
        for tensor in self._outputs:
            groups.setdefault(tensor.shape[-1], []).append(tensor[rows])
        return {r: torch.cat(parts, dim=1) for r, parts in sorted(groups.items())}

    @property
    def features(self) -> dict[int, torch.Tensor]:
        if not self._outputs:
            raise RuntimeError(f"the U-Net was called {self.calls} times; call {self.call} never happened")
        return self._grouped(slice(-self.batch, None))  # the conditional half (or the whole batch)

    @property
    def unconditional(self) -> dict[int, torch.Tensor]:
        if self._outputs[0].shape[0] != 2 * self.batch:
            raise RuntimeError("no unconditional branch: generation ran without guidance")
        return self._grouped(slice(0, self.batch))


@torch.inference_mode()
def unet_features(unet: nn.Module, latent: torch.Tensor, timestep: int, conditioning: dict) -> dict[int, torch.Tensor]:
    """Features of one U-Net pass: the conditional branch of a generation's capture call,
    recomputed from its latent, or features of a real image's noised latent.

    ``latent`` (N, 4, h, w); ``conditioning``: the U-Net's keyword arguments for the N prompts,
    ``factory.diffusion.pipelines.unet_conditioning`` (SD: the (N, 77, D) text states; SDXL: also
    its pooled text and size ids, without which its U-Net does not run). Returns resolution ->
    (N, C_r, r, r)."""
    with FeatureCapture(unet, call=0, batch=len(latent)) as capture:
        unet(latent, timestep, **conditioning)
    return capture.features


def feature_channels(features: dict[int, torch.Tensor]) -> dict[int, int]:
    return {r: int(t.shape[1]) for r, t in features.items()}


def fp16_array(tensor: torch.Tensor) -> np.ndarray:
    """A captured tensor as the float16 numpy array a batch column holds."""
    return tensor.float().cpu().numpy().astype(np.float16)


def to_fp16_bytes(array: np.ndarray | torch.Tensor) -> bytes:
    """Raw float16 bytes (C, H, W order); Parquet's zstd compresses them further."""
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    return np.ascontiguousarray(array, dtype=np.float16).tobytes()


def from_fp16_bytes(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float16).reshape(shape)

"""Generator families: which diffusers pipeline a saved generator is, and what each can do here.

A recipe names a generator (``tiny``, a model id, a folder, an ``s3://`` prefix), never its kind:
the kind is the ``_class_name`` of the pipeline's saved ``model_index.json``, read before any
weight loads, as the open-vocabulary labeler reads its models' configs. No torch here: the
driver checks a recipe against its generator's family without loading a model.

- Stable Diffusion 1.x/2 (Rombach et al., 2022): the papers' generator; a U-Net, DDIM.
- SDXL (Podell et al., 2023): a larger U-Net, two text encoders, 1024 px.
- Stable Diffusion 3.5 (Esser et al., 2024): a multimodal diffusion transformer (MMDiT),
  rectified flow, three text encoders.
- FLUX.1 (Black Forest Labs, 2024): a rectified-flow transformer with distilled guidance.

The grounding module and DAAM read a U-Net's blocks and cross-attention (Li et al., ICCV 2023,
section 4.2; Tang et al., 2023), so only the U-Net families support capture and annotation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from factory.core.conventions import TINY
from factory.core.errors import FactoryError
from factory.core.storage import StorageError, first_line, is_s3, open_location


class GeneratorError(FactoryError, ValueError):
    """A generator this factory cannot use as asked; the message is one line."""


@dataclass(frozen=True)
class Family:
    key: str  # short name: sd, sdxl, sd3, flux
    title: str
    pipeline: str  # the diffusers pipeline class
    denoiser: str  # the pipeline's attribute holding it: "unet" or "transformer"
    flow: bool  # rectified flow: samples with its own flow-matching Euler scheduler, not DDIM
    guided_pairs: bool  # classifier-free guidance runs [unconditional; conditional] (FLUX.1's is distilled: one pass)
    size: int  # the resolution it was trained at (a side, pixels)
    gpu_dtype: str  # what dtype "auto" means on a GPU
    capture: bool  # U-Net feature capture and cross-attention: the grounding module, the annotator, DAAM

    @property
    def schedulers(self) -> tuple[str, ...]:
        return ("flow",) if self.flow else ("ddim", "dpm++", "lcm")


SD = Family("sd", "Stable Diffusion 1.x/2", "StableDiffusionPipeline", "unet", False, True, 512, "float16", True)
SDXL = Family("sdxl", "SDXL", "StableDiffusionXLPipeline", "unet", False, True, 1024, "float16", True)
SD3 = Family("sd3", "Stable Diffusion 3.5", "StableDiffusion3Pipeline", "transformer", True, True, 1024, "bfloat16",
             False)
FLUX = Family("flux", "FLUX.1", "FluxPipeline", "transformer", True, False, 1024, "bfloat16", False)
FAMILIES = {family.pipeline: family for family in (SD, SDXL, SD3, FLUX)}
CAPTURING = ", ".join(f.title for f in FAMILIES.values() if f.capture)


@dataclass(frozen=True)
class SavedGenerator:
    """What a generator's saved configs say, read without its weights."""
    source: str
    family: Family
    multiple: int  # image sides must be multiples of this: the VAE's downsampling (x the transformer's patch)


def read_generator(source: str) -> SavedGenerator:
    """The family and size rule of the generator ``source`` names (one-line errors)."""
    if source == TINY:
        return SavedGenerator(source, SD, 8)
    index = _read_json(source, "model_index.json")
    name = index.get("_class_name")
    if name not in FAMILIES:
        supported = "; ".join(f"{f.pipeline} ({f.title})" for f in FAMILIES.values())
        raise GeneratorError(f"generator {source} is a {name or 'pipeline of unknown class'}, which this factory "
                             f"does not run; supported: {supported}")
    family = FAMILIES[name]
    vae = _read_json(source, "vae/config.json")
    multiple = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    if family is FLUX:
        multiple *= 2  # latents are packed 2x2 into the transformer's tokens
    elif family is SD3:
        multiple *= int(_read_json(source, "transformer/config.json").get("patch_size", 2))
    return SavedGenerator(source, family, multiple)


def _read_json(source: str, name: str) -> dict:
    """A config file of a saved pipeline: a local folder, an s3:// prefix, or a model id (the hub's cache)."""
    looks_like_path = is_s3(source) or source.startswith((".", "/", "~")) or os.path.exists(source)
    if looks_like_path:
        location = open_location(source)
        try:
            if not location.exists(name):
                raise StorageError(f"model not found: {source}/{name}")
            return json.loads(location.read_bytes(name))
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read generator {source}/{name}: {first_line(exc)}") from None
    # A model id: the hub's cache, else one request (the hub client would retry for half a minute when offline).
    from huggingface_hub import get_session, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import build_hf_headers

    cached = try_to_load_from_cache(source, name)
    try:
        if isinstance(cached, str):
            with open(cached) as file:
                return json.load(file)
        response = get_session().get(hf_hub_url(source, name), headers=build_hf_headers(), follow_redirects=True,
                                     timeout=10)
        response.raise_for_status()
        return response.json()
    except Exception as exc:  # offline, gated (no token), unknown repository: the client's errors share no base
        raise StorageError(f"generator {source} is no local folder, and its {name} cannot be read from the Hugging "
                           f"Face Hub: {first_line(exc)}") from None

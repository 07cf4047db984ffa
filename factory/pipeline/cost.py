"""Cost model: GPU-hours, wall-clock hours and bytes of a build, from counted FLOPs and per-stage rates.

Pure functions of a recipe, a sample count, rates and a GPU count; nothing loads or runs (a generator
that is no counted model has its saved model_index.json read). `jobs/build_dataset.py --estimate`
prints it before any work starts.

The generator: each published model here has its TFLOP per forward pass (denoiser, VAE decoder,
text encoders) counted by bench/generator_flops.py from its published config, as an exact polynomial
of the image's megapixels (``Flops``). A recipe's model is one of them by its hub id; any other (a
folder, an s3:// prefix, another id) is timed as its family's counted model. A sample costs steps x
evaluations per step denoiser passes (2 with classifier-free guidance, [unconditional; conditional];
1 for FLUX.1, whose guidance is distilled into one pass), one decode, and the text encoders once per
prompt (twice with guidance: the empty negative prompt too).

Rates are SD 1.5's, per GPU at ``image_size`` (square), in the units `bench/gpu.py --out` writes:
single-image U-Net evaluations per second, VAE decodes per second, Mask R-CNN images per second,
open-vocabulary labeler images per second. Times SD 1.5's counted TFLOP at that size, the U-Net and
VAE rates are FLOP/s, at which every generator's denoiser (and text encoders) and VAE are assumed to
run: the public A100 anchor's by default; no generator but SD 1.5 has measured rates. The labelers'
rates scale with pixel count (convolutions), except the open-vocabulary labeler's: its models resize
every image to their own input size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.core.options import ConfigError, one_line
from factory.diffusion.families import FLUX, SD, SD3, SDXL, Family, read_generator
from factory.pipeline.labelers import labeler_for, labeler_of
from factory.pipeline.labelers.open_vocabulary import OPEN_VOCABULARY_TFLOP
from factory.pipeline.recipe import Recipe


@dataclass(frozen=True)
class Flops:
    """TFLOP of one forward pass at batch 1, at m megapixels: constant + linear * m + quadratic * m**2.

    Exact for these models, not an approximation: convolutions and linear layers grow with the
    pixels (the image tokens), self-attention with their square, and the text tokens are fixed
    (cross-attention and joint attention add to the linear and constant terms)."""
    constant: float
    linear: float
    quadratic: float

    def at(self, height: int, width: int) -> float:
        m = height * width / 1e6
        return self.constant + self.linear * m + self.quadratic * m * m


@dataclass(frozen=True)
class CountedGenerator:
    """A published generator's counted TFLOP, and the hub ids that name it."""
    name: str
    family: Family
    ids: tuple[str, ...]
    denoiser: Flops  # one evaluation
    vae: Flops  # one decode
    text: float  # every text encoder, one prompt (its pipeline's token count)

    def passes(self, guidance_scale: float) -> int:
        """Denoiser evaluations per step, and prompts encoded: the guided pair, or one."""
        return 2 if self.family.guided_pairs and guidance_scale > 1.0 else 1

    def tflop_per_image(self, steps: int, guidance_scale: float, height: int, width: int) -> float:
        passes = self.passes(guidance_scale)
        return steps * passes * self.denoiser.at(height, width) + self.vae.at(height, width) + passes * self.text


# Counted by `python -m bench.generator_flops` on 2026-12-07 (torch 2.14.1, diffusers 0.42.1,
# transformers 5.23.0): FlopCounterMode on each model built from its config on the meta device. SD
# 1.5's U-Net is factory.diffusion.pipelines.sd15_unet(); the other configs are written in the bench
# from memory of the published config.json files (not read: no download there), checked against the
# published parameter counts. FLUX.1-schnell is FLUX.1-dev without the guidance embedding. Each Flops is
# (constant, per megapixel, per megapixel squared) TFLOP; text is TFLOP per prompt, at the token counts the
# pipelines encode (CLIP 77; T5 256 for SD 3.5, 512 for FLUX.1).
SD15 = CountedGenerator("SD 1.5", SD, ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
                        Flops(0.003008, 2.5855, 1.7825), Flops(0, 9.4611, 0.5), 0.013299)
SDXL_BASE = CountedGenerator("SDXL base 1.0", SDXL, ("stabilityai/stable-diffusion-xl-base-1.0",),
                             Flops(0.052531, 5.6811, 0.68359), Flops(0, 9.4611, 0.5), 0.11116)
SD35_LARGE = CountedGenerator("SD 3.5 Large", SD3, ("stabilityai/stable-diffusion-3.5-large",
                                                     "stabilityai/stable-diffusion-3.5-large-turbo"),
                              Flops(1.8138, 22.035, 5.6406), Flops(0, 9.4628, 0.5), 2.5078)
SD35_MEDIUM = CountedGenerator("SD 3.5 Medium", SD3, ("stabilityai/stable-diffusion-3.5-medium",),
                               Flops(0.46048, 6.652, 3.4688), Flops(0, 9.4628, 0.5), 2.5078)
FLUX_DEV = CountedGenerator("FLUX.1-dev", FLUX, ("black-forest-labs/FLUX.1-dev",),
                            Flops(6.813, 53.235, 10.688), Flops(0, 9.4628, 0.5), 4.858)
FLUX_SCHNELL = CountedGenerator("FLUX.1-schnell", FLUX, ("black-forest-labs/FLUX.1-schnell",),
                                Flops(6.813, 53.235, 10.688), Flops(0, 9.4628, 0.5), 4.858)
COUNTED = (SD15, SDXL_BASE, SD35_LARGE, SD35_MEDIUM, FLUX_DEV, FLUX_SCHNELL)
REFERENCE = {SD: SD15, SDXL: SDXL_BASE, SD3: SD35_LARGE, FLUX: FLUX_DEV}  # a family's model of unknown size


def counted_generator(model: str) -> tuple[CountedGenerator, str | None]:
    """The counted generator ``model`` is, by its hub id; or its family's reference, the family read from its
    saved model_index.json (one-line errors), with a note saying so."""
    for counted in COUNTED:
        if model in counted.ids:
            return counted, None
    family = read_generator(model).family
    reference = REFERENCE[family]
    return reference, (f"generator {model} is timed as {reference.name}, the counted model of its family "
                       f"({family.title}); a model of another size costs otherwise")


class Rates(BaseModel):
    """Per-GPU throughput of each model stage at image_size x image_size: SD 1.5's U-Net and VAE, the labelers."""
    model_config = ConfigDict(extra="ignore")
    source: str = "given"
    image_size: int = Field(512, ge=8)
    unet_forwards_per_s: float = Field(..., gt=0)
    vae_images_per_s: float = Field(..., gt=0)
    label_images_per_s: float = Field(..., gt=0)
    # labeler.model open_vocabulary; unset (rates files from before it): Mask R-CNN's rate at the same FLOP/s
    open_vocabulary_images_per_s: float | None = Field(None, gt=0)
    measured: tuple[str, ...] = ()  # the rates a file gave (bench/gpu.py measured them); the others are anchors

    def origin(self, name: str) -> str:
        """Where a rate comes from, for the estimate's reader."""
        if name in self.measured:
            return "measured"
        if getattr(self, name) is None:
            return f"Mask R-CNN's rate at its FLOP, {self.origin('label_images_per_s')}"
        return "public anchor"

    def labeler_images_per_s(self, model: str) -> float:
        """The rate of the labeler named ``model``: its own, or Mask R-CNN's at the same FLOP/s when unset."""
        labeler = labeler_of(model)
        rate = getattr(self, labeler.rate)
        return rate if rate is not None else self.label_images_per_s * MASKRCNN_BENCH_TFLOP / labeler.tflop


# Public figure (docs/performance.md, "Public anchors"), not measured here: SD 1.5 on an A100, batch 16,
# torch.compile, about 1.3 images/s at 50 guided DDIM steps. At SD 1.5's counted TFLOP per such image, the
# FLOP/s every stage is assumed to reach (Mask R-CNN v2: 0.33 TFLOP an image, the public figure; it is
# under 1% of the cost either way). Measure your own with bench/gpu.py --out.
_A100_TFLOPS = 1.3 * SD15.tflop_per_image(50, 7.5, 512, 512)
MASKRCNN_BENCH_TFLOP = 0.667  # Mask R-CNN v2 as bench/gpu.py runs it (100 detections), for measured rates
DEFAULT_RATES = Rates(source="public A100 figures (docs/performance.md): 1.3 images/s at DDIM-50, batch 16, "
                      "torch.compile", image_size=512, unet_forwards_per_s=_A100_TFLOPS / SD15.denoiser.at(512, 512),
                      vae_images_per_s=_A100_TFLOPS / SD15.vae.at(512, 512), label_images_per_s=_A100_TFLOPS / 0.33,
                      open_vocabulary_images_per_s=_A100_TFLOPS / OPEN_VOCABULARY_TFLOP)

# Bytes per sample at 512x512, measured by bench/storage.py (docs/performance.md): a
# Parquet row (PNG image, palette PNG label, 1-bit PNG masks, zstd) of each product,
# and what capture adds to it. Scaled by pixel count for other sizes.
ORACLE_BYTES_512 = 392_327
SYNTHETIC_BYTES_512 = 398_017
LATENT_BYTES_512 = 30_305  # capture.features: latent (4 x 64 x 64, fp16)
FEATURE_BYTES_512 = 33_302_158  # capture.features: tensors, conditional branch, fp16 + zstd
FEATURE_VALUES_512 = 18_104_320  # SD 1.5 U-Net feature values per sample (8960/8320/4800/2560 channels at 8..64)


PART_BYTES_WARNING = 2e9  # a write task holds its whole part in memory


RATE_FIELDS = ("unet_forwards_per_s", "vae_images_per_s", "label_images_per_s", "open_vocabulary_images_per_s")


def load_rates(path: str | None) -> Rates:
    """Rates from a JSON file (`bench/gpu.py --out`, or a bare rates object), or the defaults.

    The file's rates are marked measured; a stage it lacks (a sweep that measured only the
    generator) takes the public anchor's rate, scaled to the file's image size."""
    if path is None:
        return DEFAULT_RATES
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read rates file {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"rates file {path} is not JSON: {exc}") from None
    try:
        given = data.get("rates", data) if isinstance(data, dict) else data
        if not isinstance(given, dict):
            raise ConfigError(f"rates file {path} holds no rates object")
        size = given.get("image_size", DEFAULT_RATES.image_size)
        size = size if isinstance(size, int) and size > 0 else DEFAULT_RATES.image_size  # else validation says why
        anchors = {"unet_forwards_per_s": _A100_TFLOPS / SD15.denoiser.at(size, size),
                   "vae_images_per_s": _A100_TFLOPS / SD15.vae.at(size, size),
                   "label_images_per_s": DEFAULT_RATES.label_images_per_s * (DEFAULT_RATES.image_size / size) ** 2}
        anchors = {name: rate for name, rate in anchors.items() if given.get(name) is None}
        measured = tuple(name for name in RATE_FIELDS if given.get(name) is not None)
        return Rates.model_validate({**given, **anchors, "measured": measured})
    except ValidationError as exc:
        raise ConfigError(f"rates file {path}: {one_line(exc, Rates)}") from None


def _area(recipe: Recipe, size: int = 512) -> float:
    return recipe.generator.height * recipe.generator.width / size ** 2


def tflops(rates: Rates) -> tuple[float, float]:
    """The FLOP/s (TFLOP/s) the rates imply for a denoiser and for a VAE: SD 1.5's rates at their size times
    its counted TFLOP there."""
    side = rates.image_size
    return rates.unet_forwards_per_s * SD15.denoiser.at(side, side), rates.vae_images_per_s * SD15.vae.at(side, side)


def seconds_per_sample(recipe: Recipe, rates: Rates, generator: CountedGenerator | None = None) -> dict[str, float]:
    """GPU-seconds per sample of each model stage (all of them run in one actor on one GPU); ``generator``
    the recipe's counted generator (default: ``counted_generator`` of its model)."""
    generator = generator or counted_generator(recipe.generator.model)[0]
    seconds = _making_seconds(recipe, rates, generator)
    if recipe.agreement.enabled:
        seconds["agreement"] = _label_seconds(recipe.agreement.labeler.model, recipe, rates)
    return seconds


def _making_seconds(recipe: Recipe, rates: Rates, generator: CountedGenerator) -> dict[str, float]:
    g = recipe.generator
    denoiser_tflops, vae_tflops = tflops(rates)
    evaluation = generator.denoiser.at(g.height, g.width) / denoiser_tflops
    decode = generator.vae.at(g.height, g.width) / vae_tflops
    prompt = generator.text / denoiser_tflops  # the text encoders are transformers too
    if recipe.source.enabled:  # a real image: VAE encode, then the route's U-Net calls (guidance 1)
        # inversion: steps calls up, steps down, and a decode of the regenerated image (its PSNR);
        # the encoder is counted as a decode, about twice its cost
        evaluations, vae = (2 * g.steps, 2) if recipe.source.route == "inversion" else (1, 1)
        return {"featurize+label": evaluations * evaluation + vae * decode + prompt}
    passes = generator.passes(g.guidance_scale)
    generate = g.steps * passes * evaluation + decode + passes * prompt
    if not labeler_for(recipe).own_stage:
        return {"generate+annotate": generate}
    return {"generate": generate, "label": _label_seconds(recipe.labeler.model, recipe, rates)}


def _label_seconds(model: str, recipe: Recipe, rates: Rates) -> float:
    scale = 1 if labeler_of(model).fixed_size else _area(recipe, rates.image_size)
    return scale / rates.labeler_images_per_s(model)


def bytes_per_sample(recipe: Recipe) -> float:
    """Bytes of one written Parquet row."""
    area, c = _area(recipe), recipe.capture
    total = (SYNTHETIC_BYTES_512 if recipe.annotator.enabled else ORACLE_BYTES_512) * area
    if c.features == "latent":
        total += LATENT_BYTES_512 * area
    elif c.features == "tensors":
        total += FEATURE_BYTES_512 * area * (2 if c.unconditional else 1)
    return total


def in_flight_bytes(recipe: Recipe) -> dict[str, float]:
    """Object-store bytes per batch. Every model of a sample runs in one actor on one GPU
    (factory/pipeline/actor.py ModelActor), so raw arrays never leave it: only encoded rows
    travel, a generator batch at a time, and the write tasks gather them into parts."""
    encoded = bytes_per_sample(recipe)
    return {"model actor -> write": recipe.generator.batch_size * encoded,
            "one Parquet part": recipe.writer.rows_per_file * encoded}


@dataclass
class Estimate:
    recipe: str
    generator: CountedGenerator
    samples: int
    gpus: int
    rates: Rates
    seconds_per_sample: dict[str, float]
    gpu_hours: dict[str, float]
    total_gpu_hours: float
    usable_gpus: int  # the model actors' pool can grow to this many GPUs; more sit idle
    wall_hours: float
    bytes_per_sample: float
    bytes_written: float
    in_flight_bytes: dict[str, float]
    usd: float | None = None
    notes: list[str] = field(default_factory=list)


def estimate(recipe: Recipe, samples: int, rates: Rates, gpus: int, usd_per_gpu_hour: float | None = None
             ) -> Estimate:
    """The build's cost on ``gpus`` GPUs: one model actor per GPU makes whole samples
    (generate, then label, on the same GPU), up to pool.max_size actors.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    generator, counted_as = counted_generator(recipe.generator.model)
    per_sample = seconds_per_sample(recipe, rates, generator)
    hours = {stage: samples * seconds / 3600 for stage, seconds in per_sample.items()}
    total = sum(hours.values())
    usable = recipe.pool.max_size
    notes = [counted_as] if counted_as else []
    if generator is not SD15 and "unet_forwards_per_s" in rates.measured:
        g, side = recipe.generator, rates.image_size
        ratio = generator.denoiser.at(g.height, g.width) / SD15.denoiser.at(side, side)
        notes.append(f"the rates file measured SD 1.5's U-Net: {generator.name}'s {_denoiser(generator)} evaluation "
                     f"at {g.width}x{g.height} counts {ratio:.3g}x its TFLOP at {side}x{side}, so it is timed at the "
                     f"measured rate / {ratio:.3g} (the same FLOP/s; a larger model may reach another share of the "
                     f"GPU's peak)")
    if gpus > usable:
        notes.append(f"pool.max_size is {usable}: {gpus - usable} of the {gpus} GPUs would sit idle")
    if note := labeler_for(recipe).cost_note:
        notes.append(note)
    if recipe.quality.model:
        notes.append("the CLIP quality stage is not counted")
    if recipe.capture.attention:
        notes.append("DAAM heat maps are not counted (a few kB and little compute per sample)")
    if recipe.capture.features == "tensors" and generator is not SD15:
        notes.append(f"captured feature bytes are SD 1.5's U-Net's at this size, not {generator.name}'s")
    if recipe.writer.image_format == "jpeg":
        notes.append("bytes are for PNG images; JPEG ones are smaller")
    per_row = bytes_per_sample(recipe)
    if per_row * recipe.writer.rows_per_file > PART_BYTES_WARNING:
        notes.append(f"a Parquet part holds {_size(per_row * recipe.writer.rows_per_file)} and passes through one "
                     f"write task's memory: lower writer.rows_per_file")
    return Estimate(recipe=recipe.name, generator=generator, samples=samples, gpus=gpus, rates=rates,
                    seconds_per_sample=per_sample, gpu_hours=hours, total_gpu_hours=total, usable_gpus=usable,
                    wall_hours=total / min(gpus, usable), bytes_per_sample=per_row, bytes_written=samples * per_row,
                    in_flight_bytes=in_flight_bytes(recipe),
                    usd=None if usd_per_gpu_hour is None else total * usd_per_gpu_hour, notes=notes)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000


def _denoiser(generator: CountedGenerator) -> str:
    return "U-Net" if generator.family.denoiser == "unet" else "transformer"


def _timing(e: Estimate) -> str:
    """What the generator's seconds rest on: measured rates, or counted FLOPs at a FLOP/s."""
    name, (denoiser, vae) = e.generator.name, tflops(e.rates)
    if "unet_forwards_per_s" not in e.rates.measured:
        return f"{name}'s counted FLOPs at the public A100 anchor's {denoiser:.4g} TFLOP/s (not measured)"
    if e.generator is SD15:
        return "measured: the rates file's SD 1.5 rates (other sizes scaled by its counted FLOPs)"
    return (f"{name}'s counted FLOPs at the FLOP/s measured on SD 1.5 (rates file): {denoiser:.4g} TFLOP/s "
            f"({_denoiser(e.generator)}, text encoders), {vae:.4g} (VAE); {name}'s own rates not measured")


def format_estimate(e: Estimate, recipe: Recipe) -> str:
    g, labeler_rate = recipe.generator, e.rates.labeler_images_per_s(recipe.labeler.model)
    counted, passes = e.generator, e.generator.passes(g.guidance_scale)
    lines = [f"Estimate for {e.recipe}: {e.samples:,} samples, {g.width}x{g.height}, {g.steps} steps, "
             f"guidance {g.guidance_scale}, on {e.gpus} GPU(s)",
             f"  generator {counted.family.title} ({g.model}), counted TFLOP of {counted.name}: "
             f"{_denoiser(counted)} {counted.denoiser.at(g.height, g.width):.4g} per evaluation, {passes} per step; "
             f"VAE decode {counted.vae.at(g.height, g.width):.4g}; text encoders {counted.text:.3g} per prompt, "
             f"{passes} per image; {counted.tflop_per_image(g.steps, g.guidance_scale, g.height, g.width):,.1f} "
             f"per image",
             f"  rates     {e.rates.source}, per GPU at {e.rates.image_size}x{e.rates.image_size}: "
             f"SD 1.5 U-Net {e.rates.unet_forwards_per_s:.4g}/s ({e.rates.origin('unet_forwards_per_s')}), "
             f"VAE {e.rates.vae_images_per_s:.4g}/s ({e.rates.origin('vae_images_per_s')}), "
             f"labeler {labeler_rate:.4g}/s ({e.rates.origin(labeler_of(recipe.labeler.model).rate)})",
             f"  timing    {_timing(e)}"]
    for stage, hours in e.gpu_hours.items():
        lines.append(f"  {stage:<18}{e.seconds_per_sample[stage]:9.3f} GPU-s per sample {hours:10.2f} GPU-hours")
    lines.append(f"  total     {e.total_gpu_hours:.2f} GPU-hours ({e.total_gpu_hours / 24:.2f} GPU-days)"
                 + (f", ${e.usd:,.0f}" if e.usd is not None else ""))
    lines.append(f"  wall      {e.wall_hours:.2f} h of model time on {min(e.gpus, e.usable_gpus)} GPU(s) "
                 f"(one model actor per GPU; start-up adds minutes)")
    lines.append(f"  storage   {_size(e.bytes_per_sample)} per sample, {_size(e.bytes_written)} written")
    lines.append("  in flight " + "; ".join(f"{edge} {_size(b)}" for edge, b in e.in_flight_bytes.items())
                 + " (object store)")
    lines += [f"  note      {note}" for note in e.notes]
    return "\n".join(lines)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value
    parse.__name__ = f"positive {kind.__name__}"  # argparse names the type in its error
    return parse


def add_estimate_arguments(parser) -> None:
    group = parser.add_argument_group("cost estimate (prints and exits: no Ray, no model, nothing written)")
    group.add_argument("--estimate", action="store_true", help="print GPU-hours, wall-clock and bytes, then exit")
    group.add_argument("--gpus", type=_positive(int), default=8, help="GPUs in the cluster (default: 8)")
    group.add_argument("--rates", help="per-stage rates JSON from bench/gpu.py --out, measured on SD 1.5; other "
                       "generators are timed by their counted FLOPs at the FLOP/s it implies (default: public A100 "
                       "figures)")
    group.add_argument("--usd-per-gpu-hour", type=_positive(float), help="price of a GPU-hour, to print the cost")

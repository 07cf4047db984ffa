"""Cost model: GPU-hours, wall-clock hours and bytes of a build, from per-stage rates.

Pure functions of a recipe, a sample count, measured rates and a GPU count; nothing
loads or runs. `jobs/build_dataset.py --estimate` prints it before any work starts.

Rates are per GPU at ``image_size`` (square), in the units `bench/gpu.py --out` writes:
single-image U-Net evaluations per second (a guided denoising step costs two), VAE
decodes per second, Mask R-CNN images per second, open-vocabulary labeler images per second.
Other resolutions scale by pixel count (convolutions are linear in pixels; attention grows
faster, so large images come out optimistic), except the open-vocabulary labeler's: its
models resize every image to their own input size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.core.options import ConfigError, one_line
from factory.pipeline.labelers import labeler_for, labeler_of
from factory.pipeline.labelers.open_vocabulary import OPEN_VOCABULARY_TFLOP
from factory.pipeline.recipe import Recipe


class Rates(BaseModel):
    """Per-GPU throughput of each model stage at image_size x image_size."""
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


# Public figures (docs/performance.md, "Public anchors"), not measured here: A100, batch 16, torch.compile, about
# 1.3 images/s with 50 guided DDIM steps (100 U-Net evaluations of 0.84 TFLOP, one 2.5 TFLOP
# decode). The stages are assumed to reach the same FLOP/s (Mask R-CNN v2: 0.33 TFLOP an
# image; it is under 1% of the cost either way). Measure your own with bench/gpu.py --out.
_A100_TFLOPS = 1.3 * (100 * 0.84 + 2.5)
MASKRCNN_BENCH_TFLOP = 0.667  # Mask R-CNN v2 as bench/gpu.py runs it (100 detections), for measured rates
DEFAULT_RATES = Rates(source="public A100 figures (docs/performance.md): 1.3 images/s at DDIM-50, batch 16, "
                      "torch.compile", image_size=512, unet_forwards_per_s=_A100_TFLOPS / 0.84,
                      vae_images_per_s=_A100_TFLOPS / 2.5, label_images_per_s=_A100_TFLOPS / 0.33,
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
        scale = (DEFAULT_RATES.image_size / size) ** 2 if isinstance(size, int) and size > 0 else 1.0
        anchors = {name: getattr(DEFAULT_RATES, name) * scale for name in RATE_FIELDS[:3] if given.get(name) is None}
        measured = tuple(name for name in RATE_FIELDS if given.get(name) is not None)
        return Rates.model_validate({**given, **anchors, "measured": measured})
    except ValidationError as exc:
        raise ConfigError(f"rates file {path}: {one_line(exc, Rates)}") from None


def _area(recipe: Recipe, size: int = 512) -> float:
    return recipe.generator.height * recipe.generator.width / size ** 2


def seconds_per_sample(recipe: Recipe, rates: Rates) -> dict[str, float]:
    """GPU-seconds per sample of each model stage (all of them run in one actor on one GPU)."""
    seconds = _making_seconds(recipe, rates)
    if recipe.agreement.enabled:
        seconds["agreement"] = _label_seconds(recipe.agreement.labeler.model, recipe, rates)
    return seconds


def _making_seconds(recipe: Recipe, rates: Rates) -> dict[str, float]:
    g = recipe.generator
    scale = _area(recipe, rates.image_size)
    if recipe.source.enabled:  # a real image: VAE encode, then the route's U-Net calls (guidance 1)
        # inversion: steps calls up, steps down, and a decode of the regenerated image (its PSNR);
        # the encoder is counted as a decode, about twice its cost
        evaluations, vae = (2 * g.steps, 2) if recipe.source.route == "inversion" else (1, 1)
        return {"featurize+label": scale * (evaluations / rates.unet_forwards_per_s + vae / rates.vae_images_per_s)}
    evaluations = g.steps * (2 if g.guidance_scale > 1.0 else 1)  # guidance: unconditional + conditional
    generate = scale * (evaluations / rates.unet_forwards_per_s + 1 / rates.vae_images_per_s)
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
    per_sample = seconds_per_sample(recipe, rates)
    hours = {stage: samples * seconds / 3600 for stage, seconds in per_sample.items()}
    total = sum(hours.values())
    usable = recipe.pool.max_size
    notes = []
    if gpus > usable:
        notes.append(f"pool.max_size is {usable}: {gpus - usable} of the {gpus} GPUs would sit idle")
    if note := labeler_for(recipe).cost_note:
        notes.append(note)
    if recipe.quality.model:
        notes.append("the CLIP quality stage is not counted")
    if recipe.capture.attention:
        notes.append("DAAM heat maps are not counted (a few kB and little compute per sample)")
    if recipe.writer.image_format == "jpeg":
        notes.append("bytes are for PNG images; JPEG ones are smaller")
    per_row = bytes_per_sample(recipe)
    if per_row * recipe.writer.rows_per_file > PART_BYTES_WARNING:
        notes.append(f"a Parquet part holds {_size(per_row * recipe.writer.rows_per_file)} and passes through one "
                     f"write task's memory: lower writer.rows_per_file")
    return Estimate(recipe=recipe.name, samples=samples, gpus=gpus, rates=rates, seconds_per_sample=per_sample,
                    gpu_hours=hours, total_gpu_hours=total, usable_gpus=usable, wall_hours=total / min(gpus, usable),
                    bytes_per_sample=per_row, bytes_written=samples * per_row, in_flight_bytes=in_flight_bytes(recipe),
                    usd=None if usd_per_gpu_hour is None else total * usd_per_gpu_hour, notes=notes)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000


def format_estimate(e: Estimate, recipe: Recipe) -> str:
    g, labeler_rate = recipe.generator, e.rates.labeler_images_per_s(recipe.labeler.model)
    lines = [f"Estimate for {e.recipe}: {e.samples:,} samples, {g.width}x{g.height}, {g.steps} steps, "
             f"guidance {g.guidance_scale}, on {e.gpus} GPU(s)",
             f"  rates     {e.rates.source}, per GPU at {e.rates.image_size}x{e.rates.image_size}: "
             f"U-Net {e.rates.unet_forwards_per_s:.4g}/s ({e.rates.origin('unet_forwards_per_s')}), "
             f"VAE {e.rates.vae_images_per_s:.4g}/s ({e.rates.origin('vae_images_per_s')}), "
             f"labeler {labeler_rate:.4g}/s ({e.rates.origin(labeler_of(recipe.labeler.model).rate)})"]
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
    group.add_argument("--rates", help="per-stage rates JSON from bench/gpu.py --out (default: public A100 figures)")
    group.add_argument("--usd-per-gpu-hour", type=_positive(float), help="price of a GPU-hour, to print the cost")

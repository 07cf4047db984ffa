"""Images per second of each model stage, and the fraction of the GPU's peak FLOP/s.

Real Stable Diffusion 1.5 and Mask R-CNN shapes, built from their configs with random
weights (the cost of a forward pass does not depend on the weights' values):

- unet: one guided U-Net call, [unconditional; conditional] for a batch of B images
  (SD 1.5: 320/640/1280/1280 channels, cross-attention 768, 64x64 latent);
- vae: the VAE decoder, B latents to 512x512 images (128/256/512/512);
- maskrcnn: torchvision's maskrcnn_resnet50_fpn_v2 on B images, score threshold 0
  (every candidate reaches the mask head: the most it can cost);
- generate: the whole diffusers pipeline call (text encoder, N steps, decoder) with
  DDIM-50 and with DPM-Solver++-25, beside the rate the stage rates predict for it;
- sam3, owlv2+sam: the open-vocabulary labeler (factory/pipeline/openvocab.py, its own call:
  processors, models, post-processing) on B 512x512 images, each asked for two classes
  ("dog", "cat": a two-class prompt), score threshold 0, the 4 best instances kept. sam3:
  Sam3Config() defaults, which are facebook/sam3's sizes (ViT 1024 wide, 32 layers at 1008 px;
  CLIP text tower 1024 x 24; DETR encoder and decoder 6 layers each, 200 queries per text).
  owlv2+sam: Owlv2Config() defaults (B/16 towers, owlv2-base-patch16) at that checkpoint's
  960 px, then SAM at sam-vit-huge's sizes (ViT-H: 1280 wide, 32 layers at 1024 px; SamConfig()
  defaults are ViT-B) on the 4 boxes. Not compiled (Python between the models).

- factory: the factory's own generator stage (factory/pipeline/generate.py:GenerateStage, loaded
  from a saved pipeline folder as a build loads it), DDIM, beside the bare pipeline call of the
  same configuration: what the factory's plumbing costs.

For each fast path (recipe section `fast`: math or SDPA attention, channels-last, torch.compile
of the U-Net), batch size and capture off/on: seconds per call, images/s, TFLOP per image
(counted by torch.utils.flop_counter.FlopCounterMode on one forward, attention included on a
CPU too), achieved TFLOP/s and its fraction of the device's peak (a table of known GPUs, or
--peak-tflops). Capture on: the U-Net's block outputs are recorded (unet: at that call;
generate, factory: at DDIM's t=5, the factory as a build stores them, fp16 on the CPU).
Float16 on CUDA, float32 on a CPU. ``--out rates.json`` writes every measurement as it is made
(a run stopped by --budget-seconds or a timeout keeps what it measured) and the best rate of
each stage in the form factory/cost.py reads (``jobs/build_dataset.py --estimate --rates``);
``--markdown`` the table. bench/gpu_sweep.sh runs the whole sweep on a GPU.

    python bench/gpu.py --out rates.json                        # on a GPU: every stage, path, batch
    python bench/gpu.py --small                                 # tiny models, 64x64, 2/1 steps (the smoke test)
    python bench/gpu.py --stages unet,vae,maskrcnn --batch-sizes 1 --paths sdpa   # real shapes, on a CPU
    python bench/gpu.py --stages sam3,owlv2+sam --batch-sizes 1 --repeats 1        # the open-vocabulary labeler
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from factory.core.vocab import VOC
from factory.detection.detections import Detector
from factory.detection.maskrcnn import COCO_LABELS, tiny_maskrcnn
from factory.diffusion.fast import apply_fast_paths
from factory.diffusion.features import FeatureCapture
from factory.diffusion.pipelines import sd15_unet
from factory.diffusion.schedulers import sd_scheduler
from factory.diffusion.tiny import tiny_pipeline, tiny_tokenizer
from factory.pipeline.generate import GenerateStage
from factory.pipeline.sections import CaptureConfig, FastConfig, GeneratorConfig, LabelerConfig

LABELERS = ("sam3", "owlv2+sam")  # the open-vocabulary labeler's routes
STAGES = ("unet", "vae", "maskrcnn", "generate", "factory", *LABELERS)
CAPTURING = ("unet", "generate", "factory")  # the stages measured with capture on too
# The fast paths, as recipe `fast` sections; "math" is the reference.
PATHS = {"math": FastConfig(attention="math"), "sdpa": FastConfig(),
         "sdpa+cl": FastConfig(channels_last=True), "compiled": FastConfig(channels_last=True, compile="default")}
PATHLESS = ("maskrcnn", *LABELERS)  # not Stable Diffusion: measured once, as they run
LABELER_INSTANCES = 4  # instances kept per image (boxes SAM segments): a two-object image and a duplicate each

# Dense float16/bfloat16 tensor-core TFLOP/s (fp32 accumulation), from the vendors' data sheets;
# A10G from Baseten's A10 vs A10G comparison. The first name contained in the device's name wins.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0,
               "A10G": 70.0, "A10": 125.0, "L4": 121.0, "T4": 65.0, "V100": 125.0, "RTX 4090": 165.0,
               "RTX 3090": 71.0}


def sd15_pipeline() -> StableDiffusionPipeline:
    """Stable Diffusion 1.5 from its configs, random weights; the tiny tokenizer (no download)."""
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, sample_size=512)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=sd15_unet(),
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def real_maskrcnn() -> torch.nn.Module:
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=COCO_LABELS)


def open_vocabulary_labeler(route: str, small: bool, device: torch.device, dtype: torch.dtype) -> Detector:
    """A route of the open-vocabulary labeler at real sizes (module docstring), or the tiny models
    of the tests; random weights, tokenizers built offline (the token count is what costs)."""
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        Sam3Config,
        Sam3ImageProcessor,
        Sam3Model,
        Sam3Processor,
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
    )

    from factory.pipeline import openvocab

    config = LabelerConfig(model="open_vocabulary", weights="built here", score_threshold=0.0)
    if route == "sam3":
        model, processor = openvocab.tiny_sam3() if small else (
            Sam3Model(Sam3Config()), Sam3Processor(Sam3ImageProcessor(), openvocab.tiny_clip_tokenizer(32)))
        return openvocab.Sam3Detector(model.to(device, dtype), processor, config, LABELER_INSTANCES)
    if small:
        (detector, detector_processor), (sam, sam_processor) = openvocab.tiny_owlv2(), openvocab.tiny_sam()
    else:
        detector = Owlv2ForObjectDetection(Owlv2Config(vision_config={"image_size": 960}))  # owlv2-base-patch16's
        detector_processor = Owlv2Processor(Owlv2ImageProcessor(), openvocab.tiny_clip_tokenizer(16))
        sam = SamModel(SamConfig(vision_config={"hidden_size": 1280, "num_hidden_layers": 32,  # sam-vit-huge
                                                "num_attention_heads": 16, "global_attn_indexes": [7, 15, 23, 31]}))
        sam_processor = SamProcessor(SamImageProcessor())
    return openvocab.GroundedSamDetector(detector.to(device, dtype), detector_processor, sam.to(device, dtype),
                                         sam_processor, config, LABELER_INSTANCES)


@dataclass
class Measurement:
    stage: str
    batch: int
    path: str  # a PATHS name, "-" for the stages it does not apply to
    capture: bool
    seconds_per_call: float
    images_per_s: float  # for unet: single-image U-Net evaluations per second (a guided step is 2)
    tflop_per_image: float
    achieved_tflops: float
    fraction_of_peak: float | None
    scheduler: str = ""
    steps: int = 0
    predicted_images_per_s: float | None = None  # generate: what the unet and vae rates predict
    bare_images_per_s: float | None = None  # factory: the bare pipeline call of the same configuration


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _attention_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# A CPU runs scaled_dot_product_attention as an op FlopCounterMode has no formula for (it has
# CUDA's): without this, attention is not counted on a CPU (SD 1.5's U-Net: 0.677 TFLOP, not 0.803).
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flop}


def count_tflop(fn) -> float:
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call after one warm-up call (compilation, cuDNN autotuning, caches)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def eager_path(path: str) -> str:
    """The path whose modules FLOPs are counted on: compiled graphs hide their operations from the counter."""
    return path.replace("compiled", "sdpa+cl")


def capture_step(steps: int) -> int:
    """DDIM's t=5, or the last step of a shorter run (--small)."""
    return min(5, steps)


class Bench:
    """The models once per fast path, on one device and dtype; one method per stage."""

    def __init__(self, small: bool, device: torch.device, dtype: torch.dtype, backend: str):
        self.small, self.device, self.dtype, self.backend = small, device, dtype, backend
        self.size = 64 if small else 512
        self.latent_side = self.size // (2 if small else 8)  # the VAE's downsampling: the tiny one's 2 blocks, SD's 4
        self.labelers: dict[str, Detector] = {}
        self.pipes: dict[str, StableDiffusionPipeline] = {}
        self.stages: dict[tuple[str, bool], GenerateStage] = {}

    def pipe(self, path: str) -> StableDiffusionPipeline:
        """Stable Diffusion with the path's fast paths; built when a stage first needs it."""
        if path not in self.pipes:
            fast = PATHS[path]
            torch.manual_seed(0)
            pipe = (tiny_pipeline() if self.small else sd15_pipeline()).to(self.device, self.dtype)
            pipe.set_progress_bar_config(disable=True)
            self.pipes[path] = apply_fast_paths(pipe, attention=fast.attention, channels_last=fast.channels_last,
                                                compile=fast.compile, backend=self.backend)
        return self.pipes[path]

    @cached_property
    def saved(self) -> str:
        """The pipeline saved as a build loads one: a diffusers folder of safetensors."""
        if self.small:
            return "tiny"
        folder = tempfile.mkdtemp(prefix="bench-sd15-")
        torch.manual_seed(0)
        sd15_pipeline().to(dtype=self.dtype).save_pretrained(folder, safe_serialization=True)
        return folder

    @cached_property
    def detector(self) -> torch.nn.Module:
        torch.manual_seed(0)
        detector = (tiny_maskrcnn(64) if self.small else real_maskrcnn()).to(self.device, self.dtype).eval()
        detector.roi_heads.score_thresh = 0.0
        return detector

    def module(self, stage: str, path: str):
        if stage in LABELERS:
            if stage not in self.labelers:
                torch.manual_seed(0)
                self.labelers[stage] = open_vocabulary_labeler(stage, self.small, self.device, self.dtype)
            return self.labelers[stage]
        return {"unet": lambda: self.pipe(path).unet, "vae": lambda: self.pipe(path).vae.decoder,
                "maskrcnn": lambda: self.detector}[stage]()

    def call(self, stage: str, batch: int, module, capture: bool = False) -> Callable[[], object]:
        """A zero-argument forward of ``module`` for a batch of images."""
        make = lambda *shape: torch.randn(*shape, device=self.device, dtype=self.dtype)  # noqa: E731
        if stage == "unet":
            side = self.latent_side
            text = make(2 * batch, 77, module.config.cross_attention_dim)
            latent = make(2 * batch, 4, side, side)
            if not capture:
                return lambda: module(latent, 801, encoder_hidden_states=text)

            def captured():
                with FeatureCapture(module, call=0, batch=batch) as hooks:
                    module(latent, 801, encoder_hidden_states=text)
                return hooks.features
            return captured
        if stage == "vae":
            side = self.latent_side
            latent = make(batch, 4, side, side)
            return lambda: module(latent)
        if stage in LABELERS:
            images = np.random.default_rng(0).integers(0, 256, (batch, self.size, self.size, 3), dtype=np.uint8)
            return lambda: module(images, [[VOC.lookup("dog"), VOC.lookup("cat")]] * batch)
        images = [torch.rand(3, self.size, self.size, device=self.device, dtype=self.dtype) for _ in range(batch)]
        return lambda: module(images)

    @torch.inference_mode()
    def stage(self, stage: str, batch: int, path: str, capture: bool, repeats: int,
              peak: float | None) -> Measurement:
        eager = "sdpa" if stage in PATHLESS else eager_path(path)
        tflop = count_tflop(self.call(stage, 1, self.module(stage, eager)))
        if stage == "unet":
            tflop /= 2  # the one-image call is a guided pair
        seconds = timed(self.call(stage, batch, self.module(stage, path), capture), self.device, repeats)
        per_s = (2 * batch if stage == "unet" else batch) / seconds
        return Measurement(stage, batch, "-" if stage in PATHLESS else path, capture, seconds, per_s, tflop,
                           tflop * per_s, tflop * per_s / peak if peak else None)

    def run(self, path: str, scheduler: str, steps: int, capture: bool) -> Callable[[int], object]:
        """The bare pipeline call for n images (capture: at DDIM's t=5, or its first call)."""
        pipe = self.pipe(path)
        ddim = sd_scheduler()
        pipe.scheduler = ddim if scheduler == "ddim" else DPMSolverMultistepScheduler.from_config(
            ddim.config, algorithm_type="dpmsolver++")

        def run(n: int):
            hooks = FeatureCapture(pipe.unet, steps - capture_step(steps), n) if capture else contextlib.nullcontext()
            with hooks:
                return pipe(prompt=["a photograph of a dog and a sofa"] * n, num_inference_steps=steps,
                            guidance_scale=7.5, height=self.size, width=self.size, output_type="np")
        return run

    @torch.inference_mode()
    def generate(self, scheduler: str, steps: int, batch: int, path: str, capture: bool, repeats: int,
                 peak: float | None, unet_rate: float | None, vae_rate: float | None) -> Measurement:
        tflop = count_tflop(lambda: self.run(eager_path(path), scheduler, steps, False)(1))
        run = self.run(path, scheduler, steps, capture)
        seconds = timed(lambda: run(batch), self.device, repeats)
        per_s = batch / seconds
        predicted = 1 / (2 * steps / unet_rate + 1 / vae_rate) if unet_rate and vae_rate else None
        return Measurement("generate", batch, path, capture, seconds, per_s, tflop, tflop * per_s,
                           tflop * per_s / peak if peak else None, scheduler, steps, predicted)

    def factory(self, steps: int, batch: int, path: str, capture: bool, repeats: int, peak: float | None,
                bare: Measurement | None) -> Measurement:
        """The factory's GenerateStage on plan-like batches: loading, phases, capture to fp16 on the CPU."""
        if (path, capture) not in self.stages:
            config = GeneratorConfig(model=self.saved, steps=steps, height=self.size, width=self.size,
                                     batch_size=batch, dtype=str(self.dtype).removeprefix("torch."))
            kept = CaptureConfig(features="tensors", step=capture_step(steps)) if capture else CaptureConfig()
            fast = PATHS[path]
            stage = GenerateStage(config, kept, fast.model_copy(update={"compile": "off"}), load_attempts=1)
            # compiled as the recipe would, with this bench's backend (aot_eager in the CPU tests)
            apply_fast_paths(stage.pipe, attention=fast.attention, channels_last=fast.channels_last,
                             compile=fast.compile, backend=self.backend)
            self.stages[path, capture] = stage
        stage = self.stages[path, capture]
        rows = {"prompt": np.array(["a photograph of a dog and a sofa"] * batch, dtype=object),
                "seed": np.arange(batch, dtype=np.int64)}
        seconds = timed(lambda: stage(dict(rows)), self.device, repeats)
        per_s = batch / seconds
        tflop = bare.tflop_per_image if bare else float("nan")
        return Measurement("factory", batch, path, capture, seconds, per_s, tflop, tflop * per_s,
                           tflop * per_s / peak if peak and bare else None, "ddim", steps,
                           bare_images_per_s=bare.images_per_s if bare else None)


def best_rates(measurements: list[Measurement], device_name: str, dtype: str, image_size: int) -> dict:
    """The fastest configuration of each stage without capture, in the form factory/cost.py reads."""
    def best(stage: str) -> float | None:
        rates = [m.images_per_s for m in measurements if m.stage == stage and not m.capture]
        return max(rates) if rates else None

    # open_vocabulary's route is a matter of its saved models, not of the recipe: the slower route measured
    open_vocabulary = [best(stage) for stage in LABELERS if best(stage) is not None]
    rates = {"unet_forwards_per_s": best("unet"), "vae_images_per_s": best("vae"),
             "label_images_per_s": best("maskrcnn"),
             "open_vocabulary_images_per_s": min(open_vocabulary) if open_vocabulary else None}
    return {"source": f"bench/gpu.py on {device_name}, {dtype}",
            "image_size": image_size, **{key: value for key, value in rates.items() if value is not None}}


COLUMNS = ("stage", "path", "capture", "batch", "s/call", "img/s", "TFLOP/img", "TFLOP/s", "of peak", "predicted",
           "vs bare")


def table_rows(measurements: list[Measurement]) -> list[list[str]]:
    """One row of COLUMNS per measurement. unet's img/s are single-image forwards (a guided step is 2);
    predicted: a generate rate from the unet and vae rates; vs bare: the factory's stage over the bare call."""
    rows = []
    for m in measurements:
        name = m.stage + (f" {m.scheduler}-{m.steps}" if m.stage in ("generate", "factory") else "")
        rows.append([name, m.path, "on" if m.capture else "off", str(m.batch), f"{m.seconds_per_call:.3f}",
                     f"{m.images_per_s:.3g}", f"{m.tflop_per_image:.3g}", f"{m.achieved_tflops:.3g}",
                     f"{m.fraction_of_peak:.1%}" if m.fraction_of_peak is not None else "-",
                     f"{m.predicted_images_per_s:.3g}" if m.predicted_images_per_s else "-",
                     f"{m.images_per_s / m.bare_images_per_s:.2f}" if m.bare_images_per_s else "-"])
    return rows


def ratios(measurements: list[Measurement]) -> list[str]:
    """Speed-ups measured in this run: each fast path over math attention, capture's cost, DPM-Solver++
    over DDIM, and the factory's stage over the bare pipeline call."""
    lines = []
    by = {(m.stage, m.scheduler, m.batch, m.path, m.capture): m for m in measurements}
    for (stage, scheduler, batch, path, capture), m in by.items():
        reference = by.get((stage, scheduler, batch, "math", capture))
        if reference and path != "math" and not capture:
            lines.append(f"{path} / math, {stage} {scheduler} batch {batch}: "
                         f"{m.images_per_s / reference.images_per_s:.2f}x")
        plain = by.get((stage, scheduler, batch, path, False))
        if capture and plain:
            lines.append(f"capture on / off, {stage} {scheduler} {path} batch {batch}: "
                         f"{m.images_per_s / plain.images_per_s:.2f}x")
        ddim = by.get((stage, "ddim", batch, path, capture))
        if scheduler == "dpm" and ddim:
            lines.append(f"DPM-Solver++-{m.steps} / DDIM-{ddim.steps} images/s ({path}, batch {batch}, capture "
                         f"{'on' if capture else 'off'}): {m.images_per_s / ddim.images_per_s:.2f}x")
        if m.bare_images_per_s:
            lines.append(f"factory / bare pipeline, {path} batch {batch} capture {'on' if capture else 'off'}: "
                         f"{m.images_per_s / m.bare_images_per_s:.2f}x")
    return lines


def print_table(measurements: list[Measurement], device_name: str, peak: float | None) -> None:
    print(f"\ndevice: {device_name}; peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown (give --peak-tflops)'}")
    widths = [22, 9, 8, 6, 9, 10, 10, 9, 8, 10, 8]
    print("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(COLUMNS, widths))))
    for row in table_rows(measurements):
        print("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))
    for line in ratios(measurements):
        print(line)


def markdown(measurements: list[Measurement], device_name: str, dtype: str, peak: float | None) -> str:
    lines = [f"Measured by bench/gpu.py on {device_name}, {dtype}, "
             f"{time.strftime('%Y-%m-%d')}; peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(measurements)]
    return "\n".join(lines + [""] + [f"- {line}" for line in ratios(measurements)]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny models at 64x64, DDIM-2 and DPM-Solver++-1")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--batch-sizes", help="comma list (default: 1,4,8,16,32; --small: 1,2)")
    parser.add_argument("--paths", help=f"comma list of fast paths: {', '.join(PATHS)} (default: all on CUDA; "
                        "sdpa on a CPU)")
    parser.add_argument("--capture", choices=("off", "on", "both"), default="both",
                        help=f"capture on the {', '.join(CAPTURING)} stages")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for the compiled path (aot_eager: tracing only, for tests)")
    parser.add_argument("--ddim-steps", type=int, help="DDIM steps for generate (default 50; --small 2)")
    parser.add_argument("--dpm-steps", type=int, help="DPM-Solver++ steps for generate (default 25; --small 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration after a warm-up")
    parser.add_argument("--budget-seconds", type=float, help="start no configuration after this long")
    parser.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                        help="'auto': float16 on CUDA, float32 on a CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (default: from the table)")
    parser.add_argument("--out", help="write per-stage rates and every measurement to this JSON file, as they come")
    parser.add_argument("--markdown", help="write the table and the measured ratios to this Markdown file")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="measure nothing: merge these --out files "
                        "(bench/gpu_sweep.sh's phases) into one --out and --markdown")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(args.stages) - set(STAGES)
    if unknown or not args.stages:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if args.paths is not None:
        args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        if not args.paths or set(args.paths) - set(PATHS):
            parser.error(f"unknown paths {sorted(set(args.paths) - set(PATHS))}; choose from {', '.join(PATHS)}")
    try:
        sizes = args.batch_sizes or ("1,2" if args.small else "1,4,8,16,32")
        args.batch_sizes = [int(b) for b in sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be a comma list of integers, got {args.batch_sizes!r}")
    if min(args.batch_sizes) < 1 or args.repeats < 1:
        parser.error("batch sizes and --repeats must be at least 1")
    args.ddim_steps = args.ddim_steps or (2 if args.small else 50)
    args.dpm_steps = args.dpm_steps or (1 if args.small else 25)
    return args


def sweep(args: argparse.Namespace, device: torch.device) -> list[tuple[str, int, str, bool]]:
    """(stage, batch, path, capture) in the order measured: by path, so that each path's models are
    built (and compiled) once; stages without paths with the first."""
    paths = args.paths or (list(PATHS) if device.type == "cuda" else ["sdpa"])
    captures = {"off": [False], "on": [True], "both": [False, True]}[args.capture]
    return [(stage, batch, path, capture) for path in paths for stage in args.stages for batch in args.batch_sizes
            for capture in (captures if stage in CAPTURING else [False])
            if stage not in PATHLESS or path == paths[0]]


def write_report(args: argparse.Namespace, report: dict) -> None:
    """The --out JSON (every measurement and the rates) and the --markdown table of one report."""
    measurements = [Measurement(**m) for m in report["measurements"]]
    report["rates"] = best_rates(measurements, report["device"], report["dtype"], report["image_size"])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(measurements, report["device"], report["dtype"], report["peak_tflops"]))


def merge(args: argparse.Namespace) -> int:
    reports = [json.loads(Path(path).read_text()) for path in args.merge]
    merged = {**reports[0], "measurements": [m for report in reports for m in report["measurements"]]}
    write_report(args, merged)
    print_table([Measurement(**m) for m in merged["measurements"]], merged["device"], merged["peak_tflops"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    dtype_name = str(dtype).removeprefix("torch.")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(device, args.peak_tflops)
    bench = Bench(args.small, device, dtype, args.compile_backend)
    measurements: list[Measurement] = []
    report = lambda: {"device": device_name, "dtype": dtype_name, "peak_tflops": peak,  # noqa: E731
                      "small": args.small, "image_size": bench.size, "measurements": [asdict(m) for m in measurements]}
    started, plan = time.perf_counter(), sweep(args, device)
    for stage, batch, path, capture in tqdm(plan, desc="bench/gpu", file=sys.stderr):
        if args.budget_seconds is not None and time.perf_counter() - started > args.budget_seconds:
            print(f"budget of {args.budget_seconds:.0f} s spent: {plan.index((stage, batch, path, capture))} of "
                  f"{len(plan)} configurations measured", file=sys.stderr)
            break
        find = lambda name, **key: next((m for m in measurements if m.stage == name and all(  # noqa: E731
            getattr(m, k) == v for k, v in key.items())), None)
        if stage == "generate":
            unet, vae = find("unet", path=path, batch=batch, capture=False), find("vae", path=path, batch=batch)
            for scheduler, steps in (("ddim", args.ddim_steps), ("dpm", args.dpm_steps)):
                measurements.append(bench.generate(scheduler, steps, batch, path, capture, args.repeats, peak,
                                                   unet and unet.images_per_s, vae and vae.images_per_s))
        elif stage == "factory":
            bare = find("generate", path=path, batch=batch, capture=capture, scheduler="ddim")
            measurements.append(bench.factory(args.ddim_steps, batch, path, capture, args.repeats, peak, bare))
        else:
            measurements.append(bench.stage(stage, batch, path, capture, args.repeats, peak))
        if args.out:  # as they come: a run cut short keeps what it measured
            write_report(argparse.Namespace(out=args.out, markdown=None), report())
    print_table(measurements, device_name, peak)
    rates = best_rates(measurements, device_name, dtype_name, bench.size)
    print("rates for the cost model: " + ", ".join(f"{k} {v:.4g}" for k, v in rates.items()
                                               if k not in ("source", "image_size")))
    write_report(args, report())
    print(*(f"wrote {path}" for path in (args.out, args.markdown) if path), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

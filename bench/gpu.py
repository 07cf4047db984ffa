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
- sam3, owlv2+sam: the open-vocabulary labeler (factory/build/openvocab.py, its own call:
  processors, models, post-processing) on B 512x512 images, each asked for two classes
  ("dog", "cat": a two-class prompt), score threshold 0, the 4 best instances kept. sam3:
  Sam3Config() defaults, which are facebook/sam3's sizes (ViT 1024 wide, 32 layers at 1008 px;
  CLIP text tower 1024 x 24; DETR encoder and decoder 6 layers each, 200 queries per text).
  owlv2+sam: Owlv2Config() defaults (B/16 towers, owlv2-base-patch16) at that checkpoint's
  960 px, then SAM at sam-vit-huge's sizes (ViT-H: 1280 wide, 32 layers at 1024 px; SamConfig()
  defaults are ViT-B) on the 4 boxes. Not compiled (Python between the models).

For each batch size and torch.compile off/on: seconds per call, images/s, TFLOP per
image (counted by torch.utils.flop_counter.FlopCounterMode on one forward, attention
included on a CPU too), achieved
TFLOP/s and its fraction of the device's peak (a table of known GPUs, or --peak-tflops).
Float16 on CUDA, float32 on a CPU. ``--out rates.json`` writes the best rate of each
stage in the form factory/cost.py reads (``jobs/build_dataset.py --estimate --rates``).

    python bench/gpu.py --out rates.json                        # on a GPU: the full sweep
    python bench/gpu.py --small                                 # tiny models, 64x64, 2/1 steps (the smoke test)
    python bench/gpu.py --stages unet,vae,maskrcnn --batch-sizes 1 --compile off   # real shapes, on a CPU
    python bench/gpu.py --stages sam3,owlv2+sam --batch-sizes 1 --repeats 1        # the open-vocabulary labeler
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from factory.build.detect import COCO_LABELS, Detector, tiny_maskrcnn
from factory.build.recipe import LabelerConfig
from factory.core.vocab import VOC
from factory.diffusion.pipelines import sd15_unet, sd_scheduler, tiny_pipeline, tiny_tokenizer

LABELERS = ("sam3", "owlv2+sam")  # the open-vocabulary labeler's routes
STAGES = ("unet", "vae", "maskrcnn", "generate", *LABELERS)
LABELER_INSTANCES = 4  # instances kept per image (boxes SAM segments): a two-object image and a duplicate each

# Dense float16/bfloat16 tensor-core TFLOP/s (fp32 accumulation), from the vendors' data sheets;
# A10G from Baseten's A10 vs A10G comparison. The first name contained in the device's name wins.
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0,
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

    from factory.build import openvocab

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
    compiled: bool
    seconds_per_call: float
    images_per_s: float  # for unet: single-image U-Net evaluations per second (a guided step is 2)
    tflop_per_image: float
    achieved_tflops: float
    fraction_of_peak: float | None
    scheduler: str = ""
    steps: int = 0
    predicted_images_per_s: float | None = None  # generate: what the unet and vae rates predict


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


class Bench:
    """The models once, on one device and dtype; one method per stage and configuration."""

    def __init__(self, small: bool, device: torch.device, dtype: torch.dtype):
        self.small, self.device, self.dtype = small, device, dtype
        self.size = 64 if small else 512
        self.labelers: dict[str, Detector] = {}

    # Each model is built when a stage first needs it: a run of some stages builds only theirs.
    @cached_property
    def pipe(self) -> StableDiffusionPipeline:
        torch.manual_seed(0)
        pipe = (tiny_pipeline() if self.small else sd15_pipeline()).to(self.device, self.dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @cached_property
    def detector(self) -> torch.nn.Module:
        torch.manual_seed(0)
        detector = (tiny_maskrcnn(64) if self.small else real_maskrcnn()).to(self.device, self.dtype).eval()
        detector.roi_heads.score_thresh = 0.0
        return detector

    def eager(self, stage: str):
        if stage in LABELERS:
            if stage not in self.labelers:
                torch.manual_seed(0)
                self.labelers[stage] = open_vocabulary_labeler(stage, self.small, self.device, self.dtype)
            return self.labelers[stage]
        return {"unet": lambda: self.pipe.unet, "vae": lambda: self.pipe.vae.decoder,
                "maskrcnn": lambda: self.detector}[stage]()

    def module(self, stage: str, compiled: bool):
        return torch.compile(self.eager(stage), dynamic=False) if compiled else self.eager(stage)

    def call(self, stage: str, batch: int, module) -> Callable[[], object]:
        """A zero-argument forward of ``module`` for a batch of images."""
        make = lambda *shape: torch.randn(*shape, device=self.device, dtype=self.dtype)  # noqa: E731
        if stage == "unet":
            side = self.size // self.pipe.vae_scale_factor  # 64 for SD 1.5, 32 for the tiny VAE
            text = make(2 * batch, 77, self.pipe.unet.config.cross_attention_dim)
            latent = make(2 * batch, 4, side, side)
            return lambda: module(latent, 801, encoder_hidden_states=text)
        if stage == "vae":
            side = self.size // self.pipe.vae_scale_factor
            latent = make(batch, 4, side, side)
            return lambda: module(latent)
        if stage in LABELERS:
            images = np.random.default_rng(0).integers(0, 256, (batch, self.size, self.size, 3), dtype=np.uint8)
            return lambda: module(images, [[VOC.lookup("dog"), VOC.lookup("cat")]] * batch)
        images = [torch.rand(3, self.size, self.size, device=self.device, dtype=self.dtype) for _ in range(batch)]
        return lambda: module(images)

    @torch.inference_mode()
    def stage(self, stage: str, batch: int, compiled: bool, repeats: int, peak: float | None) -> Measurement:
        tflop = count_tflop(self.call(stage, 1, self.eager(stage)))
        if stage == "unet":
            tflop /= 2  # the one-image call is a guided pair
        seconds = timed(self.call(stage, batch, self.module(stage, compiled)), self.device, repeats)
        per_s = (2 * batch if stage == "unet" else batch) / seconds
        return Measurement(stage, batch, compiled, seconds, per_s, tflop, tflop * per_s,
                           tflop * per_s / peak if peak else None)

    @torch.inference_mode()
    def generate(self, scheduler: str, steps: int, batch: int, compiled: bool, repeats: int,
                 peak: float | None, unet_rate: float | None, vae_rate: float | None) -> Measurement:
        pipe = self.pipe
        ddim = sd_scheduler()
        pipe.scheduler = ddim if scheduler == "ddim" else DPMSolverMultistepScheduler.from_config(
            ddim.config, algorithm_type="dpmsolver++")
        run = lambda n: pipe(prompt=["a photograph of a dog and a sofa"] * n, num_inference_steps=steps,  # noqa: E731
                             guidance_scale=7.5, height=self.size, width=self.size, output_type="np")
        tflop = count_tflop(lambda: run(1))  # eager: FLOPs are counted on the modules, not compiled graphs
        eager = pipe.unet, pipe.vae.decoder
        pipe.unet, pipe.vae.decoder = self.module("unet", compiled), self.module("vae", compiled)
        try:
            seconds = timed(lambda: run(batch), self.device, repeats)
        finally:
            pipe.unet, pipe.vae.decoder = eager
        per_s = batch / seconds
        predicted = 1 / (2 * steps / unet_rate + 1 / vae_rate) if unet_rate and vae_rate else None
        return Measurement("generate", batch, compiled, seconds, per_s, tflop, tflop * per_s,
                           tflop * per_s / peak if peak else None, scheduler, steps, predicted)


def best_rates(measurements: list[Measurement], device_name: str, dtype: torch.dtype, image_size: int) -> dict:
    """The fastest configuration of each stage, in the form factory/cost.py reads."""
    def best(stage: str) -> float | None:
        rates = [m.images_per_s for m in measurements if m.stage == stage]
        return max(rates) if rates else None

    # open_vocabulary's route is a matter of its saved models, not of the recipe: the slower route measured
    open_vocabulary = [best(stage) for stage in LABELERS if best(stage) is not None]
    rates = {"unet_forwards_per_s": best("unet"), "vae_images_per_s": best("vae"),
             "label_images_per_s": best("maskrcnn"),
             "open_vocabulary_images_per_s": min(open_vocabulary) if open_vocabulary else None}
    return {"source": f"bench/gpu.py on {device_name}, {str(dtype).removeprefix('torch.')}",
            "image_size": image_size, **{key: value for key, value in rates.items() if value is not None}}


def print_table(measurements: list[Measurement], device_name: str, peak: float | None) -> None:
    print(f"\ndevice: {device_name}; peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown (give --peak-tflops)'}")
    print(f"{'stage':<22}{'batch':>6}{'compile':>8}{'s/call':>9}{'img/s':>10}{'TFLOP/img':>10}"
          f"{'TFLOP/s':>9}{'of peak':>8}{'predicted':>10}")
    for m in measurements:
        name = m.stage + (f" {m.scheduler}-{m.steps}" if m.stage == "generate" else "")
        name += " (fwd/s)" if m.stage == "unet" else ""
        of_peak = f"{m.fraction_of_peak:.1%}" if m.fraction_of_peak is not None else "-"
        predicted = f"{m.predicted_images_per_s:.3g}" if m.predicted_images_per_s else "-"
        print(f"{name:<22}{m.batch:>6}{'on' if m.compiled else 'off':>8}{m.seconds_per_call:>9.3f}"
              f"{m.images_per_s:>10.3g}{m.tflop_per_image:>10.3g}{m.achieved_tflops:>9.3g}{of_peak:>8}{predicted:>10}")
    for ddim in measurements:  # ratios measured in this run
        for dpm in measurements:
            if ddim.scheduler == "ddim" and dpm.scheduler == "dpm" and (ddim.batch, ddim.compiled) == (
                    dpm.batch, dpm.compiled):
                print(f"DPM-Solver++-{dpm.steps} / DDIM-{ddim.steps} images/s (compile "
                      f"{'on' if ddim.compiled else 'off'}, batch {ddim.batch}): "
                      f"{dpm.images_per_s / ddim.images_per_s:.2f}x")
    for stage in STAGES:
        pairs = [(m, n) for m in measurements for n in measurements
                 if m.stage == n.stage == stage and m.batch == n.batch and m.scheduler == n.scheduler
                 and n.compiled and not m.compiled]
        for off, on in pairs:
            print(f"torch.compile speed-up, {stage} {on.scheduler} batch {on.batch}: "
                  f"{on.images_per_s / off.images_per_s:.2f}x")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny models at 64x64, DDIM-2 and DPM-Solver++-1")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--batch-sizes", help="comma list (default: 1,4,8,16; --small: 1,2)")
    parser.add_argument("--compile", choices=("off", "on", "both"), help="torch.compile (default: both on CUDA, "
                        "off on a CPU)")
    parser.add_argument("--ddim-steps", type=int, help="DDIM steps for generate (default 50; --small 2)")
    parser.add_argument("--dpm-steps", type=int, help="DPM-Solver++ steps for generate (default 25; --small 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration after a warm-up")
    parser.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                        help="'auto': float16 on CUDA, float32 on a CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (default: from the table)")
    parser.add_argument("--out", help="write per-stage rates and every measurement to this JSON file")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(args.stages) - set(STAGES)
    if unknown or not args.stages:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    try:
        sizes = args.batch_sizes or ("1,2" if args.small else "1,4,8,16")
        args.batch_sizes = [int(b) for b in sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be a comma list of integers, got {args.batch_sizes!r}")
    if min(args.batch_sizes) < 1 or args.repeats < 1:
        parser.error("batch sizes and --repeats must be at least 1")
    args.ddim_steps = args.ddim_steps or (2 if args.small else 50)
    args.dpm_steps = args.dpm_steps or (1 if args.small else 25)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[
        args.compile or ("both" if device.type == "cuda" else "off")]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(device, args.peak_tflops)
    bench = Bench(args.small, device, dtype)
    plan = [(stage, batch, compiled) for stage in args.stages for compiled in compile_modes
            for batch in args.batch_sizes if not (compiled and stage in LABELERS)]
    measurements: list[Measurement] = []
    for stage, batch, compiled in tqdm(plan, desc="bench/gpu", file=sys.stderr):
        if stage != "generate":
            measurements.append(bench.stage(stage, batch, compiled, args.repeats, peak))
            continue
        rate = lambda name: max((m.images_per_s for m in measurements  # noqa: E731
                                 if m.stage == name and m.compiled == compiled), default=None)
        for scheduler, steps in (("ddim", args.ddim_steps), ("dpm", args.dpm_steps)):
            measurements.append(bench.generate(scheduler, steps, batch, compiled, args.repeats, peak,
                                               rate("unet"), rate("vae")))
    print_table(measurements, device_name, peak)
    rates = best_rates(measurements, device_name, dtype, bench.size)
    print("rates for the cost model: " + ", ".join(f"{k} {v:.4g}" for k, v in rates.items()
                                               if k not in ("source", "image_size")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name, "dtype": str(dtype), "peak_tflops": peak, "small": args.small,
                       "rates": rates, "measurements": [asdict(m) for m in measurements]}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bytes per sample of each product, as the factory writes it, against fp32 pickles.

Four samples (one-class and two-class, VOC) go through the factory's own code:
labels from `factory/label.py` (oracle) or `factory/annotate.py` (grounding annotator),
rows from `factory.dataset.write.encode_batch`, a Parquet part from `factory.dataset.write.write_part`
into a temporary folder. Bytes per sample = the part's size / its rows. The same data
stored as fp32 arrays in a pickle (how the public follow-up code stored its samples;
pickled here only to measure that size, never for our data) is the comparison.

- oracle set: image + label map + one mask per class;
- triplet set: the same + U-Net features at the capture step, from one call of Stable
  Diffusion 1.5's U-Net built from its config (random weights: the shapes, not the
  values, decide the size), stored as `capture.features: tensors` (conditional branch,
  fp16, zstd) or `latent` (the capture call's latent; features are one U-Net pass away);
  the reference pickled both guidance branches in fp32;
- synthetic segmentation set: image + label map + masks from the grounding annotator's
  probabilities (smooth, upsampled from the 64x64 feature grid, as the module's are).

Images are crops of a real photograph (matplotlib's `grace_hopper.jpg`): a generated
image compresses like a photo, not like the noise the random decoder would draw.

    python bench/storage.py                 # real SD 1.5 shapes, 512x512 (minutes and 7 GB on a CPU)
    python bench/storage.py --tiny          # the tiny U-Net at 64x64, seconds (the smoke test)
    python bench/storage.py --json out.json # also write the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from factory.core.vocab import VOC
from factory.dataset.batch import SampleLabels, attach_labels
from factory.dataset.codec import objects
from factory.dataset.write import encode_batch, write_part
from factory.detection.detections import Detections
from factory.diffusion.features import FeatureCapture, feature_channels
from factory.diffusion.pipelines import sd15_unet
from factory.diffusion.tiny import tiny_pipeline
from factory.pipeline.annotate import annotation_labels
from factory.pipeline.label import oracle_labels as label_detections
from factory.pipeline.sections import AnnotatorConfig, LabelerConfig

REFERENCE_MB = 54.0  # per triplet sample, the public follow-up implementation (Simoncini and Ankit)
SAMPLES = (("dog",), ("cat",), ("dog", "sofa"), ("person", "horse"))


def photo_crops(n: int, size: int) -> np.ndarray:
    """n different square crops of a real photograph, resized to size x size (uint8)."""
    from matplotlib.cbook import get_sample_data

    with get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")  # 512 x 600
    crops = []
    for i in range(n):
        side = 400 + 30 * i
        box = (i * 25, i * 40, i * 25 + side, i * 40 + side)
        crop = photo.crop(box).resize((size, size), Image.BICUBIC)
        crops.append(np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else crop))
    return np.stack(crops)


def blob(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """A soft elliptical instance mask in [0, 1], like a detector's mask output."""
    y, x = np.mgrid[0:size, 0:size] / size
    d = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return np.clip(1.5 - d, 0.0, 1.0).astype(np.float32)


def oracle_labels(classes: tuple[str, ...], size: int, seed: int) -> SampleLabels:
    """Labels by the oracle's rules (factory/pipeline/label.py) from detector-like instances."""
    rng = np.random.default_rng(seed)
    infos = [VOC.lookup(name) for name in classes]
    masks, ids, scores = [], [], []
    for info in infos:  # two instances per class, one below the score threshold
        for score in (0.9, 0.3):
            masks.append(blob(size, *rng.uniform(0.25, 0.75, 2), *rng.uniform(0.1, 0.3, 2)))
            ids.append(info.index)
            scores.append(score)
    detections = Detections(np.array(ids, np.int64), np.array(scores, np.float32), np.stack(masks))
    return label_detections(detections, infos, LabelerConfig(score_threshold=0.5, ignore_threshold=0.2), (size, size))


def annotator_labels(classes: tuple[str, ...], size: int, seed: int) -> SampleLabels:
    """Labels by the annotator's rules (factory/pipeline/annotate.py) from smooth per-class probabilities."""
    grid = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, len(classes), 8, 8, generator=grid) * 3  # object-sized regions
    probabilities = torch.sigmoid(F.interpolate(F.interpolate(coarse, size=64, mode="bicubic"), size=size,
                                                mode="bilinear", align_corners=False))[0].numpy()
    indices = [VOC.lookup(name).index for name in classes]
    return annotation_labels(probabilities, indices, AnnotatorConfig(threshold=0.5, ignore_below=0.4))


def capture(unet: torch.nn.Module, n: int, latent_size: int, text_dim: int) -> FeatureCapture:
    """One guided U-Net call [unconditional; conditional] for n samples, features kept."""
    torch.manual_seed(0)
    latent = torch.randn(n, 4, latent_size, latent_size).repeat(2, 1, 1, 1)
    text = torch.randn(2 * n, 77, text_dim)
    with torch.inference_mode(), FeatureCapture(unet, call=0, batch=n, keep_unconditional=True) as hooks:
        unet(latent, 801, encoder_hidden_states=text)
    return hooks


def part_bytes_per_sample(images: np.ndarray, labels: list[SampleLabels], extra: dict[str, np.ndarray]) -> float:
    """Rows encoded and written by the factory's own writer; bytes of the part / rows."""
    n = len(images)
    batch = {"sample_id": np.array([f"s{i}" for i in range(n)], dtype=object), "index": np.arange(n),
             "prompt": np.array([" and ".join(c) for c in SAMPLES[:n]], dtype=object),
             "classes": objects([np.array(c, dtype=object) for c in SAMPLES[:n]]),
             "class_words": objects([np.array(c, dtype=object) for c in SAMPLES[:n]]),
             "seed": np.arange(n), "image": images, "generate_seconds": np.zeros(n), **extra}
    table = encode_batch(attach_labels(batch, labels, time.perf_counter()), image_format="png", jpeg_quality=95,
                         class_indices={c.name: c.index for c in VOC.classes}, generator="bench", labeler="bench")
    with tempfile.TemporaryDirectory() as out:
        commit = json.loads(write_part(table, out=out).column("commit")[0].as_py())
    assert commit["rows"] == n
    return commit["bytes"] / n


def pickle_bytes_per_sample(images: np.ndarray, labels: list[SampleLabels],
                            features: list[dict[str, np.ndarray]] | None = None) -> float:
    """The same samples as dicts of fp32 arrays, pickled one file per sample (reference style)."""
    total = 0
    for i, (image, lab) in enumerate(zip(images, labels)):
        sample = {"image": image.transpose(2, 0, 1).astype(np.float32), "label": lab.label.astype(np.float32),
                  "masks": lab.masks.astype(np.float32)}
        if features is not None:
            sample.update(features[i])  # already fp32
        total += len(pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL))
    return total / len(images)


def measure(tiny: bool) -> dict:
    n = len(SAMPLES)
    if tiny:
        unet, latent_size, text_dim, size = tiny_pipeline().unet, 32, 32, 64
    else:
        unet, latent_size, text_dim, size = sd15_unet().eval(), 64, 768, 512
    images = photo_crops(n, size)
    oracle = [oracle_labels(c, size, i) for i, c in enumerate(SAMPLES)]
    synthetic = [annotator_labels(c, size, i) for i, c in enumerate(SAMPLES)]
    hooks = capture(unet, n, latent_size, text_dim)
    cond = {r: t.float().numpy() for r, t in hooks.features.items()}
    uncond = {r: t.float().numpy() for r, t in hooks.unconditional.items()}
    both = [{**{f"features_{r}": t[i] for r, t in cond.items()}, **{f"ufeatures_{r}": t[i] for r, t in uncond.items()}}
            for i in range(n)]
    tensors = {f"features_{r}": t.astype(np.float16) for r, t in cond.items()}
    latent = {"timestep": np.full(n, hooks.timestep, np.int64),
              "latent": hooks.latent.float().numpy().astype(np.float16)}
    ref_triplet = pickle_bytes_per_sample(images, oracle, both)
    rows = {
        "oracle set": (part_bytes_per_sample(images, oracle, {}), pickle_bytes_per_sample(images, oracle)),
        "triplet set, tensors": (part_bytes_per_sample(images, oracle, {"timestep": latent["timestep"], **tensors}),
                                 ref_triplet),
        "triplet set, latent": (part_bytes_per_sample(images, oracle, latent), ref_triplet),
        "synthetic seg set": (part_bytes_per_sample(images, synthetic, {}), pickle_bytes_per_sample(images, synthetic)),
    }
    return {"image_size": size, "samples": n, "feature_channels": feature_channels(hooks.features),
            "latent_values": hooks.latent[0].numel(),
            "products": {name: {"ours_bytes": ours, "reference_fp32_pickle_bytes": ref}
                         for name, (ours, ref) in rows.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny U-Net at 64x64 instead of SD 1.5 at 512x512")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = measure(args.tiny)
    size = result["image_size"]
    print(f"{result['samples']} samples at {size}x{size}; feature channels per resolution: "
          f"{result['feature_channels']}")
    print(f"{'product':<24}{'ours MB':>10}{'fp32 pickle MB':>16}{'ratio':>8}")
    for name, row in result["products"].items():
        ours, ref = row["ours_bytes"] / 1e6, row["reference_fp32_pickle_bytes"] / 1e6
        print(f"{name:<24}{ours:>10.3f}{ref:>16.3f}{ref / ours:>7.1f}x")
    if not args.tiny:
        for name in ("triplet set, tensors", "triplet set, latent"):
            ours = result["products"][name]["ours_bytes"] / 1e6
            print(f"{name}: {REFERENCE_MB / ours:.1f}x smaller than the reference's published {REFERENCE_MB:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

"""Bytes per sample of each product, as the factory writes it, against fp32 pickles.

Four samples (one-class and two-class, VOC) go through the factory's own code:
labels from `factory/label.py` (oracle) or `factory/annotate.py` (grounding annotator),
rows from `factory/write.encode_batch`, a Parquet part from `factory/write.write_part`
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

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image

from factory.annotate import annotation_label_map
from factory.detect import Detections
from factory.features import FeatureCapture, feature_channels
from factory.generate import tiny_pipeline
from factory.label import label_classes, pack_masks, ragged, semantic_label_map
from factory.vocab import VOC
from factory.write import encode_batch, write_part

REFERENCE_MB = 54.0  # per triplet sample, the public follow-up implementation (spec section 5)
SAMPLES = (("dog",), ("cat",), ("dog", "sofa"), ("person", "horse"))


def sd15_unet() -> UNet2DConditionModel:
    # diffusers' defaults are SD 1.x's U-Net (320/640/1280/1280) except the text width (768: CLIP ViT-L/14)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


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


def oracle_labels(classes: tuple[str, ...], size: int, seed: int) -> dict:
    """Label map, mask bits and scores by factory/label.py from detector-like instances."""
    rng = np.random.default_rng(seed)
    infos = [VOC.lookup(name) for name in classes]
    masks, ids, scores = [], [], []
    for info in infos:  # two instances per class, one below the score threshold
        for score in (0.9, 0.3):
            masks.append(blob(size, *rng.uniform(0.25, 0.75, 2), *rng.uniform(0.1, 0.3, 2)))
            ids.append(info.coco_id)
            scores.append(score)
    detections = Detections(np.array(ids, np.int64), np.array(scores, np.float32), np.stack(masks))
    labels, owner, ignore = label_classes(detections, infos, score_threshold=0.5, mask_threshold=0.5,
                                          ignore_threshold=0.2)
    return {"label": semantic_label_map(labels, owner, ignore), "class_bits": pack_masks(labels, (size, size)),
            "scores": np.array([lab.score for lab in labels], np.float32),
            "instances": np.array([lab.instances for lab in labels], np.int16),
            "found": np.array([lab.found for lab in labels])}


def annotator_labels(classes: tuple[str, ...], size: int, seed: int) -> dict:
    """Label map and mask bits by factory/annotate.py from smooth per-class probabilities."""
    grid = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, len(classes), 8, 8, generator=grid) * 3  # object-sized regions
    probabilities = torch.sigmoid(F.interpolate(F.interpolate(coarse, size=64, mode="bicubic"), size=size,
                                                mode="bilinear", align_corners=False))[0].numpy()
    indices = [VOC.lookup(name).index for name in classes]
    masks = probabilities > 0.5
    found = masks.reshape(len(classes), -1).any(axis=1)
    return {"label": annotation_label_map(probabilities, indices, threshold=0.5, ignore_below=0.4),
            "class_bits": np.bitwise_or.reduce([masks[k].astype(np.uint8) << k for k in range(len(classes))], axis=0),
            "scores": np.array([probabilities[k][masks[k]].mean() if found[k] else 0.0
                                for k in range(len(classes))], np.float32),
            "instances": found.astype(np.int16), "found": found}


def capture(unet: torch.nn.Module, n: int, latent_size: int, text_dim: int) -> FeatureCapture:
    """One guided U-Net call [unconditional; conditional] for n samples, features kept."""
    torch.manual_seed(0)
    latent = torch.randn(n, 4, latent_size, latent_size).repeat(2, 1, 1, 1)
    text = torch.randn(2 * n, 77, text_dim)
    with torch.inference_mode(), FeatureCapture(unet, call=0, batch=n, keep_unconditional=True) as hooks:
        unet(latent, 801, encoder_hidden_states=text)
    return hooks


def part_bytes_per_sample(images: np.ndarray, labels: list[dict], extra: dict[str, np.ndarray]) -> float:
    """Rows encoded and written by the factory's own writer; bytes of the part / rows."""
    n = len(images)
    batch = {"sample_id": np.array([f"s{i}" for i in range(n)], dtype=object), "index": np.arange(n),
             "prompt": np.array([" and ".join(c) for c in SAMPLES[:n]], dtype=object),
             "classes": ragged([np.array(c, dtype=object) for c in SAMPLES[:n]]),
             "class_words": ragged([np.array(c, dtype=object) for c in SAMPLES[:n]]),
             "seed": np.arange(n), "image": images, "drop_reason": np.array([""] * n, dtype=object),
             "generate_seconds": np.zeros(n), "label_seconds": np.zeros(n), **extra}
    for key in ("label", "class_bits"):
        batch[key] = np.stack([lab[key] for lab in labels])
    for key in ("scores", "instances", "found"):
        batch[key] = ragged([lab[key] for lab in labels])
    table = encode_batch(batch, image_format="png", jpeg_quality=95,
                         class_indices={c.name: c.index for c in VOC.classes}, generator="bench", labeler="bench")
    with tempfile.TemporaryDirectory() as out:
        commit = json.loads(write_part(table, out=out).column("commit")[0].as_py())
    assert commit["rows"] == n
    return commit["bytes"] / n


def pickle_bytes_per_sample(images: np.ndarray, labels: list[dict], features: list[dict[str, np.ndarray]] | None = None) -> float:
    """The same samples as dicts of fp32 arrays, pickled one file per sample (reference style)."""
    total = 0
    for i, (image, lab) in enumerate(zip(images, labels)):
        k = len(lab["scores"])
        sample = {"image": image.transpose(2, 0, 1).astype(np.float32), "label": lab["label"].astype(np.float32),
                  "masks": np.stack([(lab["class_bits"] >> b) & 1 for b in range(k)]).astype(np.float32)}
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

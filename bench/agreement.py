"""Label agreement on the mini world: does keeping only the labels two labelers agree on raise
their quality, measured against exact masks?

    python -m bench.agreement [--work outputs/agreement] [--images 500]

1. The drawn benchmark's val images (the mini world's "real" images, exact masks; drawn here
   when --work has none).
2. Annotated by the shipped grounding module (models/shapes-grounding, split 1's seen classes;
   the noised route), as jobs/annotate_images.py does, with the world's Mask R-CNN oracle
   (models/shapes-oracle) as the second labeler: ``agreement.min_iou`` 0, so each sample records
   its per-class IoU and nothing is filtered.
3. ``action: drop`` at each threshold keeps exactly the samples whose every class agrees at least
   that much: those rows of the same build are scored (``annotation_scores``, 255 as background).
4. ``action: ignore`` at 0.5 is a build of its own (its labels change). Ignored pixels teach a
   segmenter nothing, so its labels are scored on the pixels they label, beside the unfiltered
   labels scored the same way, and the share of pixels made 255.

Agreement with an oracle trained on every class uses unseen-class knowledge: such a set is not
zero-shot (its manifest says so, and Protocol-II refuses it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.mini_mission import StageClock, save_report
from bench.real_images import annotate, annotation_scores
from factory.core.cli import add_verbose_argument, setup_output
from factory.core.cluster import init_ray
from factory.core.conventions import IGNORE
from factory.dataset.codec import decode_label
from factory.dataset.source import DatasetSource
from world.benchmark import write_benchmark

MODULE, ORACLE = "models/shapes-grounding", "models/shapes-oracle/model.safetensors"
THRESHOLDS = (0.3, 0.5, 0.7)
IGNORE_AT = 0.5


def checked(min_iou: float = 0.0, action: str = "drop") -> dict:
    return {"agreement.labeler": {"model": "maskrcnn_small", "weights": ORACLE, "score_threshold": 0.5},
            "agreement.min_iou": min_iou, "agreement.action": action}


def ignored_share(dataset: str) -> float:
    labels = DatasetSource.open(dataset).read(["label"]).column("label").to_pylist()
    return float(np.mean([np.mean(decode_label(label) == IGNORE) for label in labels]))


def run(work: Path, images: int) -> dict:
    stage = StageClock("agreement")
    root = work / "benchmark"
    if not (root / "ImageSets").exists():
        write_benchmark(root, val=images, train=1)
    recorded = annotate(work / "recorded", root, MODULE, "noised", images, checked()).out
    stage("recorded")
    drop = {"none": annotation_scores(recorded, root)}
    drop |= {f"drop below {t}": annotation_scores(recorded, root, min_iou=t) for t in THRESHOLDS}
    agreement = DatasetSource.open(recorded).manifest["agreement"]
    ignore_build = annotate(work / "ignored", root, MODULE, "noised", images, checked(IGNORE_AT, "ignore")).out
    stage("ignore build")
    ignore = {"none": {**annotation_scores(recorded, root, unsure="excluded"), "ignored": ignored_share(recorded)},
              f"ignore below {IGNORE_AT}": {**annotation_scores(ignore_build, root, unsure="excluded"),
                                            "ignored": ignored_share(ignore_build)}}
    return {"images": images, "drop": drop, "ignore": ignore, "agreement": agreement, "seconds": stage.report()}


def markdown(report: dict) -> str:
    total = report["drop"]["none"]["images"]
    drop = ["| Samples kept | Images | Seen mIoU | Unseen mIoU | Harmonic |", "|---|---:|---:|---:|---:|"]
    drop += [f"| {name} | {r['images']} ({100 * r['images'] / total:.0f}%) | {r['seen']:.1f} | {r['unseen']:.1f} | "
             f"{r['harmonic']:.1f} |" for name, r in report["drop"].items()]
    ignore = ["| Labels | Seen mIoU | Unseen mIoU | Harmonic | Pixels 255 |", "|---|---:|---:|---:|---:|"]
    ignore += [f"| {name} | {r['seen']:.1f} | {r['unseen']:.1f} | {r['harmonic']:.1f} | {100 * r['ignored']:.1f}% |"
               for name, r in report["ignore"].items()]
    classes = ["| Class | Samples | Mean IoU | Median IoU |", "|---|---:|---:|---:|"]
    classes += [f"| {name} | {c['samples']} | {c['mean']:.3f} | {c['median']:.3f} |"
                for name, c in report["agreement"]["classes"].items()]
    return "\n".join([
        f"# Label agreement on the mini world ({report['images']} val images)", "",
        "Grounding-module labels (split 1's seen classes trained, noised route) checked by the world's oracle; "
        "mIoU (%) against the exact masks, split 1's seen and unseen classes.", "",
        "## action: drop (the same build, the samples each threshold keeps)", "", *drop, "",
        "## action: ignore (scored on the pixels the labels label)", "", *ignore, "",
        "## Agreement per class (every sample)", "", *classes, "",
        "## Time (s, this machine)", "", "```json", json.dumps(report["seconds"], indent=2), "```", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("outputs/agreement"),
                        help="folder of the benchmark, builds and report; a rerun resumes (default: %(default)s)")
    parser.add_argument("--images", type=int, default=500, help="val images to draw and annotate")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    setup_output(args.verbose)
    init_ray()
    report = run(args.work, args.images)
    save_report(args.work, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

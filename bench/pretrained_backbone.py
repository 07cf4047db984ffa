"""Does the world's pretrained backbone (models/shapes-backbone) make the segmenter learn faster?

    python -m bench.pretrained_backbone [--work outputs/pretrained-backbone] [--iterations 500] [--seeds 2] [--repeat]

The real-data reference of the mission in miniature: the `world` MaskFormer trained supervised on
the drawn benchmark's train images (every class labelled; as FreeMask, Yang et al. 2023, sets
synthetic data against real), from a random backbone (at the decoder's learning rate, as the
mission trains it) and from the pretrained one (at the paper's 0.1 backbone factor; Li et al.
2023 start from ImageNet; and at the random one's 1.0, so that the start and the factor are each
compared with one thing changed), each with --seeds seeds on one schedule, scored on the 500 drawn
benchmark val images (Protocol-II's split 1 columns, both background conventions). The same
images, iterations, batch, crops and learning rate for all; only the backbone's start (and factor) differ.
--repeat trains the pretrained start's seed 0 once more into <work>/repeat: a seed fixes the initial
weights, the data order and every crop, flip and jitter (segmenter/data.py), so the two should agree.
Results: <work>/report.md and report.json; --publish writes the report as a docs page.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench.mini_mission import StageClock, over_seeds, protocol_ii, publish_report, save_report
from factory.core.cli import add_verbose_argument, setup_output
from factory.core.cluster import init_ray
from segmenter.config import SegmenterTrainConfig
from segmenter.evaluate import BACKGROUND_KEYS
from segmenter.train import prepare_training, run_training
from world.benchmark import write_benchmark

BACKBONE = "models/shapes-backbone"
# backbone weights, backbone lr factor: the pretrained start at the random one's factor too, so that the start
# and the factor are each compared with one thing changed
STARTS = {"random": (None, 1.0), "pretrained": (BACKBONE, 0.1), "pretrained-full-lr": (BACKBONE, 1.0)}


def train(work: Path, start: str, seed: int, iterations: int) -> str:
    weights, factor = STARTS[start]
    config = SegmenterTrainConfig(
        real={"format": "voc", "root": str(work / "benchmark"), "split": "train", "vocabulary": "shapes"},
        setting="supervised", split=1, out=str(work / start / f"seed-{seed}"),
        model={"preset": "world", "backbone_weights": weights}, crop_size=64, crop_scale=(0.5, 1.0),
        iterations=iterations, batch_size=16, lr=3e-3, backbone_lr_factor=factor, checkpoint_every=iterations,
        log_every=max(10, iterations // 10), seed=seed)
    return run_training(prepare_training(config)).last


def markdown(report: dict) -> str:
    ignored, counted = BACKGROUND_KEYS["ignore"], BACKGROUND_KEYS["seen"]
    lines = [f"# The pretrained world backbone: {report['iterations']} iterations, {report['seeds']} seeds", "",
             "The `world` MaskFormer trained supervised on 1,000 drawn benchmark train images (every class), scored "
             "on the 500 val images, split 1's columns (all 20 classes were trained: seen and unseen here only "
             "name the columns). Each cell: mean ± sample standard deviation over the seeds.", "",
             "| Backbone | lr factor | mIoU, bg ignored (seen / unseen / harmonic) | mIoU, bg counted (seen / unseen / "
             "harmonic) |", "|---|---:|---|---|"]
    for start, entry in report["results"].items():
        cells = [" / ".join(_cell(entry[key], m) for m in ("seen", "unseen", "harmonic")) for key in (ignored, counted)]
        lines.append(f"| {start} | {STARTS[start][1]} | {cells[0]} | {cells[1]} |")
    if "repeat" in report:
        first, again = report["results"]["pretrained"]["runs"][0][ignored], report["repeat"][ignored]
        lines += ["", "The pretrained start's seed 0 trained again, the same command (bg ignored, seen / unseen / "
                  f"harmonic): {_figures(first)} the first time, {_figures(again)} the second. A seed fixes the "
                  "initial weights, the data order and every crop, flip and colour jitter; one training worker."]
    lines += ["", "What it does not show: one schedule and one set size; whether the gap stays at the mission's "
              "longer schedules, or on synthetic sets and for zero-shot (unseen) classes, which these runs were "
              "trained on; the backbone's task is drawings of 20 other classes, not ImageNet.", "",
              "Time (s, this machine): " + json.dumps(report["seconds"]), ""]
    return "\n".join(lines)


def _figures(figures: dict) -> str:
    return " / ".join(f"{figures[m]:.1f}" for m in ("seen", "unseen", "harmonic"))


def _cell(figures: dict, metric: str) -> str:
    mean, sd = figures[metric], figures[f"{metric}_sd"]
    return "-" if mean is None else f"{mean:.1f}" + ("" if sd is None else f" ± {sd:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("outputs/pretrained-backbone"),
                        help="folder of the benchmark, checkpoints and results; a rerun resumes (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=500, help="each segmenter's (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per backbone (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=1000, help="drawn train images (default: %(default)s)")
    parser.add_argument("--repeat", action="store_true", help="train the pretrained start's seed 0 once more")
    parser.add_argument("--publish", type=Path, help="also write the report to this docs page")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    setup_output(args.verbose)
    init_ray(num_cpus=max(4, os.cpu_count() or 1))  # the training worker and two real-image readers
    stage = StageClock("pretrained backbone")
    write_benchmark(args.work / "benchmark", val=500, train=args.train_images)
    stage("benchmark")
    results = {}
    for start in STARTS:
        checkpoints = {seed: train(args.work, start, seed, args.iterations) for seed in range(args.seeds)}
        results[start] = over_seeds({seed: protocol_ii(args.work, start, seed, checkpoint)
                                     for seed, checkpoint in checkpoints.items()})
        stage(start)
    report = {"iterations": args.iterations, "seeds": args.seeds, "train_images": args.train_images,
              "results": results}
    if args.repeat:
        again = args.work / "repeat"
        again.mkdir(parents=True, exist_ok=True)
        if not (again / "benchmark").exists():
            (again / "benchmark").symlink_to((args.work / "benchmark").resolve())
        report["repeat"] = protocol_ii(again, "pretrained", 0, train(again, "pretrained", 0, args.iterations))
        stage("repeat")
    report["seconds"] = stage.report()
    text = markdown(report)
    save_report(args.work, report, text)
    if args.publish:
        command = "python -m bench.pretrained_backbone" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
        publish_report(args.publish, text, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())

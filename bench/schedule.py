"""Is the mission's segmenter schedule long enough? The oracle reference's training curve.

    python -m bench.schedule [--work outputs/schedule] [--iterations 1500] [--seeds 3] [--publish PAGE]

The mission in miniature (bench/mini_mission.py) trains every segmenter on one schedule, long
enough when the oracle-labelled reference has plateaued: its mean harmonic mIoU (background
ignored) moves under 1 point over the last quarter of training, scored at 10 snapshots on the
500 drawn benchmark val images. The mission draws that curve at its end; this bench draws it
alone, so that a schedule can be chosen before the whole chain runs: the mission's mixture set
(shapes-synthetic-mixture, full size) labelled by the shipped split-1 grounding module
(models/shapes-grounding; the mission's own module, trained on its triplets, decides only which
samples are dropped), the same images labelled by the world's oracle (shapes-oracle, `follow`),
and the oracle reference trained on them exactly as the mission trains it, --seeds seeds.
Results: <work>/report.md, report.json and images/oracle-curve.png; --publish writes the report
as a docs page and the picture beside it (images/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from bench.mini_mission import (
    StageClock,
    build,
    curve_summary,
    curve_text,
    plot_curve,
    protocol_ii,
    publish_report,
    save_report,
    train_segmenter,
    training_curve,
)
from factory.core.cli import add_verbose_argument, setup_output
from factory.core.cluster import init_ray
from world.benchmark import write_benchmark

MODULE = "models/shapes-grounding"  # split 1, seen classes only
PICTURE = "images/oracle-curve.png"


def markdown(report: dict) -> str:
    return "\n".join([
        f"# The segmenters' schedule: the oracle reference at {report['iterations']} iterations, "
        f"{report['seeds']} seeds", "",
        "The mission's oracle reference (the `world` MaskFormer from the pretrained backbone, trained supervised "
        "on the mixture's images with the world oracle's labels; batch 16, 64 px crops, lr 3e-3, the poly "
        "schedule) scored on the 500 drawn benchmark val images, split 1's columns, at each snapshot of its "
        "training. Each point: mean ± sample standard deviation over the seeds.", "",
        curve_text(report["curve"], PICTURE), "",
        "What it does not show: how fast the other rows converge (module labels and DAAM labels are noisier than "
        "the oracle's, and may need longer); a schedule of another length has its own poly decay, so this curve "
        "does not say where a shorter schedule would end. The mixture here was filtered by the shipped module, "
        "not the mission's own.", "",
        "Sets (written / planned): " + ", ".join(f"{name} {s['written']}/{s['planned']}"
                                                 for name, s in report["sets"].items()) + ".",
        "", "Time (s, this machine; a resumed run counts only what it did again): " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("outputs/schedule"),
                        help="folder of the sets, checkpoints and results; a rerun resumes (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=1500, help="the schedule's length (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (default: %(default)s)")
    parser.add_argument("--publish", type=Path, help="also write the report to this docs page")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    setup_output(args.verbose)
    work = args.work
    init_ray(num_cpus=max(4, os.cpu_count() or 1))  # the training worker and two real-image readers
    stage = StageClock("schedule")
    sets = {"synthetic-mixture": build("shapes-synthetic-mixture", work / "synthetic-mixture", 1.0,
                                       {"annotator.checkpoint": MODULE}),
            "oracle": build("shapes-oracle", work / "oracle", 1.0, {"follow": str(work / "synthetic-mixture")})}
    write_benchmark(work / "benchmark", val=500, train=1000)
    stage("sets")
    curves = {}
    for seed in range(args.seeds):
        last = train_segmenter(work, "Oracle", args.iterations, seed)
        curves[seed] = training_curve(work, "Oracle", seed, last, protocol_ii(work, "Oracle", seed, last))
    stage("trainings")
    curve = curve_summary(curves)
    (work / PICTURE).parent.mkdir(parents=True, exist_ok=True)
    plot_curve(curve, work / PICTURE)
    report = {"iterations": args.iterations, "seeds": args.seeds, "sets": sets, "curve": curve,
              "seconds": stage.report()}
    text = markdown(report)
    save_report(work, report, text)
    if args.publish:
        command = "python -m bench.schedule" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
        publish_report(args.publish, text, command)
        (args.publish.parent / PICTURE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / PICTURE, args.publish.parent / PICTURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())

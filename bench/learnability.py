"""Learnability: a grounding module trained on seen classes labels unseen ones (the mini world).

    python -m bench.learnability [--train 768 --val 64 --test 128 --epochs 12 --seed 0 --seeds 1 --work DIR]

The property the whole method rests on, checked in minutes on a CPU. The images are mini-world
drawings with exact masks (bench/procedural.py), featurized by the world's trained generator
as real images are annotated (VAE, noise to the paper's t=5 of 50, one U-Net pass). They go
through the project's own code: training (grounding.train on Ray Train, on the 15 seen
classes of shapes split 1 only, best epoch by validation mIoU) and Protocol-I evaluation
(jobs/eval_grounding.py) on a held-out test set of all 20 classes. The five unseen classes are
new combinations of seen words ("red disc" is unseen; "red square" and "blue disc" are
seen), which the generator's trained text encoder relates. "seen" is the mean of the groups
of seen classes only (one/seen, two/seen), "unseen" the mean of the groups of unseen classes
only (one/unseen, two/unseen); the two/seen+unseen group, whose mIoU mixes a seen and an
unseen class's IoU, is printed on its own and counts in neither. The run exits 1 when seen is
below MIN_SEEN_MIOU or unseen below MIN_UNSEEN_MIOU.

--seeds N repeats the whole run (sets, training, evaluation) with seeds seed..seed+N-1 and adds
their mean, sample standard deviation and minimum: the thresholds are set from that spread
(docs/learnability.md), not from one run. --publish PAGE writes the report as a docs page.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.mini_mission import publish_report
from bench.procedural import SEEN, SPLIT, build_procedural, procedural_recipe
from factory.core.vocab import SHAPES
from grounding.config import GroundingEvalOptions, GroundingTrainConfig
from grounding.evaluate import MODULE, prepare_evaluation, run_evaluation
from grounding.metrics import GROUPS, format_table
from grounding.train import prepare_training, run_training

# Percent, as the evaluation reports it: mean - 3 sd over 5 seeds at the test's size, rounded down
# (docs/learnability.md: seen 80.1 - 3 x 3.5, unseen 73.5 - 3 x 7.1). One run's figures (seed 0 passed
# 80 and 75) said nothing of the next seed's.
MIN_SEEN_MIOU = 69.0
MIN_UNSEEN_MIOU = 52.0
SEEN_GROUPS = ("one/seen", "two/seen")
UNSEEN_GROUPS = ("one/unseen", "two/unseen")  # unseen-class IoUs only
MIXED_GROUP = "two/seen+unseen"  # a seen and an unseen class per image: in neither mean
LR = 1e-3  # the tiny module learns within a few hundred steps at 10x the paper's rate


@dataclass
class Report:
    train: int
    val: int
    test: int
    epochs: int
    best_epoch: int
    val_miou: float  # percent: seen classes of the validation set, at the best epoch
    results: dict  # eval_grounding's per-method results
    seconds: dict[str, float]

    @property
    def groups(self) -> dict[str, float | None]:
        """Test mIoU (percent) per Protocol-I group of split 1."""
        split = self.results[MODULE]["splits"][str(SPLIT)]
        return {g: split[g]["miou"] for g in GROUPS}  # the split holds more than its groups

    @property
    def seen_miou(self) -> float:
        return sum(self.groups[g] or 0.0 for g in SEEN_GROUPS) / len(SEEN_GROUPS)

    @property
    def unseen_miou(self) -> float:
        return sum(self.groups[g] or 0.0 for g in UNSEEN_GROUPS) / len(UNSEEN_GROUPS)

    @property
    def passed(self) -> bool:
        return self.seen_miou >= MIN_SEEN_MIOU and self.unseen_miou >= MIN_UNSEEN_MIOU

    def text(self) -> str:
        def cells(groups):
            return ", ".join(f"{g} {'-' if self.groups[g] is None else f'{self.groups[g]:.1f}'}" for g in groups)
        seconds = ", ".join(f"{stage} {s:.0f} s" for stage, s in self.seconds.items())
        verdict = "PASS" if self.passed else "FAIL"
        return "\n".join([
            "learnability: drawn mini-world triplets, the world generator's features at t=5 of 50, shapes split 1",
            f"  sets      train {self.train} (the {len(SEEN)} seen classes), val {self.val}, test {self.test} "
            f"(all {len(SHAPES)} classes)",
            f"  training  {self.epochs} epochs, best epoch {self.best_epoch} (val seen mIoU {self.val_miou:.1f})",
            f"  test      seen mIoU {self.seen_miou:.1f} ({cells(SEEN_GROUPS)})",
            f"            unseen mIoU {self.unseen_miou:.1f} ({cells(UNSEEN_GROUPS)})",
            f"            seen+unseen images: {cells([MIXED_GROUP])} (a seen and an unseen class per image; "
            f"in neither mean)",
            f"  time      {seconds}",
            f"  {verdict}  (seen mIoU must reach {MIN_SEEN_MIOU:.0f}, unseen {MIN_UNSEEN_MIOU:.0f})",
            "", format_table(self.results)])


def run(*, train: int, val: int, test: int, epochs: int, seed: int, work: Path) -> Report:
    """Build the three sets under `work`, train, evaluate; `work` must be empty or new."""
    if work.exists() and any(work.iterdir()):
        raise ValueError(f"{work} is not empty: use a new folder (a rerun would resume its training)")
    start = time.perf_counter()
    # Different plan seeds: no sample of the validation or test set is a training sample.
    sets = {"train": (train, SEEN, seed), "val": (val, SHAPES.names, seed + 1),
            "test": (test, SHAPES.names, seed + 2)}
    for name, (size, classes, plan_seed) in sets.items():
        build_procedural(procedural_recipe(str(work / name), classes=classes, num_samples=size, seed=plan_seed))
    built = time.perf_counter()

    config = GroundingTrainConfig(data=str(work / "train"), val=str(work / "val"), out=str(work / "grounding"),
                                  classes="seen", epochs=epochs, batch_size=8, lr=LR, seed=seed,
                                  model={"preset": "world"})
    summary = run_training(prepare_training(config))
    trained = time.perf_counter()

    options = GroundingEvalOptions(checkpoints={SPLIT: summary.best}, data=str(work / "test"))
    report = run_evaluation(prepare_evaluation(options))
    done = time.perf_counter()
    return Report(train=train, val=val, test=test, epochs=epochs, best_epoch=summary.best_epoch,
                  val_miou=100 * summary.best_miou, results=report["results"],
                  seconds={"build": built - start, "train": trained - built, "evaluate": done - trained,
                           "total": done - start})


def spread(reports: list[Report]) -> str:
    """Seen and unseen mIoU over the seeds' runs: mean, sample standard deviation, minimum."""
    def line(name: str, values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return (f"  {name:<7} mean {statistics.mean(values):.1f}  sd {sd:.1f}  min {min(values):.1f}  "
                f"(mean - 3 sd {statistics.mean(values) - 3 * sd:.1f}; runs {', '.join(f'{v:.1f}' for v in values)})")
    return "\n".join([f"over {len(reports)} seeds (seeds, sets and trainings all differ):",
                      line("seen", [r.seen_miou for r in reports]), line("unseen", [r.unseen_miou for r in reports]),
                      f"  {sum(r.passed for r in reports)} of {len(reports)} runs pass"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=768, help="training samples, seen classes (default: 768)")
    parser.add_argument("--val", type=int, default=64, help="validation samples, all classes (default: 64)")
    parser.add_argument("--test", type=int, default=128, help="test samples, all classes (default: 128)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default: 12)")
    parser.add_argument("--seed", type=int, default=0, help="plan seeds and training seed (default: 0)")
    parser.add_argument("--seeds", type=int, default=1, help="runs, with seeds seed..seed+N-1 (default: 1)")
    parser.add_argument("--work", type=Path, help="keep the sets and checkpoints in this new folder "
                        "(default: a temporary one, deleted afterwards)")
    parser.add_argument("--publish", type=Path, metavar="PAGE", help="also write the report as this docs page, "
                        "with the date, commit and command")
    args = parser.parse_args(argv)
    sizes = dict(train=args.train, val=args.val, test=args.test, epochs=args.epochs)
    with tempfile.TemporaryDirectory(prefix="learnability-") as scratch:
        work = args.work or Path(scratch)
        reports = [run(**sizes, seed=seed, work=work / f"seed-{seed}" if args.seeds > 1 else work)
                   for seed in range(args.seed, args.seed + args.seeds)]
    text = "\n\n".join([*(r.text() for r in reports), *([spread(reports)] if len(reports) > 1 else [])])
    print(text)
    if args.publish:
        publish_report(args.publish, f"# Learnability\n\n```\n{text}\n```\n",
                       "python -m bench.learnability " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Label truth on the mini world: does the grounding annotator give a class that is not in the image no mask?

    python -m bench.label_truth [--work outputs/label-truth] [--modules shipped=models/shapes-grounding ...]
                                [--images 500]

Every module named in --modules is measured on the same images, so a before/after comparison is
one run. Two measurements:

1. **Generated images.** The Protocol-I test prompts (recipe shapes-triplets-test: ten one-object
   prompts per class and one per pair, 390 images) with every image kept whether or not the
   generator drew each prompted class (``labeler.on_missing: ignore``), without DAAM's maps.
   Protocol-I (grounding/evaluate.py) per module: mIoU of the classes the oracle found; presence
   precision and recall against the oracle's found flags (the judge: used here, never by the
   annotator), seen and unseen classes apart; how many images with a class the oracle did not
   find gave that class a mask; and the text-blind control (each class asked for under another
   class's name).
2. **Drawn benchmark images**, annotated as a user would (the recipe of jobs/annotate_images.py with
   ``--images DIR --classes-file F --route noised``): each val image is asked about its own classes,
   read from its exact masks, plus one class it does not show (drawn per image, seeded by its
   name). The module is given that list: the true classes and one false one. Scored against the
   exact masks: the share of images whose absent class got pixels in the label map, the share of
   present classes found (IoU >= 0.5), presence precision and recall, and the mIoU of the present
   classes (per class over the images that show it), seen and unseen classes apart; and how the
   presence scores alone would decide at other thresholds (the sweep behind the recipe's default).
3. **The same images given only their true classes** (the recipe shapes-annotate reads them from the
   masks, as ``bench/real_images.py`` does): what the presence gate costs where every listed class
   is there. Label maps scored against the exact ones, background errors counted
   (``bench.real_images.annotation_scores``).

Modules named NAME#k are NAME's training again with seed k: the report gives each such group's mean
and range, so that a difference between modules can be set against what a seed alone changes.

Every stage resumes. Results: <work>/report.md and <work>/report.json; ``--publish docs/label-truth.md``
writes the report as that page, with the date, commit and command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from bench import real_images
from bench.mini_mission import StageClock, build, publish_report, save_report
from factory.core.cli import add_verbose_argument, setup_output
from factory.core.cluster import init_ray
from factory.core.tables import cell
from factory.core.vocab import SHAPES
from factory.dataset.codec import decode_label
from factory.dataset.real import real_dataset
from factory.dataset.source import DatasetSource
from grounding.config import GroundingEvalOptions
from grounding.evaluate import GATED, MODULE, TEXT_PERMUTED
from grounding.evaluate import prepare_evaluation as prepare_protocol_i
from grounding.evaluate import run_evaluation as run_protocol_i
from grounding.metrics import format_presence_table, format_table
from world.benchmark import write_benchmark

SPLIT = 1
FOUND_IOU = 0.5  # a present class counts as found when its label-map region overlaps the truth this much
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
# An absent class that shares a word with a present one ("red disc" beside a "red square") or none.
NEARNESS = ("sharing", "apart")
KINDS = {"seen": set(SHAPES.seen(SPLIT)), "unseen": set(SHAPES.unseen(SPLIT))}


def absent_class(image: str, shown: tuple[str, ...]) -> str:
    """One class the image does not show, drawn from a seed made of its name (the same on every run)."""
    others = [name for name in SHAPES.names if name not in shown]
    seed = int(hashlib.sha256(image.encode()).hexdigest()[:8], 16)
    return others[np.random.default_rng(seed).integers(len(others))]


def class_lists(root: Path, images: int, folder: Path) -> Path:
    """The first `images` val images copied into `folder` and their class lists (own classes plus one
    absent) in `folder`/../classes.json, as a user hands them to jobs/annotate_images.py."""
    reader = real_dataset("voc", root, "val", SHAPES.name)
    folder.mkdir(parents=True, exist_ok=True)
    lists = {}
    for k in range(min(images, len(reader))):
        name = f"{reader.ids[k]}.jpg"
        shown = tuple(SHAPES.classes[i - 1].name for i in reader.present(k))
        lists[name] = [*shown, absent_class(name, shown)]
        if not (folder / name).exists():
            shutil.copyfile(root / "JPEGImages" / name, folder / name)
    path = folder.parent / "classes.json"
    path.write_text(json.dumps(lists, indent=1) + "\n")
    return path


def annotate(out: Path, images: Path, classes: Path, checkpoint: str, presence_threshold: float = 0.5) -> str:
    """jobs/annotate_images.py --images images --classes-file classes --route noised --checkpoint checkpoint."""
    return real_images.annotate(out, images, checkpoint, "noised", overrides={
        "source.format": "folder", "source.classes_file": str(classes),
        "annotator.presence_threshold": presence_threshold}).out


def score_annotation(dataset: str, root: Path, lists: dict[str, list[str]]) -> dict:
    """Label truth of an annotated set of benchmark images against their exact masks (see the module
    docstring); seen and unseen classes apart."""
    reader = real_dataset("voc", root, "val", SHAPES.name)
    position = {f"{image_id}.jpg": k for k, image_id in enumerate(reader.ids)}
    source = DatasetSource.open(dataset)
    with_presence = source.has_column("presence")  # a module without a presence head records none
    rows = source.read(["source_image", "classes", "label", *(["presence"] if with_presence else [])]).to_pylist()
    counts = {kind: {"absent_images": 0, "absent_masked": 0, "present": 0, "found": 0, "tp": 0, "fp": 0, "fn": 0,
                     **{f"absent_{near}_{n}": 0 for near in NEARNESS for n in ("images", "masked")}} for kind in KINDS}
    pixels: dict[str, list[int]] = {}  # present class -> [intersection, union]
    scores: dict[str, list[tuple[float, bool]]] = {kind: [] for kind in KINDS}  # (presence score, in the image)
    for row in rows:
        predicted, truth = decode_label(row["label"]), reader[position[row["source_image"]]].label
        there = set(lists[row["source_image"]][:-1])
        for k, name in enumerate(row["classes"]):
            index, kind = SHAPES.lookup(name).index, "unseen" if name in KINDS["unseen"] else "seen"
            mine, true = predicted == index, truth == index
            c, masked = counts[kind], bool(mine.any())
            if with_presence:
                scores[kind].append((row["presence"][k], name in there))
            if name not in there:
                near = "sharing" if set(_words(name)) & {w for shown in there for w in _words(shown)} else "apart"
                c["absent_images"] += 1
                c["absent_masked"] += masked
                c[f"absent_{near}_images"] += 1
                c[f"absent_{near}_masked"] += masked
                c["fp"] += masked
                continue
            i, u = int((mine & true).sum()), int((mine | true).sum())
            c["present"] += 1
            c["found"] += i / u >= FOUND_IOU
            c["tp"] += masked
            c["fn"] += not masked
            totals = pixels.setdefault(name, [0, 0])
            totals[0] += i
            totals[1] += u
    out = {"images": len(rows)}
    for kind, c in counts.items():
        ious = [100 * i / u for name, (i, u) in pixels.items() if name in KINDS[kind] and u]
        out[kind] = {**c, "absent_masked_rate": _percent(c["absent_masked"], c["absent_images"]),
                     **{f"absent_{near}_rate": _percent(c[f"absent_{near}_masked"], c[f"absent_{near}_images"])
                        for near in NEARNESS},
                     "found_rate": _percent(c["found"], c["present"]),
                     "precision": _percent(c["tp"], c["tp"] + c["fp"]), "recall": _percent(c["tp"], c["tp"] + c["fn"]),
                     "miou_present": float(np.mean(ious)) if ious else None,
                     "sweep": _sweep(scores[kind])}
    return out


def _words(name: str) -> list[str]:
    return SHAPES.lookup(name).natural.split()


def _percent(a: int, b: int) -> float | None:
    return 100.0 * a / b if b else None


def _sweep(scored: list[tuple[float, bool]]) -> dict | None:
    """Per presence threshold: the share of absent classes judged present, and of present ones judged absent."""
    if not scored:
        return None
    values, there = np.array([s for s, _ in scored]), np.array([t for _, t in scored])
    return {str(t): {"absent_judged_present": _percent(int(np.sum((values >= t) & ~there)), int(np.sum(~there))),
                     "present_judged_absent": _percent(int(np.sum((values < t) & there)), int(np.sum(there)))}
            for t in THRESHOLDS}


def run(work: Path, modules: dict[str, str], images: int, presence_threshold: float = 0.5) -> dict:
    stage = StageClock("label truth")
    test = build("shapes-triplets-test", work / "test", 1.0,
                 {"labeler.on_missing": "ignore", "capture.attention": False}, in_process=True)
    root = work / "benchmark"
    listed = root / "ImageSets" / "Segmentation" / "val.txt"
    if not listed.exists() or len(listed.read_text().split()) < images:
        write_benchmark(root, val=images, train=1)
    stage("images")
    generated = {}
    for name, checkpoint in modules.items():
        report = run_protocol_i(prepare_protocol_i(GroundingEvalOptions(
            checkpoints={SPLIT: checkpoint}, data=str(work / "test"), presence_threshold=presence_threshold)))
        generated[name] = report["results"][MODULE]
        if GATED in report["results"]:
            generated[f"{name}, presence-gated"] = report["results"][GATED]
        generated[f"{name}, text permuted"] = report["results"][TEXT_PERMUTED]
    stage("generated")
    classes = class_lists(root, images, work / "images")
    lists = json.loads(classes.read_text())
    drawn = {name: score_annotation(annotate(work / f"annotated-{_slug(name)}-{presence_threshold}", work / "images",
                                             classes, checkpoint, presence_threshold), root, lists)
             for name, checkpoint in modules.items()}
    stage("drawn")
    true_lists = {name: real_images.annotation_scores(real_images.annotate(
        work / f"true-lists-{_slug(name)}-{presence_threshold}", root, checkpoint, "noised", images,
        {"annotator.presence_threshold": presence_threshold}).out, root) for name, checkpoint in modules.items()}
    stage("true lists")
    return {"modules": modules, "presence_threshold": presence_threshold, "test_set": test, "generated": generated,
            "drawn": drawn, "true_lists": true_lists,
            "given": "each drawn image's true classes (from its exact masks) plus one class it does not show",
            "seconds": stage.report()}


def _slug(name: str) -> str:
    return name.replace("#", "-seed")  # a folder name no URI parser reads as a fragment


# What the seeds table summarises: (label, the value in a module's report).
SEED_METRICS = {
    **{f"absent class given a mask, {kind} (%)": (lambda r, kind=kind: r["drawn"][kind]["absent_masked_rate"])
       for kind in KINDS},
    **{f"present classes found, {kind} (%)": (lambda r, kind=kind: r["drawn"][kind]["found_rate"]) for kind in KINDS},
    **{f"true lists, {kind} mIoU": (lambda r, kind=kind: r["true_lists"][kind]) for kind in KINDS},
}


def seed_groups(modules: dict[str, str]) -> dict[str, list[str]]:
    """Modules named NAME#k are NAME trained again with seed k: {NAME: [NAME, NAME#1, ...]}, groups of two or more."""
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(name.split("#")[0], []).append(name)
    return {group: names for group, names in groups.items() if len(names) > 1}


def seeds_table(report: dict) -> list[str]:
    """Mean and range over each group's seeds of the drawn-image measurements: how much of a difference
    between modules one training's luck could make."""
    lines = []
    for group, names in seed_groups(report["modules"]).items():
        lines += [f"`{group}` over {len(names)} trainings ({', '.join(names)}), the same data and settings, "
                  "other seeds:", "", "| Measurement | Mean | Min | Max |", "|---|---:|---:|---:|"]
        for label, value in SEED_METRICS.items():
            values = [value({"drawn": report["drawn"][n], "true_lists": report["true_lists"][n]}) for n in names]
            lines.append(f"| {label} | {np.mean(values):.1f} | {min(values):.1f} | {max(values):.1f} |")
        lines.append("")
    return ["## Seeds", "", *lines] if lines else []


def markdown(report: dict) -> str:
    drawn = ["| Module | Classes | Absent class given a mask | Present classes found (IoU >= 0.5) | "
             "Presence precision | Presence recall | mIoU of present classes | Absent masked: shares a word with a "
             "present class / none |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["drawn"].items():
        for kind in KINDS:
            c = r[kind]
            drawn.append(f"| {name} | {kind} | {cell(c['absent_masked_rate'], 1)}% of {c['absent_images']} | "
                         f"{cell(c['found_rate'], 1)}% of {c['present']} | {cell(c['precision'], 1)} | "
                         f"{cell(c['recall'], 1)} | {cell(c['miou_present'], 1)} | "
                         f"{cell(c['absent_sharing_rate'], 1)}% of {c['absent_sharing_images']} / "
                         f"{cell(c['absent_apart_rate'], 1)}% of {c['absent_apart_images']} |")
    sweep = ["| Module | Classes | Threshold | Absent judged present (%) | Present judged absent (%) |",
             "|---|---|---:|---:|---:|"]
    for name, r in report["drawn"].items():
        for kind in KINDS:
            for t, s in (r[kind]["sweep"] or {}).items():
                sweep.append(f"| {name} | {kind} | {t} | {cell(s['absent_judged_present'], 1)} | "
                             f"{cell(s['present_judged_absent'], 1)} |")
    return "\n".join([
        "# Label truth on the mini world", "",
        f"Modules: {', '.join(f'{k} = `{v}`' for k, v in report['modules'].items())}; a module with a presence "
        f"head gives a class scoring below {report['presence_threshold']} no mask.", "",
        "## Generated images (Protocol-I test prompts, every image kept; the oracle's found flags as the judge)", "",
        "mIoU over the classes the oracle found; each cell: mIoU (images). A plain row asks for a mask of every "
        "class, as the papers' Protocol-I; \"presence-gated\" gives a class the module judges absent no mask, as "
        "the annotator does; \"text permuted\" asks for each class under another class's name (gated where the "
        "module has a presence head) and scores the masks as the true class.", "",
        "```", format_table(report["generated"]), "```", "",
        "Presence precision / recall (percent) against the oracle's found flags, and the share of images with "
        "a class the oracle did not find in which that class got a mask:", "",
        "```", format_presence_table(report["generated"]), "```", "",
        f"## Drawn benchmark images (val, {next(iter(report['drawn'].values()))['images']} images, noised route)", "",
        f"The module was given {report['given']}; scored against the exact masks.", "",
        *drawn, "",
        "How the presence scores alone decide at other thresholds (the same images):", "",
        *sweep, "",
        "## The same images, given only their true classes", "",
        "Label maps against the exact ones (IoU per class, background errors counted), means over split 1's "
        "seen and unseen classes: what the presence gate costs where every listed class is in the image.", "",
        "| Module | Images | Seen mIoU | Unseen mIoU | Harmonic |", "|---|---:|---:|---:|---:|",
        *(f"| {name} | {r['images']} | {r['seen']:.1f} | {r['unseen']:.1f} | {r['harmonic']:.1f} |"
          for name, r in report["true_lists"].items()), "",
        *seeds_table(report),
        "## Time (s, this machine)", "", "```json", json.dumps(report["seconds"], indent=2), "```", ""])


def _module(value: str) -> tuple[str, str]:
    name, sep, uri = value.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT, got {value!r}")
    return name, uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("outputs/label-truth"),
                        help="folder of every set and result; a rerun resumes (default: %(default)s)")
    parser.add_argument("--modules", type=_module, nargs="+", default=[("shipped", "models/shapes-grounding")],
                        metavar="NAME=CHECKPOINT", help="grounding modules trained on split 1's seen classes, "
                        "each measured on the same images; NAME#k names NAME trained again with seed k, and the "
                        "report gives each such group's mean and range (default: shipped=models/shapes-grounding)")
    parser.add_argument("--images", type=int, default=500, help="drawn val images to annotate (default: %(default)s)")
    parser.add_argument("--presence-threshold", type=float, default=0.5,
                        help="annotator.presence_threshold and Protocol-I's (default: %(default)s)")
    parser.add_argument("--publish", type=Path, metavar="PAGE", help="also write the report as this docs page, "
                        "under the date, commit and command (docs/label-truth.md holds the published run)")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    setup_output(args.verbose)
    init_ray()
    report = run(args.work, dict(args.modules), args.images, args.presence_threshold)
    text = markdown(report)
    save_report(args.work, report, text)
    if args.publish:
        publish_report(args.publish, text, "python -m bench.label_truth " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

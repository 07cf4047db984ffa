"""Inspect a finished dataset: what it holds per class, how sure its labels are, and pictures.

One pass over the rows (label maps decoded, images not) gives per class: samples whose
prompt named it, how often the oracle found or missed it, its mask coverage (fraction of
the label map's pixels), its detector scores; per sample the ignore (255) fraction and the
CLIP ``quality`` score when the column exists. Drops come from the manifest, per class
too when the plan can be rebuilt from its recipe. A second pass reads only the gallery
samples: per class, up to ``GALLERY_SAMPLES`` spread over its score ranks, lowest first,
so a person sees the worst labels beside typical ones.

Writes ``report.json``, ``index.html`` (tables, charts embedded as PNG, no scripts, nothing
fetched) and ``gallery/<class>.png``. Charts are drawn with PIL: no plotting dependency.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from factory.core.errors import FactoryError
from factory.core.options import positional
from factory.core.storage import open_location
from factory.dataset.codec import PALETTE, decode_png
from factory.dataset.preview import preview_png
from factory.dataset.source import DatasetSource, Replan
from factory.dataset.write import read_commits


class InspectOptions(BaseModel):
    """The options of ``jobs/inspect_dataset.py``."""
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = positional(description="the dataset: a local folder or s3://bucket/prefix")
    out: str | None = Field(None, description="a local folder or s3://bucket/prefix for the report "
                            "(null: inspections/<dataset folder name>)")

    @property
    def output(self) -> str:
        return self.out or f"inspections/{self.dataset.rstrip('/').rsplit('/', 1)[-1]}"


GALLERY_SAMPLES = 8
HISTOGRAM_BINS = 10  # over [0, 1] for detector and quality scores
STAT_COLUMNS = ["sample_id", "classes", "class_indices", "label", "scores", "found", "quality", "agreement"]
GALLERY_COLUMNS = ["sample_id", "index", "prompt", "classes", "class_indices", "image", "label", "scores", "found"]


@dataclass
class ClassStats:
    index: int
    name: str
    samples: int = 0
    found: int = 0
    dropped: int | None = None  # None: the plan could not be rebuilt, so drops are not known per class
    coverage: list[float] = field(default_factory=list)  # label-map pixel fraction, one per sample
    scores: list[float] = field(default_factory=list)  # detector score where found
    ranked: list[tuple[float, str]] = field(default_factory=list)  # (score, sample_id) for the gallery
    agreement: list[float] = field(default_factory=list)  # IoU with the second labeler's mask, one per sample

    def summary(self) -> dict:
        return {"index": self.index, "name": self.name, "samples": self.samples, "found": self.found,
                "missed": self.samples - self.found, "dropped": self.dropped,
                "coverage_mean": _mean(self.coverage), "coverage_median": _median(self.coverage),
                "score_mean": _mean(self.scores), "score_median": _median(self.scores),
                "score_min": min(self.scores) if self.scores else None,
                "agreement_mean": _mean(self.agreement), "agreement_median": _median(self.agreement),
                "agreement_histogram": _histogram(self.agreement) if self.agreement else None}

    def gallery_ids(self) -> list[str]:
        """Up to GALLERY_SAMPLES ids spread evenly over the score ranks, lowest first."""
        ranked = sorted(self.ranked)
        if len(ranked) > GALLERY_SAMPLES:
            picks = np.linspace(0, len(ranked) - 1, GALLERY_SAMPLES).round().astype(int)
            ranked = [ranked[i] for i in picks]
        return [sample_id for _, sample_id in ranked]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _histogram(values: list[float]) -> list[int]:
    return np.histogram(np.clip(values, 0, 1), bins=HISTOGRAM_BINS, range=(0, 1))[0].tolist()


@dataclass
class Inspection:
    source: DatasetSource
    classes: dict[int, ClassStats]
    ignore: list[float]
    scores: list[float]
    quality: list[float] | None
    drops_per_class_known: bool

    def report(self) -> dict:
        counts = self.source.manifest["counts"]
        present = [c.summary() for c in self.classes.values() if c.samples or c.dropped]
        return {
            "dataset": self.source.uri, "name": self.source.manifest["name"],
            "vocabulary": self.source.vocabulary.name,
            "counts": counts,
            "agreement": {key: value for key, value in self.source.manifest["agreement"].items() if key != "classes"}
            if "agreement" in self.source.manifest else None,
            "classes": present,
            "classes_without_samples": [c.name for c in self.classes.values() if not c.samples],
            "ignore_fraction": {"mean": _mean(self.ignore), "median": _median(self.ignore)},
            "detector_scores": {"mean": _mean(self.scores), "histogram": _histogram(self.scores)},
            "quality": None if self.quality is None else {
                "mean": _mean(self.quality), "median": _median(self.quality),
                "min": min(self.quality, default=None), "max": max(self.quality, default=None),
                "histogram": _histogram(self.quality)},
        }


def drops_per_class(source: DatasetSource, replan: Replan) -> dict[str, int] | None:
    """Dropped samples per prompt class, from the commit records and the plan rebuilt from the
    manifest's recipe; None when this version of the code makes another plan."""
    try:
        classes = {sample.sample_id: sample.classes for sample in replan(source.manifest)}
    except FactoryError:  # a recipe of another version: totals are still in the manifest
        return None
    counts: dict[str, int] = {}
    for commit in read_commits(source.location):
        for sample_id in commit.dropped:
            for name in classes.get(sample_id, ()):
                counts[name] = counts.get(name, 0) + 1
    return counts


def inspect(source: DatasetSource, replan: Replan, progress: bool = True) -> Inspection:
    """Per-class statistics of a dataset; `replan` rebuilds its plan (``factory.pipeline.plan.replan``)."""
    classes = {c.index: ClassStats(c.index, c.name) for c in source.vocabulary.classes}
    ignore, scores, quality = [], [], []
    rows = tqdm(source.iter_rows(STAT_COLUMNS), total=source.rows, desc="inspect", unit="sample",
                disable=not progress)
    for row in rows:
        label = decode_png(row["label"]["bytes"])
        fractions = np.bincount(label.ravel(), minlength=256) / label.size
        ignore.append(float(fractions[255]))
        if "quality" in row:
            quality.append(float(row["quality"]))
        for k, (index, found, score) in enumerate(zip(row["class_indices"], row["found"], row["scores"])):
            stats = classes[index]
            if "agreement" in row:
                stats.agreement.append(float(row["agreement"][k]))
            stats.samples += 1
            stats.coverage.append(float(fractions[index]))
            stats.ranked.append((float(score), row["sample_id"]))
            if found:
                stats.found += 1
                stats.scores.append(float(score))
                scores.append(float(score))
    drops = drops_per_class(source, replan)
    for stats in classes.values():
        stats.dropped = None if drops is None else drops.get(stats.name, 0)
    return Inspection(source, classes, ignore, scores, quality if quality else None, drops is not None)


# ---- pictures ------------------------------------------------------------------------

_FONT = ImageFont.load_default()
_FOUND, _MISSED, _DROPPED, _PLAIN = (46, 125, 50), (239, 108, 0), (198, 40, 40), (30, 100, 180)


def bar_chart(title: str, labels: list[str], series: list[tuple[str, list[float], tuple]],
              value_format: str = "{:g}") -> bytes:
    """Horizontal bars, one per label, series stacked left to right; PNG bytes."""
    row_h, label_w, bar_w, pad = 16, 150, 360, 8
    totals = [sum(values[i] for _, values, _ in series) for i in range(len(labels))]
    top = max(totals, default=0) or 1
    legend = len(series) > 1
    height = pad * 2 + 20 + (16 if legend else 0) + row_h * max(len(labels), 1)
    image = Image.new("RGB", (label_w + bar_w + 90, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), title, fill="black", font=_FONT)
    y = pad + 20
    if legend:
        x = label_w
        for name, _, color in series:
            draw.rectangle((x, y + 2, x + 9, y + 11), fill=color)
            draw.text((x + 13, y), name, fill="black", font=_FONT)
            x += 13 + int(draw.textlength(name, font=_FONT)) + 16
        y += 16
    for i, label in enumerate(labels):
        draw.text((pad, y + 2), label[:24], fill="black", font=_FONT)
        x = label_w
        for _, values, color in series:
            width = int(round(bar_w * values[i] / top))
            if width:
                draw.rectangle((x, y + 2, x + width - 1, y + row_h - 3), fill=color)
            x += width
        draw.text((x + 4, y + 2), value_format.format(totals[i]), fill="black", font=_FONT)
        y += row_h
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bins() -> list[str]:
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    return [f"{a:.1f}-{b:.1f}" for a, b in zip(edges[:-1], edges[1:])]


def charts(inspection: Inspection, report: dict) -> dict[str, bytes]:
    present = report["classes"]
    names = [c["name"] for c in present]
    out = {"samples per class": bar_chart(
        "samples per class (prompted)", names,
        [("found", [c["found"] for c in present], _FOUND), ("missed", [c["missed"] for c in present], _MISSED),
         *([("dropped", [c["dropped"] for c in present], _DROPPED)] if inspection.drops_per_class_known else [])]),
        "mask coverage per class": bar_chart(
            "mean mask coverage per class (share of the label map)", names,
            [("coverage", [c["coverage_mean"] or 0.0 for c in present], _PLAIN)], "{:.1%}")}
    dropped = report["counts"]["dropped"]
    if dropped:
        out["drop reasons"] = bar_chart("dropped samples by reason", list(dropped),
                                        [("dropped", list(dropped.values()), _DROPPED)])
    if inspection.scores:
        out["detector scores"] = bar_chart("detector score of found classes", _bins(),
                                           [("classes", report["detector_scores"]["histogram"], _PLAIN)])
    if report["agreement"]:
        checked = [c for c in present if c["agreement_histogram"]]
        out["label agreement"] = bar_chart(
            "mean IoU with the second labeler's masks per class", [c["name"] for c in checked],
            [("IoU", [c["agreement_mean"] for c in checked], _PLAIN)], "{:.2f}")
        out["label agreement histogram"] = bar_chart(
            "IoU with the second labeler's masks, every class of every written sample", _bins(),
            [("classes", np.sum([c["agreement_histogram"] for c in checked], axis=0).tolist(), _PLAIN)])
    if report["quality"]:
        out["quality scores"] = bar_chart("CLIP quality score per sample", _bins(),
                                          [("samples", report["quality"]["histogram"], _PLAIN)])
    return out


def gallery_name(class_name: str) -> str:
    return class_name.replace(" ", "_")


def galleries(inspection: Inspection, progress: bool = True) -> dict[str, bytes]:
    """gallery/<class>.png per class with samples: image beside its overlay, lowest score first."""
    wanted = {stats.name: stats.gallery_ids() for stats in inspection.classes.values() if stats.samples}
    ids = {i for picks in wanted.values() for i in picks}
    rows = {row["sample_id"]: row for row in inspection.source.iter_rows(GALLERY_COLUMNS, only=ids)}
    return {name: preview_png([rows[i] for i in picks])
            for name, picks in tqdm(wanted.items(), desc="galleries", unit="class", disable=not progress)}


# ---- the page ------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _swatch(index: int) -> str:
    r, g, b = PALETTE[3 * index:3 * index + 3]
    return f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>'


def render_html(report: dict, chart_pngs: dict[str, bytes], gallery_files: dict[str, str]) -> str:
    counts = report["counts"]
    dropped = ", ".join(f"{n} {reason}" for reason, n in counts["dropped"].items()) or "none"
    rows = "".join(
        f"<tr><td>{_swatch(c['index'])}{html.escape(c['name'])}</td><td>{c['samples']}</td><td>{c['found']}</td>"
        f"<td>{c['missed']}</td><td>{'' if c['dropped'] is None else c['dropped']}</td>"
        f"<td>{_percent(c['coverage_mean'])}</td><td>{_percent(c['coverage_median'])}</td>"
        f"<td>{_number(c['score_mean'])}</td><td>{_number(c['score_min'])}</td>"
        f"<td>{_number(c['agreement_mean'])}</td></tr>"
        for c in report["classes"])
    images = "".join(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
                     f'{base64.b64encode(png).decode()}"></figure>' for title, png in chart_pngs.items())
    quality = report["quality"]
    quality_line = ("no quality column" if quality is None else
                    f"mean {quality['mean']:.3f}, median {quality['median']:.3f}, "
                    f"range {quality['min']:.3f} to {quality['max']:.3f}")
    sections = "".join(f'<h3 id="{html.escape(gallery_name(name))}">{html.escape(name)}</h3>'
                       f'<img class="gallery" alt="{html.escape(name)}" src="{html.escape(path)}">'
                       for name, path in gallery_files.items())
    absent = ", ".join(report["classes_without_samples"]) or "none"
    ignore = report["ignore_fraction"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(report['name'])}: dataset inspection</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.swatch {{ display: inline-block; width: 10px; height: 10px; margin-right: 6px; border: 1px solid #888; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }}
img.gallery {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(report['name'])}</h1>
<p>{html.escape(report['dataset'])} &middot; vocabulary {html.escape(report['vocabulary'])}</p>
<table>
<tr><th>planned</th><td>{counts['planned']}</td></tr>
<tr><th>written</th><td>{counts['written']}</td></tr>
<tr><th>dropped</th><td>{html.escape(dropped)}</td></tr>
<tr><th>ignore pixels (255)</th><td>mean {_percent(ignore['mean'])}, median {_percent(ignore['median'])}</td></tr>
<tr><th>detector score (found)</th><td>mean {_number(report['detector_scores']['mean'])}</td></tr>
<tr><th>quality</th><td>{html.escape(quality_line)}</td></tr>
</table>
<h2>Classes</h2>
<p>Samples: written samples whose prompt named the class; found / missed by the oracle;
dropped: samples made for the class that were not written (then replaced, or given up). Coverage: share of the
label map's pixels with the class index. Agreement: IoU of a second labeler's mask with the label's (recipe
`agreement`), over the written samples.</p>
<table><tr><th>class</th><th>samples</th><th>found</th><th>missed</th><th>dropped</th>
<th>coverage mean</th><th>coverage median</th><th>score mean</th><th>score min</th><th>agreement mean</th></tr>
{rows}</table>
<p>Classes without samples: {html.escape(absent)}</p>
<h2>Charts</h2>
{images}
<h2>Galleries</h2>
<p>Per class, up to {GALLERY_SAMPLES} samples spread over its detector-score ranks, lowest first:
each image beside its label map (class colours as in the table; cream is ignore).</p>
{sections}
</body></html>
"""


def summary_table(report: dict, out: str) -> str:
    counts = report["counts"]
    dropped = ", ".join(f"{n} {reason}" for reason, n in counts["dropped"].items()) or "none"
    lines = [f"inspect_dataset: {report['dataset']} ({report['name']}, vocabulary {report['vocabulary']})",
             f"  samples  {counts['written']} written of {counts['planned']} planned; dropped: {dropped}",
             f"  ignore   {_percent(report['ignore_fraction']['mean'])} of pixels on average",
             f"  {'class':<16}{'samples':>8}{'found':>7}{'missed':>7}{'dropped':>8}{'coverage':>10}{'score':>7}"
             + (f"{'agree':>7}" if report["agreement"] else "")]
    for c in report["classes"]:
        lines.append(f"  {c['name'][:16]:<16}{c['samples']:>8}{c['found']:>7}{c['missed']:>7}"
                     f"{'' if c['dropped'] is None else c['dropped']:>8}"
                     f"{_percent(c['coverage_mean']):>10}{_number(c['score_mean']):>7}"
                     + (f"{_number(c['agreement_mean']):>7}" if report["agreement"] else ""))
    lines.append(f"  written  {out}/report.json, {out}/index.html, {out}/gallery/")
    return "\n".join(lines)


def write_inspection(inspection: Inspection, out: str, progress: bool = True) -> dict:
    """report.json, index.html and gallery/<class>.png under ``out`` (local or S3); the report."""
    location = open_location(out)
    report = inspection.report()
    gallery_files = {}
    for name, png in galleries(inspection, progress).items():
        gallery_files[name] = f"gallery/{gallery_name(name)}.png"
        location.write_bytes(gallery_files[name], png)
    location.write_bytes("report.json", json.dumps(report, indent=2).encode())
    location.write_bytes("index.html", render_html(report, charts(inspection, report), gallery_files).encode())
    return report

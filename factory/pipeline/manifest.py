"""The manifest of a finished build: what was planned, made and dropped, with which models, and
where its labels came from (label provenance), which the card shows and Protocol-II reads."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib import metadata

import numpy as np

from factory.core.conventions import BACKGROUND, IGNORE
from factory.core.vocab import Vocabulary
from factory.dataset.layout import FORMAT
from factory.dataset.write import Commit
from factory.diffusion.steps import capture_call_index
from factory.pipeline.checks import BuildError, Prepared
from factory.pipeline.labelers import labeler_for, labeler_of
from factory.pipeline.plan import Sample, all_attempts, plan_digest
from factory.pipeline.recipe import Recipe

_VERSIONED = ("dataset-factory", "torch", "torchvision", "diffusers", "transformers", "ray", "pyarrow")


def build_manifest(prepared: Prepared, commits: list[Commit], models: dict[str, str]) -> dict:
    recipe, plan, vocabulary = prepared.recipe, prepared.plan, prepared.vocabulary
    made = outcomes(commits)
    dropped: dict[str, int] = {}
    for reason in filter(None, made.values()):
        dropped[reason] = dropped.get(reason, 0) + 1
    files = sorted(({"path": c.file, "rows": c.rows, "bytes": c.bytes, "sha256": c.sha256}
                    for c in commits if c.file), key=lambda f: f["path"])
    written = sum(f["rows"] for f in files)
    return {
        "format": FORMAT,
        "name": recipe.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.model_dump(mode="json"),
        "content_key": recipe.content_key(),
        "plan": {"samples": len(plan), "digest": plan_digest(plan),
                 "prompted_classes": prompted_classes(plan, vocabulary.names)},
        **({"follows": prepared.follows} if prepared.follows else {}),
        "vocabulary": {**vocabulary.definition(), "background": BACKGROUND, "ignore": IGNORE},
        "models": models,
        **({"generator": {"family": prepared.family.key, "title": prepared.family.title,
                          "pipeline": prepared.family.pipeline}} if prepared.family else {}),
        "versions": _versions(),
        # planned: plan entries; attempted: samples made for them (replacements too); written: kept
        # samples (one per entry at most); given_up: entries whose every attempt was dropped
        "counts": {"planned": len(plan), "attempted": len(made), "written": written, "dropped": dropped,
                   "given_up": len(plan) - written},
        "per_class": attempt_counts(plan, recipe, made),
        "capture": _capture_info(recipe, commits),
        "labels": label_provenance(recipe, vocabulary, models["labeler"]),
        **({"agreement": agreement_summary(recipe, vocabulary, commits, models["agreement"])}
           if recipe.agreement.enabled else {}),
        **({"presence": presence_summary(recipe, vocabulary, commits)} if any(c.presence for c in commits) else {}),
        "files": files,
    }


def outcomes(commits: list[Commit]) -> dict[str, str]:
    """Sample id -> "" when written, its drop reason when dropped."""
    found: dict[str, str] = {}
    for commit in commits:
        for sample_id, reason in (*((i, "") for i in commit.written), *commit.dropped.items()):
            if sample_id in found:
                raise BuildError(f"sample {sample_id} is committed twice (two builds writing one output?)")
            found[sample_id] = reason
    return found


def attempt_counts(plan: list[Sample], recipe: Recipe, made: dict[str, str]) -> dict[str, dict[str, int]]:
    """Per class: plan entries naming it, samples attempted, entries kept and given up."""
    counts: dict[str, dict[str, int]] = {}
    attempts = {entry.index: [] for entry in plan}
    for sample in all_attempts(plan, recipe):
        if sample.sample_id in made:
            attempts[sample.index].append(made[sample.sample_id])
    for entry in plan:
        tried = attempts[entry.index]
        kept = "" in tried
        for name in entry.classes:
            count = counts.setdefault(name, dict.fromkeys(("planned", "attempted", "kept", "given_up"), 0))
            count["planned"] += 1
            count["attempted"] += len(tried)
            count["kept"] += kept
            count["given_up"] += not kept
    return counts


def agreement_summary(recipe: Recipe, vocabulary: Vocabulary, commits: list[Commit], checker: str) -> dict:
    """Per class, how the second labeler's masks agreed with the labels (IoU) over every sample
    made, dropped ones too: the manifest's "agreement", which the card shows."""
    ious: dict[str, list[float]] = {}
    for commit in commits:
        for name, values in commit.agreement.items():
            ious.setdefault(name, []).extend(values)
    c = recipe.agreement
    return {"labeler": checker, "min_iou": c.min_iou, "action": c.action, "classes": {
        name: {"samples": len(values), "mean": float(np.mean(values)), "median": float(np.median(values)),
               "below": int(np.sum(np.array(values) < c.min_iou))}
        for name, values in sorted(ious.items(), key=lambda item: vocabulary.lookup(item[0]).index)}}


def presence_summary(recipe: Recipe, vocabulary: Vocabulary, commits: list[Commit]) -> dict:
    """Per class, how often the annotator judged it present and absent over every sample made
    (dropped ones too), and the spread of its presence scores: the manifest's "presence", which
    the card shows, so that a user sees the module's own signal without a judge."""
    scores: dict[str, list[float]] = {}
    for commit in commits:
        for name, values in commit.presence.items():
            scores.setdefault(name, []).extend(values)
    threshold = recipe.annotator.presence_threshold
    return {"threshold": threshold, "classes": {
        name: {"samples": len(values), "present": int(np.sum(np.array(values) >= threshold)),
               "absent": int(np.sum(np.array(values) < threshold)),
               **dict(zip(("p10", "median", "p90"), np.percentile(values, [10, 50, 90]).round(4).tolist()))}
        for name, values in sorted(scores.items(), key=lambda item: vocabulary.lookup(item[0]).index)}}


def label_provenance(recipe: Recipe, vocabulary: Vocabulary, labeler: str) -> dict:
    """Which classes' labels came from a labeler trained on that class (manifest "labels"), as the
    build's labeler (``labeler_for``) answers.

    An oracle labeler (Mask R-CNN, the procedural world's drawing) was trained on, or knows,
    every class it labels, and a real image's own masks annotate every class; the grounding
    annotator knows only its checkpoint's classes (matched by their words, ``classes_seen``);
    DAAM, which reads the generator's attention and trains nothing, none. A second labeler that acts on the labels (``agreement.min_iou`` > 0)
    chose which labels were kept with its knowledge of every class (a Mask R-CNN oracle, or an
    open-vocabulary model trained on the web), so it counts as trained on all of them. Protocol-II
    reads this, and where each image's class list came from (``class_lists``), to refuse a
    "zero-shot" segmenter trained on labels of its unseen classes.
    """
    names, chosen = vocabulary.names, labeler_for(recipe)
    trained, split = chosen.trained_classes(recipe, vocabulary)
    chosen_by = None
    if recipe.agreement.enabled and recipe.agreement.min_iou > 0:
        checker = recipe.agreement.labeler
        trained, split, chosen_by = set(names), None, labeler_of(checker.model).model_id(recipe, checker)
    return {"labeler": labeler, "kind": chosen.kind, "trained_split": split,
            "trained": {name: name in trained for name in names}, "class_lists": class_lists(recipe),
            **({"chosen_by": chosen_by} if chosen_by else {})}


def class_lists(recipe: Recipe) -> str:
    """Where each image's class list (the classes it is labelled for) came from: "prompt", the
    plan's; "user", a folder source's ``classes`` or ``classes_file``; "ground_truth", the masks or
    tags of a voc, voc_aug, coco or dataset source, which say which images show a class even when
    its labels come from a zero-shot annotator."""
    if not recipe.source.enabled:
        return "prompt"
    return "user" if recipe.source.format == "folder" else "ground_truth"


def prompted_classes(plan: list[Sample], names: tuple[str, ...]) -> list[str]:
    """The classes any prompt of the plan names, in vocabulary order (`names`): a prompt names
    exactly its entry's classes (templates must hold their placeholders, a prompt file's classes
    are in braces). The inductive setting refuses a set whose prompts named an unseen class."""
    named = {name for sample in plan for name in sample.classes}
    return [name for name in names if name in named]


def _capture_info(recipe: Recipe, commits: list[Commit]) -> dict | None:
    """How to read the triplet columns: what was captured when, and each column's fp16 shape."""
    capture = recipe.capture
    if capture.features == "none" and not capture.attention:
        return None
    info = {"features": capture.features, "attention": capture.attention, "dtype": "float16",
            "shapes": next((c.capture_shapes for c in commits if c.capture_shapes), {})}
    if capture.features != "none":
        info.update(steps_remaining=capture.step,
                    unet_call=capture_call_index(recipe.generator.steps, capture.step, recipe.generator.scheduler))
    return info


def _versions() -> dict[str, str]:
    versions = {}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions

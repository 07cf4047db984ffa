"""The build's orchestration (factory/pipeline/pipeline.py): rounds of replacements, followers, resuming,
and the model actor (factory/pipeline/actor.py) it runs the stages in."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest

from factory.core.vocab import get_vocabulary
from factory.dataset.batch import LABEL_COLUMNS, PLAN_COLUMNS, SampleLabels, attach_labels
from factory.dataset.codec import decode_image
from factory.dataset.verify import Verifier
from factory.pipeline.actor import ModelActor, _in_batches
from factory.pipeline.checks import BuildError
from factory.pipeline.pipeline import prepare_build, run_build
from factory.pipeline.followed import FollowedImages
from factory.pipeline.stages import StageSpec, followed_stage, model_stages
from factory.pipeline.plan import all_attempts, build_plan, plan_batch, replan
from factory.pipeline.recipe import load_recipe


def test_more_samples_than_planned_is_said(tmp_path):
    prepared = prepare_build(load_recipe("tiny", {"num_samples": 1000, "out": str(tmp_path / "ds")}))
    assert prepared.notes == ["num_samples 1000 is more than the recipe plans: building all 210"]
    assert len(prepared.plan) == 210  # 20 classes and 190 pairs, one each
    assert prepare_build(load_recipe("tiny", {"num_samples": 5, "out": str(tmp_path / "ds2")})).notes == []


@pytest.mark.slow
def test_in_process_and_ray_builds_make_the_same_samples(ray_cluster, tmp_path):
    """The same plan, models and encoding either way. Pixels may differ in the last bit: a Ray
    actor holding one CPU runs torch on one thread, this process on more, and float sums in
    another order round differently."""
    overrides = {"num_samples": 6, "generator.steps": 2, "generator.batch_size": 4, "writer.rows_per_file": 4}
    rows = {}
    for mode, in_process in (("ray", False), ("here", True)):
        recipe = load_recipe("tiny", {**overrides, "out": str(tmp_path / mode)})
        assert run_build(prepare_build(recipe), in_process=in_process).written == 6
        rows[mode] = {row["sample_id"]: row for row in pq.read_table(tmp_path / mode / "data").to_pylist()}
    assert rows["ray"].keys() == rows["here"].keys()
    for sample_id, row in rows["ray"].items():
        here = rows["here"][sample_id]
        assert [row[k] for k in PLAN_COLUMNS] == [here[k] for k in PLAN_COLUMNS]
        difference = np.abs(decode_image(row["image"]).astype(int) - decode_image(here["image"]).astype(int))
        assert difference.max() <= 2 and difference.mean() < 0.01


class KeepsEveryThirdSeed:
    """A stand-in generator and labeler with a known verdict: a sample is kept when its seed is
    a multiple of three, dropped as "class_not_found" otherwise."""

    draws = True  # False: labels the images of a generator stage before it

    def keeps(self, seed: int) -> bool:
        return seed % 3 == 0

    def __call__(self, batch):
        n, start = len(batch["seed"]), 0.0
        if self.draws:
            batch["image"] = np.zeros((n, 8, 8, 3), np.uint8)
            batch["generate_seconds"] = np.zeros(n)
        size = batch["image"].shape[1:3]
        labels = [SampleLabels(np.zeros(size, np.uint8), np.ones((len(classes), *size), bool),
                               np.ones(len(classes), np.float32), np.ones(len(classes), np.int16),
                               "" if self.keeps(seed) else "class_not_found")
                  for classes, seed in zip(batch["classes"], batch["seed"])]
        return attach_labels(batch, labels, start)


def build_with_replacements(out, attempts: int):
    recipe = load_recipe("tiny", {"num_samples": 12, "attempts": attempts, "out": str(out),
                                  "writer": {"rows_per_file": 4, "preview_samples": 0}})
    stage = StageSpec(KeepsEveryThirdSeed, {}, 4, reads=tuple(PLAN_COLUMNS), adds=())
    summary = run_build(prepare_build(recipe), stages=[stage], models={"generator": "g", "labeler": "l"},
                        in_process=True)
    return recipe, summary


def test_dropped_samples_are_replaced_by_their_entrys_next_seeds(tmp_path):
    recipe, summary = build_with_replacements(tmp_path / "ds", attempts=4)
    # What each entry should end with, from the seeds alone: its attempts up to the first kept one.
    expected_rows, expected_drops, given_up = set(), set(), 0
    attempts = all_attempts(prepare_build(recipe).plan, recipe)
    for index in range(12):
        mine = [s for s in attempts if s.index == index]
        kept = next((s for s in mine if s.seed % 3 == 0), None)
        expected_drops |= {s.sample_id for s in mine[:mine.index(kept) if kept else len(mine)]}
        if kept:
            expected_rows.add(kept.sample_id)
        given_up += kept is None
    rows = pq.read_table(tmp_path / "ds" / "data", columns=["sample_id", "seed"]).to_pylist()
    assert {row["sample_id"] for row in rows} == expected_rows
    assert any(".1-" in row["sample_id"] or ".2-" in row["sample_id"] for row in rows)  # replacements were kept
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["counts"] == {"planned": 12, "attempted": len(expected_rows) + len(expected_drops),
                                  "written": len(expected_rows), "dropped": {"class_not_found": len(expected_drops)},
                                  "given_up": given_up}
    assert (summary.written, summary.given_up) == (len(expected_rows), given_up)
    per_class = manifest["per_class"]
    assert sum(c["planned"] for c in per_class.values()) == sum(len(s.classes) for s in prepare_build(recipe).plan)
    assert all(c["kept"] + c["given_up"] == c["planned"] for c in per_class.values())
    verifier = Verifier(str(tmp_path / "ds"), replan)
    assert verifier.run(), verifier.report()


def test_more_attempts_extend_a_build_to_what_a_fresh_build_makes(tmp_path):
    """Replacements are decided by the commit records alone: a build with one attempt, rerun with
    four, ends with exactly the rows of a build made with four at once."""
    build_with_replacements(tmp_path / "grown", attempts=1)
    first = pq.read_table(tmp_path / "grown" / "data", columns=["sample_id"]).column("sample_id").to_pylist()
    build_with_replacements(tmp_path / "grown", attempts=4)
    build_with_replacements(tmp_path / "fresh", attempts=4)
    grown, fresh = (sorted(pq.read_table(tmp_path / name / "data", columns=["sample_id"]).column("sample_id")
                           .to_pylist()) for name in ("grown", "fresh"))
    assert grown == fresh and set(first) < set(grown)
    with pytest.raises(Exception, match="outside this plan"):  # fewer attempts than made: refused
        build_with_replacements(tmp_path / "grown", attempts=1)


class KeepsEverySeed(KeepsEveryThirdSeed):
    """A follower's stand-in: keeps every sample; raises at call `fails_after` (a killed run)."""

    def __init__(self, fails_after: int | None = None):
        self.calls, self.fails_after = 0, fails_after

    def keeps(self, seed: int) -> bool:
        return True

    def __call__(self, batch):
        if self.calls == self.fails_after:
            raise RuntimeError("the run is killed")
        self.calls += 1
        return super().__call__(batch)


def follow(lead, out, fails_after: int | None = None):
    """A differently labelled build (score threshold 0.3) that follows the dataset at `lead`."""
    recipe = load_recipe("tiny", {"num_samples": 12, "follow": str(lead), "labeler.score_threshold": 0.3,
                                  "out": str(out), "writer": {"rows_per_file": 4, "preview_samples": 0}})
    stage = StageSpec(KeepsEverySeed, {"fails_after": fails_after}, 4, reads=tuple(PLAN_COLUMNS), adds=())
    return run_build(prepare_build(recipe), stages=[stage], models={"generator": "g", "labeler": "l2"},
                     in_process=True)


def plan_part(sample_id: str) -> str:
    """The id's plan entry and attempt ("0000012.1"), without the recipe's hash."""
    return sample_id.split("-")[0]


def test_a_follower_makes_exactly_the_samples_its_followed_set_wrote_and_resumes_to_them(tmp_path):
    """The followed set dropped samples and kept replacements; its follower makes what it wrote, at
    the same attempts and seeds, once each, also when killed mid-build and run again."""
    build_with_replacements(tmp_path / "lead", attempts=4)
    lead = pq.read_table(tmp_path / "lead" / "data").to_pylist()
    assert any(plan_part(row["sample_id"]).count(".") for row in lead)  # replacements were kept
    with pytest.raises(RuntimeError, match="killed"):
        follow(tmp_path / "lead", tmp_path / "oracle", fails_after=1)
    made_before = pq.read_table(tmp_path / "oracle" / "data").num_rows
    assert 0 < made_before < len(lead)

    summary = follow(tmp_path / "lead", tmp_path / "oracle")
    rows = pq.read_table(tmp_path / "oracle" / "data").to_pylist()
    assert summary.resumed_from == made_before
    # the followed set's ids: a join on sample_id pairs the same images
    assert sorted((r["sample_id"], r["index"], r["seed"], r["prompt"], r["image"]) for r in rows) == sorted(
        (r["sample_id"], r["index"], r["seed"], r["prompt"], r["image"]) for r in lead)
    manifest = json.loads((tmp_path / "oracle" / "manifest.json").read_text())
    n = len(lead)
    assert manifest["counts"] == {"planned": n, "attempted": n, "written": n, "dropped": {}, "given_up": 0}
    lead_key = json.loads((tmp_path / "lead" / "manifest.json").read_text())["content_key"]
    assert manifest["follows"] == {"dataset": str(tmp_path / "lead"), "name": "tiny", "content_key": lead_key}
    assert f"Same images as `{tmp_path / 'lead'}`: only the labels differ." in (tmp_path / "oracle" / "README.md"
                                                                                ).read_text()
    verifier = Verifier(str(tmp_path / "oracle"), replan)  # its plan is rebuilt with the followed set's samples
    assert verifier.run(), verifier.report()
    with pytest.raises(BuildError, match=f"holds a build with follow {tmp_path / 'lead'}; use another --out"):
        prepare_build(load_recipe("tiny", {"num_samples": 12, "labeler.score_threshold": 0.3,
                                           "out": str(tmp_path / "oracle")}))


def test_a_labeler_follower_reads_its_followed_sets_images_instead_of_generating(tmp_path):
    """Generate once, label twice: a detector-labelled follower that captures nothing reads each image
    from the followed set by sample id; DAAM, capture and the grounding module need the generator."""
    build_with_replacements(tmp_path / "lead", attempts=4)
    lead = {row["sample_id"]: row for row in pq.read_table(tmp_path / "lead" / "data").to_pylist()}
    oracle = load_recipe("tiny", {"num_samples": 12, "follow": str(tmp_path / "lead"), "out": str(tmp_path / "o")})
    first = model_stages(oracle)[0]
    assert first.stage is followed_stage and first.reads == ("sample_id",)
    reader = FollowedImages(**first.kwargs)
    ids = sorted(lead)[::-1]  # any order, across the set's files
    batch = reader({"sample_id": np.array(ids)})
    assert [decode_image(lead[i]["image"]).tobytes() for i in ids] == [image.tobytes() for image in batch["image"]]
    assert batch["generate_seconds"].shape == (len(ids),)
    for overrides in ({"annotator.daam": True, "annotator.on_missing": "ignore"}, {"capture.features": "latent"}):
        regenerates = load_recipe("tiny", {"num_samples": 12, "follow": str(tmp_path / "lead"), **overrides})
        assert model_stages(regenerates)[0].stage is not followed_stage
    assert model_stages(load_recipe("tiny", {"num_samples": 12}))[0].stage is not followed_stage


class LabelsEveryThirdSeed(KeepsEveryThirdSeed):
    """KeepsEveryThirdSeed's verdicts on the images of the generator stage before it."""

    draws = False


@pytest.mark.slow  # the tiny generator in four rounds, one sample at a time
def test_a_follower_labels_the_very_images_its_followed_set_wrote(tmp_path):
    """An image depends on its prompt and seed alone: a DAAM-labelled follower of a set with drops
    and a kept replacement holds that set's images, byte for byte. One sample per generator call:
    batch mates would change float sums in the last bit (test_in_process_and_ray_builds_...)."""
    common = {"num_samples": 3, "attempts": 3, "generator.steps": 2, "generator.batch_size": 1,
              "writer.preview_samples": 0}
    lead = load_recipe("tiny", {**common, "out": str(tmp_path / "lead")})
    labels = StageSpec(LabelsEveryThirdSeed, {}, 4, reads=("image", "classes", "seed"), adds=tuple(LABEL_COLUMNS))
    run_build(prepare_build(lead), stages=[model_stages(lead)[0], labels],
              models={"generator": "tiny", "labeler": "every third seed"}, in_process=True)
    daam = load_recipe("tiny", {**common, "follow": str(tmp_path / "lead"), "annotator.daam": True,
                                "annotator.on_missing": "ignore", "out": str(tmp_path / "daam")})
    run_build(prepare_build(daam), in_process=True)
    lead_rows, rows = ({r["sample_id"]: r for r in pq.read_table(tmp_path / name / "data").to_pylist()}
                       for name in ("lead", "daam"))
    assert sorted(rows) == sorted(lead_rows)
    assert [plan_part(i) for i in sorted(rows)] == ["0000000", "0000001.2"]  # entry 2 was given up
    for sample_id, row in rows.items():
        lead_row = lead_rows[sample_id]
        assert (row["seed"], row["prompt"], row["labeler"]) == (lead_row["seed"], lead_row["prompt"], "daam")
        assert row["image"] == lead_row["image"]


class TwoPhases(KeepsEveryThirdSeed):
    """A stand-in generator of two phases. The second phase of the first batch it sees waits for the
    first phase of another batch: it can only be seen while the two phases run at once."""

    def __init__(self):
        self.phases = (self.first, self.second)
        self.started, self.sizes, self.overlapped = threading.Event(), [], None

    def first(self, batch):
        self.sizes.append(len(batch["seed"]))
        if self.overlapped is not None:
            self.started.set()
        return batch

    def second(self, batch):
        if self.overlapped is None:
            self.overlapped = False
            self.overlapped = self.started.wait(timeout=30)
        return super().__call__(batch)

    def __call__(self, batch):  # both phases in one call: what an actor without overlap runs
        return self.second(self.first(batch))


def two_batches(n: int = 4):
    plan = build_plan(load_recipe("tiny", {"num_samples": 2 * n}))
    return plan_batch(plan[:n]), plan_batch(plan[n:])


ENCODE = {"image_format": "png", "jpeg_quality": 95, "class_indices": {c.name: c.index for c in get_vocabulary(
    "voc").classes}, "generator": "g", "labeler": "l"}


def test_overlap_runs_one_batchs_later_phases_while_the_next_batch_starts():
    actor = ModelActor([StageSpec(TwoPhases, {}, 4, reads=(), adds=())], ENCODE, overlap=True)
    stage = getattr(actor.phases[0][0], "__self__", actor.phases[0][0])
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(actor, two_batches()[0])
        while stage.overlapped is None:  # the first batch is in its second phase: send the next
            time.sleep(0.01)
        second = pool.submit(actor, two_batches()[1])
        tables = [first.result(), second.result()]
    assert stage.overlapped is True
    assert [t.num_rows for t in tables] == [4, 4]


def test_without_overlap_a_batch_holds_every_phase():
    actor = ModelActor([StageSpec(TwoPhases, {}, 4, reads=(), adds=())], ENCODE)
    stage = getattr(actor.phases[0][0], "__self__", actor.phases[0][0])
    stage.started.wait = lambda timeout: stage.started.is_set()  # no waiting: it is set, or never will be
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(actor, two_batches()[0])
        while stage.overlapped is None:
            time.sleep(0.01)
        pool.submit(actor, two_batches()[1]).result()
        first.result()
    assert stage.overlapped is False


def test_a_model_actor_on_cpus_takes_its_share_of_the_cores(monkeypatch):
    """Ray gives an actor one thread per logical CPU it holds, one; on a machine without GPUs the
    build's actors share its cores instead (the driver's OMP_NUM_THREADS where set), or take the
    recipe's count."""
    import torch

    from factory.pipeline.ray_executor import cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert cpu_threads(load_recipe("tiny")) == 8
    assert cpu_threads(load_recipe("tiny", {"pool.max_size": 3})) == 2
    assert cpu_threads(load_recipe("tiny", {"pool.max_size": 16})) == 1
    assert cpu_threads(load_recipe("tiny", {"pool.cpu_threads": 5})) == 5
    before = torch.get_num_threads()
    try:
        ModelActor([], ENCODE, cpu_threads=3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_static_batches_pad_short_calls_and_cut_the_copies():
    stage = TwoPhases()
    batch = plan_batch(build_plan(load_recipe("tiny", {"num_samples": 5})))
    plain = _in_batches(stage.first, dict(batch), 4)
    assert stage.sizes == [4, 1]
    padded = _in_batches(stage.first, dict(batch), 4, static=True)
    assert stage.sizes[2:] == [4, 4]
    assert plain.keys() == padded.keys()
    for key in plain:
        assert list(plain[key]) == list(padded[key]), key
    assert list(padded["sample_id"]) == list(batch["sample_id"])


@pytest.mark.slow  # two tiny pipelines per case
@pytest.mark.parametrize("fast", [{"overlap": True}, {"static_batch": True}])
def test_the_generators_phases_in_a_fast_actor_make_the_same_images(fast):
    recipe = load_recipe("tiny", {"num_samples": 6, "generator.steps": 2, "generator.batch_size": 4,
                                  **{f"fast.{key}": value for key, value in fast.items()}})
    stages = model_stages(recipe)
    reference = ModelActor(stages, ENCODE)
    actor = ModelActor(stages, ENCODE, **fast)
    if fast.get("overlap"):
        assert [phase.__name__ for phase, _ in actor.phases[:2]] == ["denoise", "decode"]
    batches = [plan_batch(part) for part in (build_plan(recipe)[:4], build_plan(recipe)[4:])]
    with ThreadPoolExecutor(2) as pool:
        tables = list(pool.map(actor, [dict(b) for b in batches]))
    for batch, table in zip(batches, tables):
        want = reference(dict(batch))
        assert table.column("sample_id").to_pylist() == want.column("sample_id").to_pylist()
        for got, expected in zip(table.column("image").to_pylist(), want.column("image").to_pylist()):
            difference = np.abs(decode_image(got).astype(int) - decode_image(expected).astype(int))
            assert difference.max() <= 1

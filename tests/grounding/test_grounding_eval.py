"""Protocol-I evaluation: the job end to end, its refusals and the test-set filter."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from factory.core.checkpoints import CheckpointError
from factory.core.conventions import IGNORE
from factory.core.errors import EvalError
from factory.core.storage import open_location
from factory.core.vocab import VOC
from factory.dataset.codec import decode_png
from factory.diffusion.daam import daam_masks
from factory.diffusion.features import from_fp16_bytes
from factory.pipeline.pipeline import prepare_build, run_build
from factory.pipeline.recipe import load_recipe
from grounding.checkpoint import load_grounding_checkpoint, save_grounding_checkpoint
from grounding.config import GroundingEvalOptions, ModelSection, TextConfig, grounding_model_config
from grounding.data import Featurizer, TripletSource
from grounding.evaluate import EvalPlan, EvalStage, derangement, prepare_evaluation, select_test_rows
from grounding.metrics import GROUPS, ProtocolIAccumulator
from grounding.model import GroundingModule
from jobs import eval_grounding

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- end to end

# The tiny recipe's random detector reports almost nothing but COCO "cow", so the set is
# built around cow to give the oracle masks something to find: cow is seen in splits 1
# and 2 and unseen in split 3; dog, horse and bus are each unseen in one split.
TEST_SET = {"classes": ["cow", "dog", "horse", "bus"], "per_class": 1, "per_pair": 1, "pairs": "all",
            "num_samples": None, "generator.steps": 3, "capture.features": "latent", "capture.step": 2,
            "capture.attention": True, "quality.model": "tiny", "writer.preview_samples": 0}


@pytest.fixture(scope="module")
def test_set(ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pascal-sim") / "test"
    run_build(prepare_build(load_recipe("tiny", {**TEST_SET, "out": str(out)})))
    return out


def save_untrained(out: Path, source: TripletSource, classes, seed: int = 0) -> Path:
    """An untrained tiny module in the training code's checkpoint format, trained on `classes`."""
    featurizer = Featurizer(source, TextConfig())
    config = grounding_model_config(ModelSection(preset="tiny"), featurizer.feature_channels(), featurizer.text_dim,
                                    source.image_size[0])
    torch.manual_seed(seed)
    save_grounding_checkpoint(str(out), GroundingModule(config).eval(), None, {
        "epoch": 0, "text": TextConfig().model_dump(), "generation": source.generation,
        "capture": source.manifest["capture"], "vocabulary": source.manifest["vocabulary"],
        "classes": list(classes)})
    return out


@pytest.fixture(scope="module")
def checkpoints(test_set, tmp_path_factory) -> dict[int, Path]:
    """One module per split, as the paper trains them: split k's, on split k's seen classes
    (different initialisations, so that the splits' predictions differ)."""
    source = TripletSource.open(str(test_set))
    folder = tmp_path_factory.mktemp("grounding")
    return {k: save_untrained(folder / f"split{k}", source, VOC.seen(k), seed=k) for k in (1, 2, 3)}


def mapping(checkpoints: dict[int, Path]) -> str:
    """The --checkpoints value: a YAML mapping of split to checkpoint."""
    return "{" + ", ".join(f"{k}: {path}" for k, path in checkpoints.items()) + "}"


def daam_by_hand(test_set: Path, threshold: float) -> dict:
    """DAAM's result straight from the Parquet rows: heat maps upsampled and thresholded, scored on
    the classes the oracle found with a non-empty mask, on the pixels the label map does not mark 255."""
    manifest = json.loads((test_set / "manifest.json").read_text())
    shape = manifest["capture"]["shapes"]["daam"]
    acc = ProtocolIAccumulator(VOC)
    ignored = 0
    for entry in manifest["files"]:
        for row in pq.read_table(test_set / entry["path"]).to_pylist():
            truth = np.stack([decode_png(m["bytes"]).astype(bool) for m in row["masks"]])
            maps = np.stack([from_fp16_bytes(m, shape) for m in row["daam"]])
            predicted = daam_masks(maps[None], threshold, size=truth.shape[1:])[0]
            ignore = decode_png(row["label"]["bytes"]) == IGNORE
            ignored += int(ignore.sum())
            acc.add(row["classes"], predicted, truth, np.array(row["found"]) & truth.any(axis=(1, 2)), ignore)
    assert ignored > 0  # the set has 255 pixels (classes the random detector missed): the rule is exercised
    return acc.result()


@pytest.mark.slow
def test_eval_job_end_to_end(test_set, checkpoints, tmp_path, bucket, capsys):
    common = ["--checkpoints", mapping(checkpoints), "--data", str(test_set), "--batch-size", "3"]  # 4 batches
    assert eval_grounding.main([*common, "--num-workers", "1", "--out", str(tmp_path / "one.json")]) == 0
    printed = capsys.readouterr().out
    uri = f"s3://{bucket}/evals/two.json"
    assert eval_grounding.main([*common, "--num-workers", "2", "--out", uri]) == 0
    assert f"results written to {uri}" in capsys.readouterr().out

    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads(open_location(f"s3://{bucket}/evals").read_bytes("two.json"))
    assert one == two  # deterministic, whatever the worker count
    manifest = json.loads((test_set / "manifest.json").read_text())
    assert one["format"] == "protocol-i-results/2"
    assert one["plan_digest"] == manifest["plan"]["digest"] and one["samples"] == manifest["counts"]["written"] == 10
    assert one["checkpoints"] == {str(k): str(path) for k, path in checkpoints.items()} and one["data"] == str(test_set)
    assert one["trained_classes"] == {str(k): list(VOC.seen(k)) for k in (1, 2, 3)}
    assert one["thresholds"] == {"grounding module": 0.5, "presence": 0.5, "DAAM": 0.4}
    # The modules have presence heads: the papers' row, the annotator's (gated) and the text-blind control.
    assert set(one["results"]) == {"grounding module", "grounding module, presence-gated",
                                   "grounding module, text permuted", "DAAM"}
    gated, plain = one["results"]["grounding module, presence-gated"], one["results"]["grounding module"]
    for k in ("1", "2", "3"):  # gating only takes masks away: never more named classes masked
        for size in ("one", "two"):
            for kind in ("seen", "unseen"):
                ours, theirs = gated["splits"][k]["presence"][size][kind], plain["splits"][k]["presence"][size][kind]
                assert ours["found"] == theirs["found"] and (ours["recall"] or 0) <= (theirs["recall"] or 0)
    numbers = 0
    for result in one["results"].values():
        assert set(result["splits"]) == {"1", "2", "3"} and set(result["average"]) == set(GROUPS)
        for groups in result["splits"].values():
            for group in (groups[g] for g in GROUPS):
                values = [v for v in (group["miou"], *group["iou"].values()) if v is not None]
                assert all(0.0 <= v <= 100.0 for v in values)
                numbers += bool(values)
    assert numbers > 0  # the oracle found something to score
    assert one["results"]["DAAM"] == daam_by_hand(test_set, 0.4)
    assert one["notes"] == []  # every split has its zero-shot module: nothing to warn about
    assert re.search(r"^grounding module +1 ", printed, re.M) and "DAAM" in printed and "Average" in printed


@pytest.mark.slow
def test_each_split_is_scored_by_its_own_module(test_set, checkpoints):
    """In-process (the Ray run is the test above): split k's counts are those of split k's module
    alone, on the same features; DAAM is skipped here."""
    two = {k: checkpoints[k] for k in (1, 2)}
    plan = prepare_evaluation(GroundingEvalOptions(checkpoints={k: str(p) for k, p in two.items()},
                                                   data=str(test_set), daam_threshold=0.4))
    no_average = "no Average: it is the mean over the modules of all 3 splits, and split(s) 3 have none here"
    assert plan.report["notes"] == [no_average]
    stage = EvalStage({k: str(p) for k, p in two.items()}, plan.data, "tiny", None)
    positions = list(range(10))
    out = stage({"positions": np.array([positions])})
    counts = {key: ProtocolIAccumulator.from_dict(json.loads(out[key][0])) for key in ("module", "gated")}
    assert counts["module"].splits == (1, 2)

    source = TripletSource.open(str(test_set))
    rows = source.take(positions, source.columns)
    inputs = Featurizer(source, TextConfig())(rows)
    predictions = {}
    for k, path in two.items():
        module, _ = load_grounding_checkpoint(str(path))
        # The papers' row asks for every class's mask; the gated row drops those judged absent.
        for key, gate in (("module", None), ("gated", 0.5)):
            predicted = module.predict(inputs.features, inputs.class_embeddings, inputs.class_mask, gate).numpy()
            predictions[k, key] = predicted
            alone = ProtocolIAccumulator(VOC, [k])
            for i, classes in enumerate(rows.column("classes").to_pylist()):
                n = len(classes)
                alone.add(classes, predicted[i, :n], inputs.targets[i, :n].bool().numpy(),
                          inputs.valid[i, :n].numpy(), inputs.ignore[i].numpy())
            assert counts[key].to_dict()["groups"][str(k)] == alone.to_dict()["groups"][str(k)]
    assert (predictions[1, "module"] != predictions[2, "module"]).any()  # the test could tell the modules apart


@pytest.mark.slow
def test_dataset_without_heat_maps_skips_daam(test_set, checkpoints, tmp_path):
    # What a build without --capture.attention records: no "daam" capture shape.
    copy = tmp_path / "no-daam"
    shutil.copytree(test_set, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["capture"]["attention"] = False
    del manifest["capture"]["shapes"]["daam"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    plan = prepare_evaluation(GroundingEvalOptions(checkpoints={1: str(checkpoints[1])}, data=str(copy)))
    assert plan.daam_threshold is None and "DAAM" not in plan.report["thresholds"]
    assert plan.report["notes"][1] == f"{copy} has no DAAM heat maps (built without --capture.attention true): DAAM skipped"
    # The actor, in-process (a Ray run is the test above): module counts only.
    stage = EvalStage(plan.checkpoints, plan.data, "tiny", plan.daam_threshold)
    out = stage({"positions": np.array([[0, 1, 2], [3, 4, 5]])})
    assert list(out["daam"]) == ["", ""]
    counts = ProtocolIAccumulator.from_dict(json.loads(out["module"][0]))
    assert counts.splits == (1,) and counts.vocabulary is VOC


def eval_error(capsys, *argv: str) -> str:
    assert eval_grounding.main(list(argv)) == 2
    message = capsys.readouterr().err
    assert message.startswith("eval_grounding: error: ") and message.count("\n") == 1
    return message


@pytest.mark.slow
def test_eval_job_input_errors(test_set, checkpoints, tmp_path, capsys):
    good = ["--checkpoints", mapping(checkpoints), "--data", str(test_set)]
    assert "no readable checkpoint" in eval_error(capsys, "--checkpoints", mapping({1: tmp_path / "missing"}),
                                                  "--data", str(test_set))
    no_capture = tmp_path / "plain"
    no_capture.mkdir()
    manifest = json.loads((test_set / "manifest.json").read_text())
    (no_capture / "manifest.json").write_text(json.dumps({**manifest, "capture": None}))
    assert "no U-Net capture" in eval_error(capsys, "--checkpoints", mapping(checkpoints), "--data", str(no_capture))
    assert "no dataset" in eval_error(capsys, "--checkpoints", mapping(checkpoints), "--data", str(tmp_path / "nowhere"))
    assert "unknown split 4" in eval_error(capsys, "--checkpoints", mapping({4: checkpoints[1]}), "--data", str(test_set))
    assert "one checkpoint per split" in eval_error(capsys, "--checkpoints", str(checkpoints[1]), "--data", str(test_set))
    assert "--daam-threshold: Input should be less than or equal to 1" in eval_error(capsys, *good, "--daam-threshold", "2")
    assert "--keep-quality: Input should be less than or equal to 1" in eval_error(capsys, *good, "--keep-quality", "1.5")
    assert "must name a file" in eval_error(capsys, *good, "--out", "s3://bucket")


@pytest.mark.slow  # its test set is built on the Ray cluster
def test_a_split_whose_unseen_classes_the_module_saw_is_refused(test_set, checkpoints):
    """The old evaluation scored split 1's module on splits 2 and 3 too, whose unseen classes it
    had trained on; now each split needs a module that never saw its unseen classes."""
    with pytest.raises(EvalError) as refused:
        prepare_evaluation(GroundingEvalOptions(checkpoints={1: str(checkpoints[1]), 2: str(checkpoints[1])},
                                                data=str(test_set)))
    assert str(refused.value) == (f"{checkpoints[1]} was trained on horse, motorbike, person, pottedplant, sheep, "
                                  f"unseen classes of split 2: it is not zero-shot there; give split 2 a module "
                                  f"trained on its seen classes (jobs/train_grounding.py --split 2)")
    everything = save_untrained(test_set.parent / "all-classes", TripletSource.open(str(test_set)), VOC.names)
    with pytest.raises(EvalError, match="unseen classes of split 3"):
        prepare_evaluation(GroundingEvalOptions(checkpoints={3: str(everything)}, data=str(test_set)))


def with_recipe(test_set: Path, folder: Path, **generator) -> Path:
    """The test set's manifest with other generator or capture settings (its rows linked in)."""
    folder.mkdir()
    (folder / "data").symlink_to(test_set / "data")
    manifest = json.loads((test_set / "manifest.json").read_text())
    capture_step = generator.pop("capture_step", None)
    if capture_step is not None:
        manifest["capture"]["steps_remaining"] = capture_step
    prompts = generator.pop("prompts", None)
    if prompts is not None:
        manifest["recipe"]["prompts"].update(prompts)
    manifest["recipe"]["generator"].update(generator)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.slow  # its test set is built on the Ray cluster
def test_test_set_of_other_features_is_refused_and_other_images_noted(test_set, checkpoints, tmp_path):
    def evaluate(data: Path) -> EvalPlan:
        return prepare_evaluation(GroundingEvalOptions(checkpoints={1: str(checkpoints[1])}, data=str(data)))

    for what, change, expected in (("steps", {"steps": 4}, "total steps 3 vs 4"),
                                   ("capture", {"capture_step": 1}, "capture step 2 vs 1"),
                                   ("sampler", {"scheduler": "dpm++"}, "sampler 'ddim' vs 'dpm++'"),
                                   ("model", {"model": "other-sd"}, "generator model 'tiny' vs 'other-sd'")):
        data = with_recipe(test_set, tmp_path / what, **change)
        with pytest.raises(EvalError) as refused:
            evaluate(data)
        assert str(refused.value) == (f"{data} does not have the features {checkpoints[1]} (split 1) was trained "
                                      f"on: {expected} (its training data vs the test set)")
    data = with_recipe(test_set, tmp_path / "looks", guidance_scale=7.5, prompts={"one": "a {0}"})
    plan = evaluate(data)
    assert plan.report["notes"][0] == (
        f"split 1: {checkpoints[1]} was trained on images made otherwise than the test set's: guidance scale 5.0 "
        f"vs 7.5; prompt template one 'a photograph of a {{0}}' vs 'a {{0}}' (its training data vs the test set); "
        f"the features are alike")


@pytest.mark.slow  # its test set is built on the Ray cluster
def test_checkpoint_without_a_generation_record_is_refused(test_set, checkpoints, tmp_path):
    """Checkpoints written before they recorded their training data's generation: their total steps
    are unknown, so nothing could show a mismatch; retraining is the safe way."""
    old = tmp_path / "old"
    shutil.copytree(checkpoints[1], old)
    metadata = json.loads((old / "checkpoint.json").read_text())
    del metadata["generation"]
    (old / "checkpoint.json").write_text(json.dumps({**metadata, "generator": "tiny"}))
    with pytest.raises(CheckpointError) as refused:
        prepare_evaluation(GroundingEvalOptions(checkpoints={1: str(old)}, data=str(test_set)))
    assert str(refused.value) == (f"{old} does not record how its training data was generated (total steps, "
                                  f"guidance scale, prompt templates): it predates that record; retrain it")


@pytest.mark.slow  # its test set is built on the Ray cluster
def test_automatic_test_set_filter(test_set):
    """Detector agreement and the quality score replace the papers' manual check of test sets."""
    source = TripletSource.open(str(test_set))
    table = source.read(["found", "scores", "quality"])
    n = table.num_rows
    assert select_test_rows(source, None, None) == list(range(n))
    agree = [i for i, (found, scores) in enumerate(zip(table.column("found").to_pylist(),
                                                        table.column("scores").to_pylist()))
             if all(found) and min(scores) >= 0.01]
    assert select_test_rows(source, 0.01, None) == agree
    quality = table.column("quality").to_numpy()
    best_half = select_test_rows(source, None, 0.5)
    assert len(best_half) == -(-n // 2)
    assert min(quality[best_half]) >= max(np.delete(quality, best_half))  # the best ones, not any


def test_derangement_moves_every_class():
    swap = derangement(VOC.names)
    assert sorted(swap.values()) == sorted(VOC.names)
    assert all(swap[name] != name for name in VOC.names)
    assert derangement(VOC.names) == swap  # fixed: the control is the same on every run

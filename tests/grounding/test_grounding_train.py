"""Grounding training: featurizer, valid slots, IoU, checkpoints (local and S3), Ray Train runs, CLI.

The fixture datasets go through the factory's own code (plan, tiny generator with capture,
encode, write, manifest) in-process, with the random detector replaced by known boxes:
class slot 0 covers the top-left quarter, slot 1 the bottom-right one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pytest
import safetensors.torch
import torch

from factory.core.checkpoints import CheckpointError, load_optimizer_state
from factory.core.conventions import IGNORE
from factory.core.options import fill_template
from factory.core.storage import open_location
from factory.core.vocab import VOC
from factory.dataset.batch import SampleLabels, attach_labels
from factory.dataset.codec import encode_label, encode_mask, objects
from factory.dataset.layout import MANIFEST_FILE
from factory.dataset.write import Commit, encode_batch, write_part
from factory.diffusion.features import from_fp16_bytes, unet_features
from factory.diffusion.pipelines import load_pipeline
from factory.diffusion.tokens import class_token_positions
from factory.pipeline.generate import GenerateStage
from factory.pipeline.manifest import build_manifest
from factory.pipeline.pipeline import prepare_build
from factory.pipeline.recipe import load_recipe
from grounding import data as grounding_data
from grounding import train as grounding_train
from grounding.checkpoint import load_grounding_checkpoint, resume_point, save_grounding_checkpoint
from grounding.config import GroundingModelConfig, GroundingTrainConfig, TextConfig
from grounding.data import DatasetError, Featurizer, TripletSource
from grounding.losses import grounding_loss
from grounding.model import GroundingModule
from grounding.train import prepare_training
from jobs import train_grounding

REPO = Path(__file__).resolve().parents[2]

SIZE = 32  # image side: latents of 16x16 keep the tiny U-Net cheap; masks and module output too
BOXES = [(slice(0, 16), slice(0, 16)), (slice(16, 32), slice(16, 32))]


def make_triplets(out: Path, features: str, num_samples: int = 24, overrides: dict | None = None) -> Path:
    recipe = load_recipe("tiny", {
        "out": str(out), "split": 1, "num_samples": num_samples, "capture.features": features,
        "capture.step": 2, "generator.steps": 2, "generator.guidance_scale": 1.0, "generator.height": SIZE,
        "generator.width": SIZE, "labeler.on_missing": "ignore", "writer.preview_samples": 0, **(overrides or {})})
    prepared = prepare_build(recipe)
    samples = prepared.plan
    n = len(samples)

    batch = {"sample_id": objects([s.sample_id for s in samples]), "index": np.array([s.index for s in samples]),
             "classes": objects([list(s.classes) for s in samples]),
             "class_words": objects([list(s.class_words) for s in samples]),
             "prompt": objects([s.prompt for s in samples]), "seed": np.array([s.seed for s in samples])}
    batch = GenerateStage(recipe.generator, recipe.capture)(batch)
    labels = []
    for sample in samples:
        masks = np.zeros((len(sample.classes), SIZE, SIZE), bool)
        for k in range(len(sample.classes)):
            masks[k][BOXES[k]] = True
        ones = np.ones(len(sample.classes))
        labels.append(SampleLabels(label=np.zeros((SIZE, SIZE), np.uint8), masks=masks, scores=ones, instances=ones))
    batch = attach_labels(batch, labels, time.perf_counter())
    table = encode_batch(batch, image_format="png", jpeg_quality=95, generator="tiny", labeler="boxes",
                         class_indices={c.name: c.index for c in VOC.classes})
    commits = []
    for start in range(0, n, 8):  # several Parquet parts, as a real build
        row = write_part(table.slice(start, 8), out=str(out)).column("commit")[0].as_py()
        commits.append(Commit.from_json(row.encode()))
    manifest = build_manifest(prepared, commits, {"generator": "tiny", "labeler": "boxes"})
    open_location(str(out)).write_bytes(MANIFEST_FILE, json.dumps(manifest).encode())
    return out


@pytest.fixture(scope="module")
def latent_set(tmp_path_factory) -> Path:
    return make_triplets(tmp_path_factory.mktemp("latent"), "latent")


@pytest.fixture(scope="module")
def tensors_set(tmp_path_factory) -> Path:
    return make_triplets(tmp_path_factory.mktemp("tensors"), "tensors", num_samples=4)


def test_featurizer_latent_mode_equals_direct_unet_pass(latent_set):
    source = TripletSource.open(str(latent_set))
    assert source.mode == "latent" and source.shapes == {"latent": (4, 16, 16)}
    rows = source.take([0, 1, 2, 3], source.columns)
    batch = Featurizer(source, TextConfig(source="prompt"))(rows)

    pipe = load_pipeline("tiny")
    prompts = rows.column("prompt").to_pylist()
    prompt_embeds = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)[0]
    latent = torch.from_numpy(np.stack([from_fp16_bytes(b, (4, 16, 16)) for b in rows.column("latent").to_pylist()]))
    expected = unet_features(pipe.unet, latent.float(), rows.column("timestep")[0].as_py(),
                             {"encoder_hidden_states": prompt_embeds})
    assert batch.features.keys() == expected.keys() == {8, 16}
    for r in expected:
        torch.testing.assert_close(batch.features[r], expected[r])

    # Class embeddings: the mean of the class word's token states in the prompt.
    words = rows.column("class_words").to_pylist()
    pair = next(i for i, w in enumerate(words) if len(w) == 2)
    tokens = class_token_positions(pipe.tokenizer, prompts[pair], words[pair])[1]
    torch.testing.assert_close(batch.class_embeddings[pair, 1], prompt_embeds[pair, tokens].mean(0))
    assert batch.class_mask.tolist() == [[True] * len(w) + [False] * (2 - len(w)) for w in words]
    for b, row_words in enumerate(words):  # targets are the fixture's boxes
        for o in range(len(row_words)):
            expected_mask = torch.zeros(SIZE, SIZE)
            expected_mask[BOXES[o]] = 1
            assert torch.equal(batch.targets[b, o], expected_mask)
    assert torch.equal(batch.valid, batch.class_mask)  # all found, none empty, no class restriction


def test_hard_negatives_name_a_class_the_sample_lacks(latent_set):
    """with_negatives: a sample asked about one more trained class, in its prompt and class list, with
    an empty mask, not found; the Featurizer makes it a presence negative the mask loss skips."""
    source = TripletSource.open(str(latent_set))
    rows = source.take([0, 1, 2, 3], source.columns)
    trained = ["dog", "cat", "bus", "sheep"]
    assert grounding_data.with_negatives(rows, trained, VOC, source.recipe["prompts"], 0.0,
                                         np.random.default_rng(0)) is rows
    more = grounding_data.with_negatives(rows, trained, VOC, source.recipe["prompts"], 1.0, np.random.default_rng(0))
    again = grounding_data.with_negatives(rows, trained, VOC, source.recipe["prompts"], 1.0, np.random.default_rng(0))
    assert more.equals(again)  # seeded: the same negatives on every run
    for before, after in zip(rows.to_pylist(), more.to_pylist()):
        added = [name for name in after["classes"] if name not in before["classes"]]
        assert len(added) == 1 and added[0] in trained and len(after["classes"]) == len(before["classes"]) + 1
        k = after["classes"].index(added[0])
        assert after["found"][k] is False and after["class_indices"][k] == VOC.lookup(added[0]).index
        assert VOC.lookup(added[0]).natural in after["prompt"] and after["class_words"][k] in after["prompt"]
        assert [name for name in after["classes"] if name != added[0]] == before["classes"]  # order kept
    batch = Featurizer(source, TextConfig())(more)
    negative = ~batch.present & batch.class_mask
    assert negative.sum() == 4 and not batch.valid[negative].any() and not batch.targets[negative].any()


def test_confusable_negatives_are_a_named_class_nearest(latent_set):
    """confusable_classes ranks the other trained classes by text-embedding cosine; with_negatives
    then asks each sample about one of its named classes' nearest, never a class it names."""
    source = TripletSource.open(str(latent_set))
    featurizer = Featurizer(source, TextConfig())
    trained = ["dog", "cat", "bus", "sheep", "train", "bird"]
    near = grounding_data.confusable_classes(featurizer, VOC, trained, source.recipe["prompts"], 2)
    assert near == grounding_data.confusable_classes(featurizer, VOC, trained, source.recipe["prompts"], 2)
    assert set(near) == set(trained)
    assert all(len(set(others)) == 2 and name not in others and set(others) <= set(trained)
               for name, others in near.items())
    words = [[VOC.lookup(name).natural] for name in trained]
    texts = [fill_template(source.recipe["prompts"]["one"], source.recipe["prompts"]["two"], w) for w in words]
    unit = torch.nn.functional.normalize(grounding_data.text_class_embeddings(
        featurizer.pipe, featurizer.text, texts, words)[0][:, 0], dim=-1)
    cosine = unit @ unit.T
    for i, name in enumerate(trained):  # the two kept are the two nearest
        kept = min(cosine[i, trained.index(other)] for other in near[name])
        assert all(cosine[i, j] <= kept for j in range(len(trained)) if j != i and trained[j] not in near[name])

    rows = source.take([0, 1, 2, 3], source.columns)
    more = grounding_data.with_negatives(rows, trained, VOC, source.recipe["prompts"], 1.0,
                                         np.random.default_rng(0), near)
    for before, after in zip(rows.to_pylist(), more.to_pylist()):
        added = [name for name in after["classes"] if name not in before["classes"]]
        pool = {n for named in before["classes"] for n in near.get(named, ())} - set(before["classes"])
        assert len(added) == 1 and added[0] in (pool or set(trained))


@pytest.mark.parametrize("schedule, expected", [("constant", [1e-3, 1e-3, 1e-3]), ("cosine", [1e-3, 5e-4, 0.0])])
def test_learning_rate_schedule(schedule, expected):
    """The rate at the start, halfway and the end of training: a function of progress alone, so a
    resumed run continues the same curve."""
    config = GroundingTrainConfig(data="d", out="o", epochs=4, lr=1e-3, schedule=schedule)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    rates = []
    for done in (0.0, 2.0, 4.0):
        grounding_train.set_learning_rate(optimizer, config, done)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx(expected, abs=1e-12)


def test_featurizer_tensors_mode_decodes_manifest_shapes(tensors_set):
    source = TripletSource.open(str(tensors_set))
    shapes = source.manifest["capture"]["shapes"]
    assert source.mode == "tensors" and set(shapes) == {"features_8", "features_16"}
    featurizer = Featurizer(source, TextConfig())
    assert featurizer.pipe.unet is None  # only the text encoder is needed
    rows = source.take([0, 2], source.columns)
    batch = featurizer(rows)
    for r, tensor in batch.features.items():
        assert tuple(tensor.shape) == (2, *shapes[f"features_{r}"]) and tensor.dtype == torch.float16
        stored = from_fp16_bytes(rows.column(f"features_{r}")[1].as_py(), tuple(shapes[f"features_{r}"]))
        assert np.array_equal(tensor[1].numpy(), stored)
    assert featurizer.feature_channels() == {8: shapes["features_8"][0], 16: shapes["features_16"][0]}


# The README's tolerance for latent-mode features: recomputed by the Featurizer from the stored
# fp16 latent vs captured at build time and stored as fp16 tensors, relative to the largest feature.
RECOMPUTED_TOLERANCE = 1e-3


@pytest.mark.slow  # two small builds
def test_recomputed_features_match_the_captured_ones(tmp_path, capsys):
    """Latent mode recomputes what tensors mode stores: the same samples built both ways (guidance
    on, capture mid-trajectory at step 2 of 4), compared feature by feature. Both sides went
    through fp16 (the stored latent, the stored features), so they agree to fp16 rounding, not
    exactly; the number printed here is the README's."""
    generation = {"generator.guidance_scale": 7.5, "generator.steps": 4, "capture.step": 2}
    latent = TripletSource.open(str(make_triplets(tmp_path / "latent", "latent", 4, generation)))
    tensors = TripletSource.open(str(make_triplets(tmp_path / "tensors", "tensors", 4, generation)))
    rows = latent.take(range(latent.rows), [*latent.columns, "seed"])
    stored_rows = tensors.take(range(tensors.rows), [*tensors.columns, "seed"])
    # The plan gives both sets the same prompts and seeds; sample ids differ (the recipes do).
    position = {seed: i for i, seed in enumerate(stored_rows.column("seed").to_pylist())}
    order = [position[seed] for seed in rows.column("seed").to_pylist()]
    recomputed = Featurizer(latent, TextConfig()).features(rows)
    assert recomputed.keys() == tensors.stored_features.keys()
    worst, largest = 0.0, 0.0
    for r, name in tensors.stored_features.items():
        cells = stored_rows.column(name).to_pylist()
        stored = np.stack([from_fp16_bytes(cells[i], tensors.shapes[name]) for i in order]).astype(np.float32)
        worst = max(worst, float(np.abs(recomputed[r].float().numpy() - stored).max()))
        largest = max(largest, float(np.abs(stored).max()))
    with capsys.disabled():
        print(f"\nrecomputed vs captured features: max abs difference {worst:.2e}, largest |feature| {largest:.2f}, "
              f"relative {worst / largest:.1e}")
    assert 0.0 < worst <= RECOMPUTED_TOLERANCE * largest


def test_label_map_255_is_ignored_not_background(latent_set):
    """Pixels 255 in the label map (the oracle's unsure band; everything unclaimed when a class was
    missed) reach the batch as ignored: their targets are 0, but no loss counts them as background."""
    source = TripletSource.open(str(latent_set))
    rows = source.take([0, 1], source.columns)
    assert not Featurizer(source, TextConfig())(rows).ignore.any()  # the fixture's label maps hold no 255
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[16:, :16] = IGNORE  # the quarter that neither box covers
    edited = [{**row, "label": {"bytes": encode_label(label), "path": None}} for row in rows.to_pylist()]
    batch = Featurizer(source, TextConfig())(pa.Table.from_pylist(edited, schema=rows.schema))
    assert torch.equal(batch.ignore, torch.from_numpy(label == IGNORE).expand(2, SIZE, SIZE))
    assert not batch.targets[:, :, 16:, :16].any()

    # A module right everywhere except that it calls the unsure quarter its class: charged as a
    # false positive when 255 is background, not at all when it is ignored.
    right = torch.where(batch.targets.bool(), 5.0, -5.0)
    unsure = right.clone()
    unsure[:, :, 16:, :16] = 5.0
    for kind in ("bce", "bce+logcosh_dice"):
        assert grounding_loss(unsure, batch.targets, batch.valid, kind, batch.ignore).item() == pytest.approx(
            grounding_loss(right, batch.targets, batch.valid, kind, batch.ignore).item())
        assert grounding_loss(unsure, batch.targets, batch.valid, kind) > grounding_loss(
            right, batch.targets, batch.valid, kind) + 0.5


def _mask(box: tuple[slice, slice] | None) -> dict:
    mask = np.zeros((SIZE, SIZE), bool)
    if box is not None:
        mask[box] = True
    return {"bytes": encode_mask(mask), "path": None}


def test_valid_slot_rules(latent_set):
    source = TripletSource.open(str(latent_set))
    rows = source.take([0, 1, 2], source.columns)
    boxes = [_mask(BOXES[0]), _mask(BOXES[1])]
    cases = [(("cat", "dog"), boxes, [True, True]),  # dog is unseen in split 1
             (("horse", "chair"), boxes, [False, True]),  # the oracle missed the horse
             (("bottle", "cow"), [boxes[0], _mask(None)], [True, True])]  # the cow's mask is empty
    edited = [{**row, "prompt": f"a photograph of a {x} and a {y}", "classes": [x, y], "class_words": [x, y],
               "class_indices": [VOC.lookup(x).index, VOC.lookup(y).index], "masks": masks, "found": found}
              for row, ((x, y), masks, found) in zip(rows.to_pylist(), cases)]
    table = pa.Table.from_pylist(edited, schema=rows.schema)
    seen = VOC.seen(1)

    assert Featurizer(source, TextConfig(), classes=seen)(table).valid.tolist() == [
        [True, False], [False, True], [True, False]]
    assert Featurizer(source, TextConfig(), ignore_empty=False, classes=seen)(table).valid[2].tolist() == [True, True]
    assert Featurizer(source, TextConfig())(table).valid[0].tolist() == [True, True]  # no class restriction


def test_text_templates():
    text = TextConfig()
    assert text.render("a photograph of a dog and a cat", ["dog", "cat"]) == "dog and cat"
    assert text.render("a photograph of a dog", ["dog"]) == "dog"
    assert text.render("a photograph of a dog, a cat and a bus", ["dog", "cat", "bus"]) == "dog, cat and bus"
    assert TextConfig(source="prompt").render("a photograph of a dog", ["dog"]) == "a photograph of a dog"
    with pytest.raises(ValueError, match=r"\{1\} missing"):
        TextConfig(two="{0} alone")


def _tiny_module_and_optimizer():
    torch.manual_seed(0)
    module = GroundingModule(GroundingModelConfig.tiny())
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4, weight_decay=1e-4)
    features = {r: torch.randn(2, c, r, r) for r, c in module.config.feature_channels.items()}
    module(features, torch.randn(2, 1, 32), torch.ones(2, 1, dtype=torch.bool)).mean().backward()
    optimizer.step()
    return module, optimizer


def _assert_round_trip(uri: str, module, optimizer):
    loaded, metadata = load_grounding_checkpoint(uri)
    assert metadata["epoch"] == 1 and metadata["metrics"] == {"val_miou": 0.5}
    assert GroundingModelConfig.model_validate(metadata["model"]) == module.config
    for key, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor)
    fresh = torch.optim.Adam(loaded.parameters(), lr=1e-4, weight_decay=1e-4)
    load_optimizer_state(uri, fresh, metadata)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert float(fresh.state_dict()["state"][0]["step"]) == 1.0


def test_checkpoint_round_trip_local(tmp_path):
    module, optimizer = _tiny_module_and_optimizer()
    uri = str(tmp_path / "run" / "last")
    save_grounding_checkpoint(uri, module, optimizer, {"epoch": 1, "metrics": {"val_miou": 0.5}})
    assert sorted(p.name for p in Path(uri).iterdir()) == ["checkpoint.json", "model-00000001.safetensors",
                                                           "optimizer-00000001.safetensors"]
    assert set(safetensors.torch.load_file(Path(uri) / "model-00000001.safetensors")) == set(module.state_dict())
    _assert_round_trip(uri, module, optimizer)

    # A damaged last/ (a file no longer matching checkpoint.json): detected, and a rerun resumes from best/.
    save_grounding_checkpoint(str(tmp_path / "run" / "best"), module, optimizer, {"epoch": 1, "metrics": {}})
    (Path(uri) / "model-00000001.safetensors").write_bytes(safetensors.torch.save({"x": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="does not match"):
        load_grounding_checkpoint(uri)
    assert resume_point(open_location(str(tmp_path / "run")))[0] == "best"


def test_checkpoint_round_trip_s3(bucket, s3_endpoint):
    module, optimizer = _tiny_module_and_optimizer()
    uri = f"s3://{bucket}/grounding/run/best"
    save_grounding_checkpoint(uri, module, optimizer, {"epoch": 1, "metrics": {"val_miou": 0.5}})
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="grounding/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "grounding/run/best/checkpoint.json", "grounding/run/best/model-00000001.safetensors",
        "grounding/run/best/optimizer-00000001.safetensors"]
    _assert_round_trip(uri, module, optimizer)


def _cli_error(capsys, *args: str) -> str:
    assert train_grounding.main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_grounding: error: ") and "\n" not in err
    return err


def test_cli_one_line_errors_before_any_model(tmp_path, latent_set, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(grounding_data, "load_pipeline", no_model)
    out = ["--out", str(tmp_path / "ck")]
    assert "no dataset at" in _cli_error(capsys, "--data", str(tmp_path / "missing"), *out)

    plain = tmp_path / "plain"  # a dataset built without capture
    plain.mkdir()
    manifest = json.loads((latent_set / "manifest.json").read_text())
    (plain / "manifest.json").write_text(json.dumps({**manifest, "capture": None}))
    assert "no U-Net capture columns" in _cli_error(capsys, "--data", str(plain), *out)

    assert "unknown class 'unicorn'" in _cli_error(capsys, "--data", str(latent_set), "--classes", "dog,unicorn", *out)
    assert "not divisible" in _cli_error(capsys, "--data", str(latent_set), "--batch-size", "3", "--num-workers",
                                         "2", *out)
    assert "unknown config" in _cli_error(capsys, "--config", "nope")
    assert not (tmp_path / "ck").exists()


def test_mix_sets_are_trained_on_whole_beside_data(latent_set, tensors_set, tmp_path):
    """--mix (sim+real): every usable row of each mixed set trains; validation stays data's."""
    other = make_triplets(tmp_path / "other", "latent", num_samples=8, overrides={"seed": 5})
    config = GroundingTrainConfig(data=str(latent_set), mix=f"{other}", out=str(tmp_path / "ck"), classes="all",
                                  val_fraction=0.3)
    plan = prepare_training(config)
    alone = prepare_training(config.model_copy(update={"mix": None}))
    assert plan.mix_rows == [list(range(8))] and plan.train_rows == alone.train_rows
    assert plan.val_rows == alone.val_rows
    with pytest.raises(DatasetError, match=f"{tensors_set} differs from {latent_set} in capture mode"):
        prepare_training(config.model_copy(update={"mix": [str(tensors_set)]}))


@pytest.mark.slow
def test_train_two_workers_then_resume(ray_cluster, latent_set, tmp_path, capsys):
    out = tmp_path / "ck"
    other = make_triplets(tmp_path / "other", "latent", num_samples=8, overrides={"seed": 5})  # a mixed set
    args = ["--data", str(latent_set), "--mix", str(other), "--out", str(out), "--num-workers", "2",
            "--batch-size", "4", "--val-fraction", "0.3", "--classes", "seen"]
    assert train_grounding.main([*args, "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "epochs    2 run now; 2 done" in printed and f"checkpoint {out}/" in printed
    plan = prepare_training(GroundingTrainConfig(data=str(latent_set), mix=[str(other)], out=str(out),
                                                 val_fraction=0.3, classes="seen"))
    trained = len(plan.train_rows) + len(plan.mix_rows[0])
    assert plan.mix_rows[0] and f"samples   {trained} training, {len(plan.val_rows)} validation" in printed

    for name in ("last", "best"):
        epoch = json.loads((out / name / "checkpoint.json").read_text())["epoch"]
        assert {p.name for p in (out / name).iterdir()} == {"checkpoint.json", f"model-{epoch:08d}.safetensors",
                                                            f"optimizer-{epoch:08d}.safetensors"}
    module, last = load_grounding_checkpoint(str(out / "last"))
    assert last["epoch"] == 2 and last["resumed_from"] == 0 and len(last["history"]) == 2
    assert last["train"]["mix"] == [str(other)]
    assert 0.0 <= last["metrics"]["val_miou"] <= 1.0 and np.isfinite(last["metrics"]["train_loss"])
    assert set(last["metrics"]["val_iou"]) <= set(VOC.seen(1)) and last["classes"] == list(VOC.seen(1))
    assert last["best"]["epoch"] in (1, 2) and last["capture"]["steps_remaining"] == 2
    recipe = json.loads((latent_set / "manifest.json").read_text())["recipe"]
    # What annotation and Protocol-I check their images against (grounding.checkpoint.check_generation).
    assert last["generation"] == {"model": "tiny", "scheduler": "ddim", "steps": 2, "capture_step": 2,
                                  "guidance_scale": 1.0,
                                  "prompts": recipe["prompts"]}
    assert recipe["prompts"]["two"] == "a photograph of a {0} and a {1}" and last["text"]["two"] == "{0} and {1}"
    assert module.config.feature_channels == {8: 288, 16: 192} and module.config.mask_resolution == SIZE
    steps_two_epochs = last["optimizer"]["state"]["0"]["step"]
    optimizer_two_epochs = safetensors.torch.load_file(out / "last" / "optimizer-00000002.safetensors")

    # Rerun with more epochs: continues at epoch 3 with the saved optimizer state.
    assert train_grounding.main([*args, "--epochs", "3"]) == 0
    assert "1 run now (resumed after epoch 2); 3 done" in capsys.readouterr().out
    _, resumed = load_grounding_checkpoint(str(out / "last"))
    assert resumed["epoch"] == 3 and resumed["resumed_from"] == 2
    assert resumed["history"][:2] == last["history"] and len(resumed["history"]) == 3
    assert resumed["optimizer"]["state"]["0"]["step"] == steps_two_epochs * 3 / 2  # not restarted at 0
    # Adam's second moment only decays by beta2 per step from where it was: a restart from
    # zero would fall below that wherever earlier gradients were larger.
    after = safetensors.torch.load_file(out / "last" / "optimizer-00000003.safetensors")
    decay = 0.999 ** (steps_two_epochs / 2)
    for key in ("0.exp_avg_sq", "5.exp_avg_sq"):
        assert torch.all(after[key] >= optimizer_two_epochs[key] * decay * (1 - 1e-5))

    # Everything done: stops at once, writes nothing.
    written = (out / "last" / "checkpoint.json").stat().st_mtime_ns
    assert train_grounding.main([*args, "--epochs", "3"]) == 0
    assert "all 3 were already done" in capsys.readouterr().out
    assert (out / "last" / "checkpoint.json").stat().st_mtime_ns == written

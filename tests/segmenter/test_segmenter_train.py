"""Segmenter training: the transform, inductive and Model-D ignoring, the plan, the zero-shot
refusals, the text head's names, real and synthetic batches mixed, the CLI's errors, and a Ray
Train run with two workers that is then resumed.

The fixture datasets are written with pyarrow in the factory's format (the columns the
segmenter reads, a manifest) rather than by running the factory: every sample shows a cat
(label 8, seen in split 1) in the top-left quarter, a dog (12, unseen in split 1) in the
bottom-right one, and an unsure band of 255 in the first row. Their manifest says who
labelled them: by default a grounding annotator trained on split 1's seen classes, on class
lists from prompts that named the cat only (the dog stands for unseen pixels, which the
inductive setting ignores).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
import safetensors.torch
import torch
import yaml
from PIL import Image

from factory.core.checkpoints import CheckpointError
from factory.core.storage import open_location
from factory.core.vocab import VOC
from factory.dataset.codec import encode_image, encode_label
from factory.dataset.schema import SCHEMA
from factory.dataset.source import DatasetError, DatasetSource
from jobs import train_segmenter
from segmenter import model as segmenter_model
from segmenter import text as segmenter_text
from segmenter.checkpoint import load_segmenter_checkpoint, save_segmenter_checkpoint
from segmenter.config import SegmenterModelConfig, SegmenterTrainConfig
from segmenter.data import (
    Augment,
    RealSamples,
    batch_parts,
    ignore_classes,
    mixed_batches,
    normalize,
    pass_order,
    passes_for,
    random_resized_crop,
    train_transform,
    transform_synthetic,
)
from segmenter.model import Segmenter
from segmenter.train import prepare_training, snapshot_name, training_datasets

REPO = Path(__file__).resolve().parents[2]

SIZE = 32
CAT, DOG = VOC.lookup("cat").index, VOC.lookup("dog").index
UNSEEN_1 = sorted(VOC.lookup(name).index for name in VOC.unseen(1))


def _label() -> np.ndarray:
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[:16, :16] = CAT
    label[16:, 16:] = DOG
    label[0] = 255
    return label


def labels_record(labeler: str | None, split: int | None = 1) -> dict | None:
    """The manifest's "labels": an "annotator" trained on `split`'s seen classes, an "oracle"
    trained on every class, or None (a manifest from before the record)."""
    if labeler is None:
        return None
    trained = set(VOC.seen(split)) if labeler == "annotator" else set(VOC.names)
    return {"labeler": labeler, "kind": labeler, "trained_split": split if labeler == "annotator" else None,
            "trained": {name: name in trained for name in VOC.names}, "class_lists": "prompt"}


def make_synthetic(uri: str, split: int | None = 1, samples: int = 12, labeler: str | None = "annotator",
                   prompted: tuple[str, ...] | None = ("cat",), **records) -> str:
    """A factory-format dataset at a local folder or s3:// prefix, in two Parquet parts.
    `prompted`: the classes its plan's prompts named (None: no record); `records`: more manifest
    records, or ones that replace the fixture's."""
    location = open_location(uri)
    rng = np.random.default_rng(0)
    columns = ("sample_id", "classes", "class_indices", "image", "label")
    schema = pa.schema([SCHEMA.field(name) for name in columns])
    files = []
    for part in range(2):
        rows = [{"sample_id": f"s{part}-{i}", "classes": ["cat", "dog"], "class_indices": [CAT, DOG],
                 "image": {"bytes": encode_image(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)), "path": None},
                 "label": {"bytes": encode_label(_label()), "path": None}} for i in range(samples // 2)]
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
        path = f"data/part-{part}.parquet"
        location.write_bytes(path, buffer.getvalue())
        files.append({"path": path, "rows": len(rows)})
    manifest = {"format": "dataset-factory/1", "name": "fixture", "recipe": {"vocabulary": "voc", "split": split},
                "vocabulary": VOC.definition(), "files": files}
    if labeler is not None:
        manifest["labels"] = labels_record(labeler, split)
    if prompted is not None:
        manifest["plan"] = {"prompted_classes": list(prompted)}
    location.write_bytes("manifest.json", json.dumps({**manifest, **records}).encode())
    return uri


def make_voc(root: Path, samples: int = 3, aug: int = 0) -> Path:
    """A VOCdevkit/VOC2012 folder with the fixture's label maps (VOC border 255 included): train
    lists `samples` images; with `aug`, SBD's SegmentationClassAug holds greyscale masks of
    those and `aug` more, listed in train_aug, val lists one other image and trainval both."""
    ids = [f"2007_{i:06d}" for i in range(samples)]
    extra = [f"2008_{i:06d}" for i in range(aug)]
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for image_id in ids + extra:
        Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
    for image_id in ids:
        (root / "SegmentationClass" / f"{image_id}.png").write_bytes(encode_label(_label()))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    if aug:
        (root / "SegmentationClassAug").mkdir()
        for image_id in ids + extra:
            Image.fromarray(_label(), mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
        (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(ids + extra) + "\n")
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "JPEGImages" / "2009_000000.jpg")
        (root / "SegmentationClass" / "2009_000000.png").write_bytes(encode_label(_label()))
        (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2009_000000\n")
        (root / "ImageSets" / "Segmentation" / "trainval.txt").write_text("\n".join([*ids, "2009_000000"]) + "\n")
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")))


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc") / "VOC2012", aug=3)


def test_transform_keeps_label_values_and_ignore():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    label = np.zeros((48, 40), np.uint8)
    label[10:30, 5:25], label[30:] = 5, 255
    seen = set()
    for _ in range(20):
        out_image, out_label = train_transform(image, label, size=24, scale=(0.25, 1.0), rng=rng)
        assert out_image.shape == (24, 24, 3) and out_image.dtype == np.uint8
        assert out_label.shape == (24, 24) and out_label.dtype == np.uint8
        seen |= set(np.unique(out_label).tolist())
    assert seen == {0, 5, 255}  # nearest neighbour: no value is blended or lost


def test_crop_and_flip_keep_image_and_label_aligned():
    rng = np.random.default_rng(1)
    label = np.zeros((64, 64), np.uint8)
    label[:, 32:], label[40:, :] = 100, 200
    image = np.repeat(label[..., None], 3, axis=2)  # the image shows its own label
    for _ in range(10):
        out_image, out_label = random_resized_crop(image, label, 32, (0.3, 1.0), rng)
        assert np.mean(out_image[..., 0] == out_label) > 0.9  # all but the blended region borders
    _, flipped = train_transform(image, label, size=64, scale=(1.0, 1.0), rng=np.random.default_rng(3))
    assert np.array_equal(flipped, label) or np.array_equal(flipped, label[:, ::-1])


def test_normalize_imagenet_statistics():
    images = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    out = normalize(images)
    assert out.shape == (1, 3, 1, 1) and out.dtype == torch.float32
    expected = [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    torch.testing.assert_close(out.flatten(), torch.tensor(expected))


def test_ignore_classes():
    label = np.array([[0, 8, 12], [255, 12, 7]], np.uint8)
    assert ignore_classes(label, [12, 7]).tolist() == [[0, 8, 255], [255, 255, 255]]
    assert label[0, 2] == 12  # a copy


def _synthetic_rows(uri: str, augment: Augment, epoch: int = 0) -> dict:
    """transform_synthetic's rows of the set's first file, read in pass `epoch`."""
    source = DatasetSource.open(uri)
    item = {"pass": np.array([epoch]), "path": np.array([source.location.path(source.files[0])])}
    chunks = list(transform_synthetic(item, fs=source.location.fs, augment=augment))
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in ("image", "label")}


def test_inductive_ignores_unseen_pixels_and_keeps_samples(synthetic):
    whole = (SIZE, (1.0, 1.0))  # the whole image, maybe flipped
    transductive = _synthetic_rows(synthetic, Augment(*whole, [], seed=0))
    inductive = _synthetic_rows(synthetic, Augment(*whole, UNSEEN_1, seed=0))
    source = DatasetSource.open(synthetic)
    assert len(inductive["label"]) == pq.read_metadata(source.location.path(source.files[0])).num_rows  # all kept
    assert set(np.unique(transductive["label"]).tolist()) == {0, CAT, DOG, 255}
    assert set(np.unique(inductive["label"]).tolist()) == {0, CAT, 255}
    assert (inductive["label"] == 255).sum() == ((transductive["label"] == 255) | (transductive["label"] == DOG)).sum()


def test_augmentation_comes_from_the_seed_the_pass_and_the_row():
    """A row's crop depends on (seed, pass, its identity) only: the same on every run and in any
    batch, another in the next pass or under another seed."""
    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), np.zeros((40, 40), np.uint8), 0, f"id-{k}")
            for k in range(3)]
    augment = Augment(16, (0.2, 1.0), [], seed=7)
    first = augment(rows)["image"]
    assert np.array_equal(first, augment(rows)["image"])
    assert np.array_equal(first[::-1], augment(rows[::-1])["image"])  # not its place in the batch
    assert np.array_equal(first[1], augment(rows[1:2])["image"][0])
    assert not np.array_equal(first, augment([(i, label, 1, k) for i, label, _, k in rows])["image"])
    assert not np.array_equal(first, Augment(16, (0.2, 1.0), [], seed=8)(rows)["image"])


def test_passes_hold_every_step_a_run_reads():
    assert passes_for(rows=12, rows_per_step=4, done=0, steps=9) == range(0, 4)  # 36 rows: 3 passes, 1 spare
    assert passes_for(rows=12, rows_per_step=4, done=6, steps=9) == range(2, 4)  # resumed at step 7 (row 24)
    assert sorted(pass_order(3, 1, 5)) == list(range(5))
    assert list(pass_order(3, 1, 50)) == list(pass_order(3, 1, 50)) != list(pass_order(3, 2, 50))


def test_real_images_of_seen_classes_ignore_unseen_pixels(voc):
    reader = RealSamples(format="voc", root=str(voc), split="train", vocabulary="voc",
                         augment=Augment(SIZE, (1.0, 1.0), UNSEEN_1, seed=0))
    rows = reader({"pass": np.array([0, 0]), "id": np.array([0, 2])})
    assert rows["image"].shape == (2, SIZE, SIZE, 3) and rows["label"].shape == (2, SIZE, SIZE)
    assert set(np.unique(rows["label"]).tolist()) == {0, CAT, 255}  # the dog is ignored, not background
    assert (rows["label"] == 255).sum() == 2 * (SIZE + 16 * 16)


TEXT_HEAD = {"head": "text", "text_encoder": "tiny"}


def test_plan_inductive_and_model_d(synthetic, voc, tmp_path, monkeypatch):
    plan = prepare_training(SegmenterTrainConfig(data=synthetic, out=str(tmp_path / "a"), setting="inductive",
                                                 model=TEXT_HEAD))
    assert plan.split == 1 and plan.synthetic_rows == 12 and plan.unseen_indices() == UNSEEN_1
    assert plan.model.num_labels == 21 and plan.model.preset == "tiny" and not plan.resume
    metadata = plan.worker_config()["metadata"]
    assert metadata["seen"] == list(VOC.seen(1)) and metadata["vocabulary"]["name"] == "voc"
    assert metadata["setting"] == "inductive" and metadata["zero_shot"] is True
    assert metadata["data_labels"]["kind"] == "annotator"

    real = {"format": "voc", "root": str(voc), "split": "train"}
    plan = prepare_training(SegmenterTrainConfig(real=real, split=1, out=str(tmp_path / "d"), batch_size=2))
    assert plan.real_rows == 3 and plan.synthetic_rows == 0 and plan.unseen_indices() == UNSEEN_1

    # Real images ignore the unseen classes' pixels (Model-D), except as the supervised real-data reference.
    from segmenter import train as segmenter_train
    ignored = {}
    monkeypatch.setattr(segmenter_train, "real_training_dataset", lambda *args, **kwargs: ignored.setdefault(
        len(ignored), args[5].ignore))
    training_datasets(plan)
    reference = prepare_training(SegmenterTrainConfig(real=real, setting="supervised", out=str(tmp_path / "s"),
                                                      batch_size=2))  # needs no split: it ignores nothing
    training_datasets(reference)
    assert ignored == {0: UNSEEN_1, 1: []}

    real_model = prepare_training(SegmenterTrainConfig(data=synthetic, out=str(tmp_path / "r"),
                                                       model={"preset": "real"})).model
    assert real_model.backbone_depths == [3, 4, 23, 3] and not real_model.frozen_backbone_norm
    world_model = prepare_training(SegmenterTrainConfig(data=synthetic, out=str(tmp_path / "w"),
                                                        model={"preset": "world"})).model
    assert world_model == SegmenterModelConfig.world(21) and not world_model.stem_pool


def test_text_head_embeds_only_the_names_a_setting_trains_on(synthetic, tmp_path):
    inductive = prepare_training(SegmenterTrainConfig(data=synthetic, out=str(tmp_path / "i"), setting="inductive",
                                                      model=TEXT_HEAD))
    assert inductive.model.head == "text" and inductive.model.text_encoder == "tiny"
    assert list(inductive.class_embeddings) == list(VOC.seen(1))  # no unseen name before test time
    assert inductive.model.text_dim == len(inductive.class_embeddings["cat"]) == 32
    transductive = prepare_training(SegmenterTrainConfig(data=synthetic, out=str(tmp_path / "t"), model=TEXT_HEAD))
    assert list(transductive.class_embeddings) == list(VOC.names)
    assert transductive.class_embeddings["cat"] == inductive.class_embeddings["cat"]  # frozen CLIP: the same
    closed = prepare_training(SegmenterTrainConfig(data=synthetic, out=str(tmp_path / "c")))
    assert closed.model.head == "closed" and closed.class_embeddings is None


def test_zero_shot_refuses_labels_from_a_labeler_trained_on_unseen_classes(tmp_path):
    oracle = make_synthetic(str(tmp_path / "oracle"), labeler="oracle", samples=4)
    config = {"data": oracle, "out": str(tmp_path / "ck"), "batch_size": 2}
    expected = ("fixture: labels of unseen classes car, dog, sofa, train, tvmonitor (split 1) come from a labeler "
                "trained on them; this is not zero-shot. Train on an annotated set, or pass --setting supervised "
                "for an oracle upper bound")
    with pytest.raises(DatasetError) as refused:
        prepare_training(SegmenterTrainConfig(**config))
    assert str(refused.value) == expected
    with pytest.raises(DatasetError, match="not zero-shot"):
        prepare_training(SegmenterTrainConfig(**config, setting="inductive", model=TEXT_HEAD))
    plan = prepare_training(SegmenterTrainConfig(**config, setting="supervised"))  # an oracle upper bound, said so
    assert plan.worker_config()["metadata"]["zero_shot"] is False and plan.data_labels["kind"] == "oracle"

    # An annotator trained on split 1's seen classes labelled split 2's unseen person and horse.
    annotated = make_synthetic(str(tmp_path / "annotated"), samples=4)
    assert prepare_training(SegmenterTrainConfig(data=annotated, out=str(tmp_path / "a"), batch_size=2)).split == 1
    with pytest.raises(DatasetError, match=r"unseen classes horse, motorbike, person, pottedplant, sheep \(split 2\)"):
        prepare_training(SegmenterTrainConfig(data=annotated, out=str(tmp_path / "a"), batch_size=2, split=2))
    # With no split, evaluation may score any: every split's unseen classes count.
    no_split = make_synthetic(str(tmp_path / "no-split"), split=None, labeler="oracle", samples=4)
    with pytest.raises(DatasetError, match=r"\(the splits; no split is set\)"):
        prepare_training(SegmenterTrainConfig(data=no_split, out=str(tmp_path / "n"), batch_size=2))
    older = make_synthetic(str(tmp_path / "older"), labeler=None, samples=4)
    with pytest.raises(DatasetError, match="does not record which labeler was trained on which class"):
        prepare_training(SegmenterTrainConfig(data=older, out=str(tmp_path / "o"), batch_size=2))


def kept(**counts: int) -> dict:
    """The manifest's "per_class": each class's plan entries, all kept (0: every one given up)."""
    return {name: {"planned": max(n, 1), "attempted": max(n, 1), "kept": n, "given_up": int(not n)}
            for name, n in counts.items()}


def _prepare(tmp_path: Path, name: str, setting: str = "transductive", **records) -> None:
    """prepare_training on a 4-sample fixture set with these manifest records (see make_synthetic)."""
    data = make_synthetic(str(tmp_path / name), samples=4, **records)
    model = TEXT_HEAD if setting == "inductive" else {}
    prepare_training(SegmenterTrainConfig(data=data, out=str(tmp_path / f"{name}-ck"), batch_size=2, setting=setting,
                                          model=model))


def test_zero_shot_refuses_class_lists_from_ground_truth(tmp_path):
    """Annotated VOC images: the annotator never saw the dog, but VOC's masks chose the images named for it."""
    ground_truth = {"labels": {**labels_record("annotator"), "class_lists": "ground_truth"}}
    expected = ("fixture: which images show unseen classes dog (split 1) comes from the source's ground truth (its "
                "masks or tags); this is not zero-shot. Train on generated images or your own class lists, or pass "
                "--setting supervised")
    with pytest.raises(DatasetError) as refused:
        _prepare(tmp_path, "voc", **ground_truth, per_class=kept(cat=2, dog=2))
    assert str(refused.value) == expected
    with pytest.raises(DatasetError, match="comes from the source's ground truth"):
        _prepare(tmp_path, "voc-i", "inductive", **ground_truth, per_class=kept(cat=2, dog=2))
    _prepare(tmp_path, "voc-s", "supervised", **ground_truth, per_class=kept(cat=2, dog=2))
    _prepare(tmp_path, "seen-only", **ground_truth, per_class=kept(cat=4, dog=0))  # no dog image kept
    user = {"labels": {**labels_record("annotator"), "class_lists": "user"}}
    _prepare(tmp_path, "folder", **user, per_class=kept(cat=2, dog=2))  # the user named the dog, as a prompt does

    # A manifest from before the record: its recipe's source says where the lists came from.
    older = {"labels": labels_record("annotator")}
    del older["labels"]["class_lists"]
    with pytest.raises(DatasetError, match="comes from the source's ground truth"):
        _prepare(tmp_path, "old-voc", **older, per_class=kept(cat=2, dog=2),
                 recipe={"vocabulary": "voc", "split": 1, "source": {"images": "/voc", "format": "voc"}})
    _prepare(tmp_path, "old-folder", **older, per_class=kept(cat=2, dog=2),
             recipe={"vocabulary": "voc", "split": 1, "source": {"images": "/photos", "format": "folder"}})


def test_inductive_refuses_a_set_whose_prompts_named_unseen_classes(tmp_path):
    expected = ("fixture: its prompts name unseen classes dog (split 1); the inductive setting sees no unseen class "
                "name in training. Build the set from the seen classes (classes: seen), or pass --setting "
                "transductive")
    with pytest.raises(DatasetError) as refused:
        _prepare(tmp_path, "named", "inductive", prompted=("cat", "dog"))
    assert str(refused.value) == expected
    _prepare(tmp_path, "named-t", prompted=("cat", "dog"))  # transductive: unseen names are the paper's input

    # A manifest from before the record: the per-class counts name the prompts' classes.
    with pytest.raises(DatasetError, match="its prompts name unseen classes dog"):
        _prepare(tmp_path, "old", "inductive", prompted=None, per_class=kept(cat=2, dog=2))
    _prepare(tmp_path, "old-seen", "inductive", prompted=None, per_class=kept(cat=4))
    with pytest.raises(DatasetError, match="does not record which classes its prompts named"):
        _prepare(tmp_path, "older", "inductive", prompted=None)


def _save_init(uri: Path, setting: str, split: int | None, head: str = "closed") -> str:
    text = {"head": "text", "text_encoder": "tiny", "text_template": "{}", "text_dim": 32} if head == "text" else {}
    model = Segmenter(SegmenterModelConfig.tiny(21, **text))
    save_segmenter_checkpoint(str(uri), model, None, {"iteration": 1, "vocabulary": VOC.definition(),
                                                      "setting": setting, "split": split})
    return str(uri)


def test_init_must_have_the_runs_setting_head_and_split(synthetic, tmp_path):
    def refusal(init: str, **config) -> str:
        with pytest.raises(CheckpointError) as refused:
            prepare_training(SegmenterTrainConfig(data=synthetic, init=init, out=str(tmp_path / "ck"), **config))
        return str(refused.value)

    oracle_c = _save_init(tmp_path / "oracle-c", "supervised", 1)
    assert "was trained supervised; a transductive run must start from a transductive checkpoint" in refusal(oracle_c)
    zero_shot_c = _save_init(tmp_path / "c", "transductive", 2)
    assert "trained for split 2, so the unseen classes of split 1 are not zero-shot for it" in refusal(zero_shot_c)
    assert "has the closed head; set model.head: closed" in refusal(zero_shot_c, model=TEXT_HEAD)
    text_c = _save_init(tmp_path / "text-c", "transductive", 1, head="text")
    plan = prepare_training(SegmenterTrainConfig(data=synthetic, init=text_c, out=str(tmp_path / "d"),
                                                 model=TEXT_HEAD))
    assert plan.model.head == "text" and plan.class_embeddings is None  # the init brings its own


def test_real_fraction_sets_every_batch(synthetic, voc, tmp_path):
    real = {"format": "voc_aug", "root": str(voc), "split": "train_aug"}
    config = SegmenterTrainConfig(data=synthetic, real=real, real_fraction=0.25, out=str(tmp_path / "d"),
                                  batch_size=8, num_workers=2)
    plan = prepare_training(config)
    assert plan.real_rows == 6 and plan.synthetic_rows == 12  # SBD's train_aug, not VOC's train
    assert batch_parts(config, 2) == {"synthetic": 3, "real": 1}
    assert batch_parts(config.model_copy(update={"real_fraction": 0.5}), 1) == {"synthetic": 4, "real": 4}

    class Shard:
        """A worker's shard of `rows` rows whose labels say where they come from."""
        def __init__(self, value: int, rows: int):
            self.value, self.rows, self.passes = value, rows, 0

        def iter_torch_batches(self, batch_size, drop_last, local_shuffle_buffer_size, local_shuffle_seed):
            self.passes += 1
            for _ in range(self.rows // batch_size):
                yield {"image": torch.zeros(batch_size, 2, 2, 3, dtype=torch.uint8),
                       "label": torch.full((batch_size, 2, 2), self.value, dtype=torch.uint8)}

    shards = {"synthetic": Shard(1, 6), "real": Shard(2, 1)}  # a real shard far smaller than the synthetic one
    steps = mixed_batches(shards, batch_parts(config, 2), rank=0, seed=0)
    for _ in range(5):
        images, labels = next(steps)
        assert images.shape == (4, 2, 2, 3) and labels[:, 0, 0].tolist() == [1, 1, 1, 2]
    assert shards["real"].passes == 5 and shards["synthetic"].passes == 3  # each read again as it runs out
    with pytest.raises(DatasetError, match="worker 0's real data shard holds fewer than 1 rows"):
        next(mixed_batches({"synthetic": Shard(1, 6), "real": Shard(2, 0)}, {"synthetic": 3, "real": 1}, rank=0,
                           seed=0))


def test_recipes_claim_zero_shot_only_on_annotated_sets():
    """Each segmenter recipe's data is the output of the build recipe of the same name: a zero-shot
    setting must train on a set labelled by the grounding annotator, an oracle set says
    "supervised"; the docs' recipe table (docs/protocol-ii.md, "Recipes") has a row per recipe."""
    page = (REPO / "docs" / "protocol-ii.md").read_text()
    table = page[page.index("\n## Recipes\n"):page.index("\n## ", page.index("\n## Recipes\n") + 1)]
    for path in sorted((REPO / "factory" / "recipes" / "segmenter").glob("*.yaml")):
        config = SegmenterTrainConfig.model_validate(yaml.safe_load(path.read_text()))
        build = yaml.safe_load((REPO / "factory" / "recipes" / f"{config.data.rsplit('/', 1)[-1]}.yaml").read_text())
        annotated = bool((build.get("annotator") or {}).get("checkpoint"))
        assert annotated == (config.setting != "supervised"), path.name
        assert f"| `{path.stem}`" in table, f"{path.stem} has no row in the docs' Protocol-II recipe table"
    model_d = SegmenterTrainConfig.model_validate(
        yaml.safe_load((REPO / "factory" / "recipes" / "segmenter" / "model-d.yaml").read_text()))
    assert model_d.real.format == "voc_aug" and model_d.real_fraction and model_d.data.endswith("voc-synthetic-mixture")


def _cli_error(capsys, *args: str) -> str:
    assert train_segmenter.main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_segmenter: error: ") and "\n" not in err
    return err


def test_cli_one_line_errors_before_any_model(tmp_path, synthetic, voc, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")
    monkeypatch.setattr(segmenter_model, "MaskFormerForInstanceSegmentation", no_model)
    monkeypatch.setattr(segmenter_text, "load_clip", no_model)
    out = ["--out", str(tmp_path / "ck")]
    data = ["--data", synthetic]
    assert "no dataset at" in _cli_error(capsys, "--data", str(tmp_path / "missing"), *out)
    assert "nothing to train on" in _cli_error(capsys, "--data", "null", *out)
    assert "unknown config" in _cli_error(capsys, "--config", "nope")
    assert "not divisible" in _cli_error(capsys, *data, "--batch-size", "3", "--num-workers", "2", *out)
    assert "unknown split 7" in _cli_error(capsys, *data, "--split", "7", *out)
    assert "12 synthetic training samples are fewer than the 64 that each step of batch_size 64" in _cli_error(
        capsys, *data, "--batch-size", "64", *out)

    text = ["--model.head", "text", "--model.text-encoder", "tiny"]
    no_split = make_synthetic(str(tmp_path / "no-split"), split=None, samples=4, labeler="oracle")
    assert "pass --split" in _cli_error(capsys, "--data", no_split, "--setting", "inductive", *text, *out)
    assert ("setting inductive needs model.head text: a closed-set head trains no output for the unseen classes it "
            "ignores, so it could never predict them") in _cli_error(capsys, *data, "--setting", "inductive", *out)
    assert "model.head text needs model.text_encoder" in _cli_error(capsys, *data, "--model.head", "text", *out)
    oracle = make_synthetic(str(tmp_path / "oracle"), labeler="oracle", samples=4)
    assert "come from a labeler trained on them; this is not zero-shot" in _cli_error(
        capsys, "--data", oracle, "--setting", "transductive", *out)
    real = ["--real", f"{{format: voc_aug, root: {voc}, split: train_aug}}"]
    assert "set real_fraction, the share of every batch that is real images" in _cli_error(capsys, *data, *real, *out)
    assert "real_fraction 0.3 of the 4 samples each worker takes per step is not a whole number from 1 to 3" in (
        _cli_error(capsys, *data, *real, "--real-fraction", "0.3", *out))
    assert "real_fraction mixes data and real" in _cli_error(capsys, *data, "--real-fraction", "0.5", *out)
    assert "real voc trainval lists 1 images of VOC val, the evaluation set (first: 2009_000000)" in _cli_error(
        capsys, *data, "--real", f"{{format: voc, root: {voc}, split: trainval}}", "--real-fraction", "0.5", *out)
    assert "VOC root not found" in _cli_error(
        capsys, *data, "--real", f"{{format: voc, root: {tmp_path / 'nowhere'}, split: train}}", "--real-fraction",
        "0.5", *out)
    assert "no readable checkpoint" in _cli_error(capsys, *data, "--init", str(tmp_path / "none"), *out)
    assert "model not found" in _cli_error(capsys, *data, "--model.preset", "real", "--model.backbone-weights",
                                           str(tmp_path / "r101.safetensors"), *out)
    assert not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_training_rows_of_synthetic_and_real_images(ray_cluster, synthetic, voc, tmp_path):
    """Every pass the run reads (3 steps of 2 synthetic and 2 real rows: 2 passes over the 12 synthetic
    rows, 3 over the 3 real ones), the same rows in the same order when built again."""
    config = SegmenterTrainConfig(data=synthetic, real={"format": "voc", "root": str(voc), "split": "train"},
                                  real_fraction=0.5, batch_size=4, readers=2, out=str(tmp_path / "ck"), crop_size=16,
                                  setting="inductive", model=TEXT_HEAD, iterations=3)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # as the training workers read them
    try:
        runs = [training_datasets(prepare_training(config)) for _ in range(2)]
        synthetic_rows, real_rows = ([ds[name].take_all() for ds in runs] for name in ("synthetic", "real"))
    finally:
        context.execution_options.preserve_order = False
    assert len(synthetic_rows[0]) == 2 * 12 and len(real_rows[0]) == 3 * 3
    for first, again in (synthetic_rows, real_rows):
        assert all(np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
                   for a, b in zip(first, again, strict=True))
    rows = synthetic_rows[0] + real_rows[0]
    assert {r["image"].shape for r in rows} == {(16, 16, 3)} and {r["label"].shape for r in rows} == {(16, 16)}
    assert DOG not in set(np.unique([r["label"] for r in rows]).tolist())
    # each pass has its own crops: a real image's rows of passes 0, 1, 2 differ
    assert len({r["image"].tobytes() for r in real_rows[0]}) == 9


@pytest.mark.slow
def test_train_two_workers_then_resume(ray_cluster, bucket, tmp_path, capsys):
    data = make_synthetic(f"s3://{bucket}/datasets/fixture")  # read by Ray Data from S3
    out = tmp_path / "ck"
    args = ["--data", data, "--out", str(out), "--num-workers", "2", "--cpus-per-worker", "0.5", "--batch-size", "4",
            "--crop-size", str(SIZE), "--setting", "inductive", "--model.head", "text", "--model.text-encoder", "tiny",
            "--checkpoint-every", "1", "--log-every", "1", "--snapshot-every", "2"]
    assert train_segmenter.main([*args, "--iterations", "2"]) == 0
    assert "iterations 2 run now; 2 done" in capsys.readouterr().out
    assert {p.name for p in (out / "last").iterdir()} == {
        "checkpoint.json", "model-00000002.safetensors", "optimizer-00000002.safetensors"}
    model, first = load_segmenter_checkpoint(str(out / "last"))
    assert first["iteration"] == 2 and first["resumed_from"] == 0 and [e["iteration"] for e in first["log"]] == [1, 2]
    assert all(np.isfinite(e["loss"]) and e["iterations_per_second"] > 0 for e in first["log"])
    assert first["setting"] == "inductive" and first["split"] == 1 and first["unseen"] == list(VOC.unseen(1))
    assert first["zero_shot"] is True and first["data_labels"]["kind"] == "annotator"
    assert first["text_classes"] == list(VOC.seen(1)) and model.known_classes == sorted(
        VOC.lookup(name).index for name in VOC.seen(1))  # the unseen names wait for evaluation
    assert first["vocabulary"]["name"] == "voc" and model.config.num_labels == 21
    assert first["optimizer"]["state"]["0"]["step"] == 2
    optimizer_before = safetensors.torch.load_file(out / "last" / "optimizer-00000002.safetensors")
    # The snapshot at 2: the same weights as last/ then, without the optimizer; a resume keeps it.
    snapshot = out / snapshot_name(2)
    assert {p.name for p in snapshot.iterdir()} == {"checkpoint.json", "model-00000002.safetensors"}
    assert load_segmenter_checkpoint(str(snapshot))[1]["iteration"] == 2
    kept, last = (safetensors.torch.load_file(folder / "model-00000002.safetensors") for folder in (snapshot, out / "last"))
    assert kept.keys() == last.keys() and all(torch.equal(kept[name], last[name]) for name in kept)

    # A rerun with more iterations continues at iteration 3 with the saved optimizer state.
    assert train_segmenter.main([*args, "--iterations", "3"]) == 0
    assert "1 run now (resumed after iteration 2); 3 done" in capsys.readouterr().out
    _, resumed = load_segmenter_checkpoint(str(out / "last"))
    assert resumed["iteration"] == 3 and resumed["resumed_from"] == 2
    assert resumed["log"][:2] == first["log"] and len(resumed["log"]) == 3
    assert resumed["optimizer"]["state"]["0"]["step"] == 3  # not restarted at 0
    after = safetensors.torch.load_file(out / "last" / "optimizer-00000003.safetensors")
    # AdamW's second moment decays by beta2 from where it was; a restart from zero would fall below.
    assert torch.all(after["0.exp_avg_sq"] >= optimizer_before["0.exp_avg_sq"] * 0.999 * (1 - 1e-5))

    assert sorted(p.name for p in out.iterdir()) == ["iteration-000002", "last"]  # 3 is no multiple of 2
    written = (out / "last" / "checkpoint.json").stat().st_mtime_ns
    assert train_segmenter.main([*args, "--iterations", "3"]) == 0
    assert "all 3 were already done" in capsys.readouterr().out
    assert (out / "last" / "checkpoint.json").stat().st_mtime_ns == written
    assert "different setting" in _cli_error(capsys, *args, "--iterations", "4", "--setting", "transductive")


@pytest.mark.slow
def test_a_run_given_its_seed_trains_the_same_weights_twice(ray_cluster, synthetic, tmp_path):
    """One worker: two runs of one seed end with identical weights and losses (docs/protocol-ii.md,
    "Seeds"; real rows come in the same order too: test_training_rows_of_synthetic_and_real_images)."""
    def run(out: str) -> tuple[dict, list]:
        assert train_segmenter.main(["--data", synthetic, "--out", out, "--batch-size", "4",
                                     "--crop-size", "16", "--iterations", "3", "--log-every", "1", "--seed", "5",
                                     "--setting", "inductive", *("--model.head", "text", "--model.text-encoder",
                                                                 "tiny")]) == 0
        location = Path(out) / "last"
        weights = safetensors.torch.load_file(location / "model-00000003.safetensors")
        return weights, [entry["loss"] for entry in json.loads((location / "checkpoint.json").read_text())["log"]]

    weights, losses = run(str(tmp_path / "a"))
    again, losses_again = run(str(tmp_path / "b"))
    assert losses == losses_again and weights.keys() == again.keys()
    assert all(torch.equal(weights[name], again[name]) for name in weights)


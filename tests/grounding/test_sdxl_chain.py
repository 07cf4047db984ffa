"""The grounding chain on SDXL (Li et al., ICCV 2023, section 4.2, on Podell et al. 2023's U-Net): triplets
with U-Net capture and DAAM, training, Protocol-I, annotation of generated and of real images, through the
jobs, on a tiny random SDXL saved as a diffusers folder and so read as a real one is; and a module refused
the other family's features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from factory.core.conventions import IGNORE
from factory.core.vocab import VOC
from factory.dataset.codec import decode_label, decode_masks
from factory.diffusion.families import SDXL
from factory.diffusion.features import from_fp16_bytes
from factory.diffusion.tiny import save_tiny_pipeline
from factory.pipeline.sections import PromptConfig
from grounding.checkpoint import save_grounding_checkpoint
from grounding.config import GroundingModelConfig, TextConfig
from grounding.data import Featurizer, TripletSource
from grounding.model import GroundingModule
from jobs import annotate_images, build_dataset, eval_grounding, train_grounding

STEPS, CAPTURE = 3, 2
TINY_SDXL_CHANNELS = {16: 288, 32: 192}  # its two levels, the tiny SD's resolutions and widths
# The tiny recipe's random detector finds mostly cow (tests/grounding/test_grounding_eval.py); cow, horse
# and bus are seen in split 1, dog is unseen there.
TRIPLETS = ["--recipe", "tiny", "--pool.require-gpu", "false", "--classes", "cow,dog,horse,bus", "--per-class", "1",
            "--per-pair", "1", "--pairs", "all", "--generator.steps", str(STEPS), "--capture.step", str(CAPTURE),
            "--split", "1", "--writer.preview-samples", "0"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> str:
    return save_tiny_pipeline(tmp_path_factory.mktemp("generators") / "tiny-sdxl", SDXL)


@pytest.fixture(scope="module")
def triplets(ray_cluster, sdxl, tmp_path_factory) -> Path:
    """10 latent-mode triplets with DAAM heat maps, built by the job on the Ray cluster."""
    out = tmp_path_factory.mktemp("sdxl-triplets") / "latent"
    assert build_dataset.main(["--out", str(out), "--generator.model", sdxl, *TRIPLETS, "--capture.features", "latent",
                               "--capture.attention", "true"]) == 0
    return out


def rows_of(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [row for f in manifest["files"] for row in pq.read_table(out / f["path"]).to_pylist()]


@pytest.mark.slow
def test_the_grounding_chain_on_sdxl(triplets, sdxl, tmp_path, capsys):
    # 1. Triplets: SDXL's latent and its 32x32 heat maps, and the features its Featurizer makes from them.
    source = TripletSource.open(str(triplets))
    assert source.rows == 10 and source.generation["model"] == sdxl
    assert source.shapes == {"latent": (4, 32, 32), "daam": (32, 32)}
    featurizer = Featurizer(source, TextConfig())
    assert featurizer.text_dim == 64  # two 32-wide text encoders side by side
    assert featurizer.feature_channels() == TINY_SDXL_CHANNELS
    batch = featurizer(source.take([0, 4, 9], source.columns))
    assert {r: tuple(t.shape) for r, t in batch.features.items()} == {16: (3, 288, 16, 16), 32: (3, 192, 32, 32)}
    assert batch.class_embeddings.shape == (3, 2, 64)

    # 2. Training on split 1's seen classes, validated on the same set (only the plumbing is tested).
    out = tmp_path / "grounding"
    assert train_grounding.main(["--data", str(triplets), "--val", str(triplets), "--out", str(out), "--epochs", "1",
                                 "--batch-size", "4", "--split", "1", "--classes", "seen"]) == 0
    assert "epochs    1 run now; 1 done" in capsys.readouterr().out
    checkpoint = out / "best"
    metadata = json.loads((checkpoint / "checkpoint.json").read_text())
    assert metadata["model"]["text_dim"] == 64 and metadata["model"]["presence"] == "region"
    assert {int(r): c for r, c in metadata["model"]["feature_channels"].items()} == TINY_SDXL_CHANNELS
    assert metadata["generation"]["model"] == sdxl and metadata["classes"] == list(VOC.seen(1))

    # 3. Protocol-I on the triplets (the module, gated, the text-blind control and DAAM from the stored heat maps).
    report_file = tmp_path / "protocol-i.json"
    assert eval_grounding.main(["--checkpoints", f"{{1: {checkpoint}}}", "--data", str(triplets),
                                "--out", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["samples"] == 10 and report["splits"] == [1] and report["data"] == str(triplets)
    assert set(report["results"]) == {"grounding module", "grounding module, presence-gated",
                                      "grounding module, text permuted", "DAAM"}
    scored = [group["miou"] for result in report["results"].values() for group in result["splits"]["1"].values()
              if group.get("miou") is not None]
    assert scored and all(0.0 <= miou <= 100.0 for miou in scored)
    capsys.readouterr()

    # 4. Annotation of generated images: SDXL's features at the checkpoint's capture step, straight into the module.
    annotated = tmp_path / "annotated"
    assert build_dataset.main(["--out", str(annotated), "--recipe", "tiny", "--generator.model", sdxl,
                               "--pool.require-gpu", "false", "--generator.steps", str(STEPS), "--num-samples", "4",
                               "--annotator.checkpoint", str(checkpoint), "--annotator.on-missing", "ignore"]) == 0
    assert_annotated(annotated, checkpoint, 4)

    # 5. Annotation of real images: DDIM-inverted into SDXL's U-Net (each row records its PSNR).
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 80, 3), np.uint8)).save(photos / f"{i}.png")
    real = tmp_path / "real"
    assert annotate_images.main(["--images", str(photos), "--classes", "cow,horse", "--checkpoint", str(checkpoint),
                                 "--vocabulary", "voc", "--generator.model", sdxl, "--generator.steps", str(STEPS),
                                 "--generator.guidance-scale", "5.0", "--out", str(real)]) == 0
    rows = assert_annotated(real, checkpoint, 2)
    assert sorted(row["source_image"] for row in rows) == ["0.png", "1.png"]
    assert all(row["psnr"] > 0 and (row["source_height"], row["source_width"]) == (48, 80) for row in rows)
    assert json.loads((real / "manifest.json").read_text())["recipe"]["source"]["route"] == "inversion"


def assert_annotated(out: Path, checkpoint: Path, samples: int) -> list[dict]:
    """A dataset labelled by the module: 64x64 label maps of the named classes, a mask and a presence
    score per class. Returns its rows."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == samples and manifest["models"]["labeler"] == f"grounding:{checkpoint}"
    rows = rows_of(out)
    for row in rows:
        label, masks = decode_label(row["label"]), decode_masks(row["masks"])
        assert label.shape == (64, 64) and set(np.unique(label)) <= {0, IGNORE, *row["class_indices"]}
        assert masks.shape == (len(row["classes"]), 64, 64) and len(row["presence"]) == len(row["classes"])
        for k, index in enumerate(row["class_indices"]):
            assert not (label == index)[~masks[k]].any()  # a class's pixels lie inside its mask
    return rows


@pytest.mark.slow
def test_latent_triplets_recompute_the_captured_sdxl_features(triplets, sdxl, tmp_path):
    """The Featurizer's pass on a stored SDXL latent, conditioned by unet_conditioning (pooled text, size
    ids), gives the features a tensors-mode build captured in the generation call, to fp16 rounding
    (tests/grounding/test_grounding_train.py's tolerance)."""
    tensors = tmp_path / "tensors"
    assert build_dataset.main(["--out", str(tensors), "--generator.model", sdxl, *TRIPLETS, "--capture.features",
                               "tensors"]) == 0
    latent, stored = TripletSource.open(str(triplets)), TripletSource.open(str(tensors))
    assert stored.shapes == {"features_16": (288, 16, 16), "features_32": (192, 32, 32)}
    rows = latent.take(range(latent.rows), [*latent.columns, "seed"])
    stored_rows = stored.take(range(stored.rows), [*stored.columns, "seed"])
    position = {seed: i for i, seed in enumerate(stored_rows.column("seed").to_pylist())}
    order = [position[seed] for seed in rows.column("seed").to_pylist()]  # the same plan: prompts and seeds
    recomputed = Featurizer(latent, TextConfig()).features(rows)
    assert Featurizer(stored, TextConfig()).text_dim == 64  # from the text encoders alone: no U-Net loaded
    for r, name in stored.stored_features.items():
        cells = stored_rows.column(name).to_pylist()
        captured = np.stack([from_fp16_bytes(cells[i], stored.shapes[name]) for i in order]).astype(np.float32)
        worst = float(np.abs(recomputed[r].float().numpy() - captured).max())
        assert worst <= 1e-3 * float(np.abs(captured).max())


# ---------------------------------------------------------------- the other family's features are refused

def untrained(out: Path, model: str, text_dim: int) -> str:
    """An untrained tiny module in the checkpoint format, recorded as trained on `model`'s features."""
    config = GroundingModelConfig.tiny(feature_channels=TINY_SDXL_CHANNELS, text_dim=text_dim, mask_resolution=64)
    save_grounding_checkpoint(str(out), GroundingModule(config), None, {
        "epoch": 0, "text": TextConfig().model_dump(),
        "generation": {"model": model, "steps": STEPS, "capture_step": CAPTURE, "guidance_scale": 5.0,
                       "prompts": PromptConfig().model_dump(mode="json")},
        "capture": {"features": "latent", "steps_remaining": CAPTURE}, "vocabulary": {"name": "voc"},
        "classes": ["cow"], "split": None})
    return str(out)


def test_a_module_is_refused_the_other_familys_features(sdxl, tmp_path, capsys):
    """The tiny SD and the tiny SDXL give features of the same shapes: the checkpoint's record of its
    generator, not a shape, tells an SDXL module from an SD one, and the build refuses it before any model
    loads (Protocol-I compares the same record: grounding.checkpoint.check_generation)."""
    for trained, used in ((sdxl, "tiny"), ("tiny", sdxl)):
        checkpoint = untrained(tmp_path / f"trained-on-{Path(trained).name}", trained, 64 if trained == sdxl else 32)
        assert build_dataset.main(["--recipe", "tiny", "--out", str(tmp_path / "out"), "--generator.model", used,
                                   "--pool.require-gpu", "false", "--generator.steps", str(STEPS),
                                   "--annotator.checkpoint", checkpoint]) == 2
        assert capsys.readouterr().err == (
            f"build_dataset: error: grounding checkpoint {checkpoint} reads features this build does not make: "
            f"generator model {trained!r} vs {used!r} (its training data vs this recipe)\n")
    assert not (tmp_path / "out").exists()


"""SDXL, SD 3.5 and FLUX.1 as a build's generator: tiny random pipelines of each, saved as diffusers
folders, built through jobs/build_dataset.py on the local Ray cluster, labelled by the tiny oracle,
verified, extended, and compared with a fresh build of the whole plan."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory.diffusion.families import FLUX, SD3, SDXL
from factory.diffusion.tiny import save_tiny_pipeline
from jobs import build_dataset, verify_dataset

pytestmark = pytest.mark.slow

FAMILIES = [SDXL, SD3, FLUX]
QUICK = ["--recipe", "tiny", "--generator.steps", "2", "--generator.batch-size", "2", "--labeler.batch-size", "2",
         "--writer.rows-per-file", "2", "--writer.preview-samples", "0", "--pool.require-gpu", "false"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("generators")
    return {family: save_tiny_pipeline(root / family.key, family) for family in FAMILIES}


def rows(root: Path) -> dict[str, dict]:
    manifest = json.loads((root / "manifest.json").read_text())
    return {row["sample_id"]: row for entry in manifest["files"] for row in pq.read_table(root / entry["path"]).to_pylist()}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.key)
def test_a_build_of_each_family_verifies_resumes_and_reproduces(ray_cluster, folders, family, tmp_path, capsys):
    model = ["--generator.model", folders[family]]
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    # 1. Half the plan, then the whole plan into the same output: only the missing samples are made.
    assert build_dataset.main([*QUICK, *model, "--num-samples", "2", "--out", str(extended)]) == 0
    first = rows(extended)
    capsys.readouterr()
    assert build_dataset.main([*QUICK, *model, "--num-samples", "4", "--out", str(extended)]) == 0
    assert "resumed   2 samples were already done; 2 made now" in capsys.readouterr().out
    assert verify_dataset.main([str(extended)]) == 0
    # 2. A fresh build of the whole plan: the same ids, byte-identical images and labels.
    assert build_dataset.main([*QUICK, *model, "--num-samples", "4", "--out", str(fresh)]) == 0
    built, again = rows(extended), rows(fresh)
    assert sorted(built) == sorted(again) and len(built) == 4 and set(first) <= set(built)
    for sample_id, row in built.items():
        assert row["image"] == again[sample_id]["image"] and row["label"] == again[sample_id]["label"], sample_id
        assert row["generator"] == folders[family]
    # 3. The manifest and card say which family drew the images, with which sampler and licence.
    manifest = json.loads((fresh / "manifest.json").read_text())
    assert manifest["generator"] == {"family": family.key, "title": family.title, "pipeline": family.pipeline}
    assert manifest["recipe"]["generator"]["scheduler"] == ("flow" if family.flow else "ddim")
    card = (fresh / "README.md").read_text()
    assert f"`{folders[family]}` ({family.title}), " in card
    assert ("flow-matching Euler, 2 steps" if family.flow else "DDIM 2 steps (eta 0)") in card

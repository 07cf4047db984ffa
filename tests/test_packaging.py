"""A non-editable install carries what the jobs need: the jobs themselves, and the built-in recipes
with the vocabularies, prompts and pairs they name, found as the installed package's data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "factory", "grounding", "segmenter", "world", "jobs")


@pytest.mark.slow  # builds and installs the package: seconds
def test_an_installed_package_finds_its_recipes_and_runs_its_jobs(tmp_path):
    source, target, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    # A copy of what the package is built from: the build writes build/ and egg-info beside it.
    shutil.copytree(REPO, source, ignore=lambda folder, names: [
        name for name in names if Path(folder) == REPO and name not in SOURCES or name == "__pycache__"])
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(source)], check=True, timeout=300)
    elsewhere.mkdir()
    # The installed copy comes first on the path; the repository is not on it (run from elsewhere).
    env = {**os.environ, "PYTHONPATH": str(target)}
    # warehouse names its vocabulary file relative to the recipes: it validates only if that is found too.
    code = ("from factory.core.conventions import RECIPE_DIR\nfrom factory.pipeline.recipe import load_recipe\n"
            "print(RECIPE_DIR)\nprint(load_recipe('warehouse').name)\n"
            "print(sorted(p.stem for p in (RECIPE_DIR / 'grounding').glob('*.yaml')))")
    found = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=120)
    assert found.returncode == 0, found.stderr
    folder, vocabulary, grounding = found.stdout.splitlines()
    assert Path(folder) == target / "factory" / "recipes" and vocabulary == "warehouse" and "tiny" in grounding
    helped = subprocess.run([sys.executable, "-m", "jobs.build_dataset", "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--recipe" in helped.stdout, helped.stderr

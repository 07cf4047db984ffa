"""What a build prints, run as a user runs it: one progress bar, a short summary, one line on Ctrl-C,
and no false notes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from events import count, wait_until

from factory.pipeline.pipeline import prepare_build
from factory.pipeline.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
BAR = re.compile(r"samples:\s+\d+%\|[^|]*\|[^\]]*\]")  # tqdm's "samples:  50%|█████     | 4/8 [...]"


def lines_besides_the_bar(output: str) -> list[str]:
    """Printed lines, the progress bar's redraws (carriage returns in a pipe) taken out."""
    lines = []
    for line in output.split("\n"):
        for part in line.split("\r"):
            if text := BAR.sub("", part).strip():
                lines.append(text)
    return lines


@pytest.mark.slow  # the mini world's models on a fresh local Ray: about 60 s
def test_the_default_build_prints_a_bar_and_a_summary(tmp_path):
    """Its own local Ray, as on a fresh machine: none of Ray's start-up, progress or worker lines."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "jobs/build_dataset.py", "--out", str(tmp_path / "out"),
                           "--num-samples", "8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(bar.endswith("8/8 [") for bar in re.findall(r"samples: 100%[^\[]*\[", done.stderr)), done.stderr[-2000:]
    printed = lines_besides_the_bar(done.stdout + done.stderr)
    assert len(printed) <= 15, "\n".join(printed)
    assert "Dataset written to" in done.stdout and "Traceback" not in done.stderr
    assert not [line for line in printed if "INFO" in line or "WARNING" in line or "(raylet)" in line], printed


@pytest.mark.slow  # a tiny build interrupted once it commits: about 20 s
def test_ctrl_c_prints_one_line_and_exits_130(ray_cluster, tmp_path):
    # far more samples than are made before the signal, so that it lands while the build runs
    args = ["--recipe", "tiny", "--num-samples", "200", "--generator.steps", "3", "--generator.batch-size", "2",
            "--labeler.batch-size", "2", "--writer.rows-per-file", "2"]
    out = tmp_path / "interrupted"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    driver = subprocess.Popen([sys.executable, str(REPO / "jobs" / "build_dataset.py"), "--out", str(out), *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    commits = out / "_commits"
    assert wait_until(lambda: count(commits, "*.json") >= 2, [commits], timeout=240)
    driver.send_signal(signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    # but Ray Core's C++ log line as its actors start (RAY_BACKEND_LOG_LEVEL quiets it and prints one of its own)
    printed = [line for line in lines_besides_the_bar(stdout + stderr) if "core_worker.cc" not in line]
    assert len(printed) == 1 and printed[0].startswith("build_dataset: interrupted: "), printed
    written = re.search(r"interrupted: (\d+) of 200 planned samples are committed to .*; the same command resumes",
                        printed[0])
    assert written and 2 <= int(written[1]) < 200, printed


def test_a_checkpoint_from_before_per_class_templates_gets_no_note(tmp_path):
    """Its record has no per_class: it was trained without them, as a recipe's default {} builds."""
    checkpoint = tmp_path / "grounding"
    shutil.copytree(REPO / "models" / "shapes-grounding", checkpoint)
    record = json.loads((checkpoint / "checkpoint.json").read_text())
    del record["generation"]["prompts"]["per_class"]
    (checkpoint / "checkpoint.json").write_text(json.dumps(record))
    recipe = load_recipe("shapes", {"annotator.checkpoint": str(checkpoint), "out": str(tmp_path / "a")})
    assert prepare_build(recipe).notes == []
    other = load_recipe("shapes", {"annotator.checkpoint": str(checkpoint), "out": str(tmp_path / "b"),
                                   "prompts.per_class": {"red_disc": ["a {} on a table"]}})
    assert "prompt template per_class None vs {'red_disc'" in prepare_build(other).notes[0]  # a real difference still is

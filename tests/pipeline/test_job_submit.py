"""The README's way of running a build: `ray job submit` to a running Ray head, for real.

The head is started with `ray start` in its own temporary folder, on free ports (the
dashboard on loopback), with its own auth token, so it collides with no other Ray
cluster on the machine.
It is stopped by killing its process group: `ray stop` would stop every Ray process on
the machine, the test session's own cluster and other people's included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from events import stop_process_group

from factory.pipeline.plan import build_plan
from factory.pipeline.recipe import recipe_from_args
from jobs import build_dataset

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

BUILD = ["--recipe", "tiny", "--num-samples", "4", "--generator.steps", "2", "--generator.batch-size", "2", "--labeler.batch-size", "2",
         "--writer.rows-per-file", "2", "--writer.preview-samples", "2"]
# What `ray job status` prints: a sentence for an ended job, "Status for job ..." otherwise.
ENDED = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ray_cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ray_head():
    """A Ray head of its own; yields (dashboard address, CLI environment)."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard, gcs, client, agent = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # `ray` and the job's `python` from this interpreter's environment, activated or not.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Token auth as on a real cluster, with a token of this test's own (not ~/.ray/auth_token).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    command = ["ray", "start", "--head", "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--port", str(gcs), "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
               "--temp-dir", temp]
    # Its own session, so that every process it starts can be stopped by its group id.
    head = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = head.communicate(timeout=120)
        assert head.returncode == 0, output
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_process_group(head.pid)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_job(address: str, job_id: str, env: dict, timeout: float = 300) -> str:
    """Follows the job's logs, which end when the job does, then reads its final status."""
    try:
        ray_cli("job", "logs", "--address", address, "--follow", job_id, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"still running after {timeout:.0f} s"
    printed = ray_cli("job", "status", "--address", address, job_id, env=env)
    ended = re.search(rf"Job '{job_id}' ({'|'.join(ENDED)})", printed.stdout + printed.stderr)
    return ENDED[ended.group(1)] if ended else (printed.stdout + printed.stderr).strip()


def test_build_submitted_with_ray_job_submit(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "submitted"
    job_id = f"build-{secrets.token_hex(4)}"
    excludes = json.dumps({"excludes": [".git", "outputs/", ".benchmarks/", ".pytest_cache/"]})
    submitted = ray_cli("job", "submit", "--address", address, "--working-dir", str(REPO),
                        "--runtime-env-json", excludes, "--submission-id", job_id, "--no-wait", "--",
                        "python", "jobs/build_dataset.py", "--out", str(out), *BUILD, env=env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    try:
        status = wait_for_job(address, job_id, env)
    finally:
        ray_cli("job", "stop", "--address", address, job_id, env=env)  # no driver outlives the test
    logs = ray_cli("job", "logs", "--address", address, job_id, env=env).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"Dataset written to {out}" in logs

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"planned": 4, "attempted": 4, "written": 4, "dropped": {}, "given_up": 0}
    ids = []
    for entry in manifest["files"]:
        table = pq.read_table(out / entry["path"])
        assert table.num_rows == entry["rows"]
        ids += table.column("sample_id").to_pylist()
    planned = [s.sample_id for s in build_plan(recipe_from_args(build_dataset.parse_args(BUILD)))]
    assert sorted(ids) == sorted(planned)

"""GPU placement on a simulated cluster: a head without GPUs and two workers with two (fake) GPUs each.

Two builds run, one after the other, in a child process (this file, run as a script) with
a Ray cluster of its own, so that they neither join nor disturb the test session's cluster:
"placement", then "node-loss", which kills a worker node at two points of the build. Each model actor holds
the real generator and labeler, wrapped to record, from inside the actor, the node it runs
on, the GPU Ray gave it and when it worked; the tests read those records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from itertools import combinations
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
import ray
from events import count, wait_until
from ray.cluster_utils import Cluster

from factory.core.storage import open_location
from factory.dataset.write import read_commits
from factory.pipeline import pipeline
from factory.pipeline.stages import resolve_stage
from factory.pipeline.plan import build_plan
from factory.pipeline.recipe import recipe_from_args
from jobs import build_dataset

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# Twelve samples in parts of up to two. In "placement" the pool of model actors starts with
# one and may grow to four, all the GPUs; in "node-loss" it keeps one actor, so that the
# restarted one finds a free GPU at once.
BUILD = ["--recipe", "tiny", "--num-samples", "12", "--generator.steps", "2", "--generator.batch-size", "1", "--labeler.batch-size", "1",
         "--writer.rows-per-file", "2", "--writer.preview-samples", "0", "--pool.min-size", "1"]
ACTORS = 4
SCENARIOS = {"placement": ["--pool.max-size", str(ACTORS)], "node-loss": ["--pool.max-size", "1"]}
KILL_AFTER_PARTS = (2, 4)  # of six: a third of the way, and past the middle
WORKER = {"num_cpus": 4, "num_gpus": 2}
KILLER_FAILED = "killer-failed.txt"


def write_json(path: Path, record: dict) -> None:
    """Whole or not at all: the test's other threads read these files while actors write them."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Hold:
    """What a generation call waits for: `busy()` false, looked at again as files of `folders` change."""
    busy: Callable[[], bool]
    folders: list[Path]


def recording(stage_class: type, stage: str, folder: Path, hold: Hold | None = None) -> type:
    """The stage as an actor that also writes down where it runs and when it works.

    A batch waits while ``hold`` is busy (two minutes at most), so that an event the
    test is about (the pool growing, a node dying) happens while the build is busy, on
    any machine, rather than when some amount of work happens to take long enough.
    """

    class Recorded(stage_class):
        def __init__(self, *args, **kwargs):
            self._record = {"stage": stage, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                            "gpus": [str(g) for g in ray.get_gpu_ids()],
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "started": time.time(), "calls": []}
            super().__init__(*args, **kwargs)
            self._save()

        def __call__(self, batch):
            start = time.time()
            if hold is not None:
                wait_until(lambda: not hold.busy(), hold.folders, timeout=120)
            batch = super().__call__(batch)
            self._record["calls"].append([start, time.time()])
            self._save()
            return batch

        def _save(self):
            write_json(folder / f"{stage}-{self._record['pid']}.json", self._record)

    return Recorded


def recorded_stages(model_stages: Callable, folder: Path, hold: Hold) -> Callable:
    """The build's own stages (generate, label), each wrapped by `recording`."""
    def stages(recipe):
        generate, label = model_stages(recipe)
        return [dataclasses.replace(generate, stage=recording(resolve_stage(generate.stage), "generate", folder, hold)),
                dataclasses.replace(label, stage=recording(resolve_stage(label.stage), "label", folder))]
    return stages


def simulate(workdir: str) -> int:
    """Child process: the cluster, then each scenario's build with recorded stages."""
    real_stages = pipeline.model_stages
    # No dashboard and a free agent port: the defaults (8265, 52365) may be another cluster's.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": free_port()})
    try:
        # Every model actor asks for one CPU beside its GPU, and write tasks need CPUs too:
        # GPU nodes have several CPUs per GPU (a g5.12xlarge: 48 for 4).
        for _ in range(2):
            cluster.add_node(**WORKER)
        cluster.connect()
        failed = 0
        for scenario, options in SCENARIOS.items():
            out, folder = scenario_paths(Path(workdir), scenario)
            folder.mkdir(parents=True)
            write_json(folder / "cluster.json", {"head": cluster.head_node.node_id})
            if scenario == "placement":
                hold = pool_still_small(folder)
            else:
                # Two kills leave one worker: a third joins first (as an autoscaler replaces a
                # lost spot node; Ray adds nodes from the main thread only).
                cluster.add_node(**WORKER)
                hold = node_not_yet_removed(out / "_commits", folder)
                threading.Thread(target=remove_generator_nodes, args=(cluster, out / "_commits", folder),
                                 daemon=True).start()
            pipeline.model_stages = recorded_stages(real_stages, folder, hold)
            failed |= build_dataset.main(["--out", str(out), *BUILD, *options])
        return failed
    finally:
        ray.shutdown()
        cluster.shutdown()


def pool_still_small(folder: Path) -> Hold:
    return Hold(lambda: count(folder, "generate-*.json") < ACTORS, [folder])


def committed(commits: Path) -> int:
    return count(commits, "*.json")


def node_not_yet_removed(commits: Path, folder: Path) -> Hold:
    """At each kill point, generation waits until that kill has happened."""
    def busy() -> bool:
        if (folder / KILLER_FAILED).exists():  # no kill is coming: let the build finish, the test fails
            return False
        kills = count(folder, "removed-*.json")
        return kills < len(KILL_AFTER_PARTS) and committed(commits) >= KILL_AFTER_PARTS[kills]
    return Hold(busy, [commits, folder])


def scenario_paths(workdir: Path, scenario: str) -> tuple[Path, Path]:
    """A scenario's output and its folder of actor records."""
    return workdir / scenario / "ds", workdir / scenario / "records"


def remove_generator_nodes(cluster, commits: Path, folder: Path) -> None:
    """At each kill point, kill the node of the newest live model actor (all its processes, no grace).

    A failure here is written to KILLER_FAILED, which releases the build's hold and fails the test
    with its traceback."""
    try:
        removed: list[str] = []
        for k, point in enumerate(KILL_AFTER_PARTS):
            if not wait_until(lambda point=point: committed(commits) >= point, [commits], timeout=300):
                raise TimeoutError(f"{point} parts not committed in 300 s")
            live = [json.loads(p.read_text()) for p in folder.glob("generate-*.json")]
            node_id = max((r for r in live if r["node"] not in removed), key=lambda r: r["started"])["node"]
            (worker,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
            before = committed(commits)
            cluster.remove_node(worker, allow_graceful=False)
            removed.append(node_id)
            write_json(folder / f"removed-{k}.json", {"node": node_id, "committed_before": before})
    except BaseException:
        (folder / KILLER_FAILED).write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[Path, str]:
    """Runs both scenarios once; yields their folder and the child's output."""
    workdir = tmp_path_factory.mktemp("simulated")
    ray_tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths live under it
    # RAY_TMPDIR keeps this cluster's address file out of /tmp/ray, where any other
    # `ray.init()` on the machine would find it and join this cluster.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The repository and tests/ (this file's helpers), for the child and its Ray workers alike.
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    # A killed node refuses the GCS's health checks at once: checking each second, not each 3 s,
    # finds it dead in 5 s, not 15. A live but busy node still has each check's 10 s to answer.
    env.update(RAY_health_check_period_ms="1000")
    child = subprocess.Popen([sys.executable, __file__, str(workdir)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timeout = 480
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child's session: its Ray processes too
        output, _ = child.communicate()
        output += f"\n[killed: still running after {timeout} s]"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return workdir, output


def built(simulated, scenario: str) -> tuple[Path, Path]:
    workdir, output = simulated
    out, records = scenario_paths(workdir, scenario)
    assert not (records / KILLER_FAILED).exists(), (records / KILLER_FAILED).read_text()
    # Ray Data's progress lines every ten seconds would crowd out what went wrong.
    events = "\n".join(line for line in output.splitlines() if "logging_progress.py" not in line)
    assert f"Dataset written to {out}" in output, events[-6000:]
    return out, records


def read_records(records: Path) -> tuple[str, list[dict]]:
    """The head node's id, and one record per stage in each model actor."""
    head = json.loads((records / "cluster.json").read_text())["head"]
    return head, [json.loads(p.read_text()) for stage in ("generate", "label")
                  for p in sorted(records.glob(f"{stage}-*.json"))]


def assert_every_planned_sample_once(out: Path) -> None:
    # Pool sizes are not part of a sample's content: both scenarios plan the same ids.
    planned = sorted(s.sample_id for s in build_plan(recipe_from_args(build_dataset.parse_args(BUILD))))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"planned": 12, "attempted": 12, "written": 12, "dropped": {}, "given_up": 0}
    rows = [pq.read_table(out / entry["path"]).column("sample_id").to_pylist() for entry in manifest["files"]]
    assert sorted(i for part in rows for i in part) == planned
    commits = read_commits(open_location(str(out)))
    assert sorted(i for c in commits for i in (*c.written, *c.dropped)) == planned
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(Path(c.file).name for c in commits if c.file)


def assert_gpu_actors_off_the_head(head: str, records: list[dict]) -> None:
    for record in records:
        assert record["node"] != head, f"{record['stage']} actor on the head node"
        assert len(record["gpus"]) == 1, record  # exactly one GPU per model actor
        assert record["cuda_visible_devices"] == record["gpus"][0]  # and CUDA sees only that one


def lifetime(record: dict) -> tuple[float, float]:
    return record["started"], max([record["started"]] + [end for _, end in record["calls"]])


def test_model_actors_hold_distinct_gpus_off_the_head_and_pools_grow_to_max(simulated):
    out, records_dir = built(simulated, "placement")
    assert_every_planned_sample_once(out)
    head, records = read_records(records_dir)
    assert_gpu_actors_off_the_head(head, records)

    # One actor (process) runs both models, on its one GPU, and labels what it generated.
    actors = {}
    for record in records:
        actors.setdefault(record["pid"], {})[record["stage"]] = record
    assert all(set(stages) == {"generate", "label"} for stages in actors.values()), actors
    for stages in actors.values():
        generate, label = stages["generate"], stages["label"]
        assert (generate["node"], generate["gpus"]) == (label["node"], label["gpus"])
        assert len(generate["calls"]) == len(label["calls"])
    generators = [stages["generate"] for stages in actors.values()]
    for a, b in combinations(generators, 2):
        (a_start, a_end), (b_start, b_end) = lifetime(a), lifetime(b)
        if a_start <= b_end and b_start <= a_end:  # alive at the same time
            assert (a["node"], a["gpus"]) != (b["node"], b["gpus"]), f"two live actors share a GPU: {a} {b}"

    # The pool starts with min_size (one) actor, which is already working when the others
    # come up, and grows to max_size (four): every GPU, on both workers.
    first, *added = sorted(generators, key=lambda r: r["started"])
    assert len(generators) == ACTORS
    assert first["calls"] and all(r["started"] > first["calls"][0][0] for r in added)
    assert any(r["calls"] for r in added)  # and take part of the work
    assert len({(r["node"], r["gpus"][0]) for r in generators}) == ACTORS


def test_build_survives_the_loss_of_worker_nodes_with_the_rows_of_an_uninterrupted_build(simulated):
    out, records_dir = built(simulated, "node-loss")
    kills = [json.loads((records_dir / f"removed-{k}.json").read_text()) for k in range(len(KILL_AFTER_PARTS))]
    parts = committed(out / "_commits")
    assert [k["committed_before"] for k in kills] == list(KILL_AFTER_PARTS) and parts > KILL_AFTER_PARTS[-1]
    assert_every_planned_sample_once(out)
    head, records = read_records(records_dir)
    assert_gpu_actors_off_the_head(head, records)
    # Each kill took the working actor with its node, and the work went on elsewhere.
    for kill in kills:
        assert any(r["node"] == kill["node"] for r in records)
    dead = {k["node"] for k in kills}
    assert any(r["node"] not in dead and r["stage"] == "generate" and r["calls"] for r in records)

    # Same recipe and seed as "placement", which no kill interrupted: the same rows.
    uninterrupted, _ = built(simulated, "placement")
    assert rows_by_id(out) == rows_by_id(uninterrupted)


def rows_by_id(out: Path) -> dict[str, dict]:
    columns = ["sample_id", "prompt", "seed", "image", "label", "masks", "scores", "found"]
    table = pq.read_table(out / "data", columns=columns)
    return {row["sample_id"]: row for row in table.to_pylist()}


if __name__ == "__main__":
    sys.exit(simulate(sys.argv[1]))

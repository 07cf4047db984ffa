"""Scaling: the production pipeline on a simulated cluster of fake-GPU nodes, 1 to 64 GPUs.

The model stages are stand-ins that hold their (fake) GPU for a fixed time per batch (a
sleep; defaults: SD 1.5's and Mask R-CNN's time for 8 images on an A10G, the GPU of
cluster.yaml's nodes) and return what the real ones return at real size: 512x512x3 uint8
images, uint8 label maps and class-mask planes. The per-sample CPU work that a real GPU
node does on its own cores, PNG encoding in the model actor, is held as time too: each
distinct image, label or mask is encoded once for real (the bytes that cross Ray are real
PNGs), and every later encoding of it sleeps the time the first one took. So the host's
cores are left to what a real build shares: the driver (Ray Data's executor, commit
collection), the object store, the write tasks (Parquet, real), and the Ray daemons.
Everything else is production code: `factory.pipeline.ray_executor.stream_samples` builds the pipeline
with the stand-in classes as its stage arguments and writes Parquet parts with commit records.

Each run waits until every generator actor is up (start-up is paid once per build, not
per image) and times from there to the last commit. The model-bound rate is what the
GPUs would make doing nothing but model work: GPUs x batch / (generate + label seconds
per batch). Efficiency is measured / model-bound; "vs linear" divides by N x the 1-GPU
figure of the same run. The driver's CPU seconds per batch is the coordination cost one
build pays centrally; the host's busy fraction says whether the host, not the pipeline,
was the limit (near 1.0: the host). Each simulated GPU is still a Ray worker process on
this host, doing Ray's per-task work on the host's cores: holds much shorter than the
defaults (an H100-class `--generate-seconds 4`) make a 2-core host the limit past 8 GPUs.

    python bench/scaling.py                                  # 1, 8, 32, 64 GPUs on 8-GPU nodes (~15 minutes)
    python bench/scaling.py --gpus 1 2 --gpus-per-node 1 --batches-per-gpu 2 --size 64 --generate-seconds 0.2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from factory.pipeline.actor import ModelActor

DISTINCT_IMAGES = 8  # stand-in images cycle through this many, so that held encodings find them again


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stand_in_image(seed: int, height: int, width: int) -> np.ndarray:
    """A 512x512 image that PNG-encodes in milliseconds: coloured 16x16 blocks over a gradient.

    Real generated images cost about 10x more to PNG-encode (docs/performance.md); held as time,
    the cost of its encoding does not matter to the bench.
    """
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 240, (-(-height // 16), -(-width // 16), 3), dtype=np.uint8)
    image = blocks.repeat(16, 0).repeat(16, 1)[:height, :width]
    ramp = (np.add.outer(np.arange(height), np.arange(width)) // 32 % 16).astype(np.uint8)
    return image + ramp[..., None]


class HeldEncodingActor(ModelActor):
    """The production model actor whose PNG encodings are held as time (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from factory.dataset import write  # this actor's own process: the patch stays here

        for name in ("encode_image", "encode_label", "encode_mask"):
            setattr(write, name, held(getattr(write, name)))


def held(encode):
    """``encode`` that computes each distinct input once and, for a repeat, sleeps as long as the
    first encoding took and returns its bytes."""
    done: dict[tuple, tuple[bytes, float]] = {}

    def encoding(array: np.ndarray, *args) -> bytes:
        key = (array.shape, hash(array.tobytes()), args)
        if key not in done:
            start = time.perf_counter()
            data = encode(array, *args)
            done[key] = data, time.perf_counter() - start
            return data
        data, seconds = done[key]
        time.sleep(seconds)
        return data

    return encoding


def host_busy() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole host so far (/proc/stat), for a busy fraction."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def stand_in_stages(folder: Path, generate_seconds: float, label_seconds: float, actors: int = 1
                    ) -> tuple[type, type]:
    """Generator and labeler classes with the real stages' constructors and outputs.

    Their outputs are made once and copied after (a real node makes them on its GPU, not
    on the host's cores). The generator writes a ready file on start and waits at its
    first batch until the whole pool is ready, so every run starts its clock with all GPUs up.
    """
    from factory.core.vocab import get_vocabulary
    from factory.dataset.batch import SampleLabels, attach_labels

    class SleepingGenerator:
        def __init__(self, config, capture=None, fast=None, load_attempts=1):
            self.config, self.waited, self.images = config, False, {}
            (folder / f"ready-{os.getpid()}").write_text(str(time.time()))

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            while not self.waited and len(list(folder.glob("ready-*"))) < actors:
                time.sleep(0.05)
            self.waited = True
            start = time.perf_counter()
            c = self.config
            time.sleep(generate_seconds)
            for key in {(int(s) % DISTINCT_IMAGES, c.height, c.width) for s in batch["seed"]} - self.images.keys():
                self.images[key] = stand_in_image(*key)
            batch["image"] = np.stack([self.images[int(s) % DISTINCT_IMAGES, c.height, c.width]
                                       for s in batch["seed"]])
            batch["generate_seconds"] = np.full(len(batch["seed"]), (time.perf_counter() - start) / len(batch["seed"]))
            return batch

    class SleepingLabeler:
        def __init__(self, config, vocabulary: str, image_size: int, load_attempts=1):
            self.vocabulary, self.made = get_vocabulary(vocabulary), {}

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            start = time.perf_counter()
            time.sleep(label_seconds)
            height, width = batch["image"].shape[1:3]
            for key in {(tuple(names), height, width) for names in batch["classes"]} - self.made.keys():
                self.made[key] = self.boxes(*key)
            return attach_labels(batch, [self.made[tuple(names), height, width] for names in batch["classes"]],
                                 start)

        def boxes(self, names: tuple[str, ...], height: int, width: int) -> SampleLabels:
            """One box per class, as a detector might find."""
            label = np.zeros((height, width), np.uint8)
            masks = np.zeros((len(names), height, width), bool)
            for k, name in enumerate(names):
                box = (slice(k * height // 4, height // 2 + k * height // 4), slice(width // 8, width * 7 // 8))
                label[box] = self.vocabulary.lookup(name).index
                masks[k][box] = True
            return SampleLabels(label=label, masks=masks, scores=np.full(len(names), 0.9),
                                instances=np.ones(len(names)))

    return SleepingGenerator, SleepingLabeler


def scaling_recipe(gpus: int, samples: int, size: int, batch_size: int, rows_per_file: int):
    from factory.pipeline.recipe import Recipe

    return Recipe.model_validate({
        "name": "scaling", "per_class": -(-samples // 20), "num_samples": samples, "seed": 0,
        "generator": {"height": size, "width": size, "batch_size": batch_size},
        "pool": {"min_size": gpus, "max_size": gpus},
        "labeler": {"batch_size": batch_size},
        "writer": {"rows_per_file": rows_per_file, "preview_samples": 0}})


def run_once(gpus: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One build on the cluster as it is now; returns its figures."""
    from factory.core.vocab import get_vocabulary
    from factory.pipeline.actor import encode_options
    from factory.pipeline.plan import build_plan
    from factory.pipeline.ray_executor import stream_samples
    from factory.pipeline.stages import model_ids, model_stages

    samples = gpus * args.batches_per_gpu * args.batch_size
    recipe = scaling_recipe(gpus, samples, args.size, args.batch_size, args.rows_per_file)
    folder = workdir / f"{gpus}-gpus"
    (folder / "ready").mkdir(parents=True)
    generator, labeler = stand_in_stages(folder / "ready", args.generate_seconds, args.label_seconds, gpus)
    plan = build_plan(recipe)
    generate, label = model_stages(recipe)  # the real stages' arguments, with stand-in classes
    stages = [dataclasses.replace(generate, stage=generator), dataclasses.replace(label, stage=labeler)]
    host_before, driver_before = host_busy(), time.process_time()
    commits = stream_samples(recipe, plan, str(folder / "out"), {}, stages=stages, actor=HeldEncodingActor,
                             encode=encode_options(recipe, get_vocabulary(recipe.vocabulary), model_ids(recipe)))
    end = time.time()
    host_after, driver_seconds = host_busy(), time.process_time() - driver_before
    start = max(float(p.read_text()) for p in (folder / "ready").glob("ready-*"))
    done = sorted(i for c in commits for i in (*c.written, *c.dropped))
    model_bound = gpus * args.batch_size / (args.generate_seconds + args.label_seconds)
    throughput = len(done) / (end - start)
    busy = {stage: sum(c.seconds.get(stage, 0.0) for c in commits) for stage in ("encode", "write")}
    shutil.rmtree(folder / "out", ignore_errors=True)
    batches = samples / args.batch_size
    return {"gpus": gpus, "samples": samples, "accounted": len(done),
            "exact": done == sorted(s.sample_id for s in plan), "seconds": end - start,
            "throughput": throughput, "model_bound": model_bound, "efficiency": throughput / model_bound,
            "encode_seconds": busy["encode"], "write_seconds": busy["write"],
            "driver_cpu_seconds": driver_seconds, "driver_cpu_per_batch": driver_seconds / batches,
            # the whole build, start-up included: an upper bound on the steady state's
            "host_busy": (host_after[0] - host_before[0]) / (host_after[1] - host_before[1])}


def coordination(results: list[dict], batch_size: int) -> tuple[float, float]:
    """The driver's CPU seconds as fixed + per-batch cost, fitted over the runs (one run: all of it per batch)."""
    batches = np.array([r["samples"] / batch_size for r in results])
    seconds = np.array([r["driver_cpu_seconds"] for r in results])
    if len(set(batches)) < 2:
        return 0.0, float(seconds.sum() / batches.sum())
    per_batch, fixed = np.polyfit(batches, seconds, 1)
    return float(fixed), float(max(per_batch, 1e-6))


def max_gpus(driver_cpu_per_batch: float, batch_seconds: float) -> float:
    """GPUs one build's driver can keep busy: each GPU asks it for a batch every ``batch_seconds``,
    and it spends ``driver_cpu_per_batch`` of its one core on each."""
    return batch_seconds / driver_cpu_per_batch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 32, 64], help="GPU counts, ascending")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="fake GPUs per node (p4d/p5: 8)")
    parser.add_argument("--generate-seconds", type=float, default=40.0,
                        help="generator hold per batch (default: SD 1.5, 50 steps, 8 images on an A10G)")
    parser.add_argument("--label-seconds", type=float, default=0.5,
                        help="labeler hold per batch (default: Mask R-CNN, 8 images on an A10G)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches-per-gpu", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--rows-per-file", type=int, default=16,
                        help="small parts, so that the last one (the run's tail) is short")
    parser.add_argument("--cpus-per-gpu", type=int, default=4, help="logical CPUs per GPU (g5.xlarge: 4)")
    parser.add_argument("--object-store-mb", type=int, default=256,
                        help="object store per node (Ray's test clusters default to 150)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.gpus != sorted(args.gpus) or args.gpus[0] < 1 or args.gpus_per_node < 1:
        parser.error("--gpus must be positive and ascending (the cluster only grows)")

    # A Ray temp dir of our own, so that no other `ray.init()` on the machine joins this cluster.
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    os.environ.pop("RAY_ADDRESS", None)
    # Each node's raylet starts an idle Python worker per logical CPU when a driver connects: a real
    # node does that on its own cores, these all do it on the host's (256 processes at 64 GPUs, minutes of
    # CPU). Off here: a node starts a worker when a task or actor needs one, as it does after start-up.
    os.environ["RAY_enable_worker_prestart"] = "0"
    os.environ["RAY_prestart_worker_first_driver"] = "0"
    # Every Ray process also polls and reports on timers (metrics, task events, event-loop stats): an idle
    # worker costs about 3% of a core, so the dozens a cluster keeps around would make 2 shared cores the
    # limit. Reports off, and each node keeps at most 2 idle workers (Ray's default: one per logical CPU).
    os.environ.update({"RAY_enable_metrics_collection": "0", "RAY_task_events_report_interval_ms": "0",
                       "RAY_event_stats": "0", "RAY_num_workers_soft_limit": "2"})
    import ray
    from ray.cluster_utils import Cluster

    # A head that only coordinates (as in cluster.yaml) and GPU worker nodes added as the run goes.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": free_port()})
    results = []
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for gpus in args.gpus:
                while len(cluster.worker_nodes) * args.gpus_per_node < gpus:
                    cluster.add_node(num_cpus=args.cpus_per_gpu * args.gpus_per_node, num_gpus=args.gpus_per_node,
                                     object_store_memory=args.object_store_mb * 2**20)
                cluster.wait_for_nodes()
                if not ray.is_initialized():
                    ray.init(address=cluster.address, log_to_driver=False)
                results.append(run_once(gpus, args, Path(workdir)))
                r = results[-1]  # as each run ends: a long sweep shows its progress
                print(f"{gpus} GPUs: {r['throughput']:.2f} img/s, efficiency {r['efficiency']:.2f}, "
                      f"driver {1000 * r['driver_cpu_per_batch']:.1f} CPU ms/batch, host busy {r['host_busy']:.2f}",
                      flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    base = results[0]["throughput"] / results[0]["gpus"]
    batch_seconds = args.generate_seconds + args.label_seconds
    for r in results:
        r["vs_linear"] = r["throughput"] / (r["gpus"] * base)
    print(f"batch {args.batch_size} of {args.size}x{args.size}; per batch: generate {args.generate_seconds} s, "
          f"label {args.label_seconds} s; {args.gpus_per_node} GPUs a node; encoding held as time")
    print(f"{'GPUs':>4}{'samples':>11}{'img/s':>9}{'model-bound':>13}{'efficiency':>12}{'vs linear':>11}"
          f"{'encode busy s':>15}{'write busy s':>14}{'driver ms/batch':>17}{'host busy':>11}")
    for r in results:
        print(f"{r['gpus']:>4}{r['accounted']:>6}/{r['samples']:<5}{r['throughput']:>9.2f}{r['model_bound']:>13.2f}"
              f"{r['efficiency']:>12.2f}{r['vs_linear']:>11.2f}{r['encode_seconds']:>15.1f}"
              f"{r['write_seconds']:>14.1f}{1000 * r['driver_cpu_per_batch']:>17.1f}{r['host_busy']:>11.2f}")
    fixed, per_batch = coordination(results, args.batch_size)
    print(f"coordination: the driver spends {fixed:.1f} CPU s per build and {1000 * per_batch:.1f} CPU ms per batch "
          f"(least squares over the runs), so one build's driver keeps about "
          f"{max_gpus(per_batch, batch_seconds):.0f} GPUs busy at {batch_seconds:.1f} s per batch "
          f"({max_gpus(per_batch, 1.0):.0f} at 1 s: 8 SD 1.5 images on an H100 with a few-step sampler)")
    summary = {"args": vars(args), "runs": results, "driver_fixed_cpu_seconds": fixed,
               "driver_cpu_per_batch": per_batch, "max_gpus_per_build": max_gpus(per_batch, batch_seconds)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

"""Scaling: the production pipeline on a simulated cluster of 1, 2, 4 and 8 one-GPU nodes.

The model stages are stand-ins that hold their (fake) GPU for a fixed time per batch
(a sleep, so that the machine's cores are not the limit; defaults: a tenth of SD 1.5's
and Mask R-CNN's time for 8 images on an A10G) and return what the real ones return at
real size: 512x512x3 uint8 images, uint8 label maps and class-mask planes. Everything
else is production code: `factory.pipeline.stream_samples` builds the Ray Data pipeline
with the stand-in classes as its stage arguments, encodes PNGs and writes Parquet parts
with commit records.

Each run waits until every generator actor is up (start-up is paid once per build, not
per image) and times from there to the last commit. The model-bound rate is what the
GPUs would make doing nothing but model work: GPUs x batch / (generate + label seconds
per batch). Efficiency is measured / model-bound; "vs linear" divides by N x the 1-node
figure of the same run.

    python bench/scaling.py                                  # 1, 2, 4, 8 nodes (a few minutes)
    python bench/scaling.py --nodes 1 2 --batches-per-gpu 2 --size 64 --generate-seconds 0.2
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stand_in_image(seed: int, height: int, width: int) -> np.ndarray:
    """A 512x512 image that PNG-encodes in milliseconds: coloured 16x16 blocks over a gradient.

    Real generated images cost about 10x more to PNG-encode; see docs/performance.md.
    """
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 240, (-(-height // 16), -(-width // 16), 3), dtype=np.uint8)
    image = blocks.repeat(16, 0).repeat(16, 1)[:height, :width]
    ramp = (np.add.outer(np.arange(height), np.arange(width)) // 32 % 16).astype(np.uint8)
    return image + ramp[..., None]


def stand_in_stages(folder: Path, generate_seconds: float, label_seconds: float, actors: int = 1
                    ) -> tuple[type, type]:
    """Generator and labeler classes with the real stages' constructors and outputs.

    The generator writes a ready file on start and waits at its first batch until the
    whole pool is ready, so every run starts its clock with all GPUs up.
    """
    from factory.core.vocab import get_vocabulary
    from factory.dataset.batch import SampleLabels, attach_labels

    class SleepingGenerator:
        def __init__(self, config, capture=None, load_attempts=1):
            self.config, self.waited = config, False
            (folder / f"ready-{os.getpid()}").write_text(str(time.time()))

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            while not self.waited and len(list(folder.glob("ready-*"))) < actors:
                time.sleep(0.05)
            self.waited = True
            start = time.perf_counter()
            c = self.config
            time.sleep(generate_seconds)
            batch["image"] = np.stack([stand_in_image(int(s), c.height, c.width) for s in batch["seed"]])
            batch["generate_seconds"] = np.full(len(batch["seed"]), (time.perf_counter() - start) / len(batch["seed"]))
            return batch

    class SleepingLabeler:
        def __init__(self, config, vocabulary: str, image_size: int, load_attempts=1):
            self.vocabulary = get_vocabulary(vocabulary)

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            start = time.perf_counter()
            time.sleep(label_seconds)
            height, width = batch["image"].shape[1:3]
            return attach_labels(batch, [self.boxes(names, height, width) for names in batch["classes"]], start)

        def boxes(self, names: list[str], height: int, width: int) -> SampleLabels:
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
    from factory.build.recipe import Recipe

    return Recipe.model_validate({
        "name": "scaling", "per_class": -(-samples // 20), "num_samples": samples, "seed": 0,
        "generator": {"height": size, "width": size, "batch_size": batch_size},
        "pool": {"min_size": gpus, "max_size": gpus},
        "labeler": {"batch_size": batch_size},
        "writer": {"rows_per_file": rows_per_file, "preview_samples": 0}})


def run_once(gpus: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One build on the cluster as it is now; returns its figures."""
    from factory.build.pipeline import model_stages, stream_samples
    from factory.build.plan import build_plan

    samples = gpus * args.batches_per_gpu * args.batch_size
    recipe = scaling_recipe(gpus, samples, args.size, args.batch_size, args.rows_per_file)
    folder = workdir / f"{gpus}-gpus"
    (folder / "ready").mkdir(parents=True)
    generator, labeler = stand_in_stages(folder / "ready", args.generate_seconds, args.label_seconds, gpus)
    plan = build_plan(recipe)
    generate, label = model_stages(recipe)  # the real stages' arguments, with stand-in classes
    stages = [dataclasses.replace(generate, stage=generator), dataclasses.replace(label, stage=labeler)]
    commits = stream_samples(recipe, plan, str(folder / "out"), {}, stages=stages)
    end = time.time()
    start = max(float(p.read_text()) for p in (folder / "ready").glob("ready-*"))
    done = sorted(i for c in commits for i in (*c.written, *c.dropped))
    model_bound = gpus * args.batch_size / (args.generate_seconds + args.label_seconds)
    throughput = len(done) / (end - start)
    busy = {stage: sum(c.seconds.get(stage, 0.0) for c in commits) for stage in ("encode", "write")}
    shutil.rmtree(folder / "out", ignore_errors=True)
    return {"gpus": gpus, "samples": samples, "accounted": len(done),
            "exact": done == sorted(s.sample_id for s in plan), "seconds": end - start,
            "throughput": throughput, "model_bound": model_bound, "efficiency": throughput / model_bound,
            "encode_seconds": busy["encode"], "write_seconds": busy["write"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8], help="cluster sizes, ascending")
    parser.add_argument("--generate-seconds", type=float, default=4.0,
                        help="generator hold per batch (SD 1.5, 50 steps, 8 images on an A10G: ~40 s)")
    parser.add_argument("--label-seconds", type=float, default=0.2,
                        help="labeler hold per batch (Mask R-CNN, 8 images: ~0.5 s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches-per-gpu", type=int, default=6)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--rows-per-file", type=int, default=16,
                        help="small parts, so that the last one (the run's tail) is short")
    parser.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs per GPU node (g5.xlarge: 4)")
    parser.add_argument("--object-store-mb", type=int, default=512,
                        help="object store per GPU node (Ray's test clusters default to 150)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.nodes != sorted(args.nodes) or args.nodes[0] < 1:
        parser.error("--nodes must be positive and ascending (the cluster only grows)")

    # A Ray temp dir of our own, so that no other `ray.init()` on the machine joins this cluster.
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray.cluster_utils import Cluster

    # A head that only coordinates (as in cluster.yaml) and one-GPU worker nodes added as the run goes.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": free_port()})
    results = []
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for gpus in args.nodes:
                while len(cluster.worker_nodes) < gpus:
                    cluster.add_node(num_cpus=args.cpus_per_node, num_gpus=1,
                                     object_store_memory=args.object_store_mb * 2**20)
                cluster.wait_for_nodes()
                if not ray.is_initialized():
                    ray.init(address=cluster.address, log_to_driver=False)
                results.append(run_once(gpus, args, Path(workdir)))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    base = results[0]["throughput"] / results[0]["gpus"]
    for r in results:
        r["vs_linear"] = r["throughput"] / (r["gpus"] * base)
    print(f"batch {args.batch_size} of {args.size}x{args.size}; per batch: generate {args.generate_seconds} s, "
          f"label {args.label_seconds} s")
    print(f"{'GPUs':>4}{'samples':>9}{'img/s':>9}{'model-bound':>13}{'efficiency':>12}{'vs linear':>11}"
          f"{'encode busy s':>15}{'write busy s':>14}")
    for r in results:
        print(f"{r['gpus']:>4}{r['accounted']:>5}/{r['samples']:<3}{r['throughput']:>9.2f}{r['model_bound']:>13.2f}"
              f"{r['efficiency']:>12.2f}{r['vs_linear']:>11.2f}{r['encode_seconds']:>15.1f}"
              f"{r['write_seconds']:>14.1f}")
    summary = {"args": vars(args), "runs": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

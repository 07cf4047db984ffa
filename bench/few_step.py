"""Grounding at a few-step sampler's capture step, on the mini world, beside DDIM.

A few-step sampler (DPM-Solver++, LCM) captures the U-Net's features at its call nearest the
reference's noise level (`factory.diffusion.steps`): does a grounding module still label well
there? For each sampler (default: DDIM-25, the mini world's reference, and DPM-Solver++ with 25
and with 12 steps), the mission's split-1 arc (`bench/mini_mission.py`), every generation with that sampler:

1. triplets (`shapes-triplets`) and test triplets (`shapes-triplets-test`, with DAAM), features
   at the reference's noise level (DDIM-25's step 3, timestep 81: the paper's t=5 of 50);
2. a grounding module trained on split 1's seen classes of its own sampler's triplets;
3. Protocol-I of that module on its own sampler's test triplets.

    python -m bench.few_step [--work outputs/few-step] [--scale 0.5] [--samplers ddim:25 dpm++:25 dpm++:12]

Every stage resumes (a rerun with the same --work continues; its times count only what it ran).
--scale multiplies the set sizes and the training length. Results: <work>/report.md and <work>/report.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.mini_mission import SPLIT, StageClock, build, grounding_config, protocol_i_table, save_report
from factory.core.cli import add_verbose_argument, setup_output
from factory.core.cluster import init_ray
from factory.diffusion.steps import (
    REFERENCE_STEPS,
    capture_call_index,
    reference_timestep,
    scheduler_timesteps,
)
from factory.pipeline.recipe import load_recipe
from grounding.config import GroundingEvalOptions
from grounding.evaluate import prepare_evaluation, run_evaluation
from grounding.train import prepare_training, run_training


def parse_sampler(text: str) -> tuple[str, int]:
    """'dpm++:12' -> ('dpm++', 12)."""
    name, _, steps = text.partition(":")
    if name not in ("ddim", "dpm++", "lcm") or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"a sampler is NAME:STEPS with NAME ddim, dpm++ or lcm (got {text!r})")
    return name, int(steps)


def capture_timestep(scheduler: str, steps: int, step: int) -> int:
    timesteps = scheduler_timesteps(scheduler, steps)
    return timesteps[capture_call_index(steps, step, scheduler)]


def generation(scheduler: str, steps: int) -> dict:
    """One sampler's recipe overrides, its capture at the mini world's noise level (timestep 81)."""
    base = load_recipe("shapes-triplets")
    # The mini world's capture (DDIM-25, step 3) as the step of DDIM-50 that the few-step samplers name.
    reference = (base.capture.step - 1) * REFERENCE_STEPS // base.generator.steps + 1
    step = reference
    if scheduler == "ddim":  # DDIM names a step of its own schedule: the one at the same timestep
        target, timesteps = reference_timestep(reference), scheduler_timesteps("ddim", steps)
        step = min(range(1, steps + 1), key=lambda r: abs(timesteps[capture_call_index(steps, r)] - target))
    return {"generator.scheduler": scheduler, "generator.steps": steps, "capture.step": step}


def run_sampler(work: Path, scheduler: str, steps: int, scale: float, clock: StageClock) -> dict:
    """One sampler's triplets, module and Protocol-I split-1 row."""
    name = f"{scheduler}-{steps}"
    overrides = generation(scheduler, steps)
    sets = {kind: build(f"shapes-{kind}", work / name / kind, scale, overrides)
            for kind in ("triplets", "triplets-test")}
    clock(f"{name} triplets")
    config = grounding_config(work / name / "triplets", work / name / f"grounding-{SPLIT}", SPLIT, scale)
    training = run_training(prepare_training(config))
    clock(f"{name} grounding")
    report = run_evaluation(prepare_evaluation(GroundingEvalOptions(
        checkpoints={SPLIT: training.best}, data=str(work / name / "triplets-test"))))
    clock(f"{name} protocol-i")
    return {"scheduler": scheduler, "steps": steps, "capture_step": overrides["capture.step"],
            "capture_timestep": capture_timestep(scheduler, steps, overrides["capture.step"]),
            "sets": sets, "generate_seconds": clock.seconds[f"{name} triplets"],
            "protocol_i": report["results"]}


def markdown(report: dict) -> str:
    lines = [f"# Grounding at each sampler's capture step (mini world, split {SPLIT}, scale {report['scale']})", "",
             "| Sampler | Steps | Capture call's timestep | Triplets written | Test triplets | Triplets' time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in report["samplers"]:
        written = r["sets"]["triplets"]["written"], r["sets"]["triplets-test"]["written"]
        lines.append(f"| {r['scheduler']} | {r['steps']} | {r['capture_timestep']} | {written[0]} | {written[1]} "
                     f"| {r['generate_seconds']:.0f} |")
    for r in report["samplers"]:
        lines += ["", f"## {r['scheduler']}-{r['steps']}: Protocol-I, mIoU", "", "```",
                  protocol_i_table(r["protocol_i"]), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("outputs/few-step"),
                        help="folder of every set, checkpoint and result; a rerun resumes (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=0.5, help="multiplies set sizes and training length")
    parser.add_argument("--samplers", type=parse_sampler, nargs="+",
                        default=[("ddim", 25), ("dpm++", 25), ("dpm++", 12)],
                        help="NAME:STEPS each (default: ddim:25 dpm++:25 dpm++:12)")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    setup_output(args.verbose)
    init_ray(num_cpus=max(4, os.cpu_count() or 1))
    clock = StageClock("few-step")
    report = {"scale": args.scale,
              "samplers": [run_sampler(args.work, name, steps, args.scale, clock) for name, steps in args.samplers]}
    report["seconds"] = clock.report()
    save_report(args.work, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

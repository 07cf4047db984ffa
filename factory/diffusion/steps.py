"""Which denoising call is which: plain arithmetic for DDIM, so the driver can plan captures without
torch; the other samplers' timesteps come from their diffusers schedulers."""

from __future__ import annotations

REFERENCE_STEPS = 50  # the papers' DDIM-50, whose noise levels the few-step samplers' captures match
TRAIN_TIMESTEPS = 1000  # Stable Diffusion 1.x's noise schedule


def capture_call_index(steps: int, remaining: int, scheduler: str = "ddim") -> int:
    """The U-Net call (0-based) at which the features are captured.

    DDIM: the call with ``remaining`` of ``steps`` denoising steps left; the paper's t counts steps
    before the end: t=5 of 50 is the 46th call (index 45). Another sampler: its call whose timestep
    is nearest DDIM-50's with ``remaining`` steps left (t=5: timestep 81), the same noise level.
    """
    if scheduler == "ddim":
        if not 1 <= remaining <= steps:
            raise ValueError(f"capture step {remaining} is outside 1..{steps}")
        return steps - remaining
    target = reference_timestep(remaining)
    timesteps = scheduler_timesteps(scheduler, steps)
    return min(range(len(timesteps)), key=lambda i: (abs(timesteps[i] - target), i))


def reference_timestep(remaining: int) -> int:
    """DDIM-50's timestep with ``remaining`` steps left (SD's "leading" spacing, steps_offset 1)."""
    if not 1 <= remaining <= REFERENCE_STEPS:
        raise ValueError(f"capture step {remaining} is outside 1..{REFERENCE_STEPS}")
    return (remaining - 1) * (TRAIN_TIMESTEPS // REFERENCE_STEPS) + 1


def scheduler_timesteps(scheduler: str, steps: int) -> list[int]:
    """The timesteps a sampler visits in ``steps`` steps, one per U-Net call."""
    from factory.diffusion.schedulers import make_scheduler  # diffusers: only for the few-step samplers

    sampler = make_scheduler(scheduler)
    sampler.set_timesteps(steps)
    return [int(t) for t in sampler.timesteps]

"""The samplers ``generator.scheduler`` names, each on its generator's own noise schedule."""

from __future__ import annotations

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler


def sd_scheduler(config=None) -> DDIMScheduler:
    """DDIM (eta 0: deterministic given the seed) on Stable Diffusion 1.x's noise schedule, or on ``config``'s
    (a saved SD or SDXL scheduler): its betas and timestep spacing, never clipping the predicted latent."""
    if config is not None:
        # SDXL saves an Euler config, which has no clip_sample: DDIM's default (True) would clip latents to [-1, 1]
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def make_scheduler(name: str, config=None):
    """DDIM (eta 0), DPM-Solver++ 2M or LCM (a latent consistency model or an LCM-LoRA) on SD 1.x's noise
    schedule (or ``config``'s); "flow": the flow-matching Euler sampler ``config`` describes (SD 3.5, FLUX.1)."""
    if name == "flow":
        if config is None:
            raise ValueError("scheduler flow needs a flow-matching model's saved scheduler config")
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    ddim = sd_scheduler(config)
    if name == "ddim":
        return ddim
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(ddim.config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "lcm":
        return LCMScheduler.from_config(ddim.config)
    raise ValueError(f"unknown scheduler {name!r}; choose ddim, dpm++, lcm or flow")

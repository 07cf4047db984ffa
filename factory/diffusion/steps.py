"""Which denoising call is which: plain arithmetic, so the driver can plan captures without torch."""

from __future__ import annotations


def capture_call_index(steps: int, remaining: int) -> int:
    """The U-Net call (0-based) at which ``remaining`` denoising steps are left.

    The paper's t counts steps before the end: t=5 of 50 is the 46th call (index 45).
    """
    if not 1 <= remaining <= steps:
        raise ValueError(f"capture step {remaining} is outside 1..{steps}")
    return steps - remaining

"""Which denoising steps run every block (FULL) and which refresh and extrapolate (PARTIAL).

The schedule depends only on the step index and the step count, never on data: deciding costs no
device sync and gives the same answer on every rank and for every sample of a batch.
"""

from __future__ import annotations

from enum import Enum

from hero.cache.config import HeroConfig


class StepMode(str, Enum):
    """FULL runs every block; PARTIAL refreshes shallow tokens and extrapolates the deep stack."""

    FULL = "full"
    PARTIAL = "partial"


def step_mode(step: int, num_steps: int, config: HeroConfig) -> StepMode:
    """The mode of step ``step`` (0-based) of a ``num_steps``-step sampling."""
    if step < config.warmup_steps or step >= num_steps - config.final_full_steps:
        return StepMode.FULL
    if (step - config.warmup_steps) % config.interval == config.interval - 1:
        return StepMode.FULL
    return StepMode.PARTIAL


def schedule(num_steps: int, config: HeroConfig) -> list[StepMode]:
    """The mode of every step of a ``num_steps``-step sampling."""
    return [step_mode(step, num_steps, config) for step in range(num_steps)]

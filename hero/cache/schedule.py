"""Which denoising steps run every block (FULL) and which refresh and forecast (PARTIAL).

The rule depends only on the step index, the step count and the last FULL step: FULL during the
warm-up, on the final steps, and once ``interval`` steps have passed since the last FULL step.
Deciding costs no device sync and gives the same answer on every rank and for every sample of a
batch. With ``verify_threshold`` the rule is checked: a PARTIAL step whose refreshed tokens found
the forecast further off than the threshold makes the next step FULL (the caller measures that
drift; the decision stays per step, so shapes stay static).
"""

from __future__ import annotations

from enum import Enum

from hero.cache.config import HeroConfig


class StepMode(str, Enum):
    """FULL runs every block; PARTIAL refreshes shallow tokens and forecasts the deep stack."""

    FULL = "full"
    PARTIAL = "partial"


class Schedule:
    """The schedule rule of one config."""

    def __init__(self, config: HeroConfig) -> None:
        self.config = config

    def mode(self, step: int, num_steps: int, last_full: int, drifted: bool = False) -> StepMode:
        """The mode of step ``step`` (0-based) of ``num_steps`` when the last FULL step was
        ``last_full`` and the previous step's drift did (``drifted``) or did not pass the
        threshold."""
        config = self.config
        if step < config.warmup_steps or step >= num_steps - config.final_full_steps:
            return StepMode.FULL
        if drifted or step - last_full >= config.interval:
            return StepMode.FULL
        return StepMode.PARTIAL


def schedule(num_steps: int, config: HeroConfig) -> list[StepMode]:
    """The mode of every step of a ``num_steps``-step sampling when no drift is measured (the
    static schedule; with ``verify_threshold``, the most PARTIAL steps there can be)."""
    rule, modes, last_full = Schedule(config), [], -1
    for step in range(num_steps):
        modes.append(rule.mode(step, num_steps, last_full))
        last_full = step if modes[-1] is StepMode.FULL else last_full
    return modes


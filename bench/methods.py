"""The methods the accelerator benchmark compares, each with its documented preset.

Every method goes through :func:`hero.accelerators.apply_accelerator`, so the benchmark runs
exactly what ``--accel`` gives a pipeline user. "Fewer steps" methods are full compute with fewer sampling steps, one per distinct cost of the other methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hero.accelerators import ACCELERATORS, Accelerator, apply_accelerator

FAMILIES = ("full", "steps", "hero", "diffusers", "baseline")


@dataclass(frozen=True)
class Method:
    """One row of the comparison: an accelerator by registry name with option overrides, or full
    compute with ``steps`` sampling steps (``family="steps"``, matching the cost of ``matches``)."""

    name: str
    family: str
    accelerator: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    matches: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.family == "steps":
            return f"full compute, {self.steps} steps (the cost of {', '.join(self.matches)})"
        if self.family == "full":
            return "full compute"
        spec = ACCELERATORS[self.accelerator]
        extra = f" ({', '.join(f'{k}={v}' for k, v in self.options.items())})" if self.options else ""
        return spec.description + extra


def default_methods() -> list[Method]:
    """HERO's presets, every diffusers cache that supports CogVideoX, FORA and ToCa/DuCa."""
    return [
        Method("hero", "hero", "hero"),
        Method("hero-fast", "hero", "hero-fast"),
        Method("hero-quality", "hero", "hero-quality"),
        Method("hero-turbo", "hero", "hero-turbo"),
        Method("pab", "diffusers", "pab"),
        Method("pab-fast", "diffusers", "pab-fast"),
        Method("fastercache", "diffusers", "fastercache"),
        Method("fbc", "diffusers", "fbc"),
        Method("fbc-fast", "diffusers", "fbc-fast"),
        Method("taylorseer", "diffusers", "taylorseer"),
        Method("taylorseer-o2", "diffusers", "taylorseer", {"max_order": 2}),
        Method("taylorseer-o3", "diffusers", "taylorseer", {"max_order": 3}),
        Method("taylorseer-fast", "diffusers", "taylorseer-fast"),
        Method("magcache", "diffusers", "magcache"),
        Method("fora", "baseline", "fora"),
        Method("fora-n3", "baseline", "fora-n3"),
        Method("toca", "baseline", "toca"),
        Method("duca", "baseline", "duca"),
    ]


def steps_methods(flops_ratios: dict[str, float], steps: int) -> list[Method]:
    """Full compute at the fewest steps that cost at least as much as a method, for every
    distinct cost ratio measured (methods that save less than a whole step are matched by full
    compute itself). Rounding up asks what the method's budget buys as plain steps; a row rounded
    down would cost less than the method it matches and be faster by rounding alone."""
    by_steps: dict[int, list[str]] = {}
    for name, ratio in flops_ratios.items():
        matched = max(1, math.ceil(steps * ratio - 1e-6))
        if matched < steps:
            by_steps.setdefault(matched, []).append(name)
    return [Method(f"steps-{n}", "steps", steps=n, matches=tuple(names))
            for n, names in sorted(by_steps.items(), reverse=True)]


def apply_method(transformer: nn.Module, method: Method, steps: int) -> Accelerator:
    """Apply ``method`` to ``transformer``. MagCache gets the run's step count; HERO's own FLOP
    counter stays off (a pipeline pays for it once per input shape over an actor's life, the
    benchmark would pay on every fresh application; it counts every method's FLOPs itself)."""
    options = dict(method.options)
    if method.accelerator == "magcache":
        options.setdefault("num_inference_steps", steps)
    if method.family == "hero":
        options.setdefault("count_flops", False)
    return apply_accelerator(transformer, method.accelerator, **options)

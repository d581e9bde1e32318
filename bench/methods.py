"""The methods the accelerator benchmark compares, each with its documented preset.

Every method goes through :func:`hero.accelerators.apply_accelerator`, so the benchmark runs
exactly what ``--accel`` gives a pipeline user. FORA and ToCa/DuCa (:mod:`hero.baselines`) are
registered there under their names when the registry does not carry them yet. "Fewer steps"
methods are full compute with fewer sampling steps, one per distinct cost of the other methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from diffusers.hooks.hooks import HookRegistry
from torch import nn

from hero.accelerators import (ACCELERATORS, Accelerator, AcceleratorSpec, apply_accelerator,
                               register_accelerator)
from hero.baselines import (FORA_PRESETS, TOCA_PRESETS, ForaConfig, TocaConfig, apply_fora,
                            apply_toca, fora_stats, remove_fora, remove_toca, toca_stats)

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
    register_baselines()
    return [
        Method("hero", "hero", "hero"),
        Method("hero-fast", "hero", "hero-fast"),
        Method("hero-quality", "hero", "hero-quality"),
        Method("pab", "diffusers", "pab"),
        Method("pab-fast", "diffusers", "pab-fast"),
        Method("fastercache", "diffusers", "fastercache"),
        Method("fbc", "diffusers", "fbc"),
        Method("fbc-fast", "diffusers", "fbc-fast"),
        Method("taylorseer", "diffusers", "taylorseer"),
        Method("taylorseer-o2", "diffusers", "taylorseer", {"max_order": 2}),
        Method("taylorseer-fast", "diffusers", "taylorseer-fast"),
        Method("magcache", "diffusers", "magcache"),
        Method("fora", "baseline", "fora"),
        Method("fora-n3", "baseline", "fora-n3"),
        Method("toca", "baseline", "toca"),
        Method("duca", "baseline", "duca"),
    ]


def steps_methods(flops_ratios: dict[str, float], steps: int) -> list[Method]:
    """Full compute at ``round(steps * ratio)`` steps for every distinct cost ratio measured
    (methods that save less than half a step are matched by full compute itself)."""
    by_steps: dict[int, list[str]] = {}
    for name, ratio in flops_ratios.items():
        matched = max(1, round(steps * ratio))
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


class BaselineAccelerator(Accelerator):
    """FORA or ToCa/DuCa behind the :class:`~hero.accelerators.Accelerator` interface."""

    def __init__(self, name: str, transformer: nn.Module, options: dict[str, Any],
                 config_class: type, apply: Callable, remove: Callable, stats: Callable) -> None:
        super().__init__(name, transformer, options)
        self._remove, self._stats_of = remove, stats
        apply(transformer, config_class(**options))

    def _stats(self) -> dict[str, Any]:
        return self._stats_of(self.transformer)

    def reset(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks()

    def remove(self) -> None:
        self._remove(self.transformer)


def _baseline_spec(description: str, preset: dict[str, Any], config_class: type,
                   apply: Callable, remove: Callable, stats: Callable) -> AcceleratorSpec:
    build = lambda name, transformer, options: BaselineAccelerator(
        name, transformer, options, config_class, apply, remove, stats)
    return AcceleratorSpec(description, dict(preset), build,
                           tuple(config_class.__dataclass_fields__))


BASELINE_SPECS: dict[str, AcceleratorSpec] = {
    "fora": _baseline_spec("FORA: every block's cached residual reused on every other step",
                           FORA_PRESETS["fora"], ForaConfig, apply_fora, remove_fora, fora_stats),
    "fora-n3": _baseline_spec("FORA: every block recomputed every third step, reused otherwise",
                              FORA_PRESETS["fora-n3"], ForaConfig, apply_fora, remove_fora,
                              fora_stats),
    "toca": _baseline_spec("ToCa: every third step full; in between every block refreshes the "
                           "25% of tokens with the best attention/staleness/spatial score",
                           TOCA_PRESETS["toca"], TocaConfig, apply_toca, remove_toca, toca_stats),
    "duca": _baseline_spec("DuCa: every third step full; in between, a step refreshing 25% random "
                           "tokens per block, then a step reusing every block",
                           TOCA_PRESETS["duca"], TocaConfig, apply_toca, remove_toca, toca_stats),
}


def register_baselines() -> None:
    """Make FORA and ToCa/DuCa selectable in :mod:`hero.accelerators` where they are not yet."""
    for name, spec in BASELINE_SPECS.items():
        if name not in ACCELERATORS:
            register_accelerator(name, spec)

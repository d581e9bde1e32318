"""One registry of denoiser accelerators, selected by name (``--accel``), applied to a transformer.

``apply_accelerator(transformer, name, **options)`` returns an :class:`Accelerator` with
``stats()`` (JSON-safe, for ``meta.json``), ``reset()`` and ``remove()``. Names:

- ``none``: the model as it is;
- ``hero``, ``hero-quality``, ``hero-fast``, ``hero-turbo``: HERO (:mod:`hero.cache`) presets;
- ``pab``, ``pab-fast``, ``fastercache``, ``fbc``, ``fbc-fast``, ``taylorseer``,
  ``taylorseer-fast`` (:mod:`~hero.accelerators.diffusers_caches`) and ``magcache``
  (:mod:`~hero.accelerators.magcache`): diffusers' own caches with this project's presets;
- ``fora``, ``fora-n3``: FORA-style whole-block reuse (:mod:`hero.baselines.fora`);
- ``toca``, ``duca``: ToCa/DuCa-style token refresh (:mod:`hero.baselines.toca`).

Every call must run under ``transformer.cache_context(name, ...)``; stock diffusers pipelines do.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from hero.accelerators.base import Accelerator, AcceleratorSpec, HookAccelerator
from hero.accelerators.diffusers_caches import DIFFUSERS_CACHES
from hero.accelerators.magcache import MAGCACHE
from hero.baselines import (FORA_PRESETS, TOCA_PRESETS, ForaConfig, TocaConfig, apply_fora,
                            apply_toca, fora_stats, remove_fora, remove_toca, toca_stats)
from hero.cache.config import HeroConfig
from hero.cache.hooks import apply_hero, hero_stats, remove_hero, transformer_of

__all__ = ["ACCELERATORS", "Accelerator", "AcceleratorSpec", "apply_accelerator",
           "register_accelerator"]


def _hero(preset: str) -> Callable[[str, nn.Module, dict[str, Any]], Accelerator]:
    return lambda name, model, options: HookAccelerator(
        name, model, options,
        lambda target, opts: apply_hero(target, HeroConfig.preset(preset, **opts)),
        remove_hero, hero_stats)


def _hero_spec(preset: str, description: str) -> AcceleratorSpec:
    return AcceleratorSpec(description, {}, _hero(preset), _HERO_OPTIONS)


def _baseline(description: str, preset: dict[str, Any], config_class: type,
              apply: Callable, remove: Callable, stats: Callable) -> AcceleratorSpec:
    def on_transformer(function: Callable) -> Callable:
        return lambda model, *rest: function(transformer_of(model)[0], *rest)

    def factory(name: str, model: nn.Module | Any, options: dict[str, Any]) -> Accelerator:
        return HookAccelerator(
            name, model, options,
            on_transformer(lambda module, opts: apply(module, config_class(**opts))),
            on_transformer(remove), on_transformer(stats))

    return AcceleratorSpec(description, dict(preset), factory,
                           tuple(config_class.__dataclass_fields__))


_HERO_OPTIONS = tuple(f for f in HeroConfig.__dataclass_fields__ if f != "preset_name")

ACCELERATORS: dict[str, AcceleratorSpec] = {
    "none": AcceleratorSpec("the model as it is", {}, Accelerator),
    "hero": _hero_spec("default", "HERO, default preset: three PARTIAL steps per FULL step, "
                                  "third-order forecasts"),
    "hero-quality": _hero_spec("quality", "HERO, quality preset: one PARTIAL step per FULL step, "
                                          "third-order forecasts"),
    "hero-fast": _hero_spec("fast", "HERO, fast preset: four PARTIAL steps per FULL step, "
                                    "second-order forecasts"),
    "hero-turbo": _hero_spec("turbo", "HERO, turbo preset: seven PARTIAL steps per FULL step, "
                                      "second-order forecasts"),
    **DIFFUSERS_CACHES,
    "magcache": MAGCACHE,
    "fora": _baseline("FORA: every block's cached residual reused on every other step",
                      FORA_PRESETS["fora"], ForaConfig, apply_fora, remove_fora, fora_stats),
    "fora-n3": _baseline("FORA: every block recomputed every third step, reused otherwise",
                         FORA_PRESETS["fora-n3"], ForaConfig, apply_fora, remove_fora, fora_stats),
    "toca": _baseline("ToCa: every third step full; in between every block refreshes the 25% of "
                      "tokens with the best attention/staleness/spatial score",
                      TOCA_PRESETS["toca"], TocaConfig, apply_toca, remove_toca, toca_stats),
    "duca": _baseline("DuCa: every third step full; in between, a step refreshing 25% random "
                      "tokens per block, then a step reusing every block",
                      TOCA_PRESETS["duca"], TocaConfig, apply_toca, remove_toca, toca_stats),
}


def register_accelerator(name: str, spec: AcceleratorSpec) -> None:
    """Make another accelerator selectable by name."""
    ACCELERATORS[name] = spec


def apply_accelerator(model: nn.Module | Any, name: str, **options: Any) -> Accelerator:
    """Apply the accelerator registered as ``name`` (preset options, overridden by ``options``) to
    a transformer, or to the transformer of a pipeline or world model (HERO then reads the step
    count from its scheduler)."""
    if name not in ACCELERATORS:
        raise ValueError(f"accel: unknown accelerator {name!r}; choose from {sorted(ACCELERATORS)}")
    spec = ACCELERATORS[name]
    return spec.apply(name, model, spec.options(name, options))

"""One registry of denoiser accelerators, selected by name (``--accel``), applied to a transformer.

``apply_accelerator(transformer, name, **options)`` returns an :class:`Accelerator` with
``stats()`` (JSON-safe, for ``meta.json``), ``reset()`` and ``remove()``. Names:

- ``none``: the model as it is;
- ``hero``, ``hero-fast``, ``hero-quality``: HERO (:mod:`hero.cache`) with its presets;
- ``pab``, ``pab-fast``: diffusers' Pyramid Attention Broadcast;
- ``fastercache``: diffusers' FasterCache (attention reuse, and the unconditional half of a batched
  ``"cond_uncond"`` call approximated from the conditional one);
- ``fbc``, ``fbc-fast``: diffusers' First Block Cache;
- ``taylorseer``, ``taylorseer-fast``: diffusers' TaylorSeer cache;
- ``fora``, ``fora-n3``: FORA-style whole-block reuse (:mod:`hero.baselines.fora`);
- ``toca``, ``duca``: ToCa/DuCa-style token refresh (:mod:`hero.baselines.toca`);
- ``magcache``: diffusers' MagCache. It needs per-step magnitude ratios (``mag_ratios`` or a
  ``calibration_path`` JSON); without them the first generation is a calibration run (nothing
  skipped, ratios recorded and written to ``calibration_path``) and later generations use MagCache.

Every call must run under ``transformer.cache_context(name, step_index=i, num_inference_steps=S)``.
A small hook on the transformer follows the calls: it exposes the current timestep to the caches
that ask for a ``current_timestep_callback`` and, when step 0 of a new generation starts, resets
the caches' state, so a caller never has to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                             PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)
from diffusers.hooks.hooks import (BaseState, CacheContext, HookRegistry, ModelHook,
                                   StateManager, _set_cache_context)
from torch import nn

from hero.baselines import (FORA_PRESETS, TOCA_PRESETS, ForaConfig, TocaConfig, apply_fora,
                            apply_toca, fora_stats, remove_fora, remove_toca, toca_stats)
from hero.cache.adapters import BlockAdapter, adapter_for, bind_model_inputs
from hero.cache.config import HeroConfig
from hero.cache.hooks import apply_hero, drop_empty_registries, remove_hero, reset_hero
from hero.cache.stats import hero_stats

_TRACKER_HOOK = "accelerator_call_tracker"
_MAG_HEAD_HOOK = "magcache_calibration_head"
_MAG_TAIL_HOOK = "magcache_calibration_tail"


class Accelerator:
    """An accelerator applied to one transformer: statistics, per-generation reset, removal."""

    def __init__(self, name: str, transformer: nn.Module, options: dict[str, Any]) -> None:
        self.name = name
        self.transformer = transformer
        self.options = options

    def stats(self) -> dict[str, Any]:
        """JSON-safe description and statistics of the latest generation."""
        return {"accelerator": self.name, "options": _json_safe(self.options), **self._stats()}

    def _stats(self) -> dict[str, Any]:
        return {}

    def reset(self) -> None:
        """Forget per-generation state (also done automatically when step 0 comes again)."""

    def remove(self) -> None:
        """Take the accelerator off; the transformer computes as before."""


class _HeroAccelerator(Accelerator):
    def __init__(self, name: str, transformer: nn.Module, options: dict[str, Any],
                 preset: str) -> None:
        super().__init__(name, transformer, options)
        apply_hero(transformer, HeroConfig.preset(preset, **options))

    def _stats(self) -> dict[str, Any]:
        return hero_stats(self.transformer)

    def reset(self) -> None:
        reset_hero(self.transformer)

    def remove(self) -> None:
        remove_hero(self.transformer)


class _NoState(BaseState):
    def reset(self) -> None:
        """Nothing to forget."""


class _CallTracker(ModelHook):
    """Outermost hook on the transformer: timestep, calls per generation, new-generation resets."""

    _is_stateful = True

    def __init__(self, on_new_generation: Callable[[CacheContext], None],
                 before_call: Callable[[CacheContext | None], None]) -> None:
        super().__init__()
        self.context = StateManager(_NoState)
        self.on_new_generation = on_new_generation
        self.before_call = before_call
        self.timestep: Any = None
        self.calls = 0
        self.last_step: int | None = None
        self.num_steps: int | None = None

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        context = self.context._context
        step = None if context is None else context.step_index
        if step == 0 and self.last_step not in (None, 0):
            self.on_new_generation(context)
            self.calls = 0
        if context is not None and context.num_inference_steps is not None:
            self.num_steps = int(context.num_inference_steps)
        self.last_step = step if step is not None else self.last_step
        self.calls += 1
        self.before_call(context)
        self.timestep = bind_model_inputs(module, args, kwargs).get("timestep")
        return args, kwargs

    def current_timestep(self) -> float:
        """The timestep of the call in progress (read from the device only when asked)."""
        if self.timestep is None:
            raise RuntimeError("the accelerator has not seen a transformer call yet")
        if isinstance(self.timestep, torch.Tensor):
            return float(self.timestep.flatten()[0])
        return float(self.timestep)

    def reset_state(self, module: nn.Module) -> nn.Module:
        return module


class _DiffusersCacheAccelerator(Accelerator):
    """A diffusers cache enabled through ``enable_cache``, with the call tracker on top."""

    def __init__(self, name: str, transformer: nn.Module, options: dict[str, Any],
                 build: Callable[[BlockAdapter, nn.Module, dict[str, Any], _CallTracker], Any]
                 ) -> None:
        super().__init__(name, transformer, options)
        self.tracker = _CallTracker(self._new_generation, self._before_call)
        self.adapter = adapter_for(transformer)
        self.cache_config = build(self.adapter, transformer, options, self.tracker)
        self._enable()
        root = HookRegistry.check_if_exists_or_initialize(transformer)
        root.register_hook(self.tracker, _TRACKER_HOOK)
        root.invalidate_child_registries_cache()

    def _enable(self) -> None:
        self.transformer.enable_cache(self.cache_config)

    def _disable(self) -> None:
        self.transformer.disable_cache()

    def _new_generation(self, context: CacheContext) -> None:
        self.reset()
        _set_cache_context(self.transformer, context)

    def _before_call(self, context: CacheContext | None) -> None:
        """Per-call adjustment of the cache's hooks (none by default)."""

    def _stats(self) -> dict[str, Any]:
        return {"calls": self.tracker.calls}

    def reset(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks()

    def remove(self) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.remove_hook(_TRACKER_HOOK, recurse=False)
        self._disable()
        registry.invalidate_child_registries_cache()
        drop_empty_registries(self.transformer.modules())


class _FasterCacheAccelerator(_DiffusersCacheAccelerator):
    """FasterCache splits a batched ``"cond_uncond"`` call; calls under any other context name
    carry no unconditional half, so for those its hooks act as for a guidance-distilled model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hooks_with_guidance: list[ModelHook] | None = None

    def _before_call(self, context: CacheContext | None) -> None:
        distilled = context is None or context.name != "cond_uncond"
        for hook in self._guidance_hooks():
            hook.is_guidance_distilled = distilled

    def _guidance_hooks(self) -> list[ModelHook]:
        if self._hooks_with_guidance is None:
            registries = [m.__dict__.get("_diffusers_hook") for m in self.transformer.modules()]
            self._hooks_with_guidance = [
                hook for registry in registries if registry is not None
                for hook in registry.hooks.values() if hasattr(hook, "is_guidance_distilled")]
        return self._hooks_with_guidance


class _MagRatioState(BaseState):
    def __init__(self) -> None:
        self.head_input: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        self.ratios: list[float] = []

    def reset(self) -> None:
        self.__init__()


class _MagRatioHook(ModelHook):
    """Calibration for MagCache: per step, the mean over tokens of ``|R(s)| / |R(s-1)|`` with ``R``
    the residual of the whole block stack (last block's output minus first block's input)."""

    _is_stateful = True

    def __init__(self, state: StateManager, adapter: BlockAdapter, is_head: bool) -> None:
        super().__init__()
        self.state = state
        self.adapter = adapter
        self.is_head = is_head

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.is_head:
            self.state.get_state().head_input = self.adapter.bind(args, kwargs).hidden
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.is_head:
            return output
        state: _MagRatioState = self.state.get_state()
        residual = (self.adapter.split_output(output)[0] - state.head_input).float()
        if state.previous is None:
            state.ratios.append(1.0)
        else:
            ratio = residual.norm(dim=-1) / (state.previous.norm(dim=-1) + 1e-8)
            state.ratios.append(float(ratio.mean()))
        state.previous = residual
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.reset()
        return module


class _MagCacheAccelerator(_DiffusersCacheAccelerator):
    """MagCache, calibrating itself on the first generation when it has no ratios."""

    def __init__(self, name: str, transformer: nn.Module, options: dict[str, Any]) -> None:
        self.calibration_path = options.get("calibration_path")
        self.ratios = _load_mag_ratios(options)
        self.ratio_state = StateManager(_MagRatioState)
        super().__init__(name, transformer, options, _magcache_config)

    @property
    def calibrating(self) -> bool:
        return self.ratios is None

    def _enable(self) -> None:
        if not self.calibrating:
            self.cache_config = _magcache_config(self.adapter, self.transformer,
                                                 {**self.options, "mag_ratios": self.ratios},
                                                 self.tracker)
            self.transformer.enable_cache(self.cache_config)
            return
        blocks = self.adapter.blocks(self.transformer)
        for block, is_head, hook_name in ((blocks[0], True, _MAG_HEAD_HOOK),
                                          (blocks[-1], False, _MAG_TAIL_HOOK)):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(
                _MagRatioHook(self.ratio_state, self.adapter, is_head), hook_name)

    def _disable(self) -> None:
        if not self.calibrating:
            self.transformer.disable_cache()
            return
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        for hook_name in (_MAG_HEAD_HOOK, _MAG_TAIL_HOOK):
            registry.remove_hook(hook_name, recurse=True)

    def reset(self) -> None:
        if self.calibrating:
            self._finish_calibration()
        super().reset()

    def _finish_calibration(self) -> None:
        """Once a whole generation was recorded: keep its ratios and switch to MagCache."""
        recorded = [state.ratios for state in self.ratio_state._state_cache.values()
                    if state.ratios]
        if not recorded or len(recorded[0]) < (self.tracker.num_steps or 2):
            return
        self._disable()
        self.ratios = recorded[0]
        if self.calibration_path:
            Path(self.calibration_path).write_text(json.dumps(
                {"mag_ratios": self.ratios, "num_inference_steps": len(self.ratios),
                 "model": type(self.transformer).__name__}, indent=1))
        self._enable()
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()

    def _stats(self) -> dict[str, Any]:
        return {"calls": self.tracker.calls, "calibrating": self.calibrating,
                "mag_ratios": self.ratios}


def _load_mag_ratios(options: dict[str, Any]) -> list[float] | None:
    if options.get("mag_ratios") is not None:
        return [float(r) for r in options["mag_ratios"]]
    path = options.get("calibration_path")
    if path and Path(path).exists():
        data = json.loads(Path(path).read_text())
        if "mag_ratios" not in data:
            raise ValueError(f"magcache: calibration file {path} has no 'mag_ratios'")
        return [float(r) for r in data["mag_ratios"]]
    return None


class _BaselineAccelerator(Accelerator):
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


def _model_dtype(transformer: nn.Module) -> torch.dtype:
    return next(transformer.parameters()).dtype


def _pab_config(adapter: BlockAdapter, transformer: nn.Module, options: dict[str, Any],
                tracker: _CallTracker) -> PyramidAttentionBroadcastConfig:
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=options["spatial_skip"],
        spatial_attention_timestep_skip_range=tuple(options["timestep_range"]),
        cross_attention_block_skip_range=options["cross_skip"],
        cross_attention_timestep_skip_range=tuple(options["timestep_range"]),
        current_timestep_callback=tracker.current_timestep)


def _fastercache_config(adapter: BlockAdapter, transformer: nn.Module, options: dict[str, Any],
                        tracker: _CallTracker) -> FasterCacheConfig:
    weight = float(options["attention_weight"])
    return FasterCacheConfig(
        spatial_attention_block_skip_range=options["spatial_skip"],
        spatial_attention_timestep_skip_range=tuple(options["timestep_range"]),
        unconditional_batch_skip_range=options["uncond_skip"],
        unconditional_batch_timestep_skip_range=tuple(options["uncond_timestep_range"]),
        low_frequency_weight_update_timestep_range=(99, 641),
        high_frequency_weight_update_timestep_range=(-1, 301),
        attention_weight_callback=lambda _: weight,
        tensor_format="BFCHW" if adapter.name == "cogvideox" else "BCFHW",
        current_timestep_callback=tracker.current_timestep)


def _fbc_config(adapter: BlockAdapter, transformer: nn.Module, options: dict[str, Any],
                tracker: _CallTracker) -> FirstBlockCacheConfig:
    return FirstBlockCacheConfig(threshold=float(options["threshold"]))


def _taylorseer_config(adapter: BlockAdapter, transformer: nn.Module, options: dict[str, Any],
                       tracker: _CallTracker) -> TaylorSeerCacheConfig:
    blocks = adapter.block_list
    return TaylorSeerCacheConfig(
        cache_interval=options["cache_interval"],
        disable_cache_before_step=options["warmup_steps"],
        max_order=options["max_order"],
        taylor_factors_dtype=_model_dtype(transformer),
        cache_identifiers=[rf"{blocks}\.\d+\.attn\d", rf"{blocks}\.\d+\.ffn?"])


def _magcache_config(adapter: BlockAdapter, transformer: nn.Module, options: dict[str, Any],
                     tracker: _CallTracker) -> MagCacheConfig | None:
    ratios = options.get("mag_ratios")
    if ratios is None:
        return None
    return MagCacheConfig(threshold=float(options["threshold"]),
                          max_skip_steps=options["max_skip_steps"],
                          retention_ratio=float(options["retention_ratio"]),
                          num_inference_steps=options["num_inference_steps"] or len(ratios),
                          mag_ratios=list(ratios))


@dataclass(frozen=True)
class AcceleratorSpec:
    """A registry entry: what it is, its preset options, and how to apply it."""

    description: str
    defaults: dict[str, Any]
    apply: Callable[[str, nn.Module, dict[str, Any]], Accelerator]
    option_names: tuple[str, ...] = field(default=())

    def options(self, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        allowed = set(self.defaults) | set(self.option_names)
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(f"accelerator {name!r} has no option(s) {unknown}; it takes "
                             f"{sorted(allowed)}")
        return {**self.defaults, **overrides}


def _baseline_spec(description: str, preset: dict[str, Any], config_class: type,
                   apply: Callable, remove: Callable, stats: Callable) -> AcceleratorSpec:
    build = lambda name, transformer, options: _BaselineAccelerator(
        name, transformer, options, config_class, apply, remove, stats)
    return AcceleratorSpec(description, dict(preset), build,
                           tuple(config_class.__dataclass_fields__))


def _hero(preset: str) -> Callable[[str, nn.Module, dict[str, Any]], Accelerator]:
    return lambda name, transformer, options: _HeroAccelerator(name, transformer, options, preset)


def _diffusers(build: Callable) -> Callable[[str, nn.Module, dict[str, Any]], Accelerator]:
    return lambda name, transformer, options: _DiffusersCacheAccelerator(name, transformer,
                                                                          options, build)


_HERO_OPTIONS = tuple(f for f in HeroConfig.__dataclass_fields__ if f != "preset_name")
_PAB = dict(spatial_skip=2, cross_skip=None, timestep_range=(100, 800))
_FASTERCACHE = dict(spatial_skip=2, timestep_range=(-1, 681), uncond_skip=5,
                    uncond_timestep_range=(-1, 641), attention_weight=0.3)
_TAYLORSEER = dict(cache_interval=3, warmup_steps=3, max_order=1)
_MAGCACHE = dict(threshold=0.06, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=None,
                 mag_ratios=None, calibration_path=None)

ACCELERATORS: dict[str, AcceleratorSpec] = {
    "none": AcceleratorSpec("the model as it is", {}, Accelerator),
    "hero": AcceleratorSpec("HERO, default preset: every other step PARTIAL, rho 0.25",
                            {}, _hero("default"), _HERO_OPTIONS),
    "hero-fast": AcceleratorSpec("HERO, fast preset: two PARTIAL steps per FULL step",
                                 {}, _hero("fast"), _HERO_OPTIONS),
    "hero-quality": AcceleratorSpec("HERO, quality preset: rho 0.5, longer warm-up and tail",
                                    {}, _hero("quality"), _HERO_OPTIONS),
    "pab": AcceleratorSpec("Pyramid Attention Broadcast: self-attention reused every other call "
                           "for timesteps in (100, 800)", _PAB, _diffusers(_pab_config)),
    "pab-fast": AcceleratorSpec("Pyramid Attention Broadcast: self-attention computed every third "
                                "call for timesteps in (50, 900)",
                                {**_PAB, "spatial_skip": 3, "timestep_range": (50, 900)},
                                _diffusers(_pab_config)),
    "fastercache": AcceleratorSpec("FasterCache: attention extrapolated every other call below "
                                   "t=681, the unconditional half reused 4 calls in 5 below t=641",
                                   _FASTERCACHE,
                                   lambda name, transformer, options: _FasterCacheAccelerator(
                                       name, transformer, options, _fastercache_config)),
    "fbc": AcceleratorSpec("First Block Cache: skip the other blocks when the first block's "
                           "residual changed by less than 5%", dict(threshold=0.05),
                           _diffusers(_fbc_config)),
    "fbc-fast": AcceleratorSpec("First Block Cache with a 10% threshold", dict(threshold=0.1),
                                _diffusers(_fbc_config)),
    "taylorseer": AcceleratorSpec("TaylorSeer: attention/feed-forward outputs forecast to first "
                                  "order, computed every third step after 3 warm-up steps",
                                  _TAYLORSEER, _diffusers(_taylorseer_config)),
    "taylorseer-fast": AcceleratorSpec("TaylorSeer computing every fifth step",
                                       {**_TAYLORSEER, "cache_interval": 5},
                                       _diffusers(_taylorseer_config)),
    "magcache": AcceleratorSpec("MagCache: skip steps while the accumulated residual-magnitude "
                                "error stays under 0.06 (at most 3 in a row, first 20% never); "
                                "calibrates itself on the first generation without ratios",
                                _MAGCACHE,
                                lambda name, transformer, options: _MagCacheAccelerator(
                                    name, transformer, options)),
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


def register_accelerator(name: str, spec: AcceleratorSpec) -> None:
    """Make another accelerator selectable by name."""
    ACCELERATORS[name] = spec


def apply_accelerator(transformer: nn.Module, name: str, **options: Any) -> Accelerator:
    """Apply the accelerator registered as ``name`` (preset options, overridden by ``options``)."""
    if name not in ACCELERATORS:
        raise ValueError(f"accel: unknown accelerator {name!r}; choose from {sorted(ACCELERATORS)}")
    spec = ACCELERATORS[name]
    return spec.apply(name, transformer, spec.options(name, options))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)

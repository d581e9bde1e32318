"""diffusers' own caches behind the accelerator interface, with this project's presets.

Each is enabled through ``transformer.enable_cache``; a small hook on the transformer (the
:class:`CallTracker`) follows the calls: it exposes the current timestep to the caches that ask for
a ``current_timestep_callback`` and, when a new generation starts, resets the caches' state, so a
caller never has to. FasterCache is told per call whether the batch holds an unconditional half.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig,
                             PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)
from diffusers.hooks.hooks import (BaseState, CacheContext, ModelHook, StateManager,
                                   _set_cache_context)
from torch import nn

from hero.accelerators.base import Accelerator, AcceleratorSpec
from hero.cache.adapters import BlockAdapter, adapter_for, bind_model_inputs
from hero.cache.hooking import StepClock, input_signature, install_hooks, reset_hook_states, \
    uninstall_hooks

TRACKER_HOOK = "accelerator_call_tracker"


class _ClockState(BaseState):
    def __init__(self) -> None:
        self.clock = StepClock()

    def reset(self) -> None:
        self.__init__()


class CallTracker(ModelHook):
    """Outermost hook on the transformer: timestep, calls per generation, new-generation resets.

    Every cache context keeps its own :class:`~hero.cache.hooking.StepClock`; the first context
    whose clock starts a new generation (numbered per context) triggers ``on_new_generation``
    once, so the other branch of classifier-free guidance at the same step does not reset again.
    """

    _is_stateful = True

    def __init__(self, on_new_generation: Callable[[CacheContext], None],
                 before_call: Callable[[CacheContext | None], None]) -> None:
        super().__init__()
        self.state_manager = StateManager(_ClockState)
        self.on_new_generation = on_new_generation
        self.before_call = before_call
        self.timestep: Any = None
        self.generation = 0
        self.calls = 0
        self.num_steps: int | None = None

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        context = self.state_manager._context
        inputs = bind_model_inputs(module, args, kwargs)
        if context is not None:
            clock = self.state_manager.get_state().clock
            position = clock.advance(context, input_signature(inputs), None)
            if clock.generation > self.generation:
                self.generation = clock.generation
                if self.calls:
                    self.on_new_generation(context)
                self.calls = 0
            self.num_steps = position.num_steps or self.num_steps
        self.calls += 1
        self.before_call(context)
        self.timestep = inputs.get("timestep")
        return args, kwargs

    def current_timestep(self) -> float:
        """The timestep of the call in progress (read from the device only when asked)."""
        if self.timestep is None:
            raise RuntimeError("the accelerator has not seen a transformer call yet")
        if isinstance(self.timestep, torch.Tensor):
            return float(self.timestep.flatten()[0])
        return float(self.timestep)

    def reset_state(self, module: nn.Module) -> nn.Module:
        """The pipeline finished a generation: the next call starts a new one."""
        self.state_manager.reset()
        self.generation = 0
        return module


CacheBuilder = Callable[[BlockAdapter, nn.Module, dict[str, Any], CallTracker], Any]


class DiffusersCacheAccelerator(Accelerator):
    """A diffusers cache enabled through ``enable_cache``, with the call tracker on top."""

    def __init__(self, name: str, model: nn.Module | Any, options: dict[str, Any],
                 build: CacheBuilder) -> None:
        super().__init__(name, model, options)
        self.tracker = CallTracker(self._new_generation, self._before_call)
        self._hook_lists: dict[str, list[ModelHook]] = {}
        self.adapter = adapter_for(self.transformer)
        self.cache_config = build(self.adapter, self.transformer, options, self.tracker)
        self._enable()
        install_hooks(self.transformer, [], (TRACKER_HOOK, self.tracker))

    def _enable(self) -> None:
        self.transformer.enable_cache(self.cache_config)

    def _disable(self) -> None:
        self.transformer.disable_cache()

    def _new_generation(self, context: CacheContext) -> None:
        """A new generation starts with this call: reset the caches, then give them back the
        call's context (a reset clears it)."""
        self._reset_caches()
        _set_cache_context(self.transformer, context)

    def _reset_caches(self) -> None:
        """Reset every cache's state but the tracker's."""
        reset_hook_states(self.transformer, keep=self.tracker)

    def _before_call(self, context: CacheContext | None) -> None:
        """Per-call adjustment of the cache's hooks (none by default)."""

    def _hooks_with(self, attribute: str) -> list[ModelHook]:
        """The cache's hooks that have ``attribute`` (looked up once)."""
        if attribute not in self._hook_lists:
            registries = [m.__dict__.get("_diffusers_hook") for m in self.transformer.modules()]
            self._hook_lists[attribute] = [
                hook for registry in registries if registry is not None
                for hook in registry.hooks.values() if hasattr(hook, attribute)]
        return self._hook_lists[attribute]

    def _stats(self) -> dict[str, Any]:
        return {"calls": self.tracker.calls}

    def reset(self) -> None:
        self._reset_caches()
        self.tracker.reset_state(self.transformer)

    def remove(self) -> None:
        self._disable()
        uninstall_hooks(self.transformer, (TRACKER_HOOK,))


class FasterCacheAccelerator(DiffusersCacheAccelerator):
    """FasterCache splits a batched ``"cond_uncond"`` call; calls under any other context name
    carry no unconditional half, so for those its hooks act as for a guidance-distilled model."""

    def _before_call(self, context: CacheContext | None) -> None:
        distilled = context is None or context.name != "cond_uncond"
        for hook in self._hooks_with("is_guidance_distilled"):
            hook.is_guidance_distilled = distilled


class TaylorSeerAccelerator(DiffusersCacheAccelerator):
    """TaylorSeer with its last ``final_full_steps`` steps computed in full, as HERO's presets end
    (diffusers' hooks take that as a step number; the step count is known only once a generation
    has begun, so it is set before every call)."""

    def _before_call(self, context: CacheContext | None) -> None:
        steps, final = self.tracker.num_steps, int(self.options["final_full_steps"])
        last = steps - final if steps is not None and final > 0 else None
        for hook in self._hooks_with("disable_cache_after_step"):
            hook.disable_cache_after_step = last


def model_dtype(transformer: nn.Module) -> torch.dtype:
    return next(transformer.parameters()).dtype


def pab_config(adapter: BlockAdapter, transformer: nn.Module, options: dict[str, Any],
               tracker: CallTracker) -> PyramidAttentionBroadcastConfig:
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=options["spatial_skip"],
        spatial_attention_timestep_skip_range=tuple(options["timestep_range"]),
        cross_attention_block_skip_range=options["cross_skip"],
        cross_attention_timestep_skip_range=tuple(options["timestep_range"]),
        current_timestep_callback=tracker.current_timestep)


def fastercache_config(adapter: BlockAdapter, transformer: nn.Module, options: dict[str, Any],
                       tracker: CallTracker) -> FasterCacheConfig:
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


def fbc_config(adapter: BlockAdapter, transformer: nn.Module, options: dict[str, Any],
               tracker: CallTracker) -> FirstBlockCacheConfig:
    return FirstBlockCacheConfig(threshold=float(options["threshold"]))


def taylorseer_config(adapter: BlockAdapter, transformer: nn.Module, options: dict[str, Any],
                      tracker: CallTracker) -> TaylorSeerCacheConfig:
    blocks = adapter.block_list
    return TaylorSeerCacheConfig(
        cache_interval=options["cache_interval"],
        disable_cache_before_step=options["warmup_steps"],
        max_order=options["max_order"],
        taylor_factors_dtype=model_dtype(transformer),
        cache_identifiers=[rf"{blocks}\.\d+\.attn\d", rf"{blocks}\.\d+\.ffn?"])


def diffusers_cache(build: CacheBuilder, accelerator: type[DiffusersCacheAccelerator]
                    = DiffusersCacheAccelerator) -> Callable[..., Accelerator]:
    """The registry factory of a diffusers cache built by ``build``."""
    return lambda name, model, options: accelerator(name, model, options, build)


_PAB = dict(spatial_skip=2, cross_skip=None, timestep_range=(100, 800))
_FASTERCACHE = dict(spatial_skip=2, timestep_range=(-1, 681), uncond_skip=5,
                    uncond_timestep_range=(-1, 641), attention_weight=0.3)
# One warm-up step and a FULL last step, as HERO's presets: measured better for TaylorSeer too
# (toyworld v2, 8 scenes: interval 3 gave 48.6 dB against full compute at 2.65x fewer FLOPs, against
# 44.0 dB at 2.44x with diffusers' three warm-up steps; docs/benchmarks.md).
_TAYLORSEER = dict(cache_interval=3, warmup_steps=1, final_full_steps=1, max_order=1)

DIFFUSERS_CACHES: dict[str, AcceleratorSpec] = {
    "pab": AcceleratorSpec("Pyramid Attention Broadcast: self-attention reused every other call "
                           "for timesteps in (100, 800)", _PAB, diffusers_cache(pab_config)),
    "pab-fast": AcceleratorSpec("Pyramid Attention Broadcast: self-attention computed every third "
                                "call for timesteps in (50, 900)",
                                {**_PAB, "spatial_skip": 3, "timestep_range": (50, 900)},
                                diffusers_cache(pab_config)),
    "fastercache": AcceleratorSpec("FasterCache: attention extrapolated every other call below "
                                   "t=681, the unconditional half reused 4 calls in 5 below t=641",
                                   _FASTERCACHE,
                                   diffusers_cache(fastercache_config, FasterCacheAccelerator)),
    "fbc": AcceleratorSpec("First Block Cache: skip the other blocks when the first block's "
                           "residual changed by less than 5%", dict(threshold=0.05),
                           diffusers_cache(fbc_config)),
    "fbc-fast": AcceleratorSpec("First Block Cache with a 10% threshold", dict(threshold=0.1),
                                diffusers_cache(fbc_config)),
    "taylorseer": AcceleratorSpec("TaylorSeer: attention/feed-forward outputs forecast to first "
                                  "order, computed every third step after one warm-up step, "
                                  "and at the last step",
                                  _TAYLORSEER,
                                  diffusers_cache(taylorseer_config, TaylorSeerAccelerator)),
    "taylorseer-fast": AcceleratorSpec("TaylorSeer computing every fifth step",
                                       {**_TAYLORSEER, "cache_interval": 5},
                                       diffusers_cache(taylorseer_config, TaylorSeerAccelerator)),
}

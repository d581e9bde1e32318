"""HERO as diffusers hooks: ``apply_hero`` / ``remove_hero`` on a video diffusion transformer.

A root hook on the transformer decides, per call, FULL or PARTIAL from the cache context's step
(data-independent), resets stale state, picks the tokens to refresh and keeps the statistics.
Shallow-block hooks cache per-token residuals on FULL steps and, on PARTIAL steps, run the block on
the refreshed tokens only and reuse cached residuals for the rest. Deep-block hooks record the deep
stack's residual on FULL steps; on PARTIAL steps the first deep block returns ``x_k + D̂`` and the
others pass their input through. One state per cache context (``"cond"``/``"uncond"``) lives in a
diffusers ``StateManager``; caches keep the batch axis, so batched CFG rows stay apart too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hero.cache.adapters import (BlockAdapter, BlockInputs, KeyValue, adapter_for,
                                 bind_model_inputs, gather_tokens, reuse_residuals)
from hero.cache.config import HeroConfig
from hero.cache.extrapolate import ResidualHistory
from hero.cache.hooking import StepClock, find_hook, input_signature, install_hooks, uninstall_hooks
from hero.cache.refresh import RefreshTracker, build_layout
from hero.cache.schedule import StepMode, step_mode
from hero.cache.stats import GenerationStats, summarize

ROOT_HOOK = "hero_root"
SHALLOW_HOOK = "hero_shallow_block"
DEEP_HOOK = "hero_deep_block"
HOOK_NAMES = (ROOT_HOOK, SHALLOW_HOOK, DEEP_HOOK)
RateSample = tuple[torch.Tensor, torch.Tensor]  # refreshed tokens' old and new residuals


class HeroState(BaseState):
    """Everything one cache context remembers within one generation."""

    def __init__(self) -> None:
        self.clock = StepClock()
        self.start_generation()

    def start_generation(self) -> None:
        """Forget every cached tensor and counter: a new generation (or new shapes) begins."""
        self.step = -1
        self.mode = StepMode.FULL
        self.counting = False
        self.ready = False
        self.tracker: RefreshTracker | None = None
        self.index: torch.Tensor | None = None
        self.shallow_residuals: dict[int, torch.Tensor] = {}
        self.key_values: dict[int, KeyValue] = {}
        self.deep_input: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.deep_history = ResidualHistory()
        self.stats = GenerationStats()

    def reset(self) -> None:
        self.__init__()

    @property
    def nbytes(self) -> int:
        tensors = [*self.shallow_residuals.values(),
                   *(t for kv in self.key_values.values() for t in kv)]
        total = sum(t.nbytes for t in tensors) + self.deep_history.nbytes
        return total + (self.tracker.nbytes if self.tracker is not None else 0)


@dataclass
class HeroRuntime:
    """What every HERO hook of one model shares: config, adapter, split, compiled kernels."""

    config: HeroConfig
    adapter: BlockAdapter
    num_layers: int
    split: int

    def __post_init__(self) -> None:
        self.kernels = {name: self.compiled(kernel) if self.config.compile else kernel
                        for name, kernel in KERNELS.items()}

    def compiled(self, function: Any) -> Any:
        return torch.compile(function, dynamic=False, backend=self.config.compile_backend)

    def run_full(self, hook: ModelHook, state: HeroState, args: tuple, kwargs: dict[str, Any]
                 ) -> Any:
        """The block's own forward: compiled when asked (blocks of one class share the compiled
        code), eager while the FLOP counter watches (fused kernels would hide operations)."""
        if not self.config.compile or state.counting:
            return hook.fn_ref.original_forward(*args, **kwargs)
        if hook.compiled_forward is None:
            hook.compiled_forward = self.compiled(hook.fn_ref.original_forward)
        return hook.compiled_forward(*args, **kwargs)

    def kernel(self, name: str, state: HeroState) -> Any:
        """HERO's own block function ``name``: compiled when asked, eager while counting."""
        return KERNELS[name] if state.counting else self.kernels[name]


def _partial_block(adapter: BlockAdapter, block: nn.Module, inputs: BlockInputs,
                   index: torch.Tensor, residual: torch.Tensor, key_value: KeyValue | None,
                   backend: str, track_rate: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None, KeyValue, RateSample | None]:
    """A shallow block on a PARTIAL step: refreshed tokens recomputed, others reuse ``residual``
    (brought up to date in place, like ``key_value`` when given).

    Returns the block's video and condition outputs, the keys/values it attended, and with
    ``track_rate`` the refreshed tokens' old and new residuals (for rate-of-change tracking).
    """
    part = adapter.partial_forward(block, inputs, index, key_value, backend)
    rate = (gather_tokens(residual, index), part.residual) if track_rate else None
    hidden = reuse_residuals(inputs.hidden, residual, index, part)
    return hidden, part.encoder, part.key_value, rate


def _keyed_full_block(adapter: BlockAdapter, block: nn.Module, inputs: BlockInputs, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, KeyValue]:
    """A shallow block on a FULL step in ``cached_kv`` mode: every token through HERO's block
    function, which also hands back the keys/values. Returns outputs, residual, keys/values."""
    part = adapter.partial_forward(block, inputs, None, None, backend)
    return part.hidden, part.encoder, part.residual, part.key_value


KERNELS = {kernel.__name__: kernel for kernel in (_partial_block, _keyed_full_block)}


class HeroRootHook(ModelHook):
    """On the transformer: step bookkeeping, resets, token selection, FLOP counting, statistics."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, runtime: HeroRuntime) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.runtime = runtime
        self.flop_table: dict[tuple, int] = {}

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        runtime, config = self.runtime, self.runtime.config
        context = self.state_manager.context
        state: HeroState = self.state_manager.get_state()
        inputs = bind_model_inputs(module, args, kwargs)
        grid = runtime.adapter.token_grid(module, inputs)
        signature = (grid, input_signature(inputs))
        position = state.clock.advance(context, signature, config.num_inference_steps)
        if position.num_steps is None:
            raise ValueError(f"HERO needs the step count: call the transformer under cache_context("
                             f"{context.name!r}, step_index=i, num_inference_steps=S) or set "
                             "HeroConfig.num_inference_steps")
        if position.new_generation:
            state.start_generation()
        step = position.step
        mode = step_mode(step, position.num_steps, config) if state.ready else StepMode.FULL
        batch = int(inputs["hidden_states"].shape[0])
        self._begin_step(state, step, mode, grid, batch, inputs["hidden_states"].device)
        key = (signature, mode)
        state.counting = config.count_flops and key not in self.flop_table
        if state.counting:
            try:
                with FlopCounterMode(display=False) as counter:
                    output = self.fn_ref.original_forward(*args, **kwargs)
            finally:
                state.counting = False
            self.flop_table[key] = counter.get_total_flops()
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
        self._end_step(state, signature, grid, batch)
        return output

    def _begin_step(self, state: HeroState, step: int, mode: StepMode, grid: tuple[int, int, int],
                    batch: int, device: torch.device) -> None:
        config = self.runtime.config
        if state.tracker is None:
            layout = build_layout(grid, config.patch_size, config.tokens_per_patch, device)
            state.tracker = RefreshTracker(layout, batch, device, config.rate_weight,
                                           config.rate_momentum)
        state.step, state.mode = step, mode
        state.index = state.tracker.select() if mode is StepMode.PARTIAL else None

    def _end_step(self, state: HeroState, signature: tuple, grid: tuple[int, int, int],
                  batch: int) -> None:
        runtime = self.runtime
        full = state.mode is StepMode.FULL
        tokens = grid[0] * grid[1] * grid[2]
        refreshed = tokens if full else state.tracker.layout.num_refreshed
        computed_blocks = runtime.num_layers if full else runtime.split
        state.stats.record(full, batch * tokens * runtime.num_layers,
                           batch * refreshed * computed_blocks,
                           self.flop_table.get((signature, state.mode)),
                           self.flop_table.get((signature, StepMode.FULL)))
        state.tracker.advance(None if full else state.index)
        state.index = None
        state.ready = True

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module

    def stats(self) -> dict[str, Any]:
        runtime = self.runtime
        per_context = {name: (state.stats, state.nbytes)
                       for name, state in self.state_manager._state_cache.items()}
        summary = summarize(per_context)
        summary.update(num_layers=runtime.num_layers, split=runtime.split,
                       model_family=runtime.adapter.name, config=runtime.config.to_dict())
        return summary


class HeroShallowBlockHook(ModelHook):
    """Shallow block ``i < k``: cache per-token residuals on FULL, patch-wise refresh on PARTIAL."""

    def __init__(self, state_manager: StateManager, runtime: HeroRuntime, index: int) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.runtime = runtime
        self.block_index = index
        self.compiled_forward: Any = None
        self.tracks_rate = index == runtime.split - 1 and runtime.config.rate_weight > 0

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: HeroState = self.state_manager.get_state()
        adapter = self.runtime.adapter
        inputs = adapter.bind(args, kwargs)
        config = self.runtime.config
        if state.mode is StepMode.FULL:
            if config.kv_mode == "cached_kv":
                return self._full_with_key_values(module, state, inputs)
            output = self.runtime.run_full(self, state, args, kwargs)
            hidden, _ = adapter.split_output(output)
            self._store_full_residual(state, hidden - inputs.hidden)
            return output
        i = self.block_index
        hidden, encoder, key_value, rate = self.runtime.kernel("_partial_block", state)(
            adapter, module, inputs, state.index, state.shallow_residuals[i],
            state.key_values.get(i), config.attention_backend, self.tracks_rate)
        if config.kv_mode == "cached_kv":
            state.key_values[i] = key_value
        if rate is not None:
            state.tracker.observe_change(state.index, *rate)
        return adapter.pack_output(hidden, encoder)

    def _store_full_residual(self, state: HeroState, residual: torch.Tensor) -> None:
        previous = state.shallow_residuals.get(self.block_index)
        if self.tracks_rate and previous is not None:
            state.tracker.observe_change(None, previous, residual)
        state.shallow_residuals[self.block_index] = residual

    def _full_with_key_values(self, module: nn.Module, state: HeroState, inputs: BlockInputs
                              ) -> Any:
        """A FULL step in ``cached_kv`` mode: HERO's block over all tokens, keeping keys/values."""
        hidden, encoder, residual, state.key_values[self.block_index] = self.runtime.kernel(
            "_keyed_full_block", state)(self.runtime.adapter, module, inputs,
                                        self.runtime.config.attention_backend)
        self._store_full_residual(state, residual)
        return self.runtime.adapter.pack_output(hidden, encoder)


class HeroDeepBlockHook(ModelHook):
    """Deep block ``i >= k``: record ``D = x_L - x_k`` on FULL; on PARTIAL the first deep block
    returns ``x_k + D̂`` and the others pass their input through."""

    def __init__(self, state_manager: StateManager, runtime: HeroRuntime, is_entry: bool,
                 is_exit: bool) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.runtime = runtime
        self.is_entry = is_entry
        self.is_exit = is_exit
        self.compiled_forward: Any = None

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: HeroState = self.state_manager.get_state()
        adapter = self.runtime.adapter
        inputs = adapter.bind(args, kwargs)
        encoder = inputs.encoder if adapter.returns_encoder else None
        if state.mode is StepMode.FULL:
            if self.is_entry:
                state.deep_input = (inputs.hidden, encoder)
            output = self.runtime.run_full(self, state, args, kwargs)
            if self.is_exit:
                hidden_out, encoder_out = adapter.split_output(output)
                hidden_in, encoder_in = state.deep_input
                residuals = (hidden_out - hidden_in,) if encoder_in is None else \
                    (hidden_out - hidden_in, encoder_out - encoder_in)
                state.deep_history.push(state.step, residuals)
                state.deep_input = None
            return output
        if not self.is_entry:
            return adapter.pack_output(inputs.hidden, encoder)
        residuals = state.deep_history.predict(state.step)
        hidden = inputs.hidden + residuals[0]
        if encoder is not None:
            encoder = encoder + residuals[1]
        return adapter.pack_output(hidden, encoder)




def root_hook(transformer: nn.Module) -> HeroRootHook | None:
    """The HERO root hook of ``transformer``, or None when HERO is not applied."""
    return find_hook(transformer, ROOT_HOOK)


def apply_hero(transformer: nn.Module, config: HeroConfig | None = None) -> None:
    """Accelerate ``transformer`` with HERO; calls must then run under ``cache_context``."""
    config = config or HeroConfig()
    if root_hook(transformer) is not None:
        raise ValueError("HERO is already applied to this transformer; call remove_hero first")
    adapter = adapter_for(transformer)
    blocks = adapter.blocks(transformer)
    num_layers = len(blocks)
    runtime = HeroRuntime(config, adapter, num_layers, config.resolve_split(num_layers))
    manager = StateManager(HeroState)
    block_hooks = [(block, SHALLOW_HOOK, HeroShallowBlockHook(manager, runtime, i))
                   if i < runtime.split else
                   (block, DEEP_HOOK, HeroDeepBlockHook(manager, runtime, i == runtime.split,
                                                        i == num_layers - 1))
                   for i, block in enumerate(blocks)]
    install_hooks(transformer, block_hooks, (ROOT_HOOK, HeroRootHook(manager, runtime)))


def remove_hero(transformer: nn.Module) -> None:
    """Remove HERO's hooks and state; the model's own ``forward`` methods are back as they were."""
    if root_hook(transformer) is not None:
        uninstall_hooks(transformer, HOOK_NAMES, adapter_for(transformer).blocks(transformer))


def reset_hero(transformer: nn.Module) -> None:
    """Forget every cache context's state (the next call starts a fresh generation)."""
    hook = root_hook(transformer)
    if hook is None:
        raise ValueError(f"HERO is not applied to this {type(transformer).__name__}")
    hook.reset_state(transformer)


def hero_stats(transformer: nn.Module) -> dict[str, Any]:
    """Statistics of the latest generation of every cache context of a HERO-accelerated model."""
    hook = root_hook(transformer)
    if hook is None:
        raise ValueError(f"HERO is not applied to this {type(transformer).__name__}")
    return hook.stats()

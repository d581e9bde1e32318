"""What the baseline caches share: their step schedule, a root hook that follows the denoising step
of every cache context, and per-context state that starts afresh with every generation.

The root hook sits on the transformer, reads the step from diffusers' ``cache_context`` (or counts
calls when the context lacks it), resets the context's state when a new generation starts or an
input shape changes, and tells the block hooks what to do on this call: run everything (``FULL``),
recompute some tokens (``PARTIAL``) or reuse every cached residual (``REUSE``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager
from torch import nn

from hero.cache.adapters import BlockAdapter, bind_model_inputs
from hero.cache.hooks import drop_empty_registries

FULL, PARTIAL, REUSE = "full", "partial", "reuse"


def is_full_step(step: int, num_steps: int | None, warmup_steps: int, interval: int,
                 final_full_steps: int) -> bool:
    """FULL during warm-up, on the last ``final_full_steps`` steps and every ``interval``-th step
    after warm-up; data-independent (the same rule as HERO's schedule)."""
    if step < warmup_steps:
        return True
    if num_steps is not None and step >= num_steps - final_full_steps:
        return True
    return (step - warmup_steps) % interval == interval - 1


class StepState(BaseState):
    """One cache context's step position, mode, caches and counters within one generation."""

    def __init__(self) -> None:
        self.signature: tuple | None = None
        self.counted_steps = 0
        self.start()

    def start(self) -> None:
        """Forget caches and counters: a new generation (or new shapes) begins."""
        self.step = -1
        self.mode = FULL
        self.grid: tuple[int, int, int] | None = None
        self.block_tokens_total = 0
        self.block_tokens_computed = 0
        self.clear_caches()

    def clear_caches(self) -> None:
        """Subclasses drop their cached tensors here."""

    def reset(self) -> None:
        self.__init__()

    def count(self, tokens_total: int, tokens_computed: int) -> None:
        self.block_tokens_total += tokens_total
        self.block_tokens_computed += tokens_computed

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds between calls (for cache-memory accounting)."""
        return []

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


class ContextStates(StateManager):
    """diffusers' per-context state store, with a read-only view of the contexts it holds."""

    def states(self) -> dict[str, StepState]:
        return dict(self._state_cache)


Plan = Callable[[int, "int | None"], str]


class StepRootHook(ModelHook):
    """On the transformer: step position, generation resets and the mode of every call."""

    _is_stateful = True

    def __init__(self, state_manager: ContextStates, adapter: BlockAdapter, plan: Plan,
                 num_inference_steps: int | None) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.adapter = adapter
        self.plan = plan
        self.num_inference_steps = num_inference_steps

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        context = self.state_manager.context
        state: StepState = self.state_manager.get_state()
        inputs = bind_model_inputs(module, args, kwargs)
        signature = _signature(inputs)
        num_steps = context.num_inference_steps or self.num_inference_steps
        step = _step_index(context, state, signature, num_steps)
        fresh = signature != state.signature or step <= state.step
        if fresh:
            state.signature = signature
            state.start()
        state.grid = self.adapter.token_grid(module, inputs)
        state.mode = FULL if fresh else self.plan(step, num_steps)
        state.step = step
        return args, kwargs

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module


def _signature(inputs: dict[str, Any]) -> tuple:
    """Every tensor input's name, shape, dtype and device: caches are reusable only if all agree."""
    return tuple((name, tuple(value.shape), str(value.dtype), str(value.device))
                 for name, value in inputs.items() if isinstance(value, torch.Tensor))


def _step_index(context: CacheContext, state: StepState, signature: tuple,
                num_steps: int | None) -> int:
    """The context's step index, or the number of calls of this context so far when it has none."""
    if context.step_index is not None:
        return int(context.step_index)
    if signature != state.signature:
        state.counted_steps = 0
    step = state.counted_steps if num_steps is None else state.counted_steps % num_steps
    state.counted_steps = step + 1
    return step


def register(transformer: nn.Module, adapter: BlockAdapter, root: ModelHook, root_name: str,
             block_hooks: list[ModelHook], block_name: str) -> None:
    """Register ``root`` on the transformer and ``block_hooks[i]`` on block ``i``."""
    for block, hook in zip(adapter.blocks(transformer), block_hooks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, block_name)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(root, root_name)
    registry.invalidate_child_registries_cache()


def unregister(transformer: nn.Module, adapter: BlockAdapter, names: tuple[str, ...]) -> None:
    """Remove hooks ``names`` everywhere; modules left with no hook get their own forward back."""
    registry = transformer._diffusers_hook
    for name in names:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    drop_empty_registries([transformer, *adapter.blocks(transformer)])


def find_hook(transformer: nn.Module, name: str) -> ModelHook | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(name)


def summarize_states(states: dict[str, StepState]) -> dict[str, Any]:
    """JSON-safe totals of the latest generation over contexts, and each context's own numbers."""
    def describe(total: int, computed: int, nbytes: int) -> dict[str, Any]:
        skipped = 1.0 - computed / total if total else 0.0
        return {"skipped_block_token_fraction": skipped, "cache_bytes": int(nbytes)}

    contexts = {name: describe(s.block_tokens_total, s.block_tokens_computed, s.nbytes)
                for name, s in states.items()}
    summary = describe(sum(s.block_tokens_total for s in states.values()),
                       sum(s.block_tokens_computed for s in states.values()),
                       sum(s.nbytes for s in states.values()))
    summary["contexts"] = contexts
    return summary

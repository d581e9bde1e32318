"""What the baseline caches share: their step schedule, a root hook that follows the denoising step
of every cache context, per-context state that starts afresh with every generation, and one
install / remove / statistics path.

The root hook sits on the transformer, takes the step from :class:`~hero.cache.hooking.StepClock`
(the cache context's step index, or counted calls), resets the context's state when a new
generation starts or an input shape changes, and tells the block hooks what to do on this call:
run everything (``FULL``), recompute some tokens (``PARTIAL``) or reuse every cached residual
(``REUSE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from torch import nn

from hero.cache.adapters import BlockAdapter, adapter_for, bind_model_inputs
from hero.cache.hooking import StepClock, find_hook, input_signature, install_hooks, uninstall_hooks

FULL, PARTIAL, REUSE = "full", "partial", "reuse"


def is_full_step(step: int, num_steps: int | None, warmup_steps: int, interval: int,
                 final_full_steps: int) -> bool:
    """FULL during warm-up, on the last ``final_full_steps`` steps and every ``interval``-th step
    after warm-up; data-independent (the same rule as HERO's static schedule)."""
    if step < warmup_steps:
        return True
    if num_steps is not None and step >= num_steps - final_full_steps:
        return True
    return (step - warmup_steps) % interval == interval - 1


class StepState(BaseState):
    """One cache context's step position, mode, caches and counters within one generation."""

    def __init__(self) -> None:
        self.clock = StepClock()
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


class BaselineConfig(Protocol):
    """What every baseline config offers the shared root hook."""

    num_inference_steps: int | None

    def mode(self, step: int, num_steps: int | None) -> str: ...


class StepRootHook(ModelHook):
    """On the transformer: step position, generation resets and the mode of every call."""

    _is_stateful = True

    def __init__(self, state_manager: ContextStates, adapter: BlockAdapter,
                 config: BaselineConfig) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.adapter = adapter
        self.config = config

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        context = self.state_manager.context
        state: StepState = self.state_manager.get_state()
        inputs = bind_model_inputs(module, args, kwargs)
        position = state.clock.advance(context, input_signature(inputs),
                                       self.config.num_inference_steps)
        if position.new_generation:
            state.start()
        state.grid = self.adapter.token_grid(module, inputs)
        state.mode = FULL if position.new_generation else \
            self.config.mode(position.step, position.num_steps)
        state.step = position.step
        return args, kwargs

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module


BlockHookFactory = Callable[[ContextStates, BlockAdapter, Any, int], ModelHook]


@dataclass(frozen=True)
class Baseline:
    """How one baseline installs: its name (for messages), hook names, per-context state class and
    the factory of its block hooks ``(state_manager, adapter, config, block_index) -> hook``."""

    name: str
    root_hook: str
    block_hook: str
    state_class: type[StepState]
    make_block_hook: BlockHookFactory

    def apply(self, transformer: nn.Module, config: BaselineConfig) -> None:
        """Install the baseline; calls must then run under ``cache_context``."""
        if find_hook(transformer, self.root_hook) is not None:
            raise ValueError(f"{self.name} is already applied to this transformer; remove it first")
        adapter = adapter_for(transformer)
        manager = ContextStates(self.state_class)
        blocks = adapter.blocks(transformer)
        install_hooks(transformer,
                      [(block, self.block_hook, self.make_block_hook(manager, adapter, config, i))
                       for i, block in enumerate(blocks)],
                      (self.root_hook, StepRootHook(manager, adapter, config)))

    def remove(self, transformer: nn.Module) -> None:
        """Remove the hooks and state; the model's own ``forward`` methods are back as they were."""
        if find_hook(transformer, self.root_hook) is not None:
            uninstall_hooks(transformer, (self.root_hook, self.block_hook),
                            adapter_for(transformer).blocks(transformer))

    def stats(self, transformer: nn.Module) -> dict[str, Any]:
        """Skipped block-token fraction and cache bytes of the latest generation, per context and
        in total."""
        hook = find_hook(transformer, self.root_hook)
        if hook is None:
            raise ValueError(f"{self.name} is not applied to this {type(transformer).__name__}")
        return summarize_states(hook.state_manager.states())


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

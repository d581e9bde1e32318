"""FORA-style whole-block reuse (Selvaraju et al., 2024), as diffusers hooks.

Every ``interval`` steps (after ``warmup_steps``, and on the last ``final_full_steps``) every block
runs and each block's output residual ``out - in`` is cached, for the video tokens and the condition
tokens the block updates; on the other steps every block returns its input plus that cached
residual, so attention and feed-forward cost nothing. No token is ever recomputed in between: this
is the static, everything-or-nothing end of the feature-caching spectrum that HERO refines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from torch import nn

from hero.baselines.common import FULL, REUSE, Baseline, ContextStates, StepState, is_full_step
from hero.cache.adapters import BlockAdapter


@dataclass
class ForaConfig:
    """FORA's schedule: recompute every block on FULL steps, reuse every block's residual otherwise.

    Step ``s`` of ``S`` is FULL when ``s < warmup_steps``, ``s >= S - final_full_steps`` or
    ``(s - warmup_steps) % interval == interval - 1``; ``interval=1`` recomputes everything (the
    model is unchanged). FORA's paper uses ``interval`` 2-3 with one warm-up step and no final step.
    ``num_inference_steps`` is used only when ``cache_context`` does not carry the step count.
    """

    interval: int = 3
    warmup_steps: int = 1
    final_full_steps: int = 0
    num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("interval", 1), ("warmup_steps", 1), ("final_full_steps", 0)):
            if int(getattr(self, name)) < low:
                raise ValueError(f"ForaConfig.{name}={getattr(self, name)!r} must be >= {low}")

    def mode(self, step: int, num_steps: int | None) -> str:
        full = is_full_step(step, num_steps, self.warmup_steps, self.interval, self.final_full_steps)
        return FULL if full else REUSE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FORA_PRESETS: dict[str, dict[str, Any]] = {
    "fora": dict(interval=2),  # every other step reused: ~0.5 of full compute
    "fora-n3": dict(interval=3),  # two of every three steps reused: ~0.35 of full compute
}


class ForaState(StepState):
    """Per context: each block's cached residuals (video, condition tokens)."""

    def clear_caches(self) -> None:
        self.residuals: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.residuals.values() for t in pair if t is not None]


class ForaBlockHook(ModelHook):
    """Block ``index``: run and cache its residual on FULL steps, add the cached residual otherwise."""

    def __init__(self, state_manager: ContextStates, adapter: BlockAdapter, config: ForaConfig,
                 index: int) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.adapter = adapter
        self.index = index

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: ForaState = self.state_manager.get_state()
        inputs = self.adapter.bind(args, kwargs)
        tokens = inputs.hidden.shape[0] * inputs.hidden.shape[1]
        cached = state.residuals.get(self.index)
        if state.mode == REUSE and cached is not None:
            state.count(tokens, 0)
            encoder = None if cached[1] is None else inputs.encoder + cached[1]
            return self.adapter.pack_output(inputs.hidden + cached[0], encoder)
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden, encoder = self.adapter.split_output(output)
        state.residuals[self.index] = (
            hidden - inputs.hidden, None if encoder is None else encoder - inputs.encoder)
        state.count(tokens, tokens)
        return output


FORA = Baseline("FORA", "fora_root", "fora_block", ForaState, ForaBlockHook)


def apply_fora(transformer: nn.Module, config: ForaConfig | None = None) -> None:
    """Accelerate ``transformer`` with FORA; calls must then run under ``cache_context``."""
    FORA.apply(transformer, config or ForaConfig())


def remove_fora(transformer: nn.Module) -> None:
    """Remove FORA's hooks and state; the model's own ``forward`` methods are back as they were."""
    FORA.remove(transformer)


def fora_stats(transformer: nn.Module) -> dict[str, Any]:
    """Skipped block-token fraction and cache bytes of the latest generation, per context and total."""
    return FORA.stats(transformer)

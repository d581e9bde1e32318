"""diffusers' MagCache, calibrating itself on the first generation when it has no ratios.

MagCache skips steps while the accumulated error predicted by per-step magnitude ratios stays
small; the ratios come from ``mag_ratios``, a ``calibration_path`` JSON, or a calibration run: the
first generation is computed in full while two hooks record, per step, the mean over tokens of
``|R(s)| / |R(s-1)|`` (``R`` the residual of the whole block stack), and MagCache takes over from
the next generation (writing the ratios to ``calibration_path`` when given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import MagCacheConfig
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
from torch import nn

from hero.accelerators.base import AcceleratorSpec
from hero.accelerators.diffusers_caches import CallTracker, DiffusersCacheAccelerator
from hero.cache.adapters import BlockAdapter
from hero.cache.hooking import install_hooks, uninstall_hooks

_HEAD_HOOK = "magcache_calibration_head"
_TAIL_HOOK = "magcache_calibration_tail"


class _MagRatioState(BaseState):
    def __init__(self) -> None:
        self.head_input: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        self.ratios: list[float] = []

    def reset(self) -> None:
        self.__init__()


class _MagRatioHook(ModelHook):
    """Calibration for MagCache: per step, the mean over tokens of ``|R(s)| / |R(s-1)|`` with ``R``
    the residual of the whole block stack (last block's output minus first block's input).

    Stateful (so it is told the cache context), but a pipeline's end-of-call reset leaves the
    recording alone: the accelerator reads it when the next generation starts, then clears it.
    """

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
        return module


class MagCacheAccelerator(DiffusersCacheAccelerator):
    """MagCache, calibrating itself on the first generation when it has no ratios."""

    def __init__(self, name: str, model: nn.Module | Any, options: dict[str, Any]) -> None:
        self.calibration_path = options.get("calibration_path")
        self.ratios = load_mag_ratios(options)
        self.ratio_state = StateManager(_MagRatioState)
        super().__init__(name, model, options, magcache_config)

    @property
    def calibrating(self) -> bool:
        return self.ratios is None

    def _enable(self) -> None:
        if not self.calibrating:
            self.cache_config = magcache_config(self.adapter, self.transformer,
                                                {**self.options, "mag_ratios": self.ratios},
                                                self.tracker)
            self.transformer.enable_cache(self.cache_config)
            return
        blocks = self.adapter.blocks(self.transformer)
        install_hooks(self.transformer, [
            (blocks[0], _HEAD_HOOK, _MagRatioHook(self.ratio_state, self.adapter, True)),
            (blocks[-1], _TAIL_HOOK, _MagRatioHook(self.ratio_state, self.adapter, False))])

    def _disable(self) -> None:
        if not self.calibrating:
            self.transformer.disable_cache()
            return
        blocks = self.adapter.blocks(self.transformer)
        uninstall_hooks(self.transformer, (_HEAD_HOOK, _TAIL_HOOK), [blocks[0], blocks[-1]])
        self.ratio_state.reset()

    def _reset_caches(self) -> None:
        if self.calibrating:
            self._finish_calibration()
        super()._reset_caches()

    def _finish_calibration(self) -> None:
        """Once a whole generation was recorded: keep its ratios and switch to MagCache."""
        recorded = [state.ratios for state in self.ratio_state._state_cache.values()
                    if state.ratios]
        if not recorded or len(recorded[0]) < (self.tracker.num_steps or 2):
            self.ratio_state.reset()
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


def load_mag_ratios(options: dict[str, Any]) -> list[float] | None:
    """Ratios from the ``mag_ratios`` option or the ``calibration_path`` JSON (None: neither)."""
    if options.get("mag_ratios") is not None:
        return [float(r) for r in options["mag_ratios"]]
    path = options.get("calibration_path")
    if path and Path(path).exists():
        data = json.loads(Path(path).read_text())
        if "mag_ratios" not in data:
            raise ValueError(f"magcache: calibration file {path} has no 'mag_ratios'")
        return [float(r) for r in data["mag_ratios"]]
    return None


def magcache_config(adapter: BlockAdapter, transformer: nn.Module, options: dict[str, Any],
                    tracker: CallTracker) -> MagCacheConfig | None:
    ratios = options.get("mag_ratios")
    if ratios is None:
        return None
    return MagCacheConfig(threshold=float(options["threshold"]),
                          max_skip_steps=options["max_skip_steps"],
                          retention_ratio=float(options["retention_ratio"]),
                          num_inference_steps=options["num_inference_steps"] or len(ratios),
                          mag_ratios=list(ratios))


MAGCACHE = AcceleratorSpec(
    "MagCache: skip steps while the accumulated residual-magnitude error stays under 0.06 (at "
    "most 3 in a row, first 20% never); calibrates itself on the first generation without ratios",
    dict(threshold=0.06, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=None,
         mag_ratios=None, calibration_path=None),
    lambda name, model, options: MagCacheAccelerator(name, model, options))

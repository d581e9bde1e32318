"""HERO as diffusers hooks: ``apply_hero`` / ``remove_hero`` on a video diffusion transformer, or on
a pipeline that holds one (``pipe.transformer`` with ``pipe.scheduler``).

A root hook on the transformer places every call in its generation (:class:`StepClock`), decides
FULL or PARTIAL (:class:`~hero.cache.schedule.Schedule`: a data-independent rule, optionally
checked by the drift the previous PARTIAL step measured), resets stale state, picks the tokens to
refresh and keeps the statistics. A hook on every block plays the block's role for the current
split: shallow blocks cache per-token residuals (and keys/values) on FULL steps and, on PARTIAL
steps, run the block on the refreshed tokens only and forecast the rest. Deep blocks record on
FULL steps what their forecast needs (each block's sub-layer outputs before their gates, or the
stack's input and residual); on PARTIAL steps the first deep block returns its input plus the
forecast (the features times the gates of this step, or the residual) and the others pass it
on. One state per cache context (``"cond"`` / ``"uncond"``) lives in a diffusers
``StateManager``; caches keep the batch axis, so batched CFG rows stay apart too. With
``split="auto"`` a generation whose shape has no calibration yet runs in full while the probe
records, and the split it picks holds from the next generation on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import BaseState, CacheContext, ModelHook, StateManager
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hero.cache.adapters import (BlockAdapter, BlockInputs, KeyValue, Selection, adapter_for,
                                 bind_model_inputs, call_timestep, gather_tokens, reuse_residuals,
                                 write_tokens_)
from hero.cache.calibration import calibration_file, load_calibration, model_fingerprint
from hero.cache.config import HeroConfig
from hero.cache.extrapolate import PolynomialForecast
from hero.cache.hooking import StepClock, find_hook, input_signature, install_hooks, uninstall_hooks
from hero.cache.probe import (MIN_PROBE_STEPS, CouplingRecorder, calibration_record, choose_split,
                              save_calibration)
from hero.cache.refresh import RefreshTracker, build_layout
from hero.cache.schedule import Schedule, StepMode
from hero.cache.stats import GenerationStats, summarize

logger = logging.getLogger(__name__)

ROOT_HOOK = "hero_root"
BLOCK_HOOK = "hero_block"
HOOK_NAMES = (ROOT_HOOK, BLOCK_HOOK)


class ShallowCache:
    """One shallow block's per-token residual (latest computed value), keys/values
    (``cached_kv``) and, for first-order forecasts, the residual's slope per unit of position."""

    def __init__(self, residual: torch.Tensor) -> None:
        self.residual = residual
        self.key_value: KeyValue | None = None
        self.slope: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.residual, self.slope, *(self.key_value or ())) if t is not None]


class HeroState(BaseState):
    """Everything one cache context remembers within one generation."""

    def __init__(self) -> None:
        self.clock = StepClock()
        self.start_generation(None)

    def start_generation(self, split: int | None) -> None:
        """Forget every cached tensor and counter: a new generation (or new shapes) begins."""
        self.split = split
        self.recorder: CouplingRecorder | None = None
        self.calibration_path: str | None = None
        self.step = -1
        self.num_steps = 0
        self.position: torch.Tensor | None = None
        self.mode = StepMode.FULL
        self.last_full = -1
        self.counting = False
        self.tracker: RefreshTracker | None = None
        self.selection: Selection | None = None
        self.computed_at: torch.Tensor | None = None
        self.shallow: dict[int, ShallowCache] = {}
        self.deep_input: torch.Tensor | None = None
        self.deep_forecast: PolynomialForecast | None = None
        self.drift_error: torch.Tensor | None = None
        self.drift_norm: torch.Tensor | None = None
        self.drift: torch.Tensor | None = None
        self.stats = GenerationStats()

    def reset(self) -> None:
        self.__init__()

    @property
    def nbytes(self) -> int:
        tensors = [t for cache in self.shallow.values() for t in cache.tensors()]
        if self.computed_at is not None:
            tensors.append(self.computed_at)
        total = sum(t.nbytes for t in tensors)
        total += self.deep_forecast.nbytes if self.deep_forecast is not None else 0
        return total + (self.tracker.nbytes if self.tracker is not None else 0)


@dataclass
class HeroRuntime:
    """What every HERO hook of one model shares: config, adapter, blocks, the split (None while
    ``"auto"`` has not resolved it for a shape), the step source and compiled kernels."""

    config: HeroConfig
    adapter: BlockAdapter
    blocks: nn.ModuleList
    split: int | None
    scheduler: Any = None

    def __post_init__(self) -> None:
        self.num_layers = len(self.blocks)
        self.kernels = {name: self.compiled(kernel) if self.config.compile else kernel
                        for name, kernel in KERNELS.items()}
        self.splits: dict[str, int] = {}
        self.fingerprint: str | None = None
        self.stacked_gates: tuple[int, Any] | None = None
        self.order_lowered = False
        path = self.config.calibration_path
        if self.split is None and path is not None and Path(path).exists():
            self.splits[path] = int(load_calibration(path, self.num_layers)["split"])

    def compiled(self, function: Any) -> Any:
        return torch.compile(function, dynamic=False, backend=self.config.compile_backend)

    def run_full(self, hook: HeroBlockHook, state: HeroState, args: tuple,
                 kwargs: dict[str, Any]) -> Any:
        """The block's own forward: compiled when asked (blocks of one class share the compiled
        code), eager while the FLOP counter watches (fused kernels would hide operations)."""
        if not self.config.compile or state.counting:
            return hook.fn_ref.original_forward(*args, **kwargs)
        if hook.compiled_forward is None:
            hook.compiled_forward = self.compiled(hook.fn_ref.original_forward)
        return hook.compiled_forward(*args, **kwargs)

    def deep_gates(self, split: int, temb: torch.Tensor) -> list[torch.Tensor | None]:
        """Every deep block's feature gates at this step, in the forecast's slot order. Where the
        family's gates are rows of a linear map of ``silu(temb)``, one matmul over the rows stacked
        (once per generation, so weights changed between generations are seen; the copy is a
        sixth of the modulation weights of the deep blocks)."""
        blocks = self.blocks[split:]
        if self.stacked_gates is None or self.stacked_gates[0] != split:
            self.stacked_gates = (split, _stack_gate_rows(self.adapter, blocks))
        stacked = self.stacked_gates[1]
        if stacked is None:
            return [gate for block in blocks for gate in self.adapter.feature_gates(block, temb)]
        weight, bias, count = stacked
        gates = F.linear(F.silu(temb), weight, bias)
        return list(gates.view(gates.shape[0], count, 1, -1).unbind(1))

    def kernel(self, name: str, state: HeroState) -> Any:
        """HERO's own block function ``name``: compiled when asked, eager while counting."""
        return KERNELS[name] if state.counting else self.kernels[name]

    def default_steps(self) -> int | None:
        """The step count when the cache context lacks it: the pipeline scheduler's, else the
        config's."""
        steps = getattr(self.scheduler, "num_inference_steps", None)
        return steps or self.config.num_inference_steps

    def split_for(self, transformer: nn.Module, grid: tuple[int, int, int], text: int,
                  num_steps: int) -> tuple[int | None, str | None]:
        """The split of a generation, and where a calibration for it must be written when there
        is none yet (``split="auto"``)."""
        if self.split is not None:
            return self.split, None
        if num_steps < MIN_PROBE_STEPS:
            # Too short to measure which blocks forecast well: the cheapest split, as choose_split
            # takes when the profile does not separate (nothing is calibrated or cached).
            return choose_split([1.0] * self.num_layers, self.min_shallow), None
        config = self.config
        if config.calibration_path is not None:
            path = config.calibration_path
        else:
            if self.fingerprint is None:
                self.fingerprint = model_fingerprint(transformer)
            path = str(calibration_file(self.fingerprint, grid, text, num_steps,
                                        config.calibration_dir))
        if path not in self.splits:
            try:
                record = load_calibration(path, self.num_layers)
            except FileNotFoundError:
                return None, path
            # a file the user named keeps its split; the cache's are re-cut by today's rule
            self.splits[path] = int(record["split"]) if config.calibration_path is not None \
                else choose_split(record["profile"], self.min_shallow)
        return max(self.splits[path], self.min_shallow), None

    @property
    def min_shallow(self) -> int:
        """The fewest shallow blocks: one when the schedule verifies itself (the refreshed tokens
        are its evidence), else none."""
        return 1 if self.config.verify_threshold is not None else 0


def _stack_gate_rows(adapter: BlockAdapter, blocks: nn.ModuleList
                     ) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """The feature gates of ``blocks`` as one linear map of ``silu(temb)``: weight, bias and the
    number of gates; None when the family's gates are not rows of such a map."""
    rows = [adapter.gate_rows(block) for block in blocks]
    if any(block_rows is None for block_rows in rows):
        return None
    rows = [row for block_rows in rows for row in block_rows]
    weight = torch.cat([w for w, _ in rows])
    bias = None if all(b is None for _, b in rows) else \
        torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in rows])
    return weight, bias, len(rows)


def _partial_block(adapter: BlockAdapter, block: nn.Module, inputs: BlockInputs,
                   selection: Selection, residual: torch.Tensor, key_value: KeyValue | None,
                   forecast: torch.Tensor | None, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor | None, KeyValue, torch.Tensor,
                              torch.Tensor]:
    """A shallow block on a PARTIAL step: the selected tokens recomputed, the others take
    ``forecast`` (None: their cached ``residual``); ``residual`` and ``key_value`` are brought up
    to date in place.

    Returns the video and condition outputs, the keys/values attended, and the refreshed tokens'
    new residuals beside what was forecast for them (the drift the schedule checks, and the
    slope update of first-order forecasts).
    """
    part = adapter.partial_forward(block, inputs, selection, key_value, backend)
    predicted = gather_tokens(residual if forecast is None else forecast, selection)
    hidden = reuse_residuals(inputs.hidden, residual, selection, part, forecast)
    return hidden, part.encoder, part.key_value, part.residual, predicted


def _keyed_full_block(adapter: BlockAdapter, block: nn.Module, inputs: BlockInputs, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, KeyValue]:
    """A shallow block on a FULL step in ``cached_kv`` mode: every token through HERO's block
    function, which also hands back the keys/values. Returns outputs, residual, keys/values."""
    part = adapter.partial_forward(block, inputs, None, None, backend)
    return part.hidden, part.encoder, part.residual, part.key_value


def _featured_full_block(adapter: BlockAdapter, block: nn.Module, inputs: BlockInputs, backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """A deep block on a FULL step when its features are forecast: every token through HERO's
    block function, which also hands back the sub-layer outputs before their gates."""
    part = adapter.partial_forward(block, inputs, None, None, backend)
    return part.hidden, part.encoder, part.features


KERNELS = {kernel.__name__: kernel
           for kernel in (_partial_block, _keyed_full_block, _featured_full_block)}


class HeroRootHook(ModelHook):
    """On the transformer: step bookkeeping, resets, schedule, token selection, FLOP counting,
    statistics (the last finished generation's outlive a pipeline's end-of-call reset)."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, runtime: HeroRuntime) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.runtime = runtime
        self.schedule = Schedule(runtime.config)
        self.flop_table: dict[tuple, int] = {}
        self.finished: dict[str, Any] | None = None

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        runtime, config = self.runtime, self.runtime.config
        context = self.state_manager.context
        state: HeroState = self.state_manager.get_state()
        inputs = bind_model_inputs(module, args, kwargs)
        grid = runtime.adapter.token_grid(module, inputs)
        signature = (grid, input_signature(inputs))
        position = state.clock.advance(context, signature, runtime.default_steps())
        if position.num_steps is None:
            raise ValueError(f"HERO needs the step count: call the transformer under cache_context("
                             f"{context.name!r}, step_index=i, num_inference_steps=S), apply HERO "
                             "to the pipeline (apply_hero(pipe)) or set "
                             "HeroConfig.num_inference_steps")
        if position.new_generation:
            self._start_generation(module, state, grid, inputs, position.num_steps)
        mode = self._mode(state, position.step)
        self._begin_step(state, position.step, mode, grid, inputs, context)
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
        self._end_step(state, signature, grid, int(inputs["hidden_states"].shape[0]))
        return output

    def _start_generation(self, module: nn.Module, state: HeroState, grid: tuple[int, int, int],
                          inputs: dict[str, Any], num_steps: int) -> None:
        encoder = inputs.get("encoder_hidden_states")
        text = 0 if encoder is None else int(encoder.shape[1])
        split, calibrate_to = self.runtime.split_for(module, grid, text, num_steps)
        self.runtime.stacked_gates = None
        state.start_generation(split)
        state.num_steps = num_steps
        if calibrate_to is not None:
            state.recorder = CouplingRecorder(self.runtime.num_layers)
            state.calibration_path = calibrate_to
            state.stats.calibration = True

    def _mode(self, state: HeroState, step: int) -> StepMode:
        """FULL while calibrating or before any FULL step; else what the schedule says, told
        whether the last PARTIAL step's measured drift passed the threshold (one host sync)."""
        if state.recorder is not None or state.last_full < 0:
            return StepMode.FULL
        drifted = state.drift is not None and \
            float(state.drift) > self.runtime.config.verify_threshold
        state.drift = None
        return self.schedule.mode(step, state.num_steps, state.last_full, drifted)

    def _begin_step(self, state: HeroState, step: int, mode: StepMode, grid: tuple[int, int, int],
                    inputs: dict[str, Any], context: CacheContext) -> None:
        config = self.runtime.config
        hidden = inputs["hidden_states"]
        timestep = call_timestep(inputs) if config.positions == "timestep" else None
        state.position = timestep if timestep is not None else \
            torch.tensor(float(step), device=hidden.device)
        if state.recorder is not None:
            state.recorder.position = state.position
        if state.tracker is None:
            layout = build_layout(grid, config.patch_size, config.tokens_per_patch, hidden.device)
            state.tracker = RefreshTracker(layout, int(hidden.shape[0]), hidden.device)
        state.step, state.mode = step, mode
        state.selection = Selection(state.tracker.select()) if mode is StepMode.PARTIAL else None
        if mode is StepMode.PARTIAL and config.verify_threshold is not None:
            state.drift_error = torch.zeros(int(hidden.shape[0]), device=hidden.device)
            state.drift_norm = torch.zeros_like(state.drift_error)

    def _end_step(self, state: HeroState, signature: tuple, grid: tuple[int, int, int],
                  batch: int) -> None:
        runtime = self.runtime
        full = state.mode is StepMode.FULL
        tokens = grid[0] * grid[1] * grid[2]
        refreshed = tokens if full else state.tracker.layout.num_refreshed
        computed_blocks = runtime.num_layers if full else state.split
        state.stats.record(full, batch * tokens * runtime.num_layers,
                           batch * refreshed * computed_blocks,
                           self.flop_table.get((signature, state.mode)),
                           self.flop_table.get((signature, StepMode.FULL)))
        if state.drift_error is not None:
            state.drift = (state.drift_error / state.drift_norm.clamp_min(1e-12)).sqrt().max()
            state.drift_error = state.drift_norm = None
        index = None if full else state.selection.index
        state.tracker.advance(index)
        if state.computed_at is not None:
            _write_positions_(state.computed_at, state.selection, state.position)
        state.selection = None
        if full:
            state.last_full = state.step
        if state.recorder is not None and state.step == state.num_steps - 1:
            self._finish_calibration(state)

    def _finish_calibration(self, state: HeroState) -> None:
        """The calibration generation is complete: choose the split, save it, use it from now."""
        runtime = self.runtime
        profile = state.recorder.profiles()["forecast_error"]
        split = choose_split(profile, runtime.min_shallow)
        record = calibration_record(state.recorder, split, runtime.adapter.model_class_name,
                                    state.num_steps)
        save_calibration(state.calibration_path, record)
        runtime.splits[state.calibration_path] = state.split = split
        state.recorder = None

    def reset_state(self, module: nn.Module) -> nn.Module:
        if any(s.stats.full_steps for s in self.state_manager._state_cache.values()):
            self.finished = self.stats()
        self.state_manager.reset()
        return module

    def stats(self) -> dict[str, Any]:
        """The latest generation of every context, or, when none has run since the states were
        reset, the last finished one."""
        states = self.state_manager._state_cache
        if not any(s.stats.full_steps for s in states.values()) and self.finished is not None:
            return self.finished
        runtime = self.runtime
        summary = summarize({name: (state.stats, state.nbytes) for name, state in states.items()})
        splits = [state.split for state in states.values() if state.split is not None]
        summary.update(num_layers=runtime.num_layers,
                       split=splits[0] if splits else runtime.split,
                       model_family=runtime.adapter.name, config=runtime.config.to_dict())
        return summary


def _write_positions_(computed_at: torch.Tensor, selection: Selection | None,
                      position: torch.Tensor) -> None:
    """Every token (None) or the selected ones were computed at ``position``."""
    if selection is None:
        computed_at.copy_(position.expand_as(computed_at))
    else:
        write_tokens_(computed_at.unsqueeze(-1), selection,
                      position.expand(*selection.index.shape, 1).to(computed_at.dtype))


class HeroBlockHook(ModelHook):
    """Block ``index``: its role (shallow, deep entry, deep, deep exit) follows the state's split.

    Shallow ``i < k``: cache per-token residuals on FULL, patch-wise refresh on PARTIAL. Deep
    ``i >= k`` on FULL: each records its sub-layer features (``deep_forecast="features"``), or the
    first records ``x_k`` and the last ``D = x_L - x_k`` (``"residual"``); on PARTIAL the first
    returns ``x_k`` plus the forecast and the others pass their input through.
    """

    def __init__(self, state_manager: StateManager, runtime: HeroRuntime, index: int) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.runtime = runtime
        self.index = index
        self.compiled_forward: Any = None

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: HeroState = self.state_manager.get_state()
        if state.recorder is not None:
            return self._record(module, state, args, kwargs)
        if self.index < state.split:
            return self._shallow(module, state, args, kwargs)
        return self._deep(module, state, args, kwargs)

    def _record(self, module: nn.Module, state: HeroState, args: tuple, kwargs: dict[str, Any]
                ) -> Any:
        """Calibration: the block's own forward, its residual recorded for the probe."""
        hidden = self.runtime.adapter.bind(args, kwargs).hidden
        output = self.runtime.run_full(self, state, args, kwargs)
        state.recorder.observe(self.index, hidden, self.runtime.adapter.split_output(output)[0])
        return output

    # -------------------------------------------------------------------------------- shallow
    def _shallow(self, module: nn.Module, state: HeroState, args: tuple, kwargs: dict[str, Any]
                 ) -> Any:
        adapter, config = self.runtime.adapter, self.runtime.config
        inputs = adapter.bind(args, kwargs)
        if state.mode is StepMode.FULL:
            if config.kv_mode == "cached_kv":
                hidden, encoder, residual, key_value = self.runtime.kernel(
                    "_keyed_full_block", state)(adapter, module, inputs, config.attention_backend)
                self._store(state, residual).key_value = key_value
                return adapter.pack_output(hidden, encoder)
            output = self.runtime.run_full(self, state, args, kwargs)
            self._store(state, adapter.split_output(output)[0] - inputs.hidden)
            return output
        cache = state.shallow[self.index]
        forecast = self._forecast(state, cache)
        adapter.prepare(state.selection, inputs)
        hidden, encoder, key_value, fresh, predicted = self.runtime.kernel("_partial_block", state)(
            adapter, module, inputs, state.selection, cache.residual, cache.key_value, forecast,
            config.attention_backend)
        if cache.key_value is not None:
            cache.key_value = key_value
        self._observe(state, cache, fresh, predicted)
        return adapter.pack_output(hidden, encoder)

    def _store(self, state: HeroState, residual: torch.Tensor) -> ShallowCache:
        """A FULL step's residual of every token, and (first-order forecasts) its slope since
        each token's previous value."""
        previous = state.shallow.get(self.index)
        cache = state.shallow[self.index] = ShallowCache(residual)
        if previous is None:
            if self.runtime.config.shallow_forecast == "linear" and state.computed_at is None:
                state.computed_at = torch.empty(residual.shape[:2], device=residual.device)
            return cache
        if state.computed_at is not None:
            elapsed = (state.position - state.computed_at).unsqueeze(-1)
            cache.slope = (residual - previous.residual) / _nonzero(elapsed).to(residual.dtype)
        return cache

    def _forecast(self, state: HeroState, cache: ShallowCache) -> torch.Tensor | None:
        """The non-refreshed tokens' residuals at this step: None (reuse the cache) or the cache
        moved along its slope by the position elapsed since each token was computed."""
        if cache.slope is None:
            return None
        elapsed = (state.position - state.computed_at).unsqueeze(-1).to(cache.slope.dtype)
        return torch.addcmul(cache.residual, elapsed, cache.slope)

    def _observe(self, state: HeroState, cache: ShallowCache, fresh: torch.Tensor,
                 predicted: torch.Tensor) -> None:
        """What the refreshed tokens tell: the drift (forecast error) the schedule checks, and,
        for first-order forecasts, the slope since each one's previous value."""
        if state.drift_error is not None:
            state.drift_error += (fresh.float() - predicted.float()).square().sum(dim=(1, 2))
            state.drift_norm += fresh.float().square().sum(dim=(1, 2))
        if cache.slope is not None:  # (fresh - old) / elapsed = slope + forecast error / elapsed
            elapsed = gather_tokens((state.position - state.computed_at).unsqueeze(-1),
                                    state.selection)
            slope = gather_tokens(cache.slope, state.selection)
            write_tokens_(cache.slope, state.selection,
                          slope + (fresh - predicted) / _nonzero(elapsed).to(fresh.dtype))

    # ----------------------------------------------------------------------------------- deep
    def _deep(self, module: nn.Module, state: HeroState, args: tuple, kwargs: dict[str, Any]
              ) -> Any:
        adapter = self.runtime.adapter
        if state.mode is StepMode.FULL:
            if self.runtime.config.deep_forecast == "features":
                return self._record_features(module, state, adapter.bind(args, kwargs))
            return self._record_residual(state, args, kwargs)
        inputs = adapter.bind(args, kwargs)
        encoder = inputs.encoder if adapter.returns_encoder else None
        if self.index != state.split:
            return adapter.pack_output(inputs.hidden, encoder)
        return adapter.pack_output(self._forecast_deep(state, inputs), encoder)

    def _record_features(self, module: nn.Module, state: HeroState, inputs: BlockInputs) -> Any:
        """FULL step, features forecast: the block through HERO's block function, its sub-layer
        outputs before their gates kept."""
        hidden, encoder, features = self.runtime.kernel("_featured_full_block", state)(
            self.runtime.adapter, module, inputs, self.runtime.config.attention_backend)
        deep_blocks = self.runtime.num_layers - state.split
        forecast = self._deep_forecast(state, deep_blocks * len(features), features[0])
        if self.index == state.split:
            forecast.start(state.position)
        forecast.push(features, slot=(self.index - state.split) * len(features))
        return self.runtime.adapter.pack_output(hidden, encoder)

    def _record_residual(self, state: HeroState, args: tuple, kwargs: dict[str, Any]) -> Any:
        """FULL step, residual forecast: the first deep block keeps the stack's input, the last
        one the residual the stack added to it."""
        adapter = self.runtime.adapter
        if self.index == state.split:
            state.deep_input = adapter.bind(args, kwargs).hidden
        output = self.runtime.run_full(self, state, args, kwargs)
        if self.index == self.runtime.num_layers - 1:
            residual = adapter.split_output(output)[0] - state.deep_input
            forecast = self._deep_forecast(state, 1, residual)
            forecast.start(state.position)
            forecast.push([residual])
            state.deep_input = None
        return output

    def _deep_forecast(self, state: HeroState, slots: int, like: torch.Tensor
                       ) -> PolynomialForecast:
        """The deep stack's forecast of ``slots`` tensors shaped ``like`` (every deep block's
        features in block order, or the one residual), created on the first FULL step at the
        highest order the memory bound allows."""
        if state.deep_forecast is None:
            config = self.runtime.config
            order = config.affordable_order(slots * like.nbytes, free_device_bytes(like.device))
            if order < config.forecast_order and not self.runtime.order_lowered:
                self.runtime.order_lowered = True  # said once, not once per generation
                logger.warning("HERO: the deep forecast at order %d needs %.1f GiB, more than the "
                               "memory bound (max_cache_gib); this generation forecasts at order "
                               "%d", config.forecast_order,
                               (config.forecast_order + 1) * slots * like.nbytes / 2**30, order)
            state.deep_forecast = PolynomialForecast(order, slots)
            state.stats.forecast_order = order
        return state.deep_forecast

    def _forecast_deep(self, state: HeroState, inputs: BlockInputs) -> torch.Tensor:
        """PARTIAL step, first deep block: the stack's input plus what the deep blocks are
        forecast to add, with each block's gates at this step when features are forecast."""
        runtime = self.runtime
        gates = None if runtime.config.deep_forecast == "residual" else \
            runtime.deep_gates(state.split, inputs.temb)
        return state.deep_forecast.add_to_(inputs.hidden.clone(), state.position, gates)


def free_device_bytes(device: torch.device) -> int | None:
    """What a CUDA device can still hand out (free memory plus PyTorch's cached blocks), less a
    tenth for the activations still to come; None off CUDA (no bound)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(0.9 * (free + cached))


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zeros replaced by one (a token computed twice at one position has no slope)."""
    return torch.where(x == 0, torch.ones_like(x), x)


def root_hook(transformer: nn.Module) -> HeroRootHook | None:
    """The HERO root hook of ``transformer``, or None when HERO is not applied."""
    return find_hook(transformer, ROOT_HOOK)


def transformer_of(model: nn.Module | Any) -> tuple[nn.Module, Any]:
    """The transformer to hook and the scheduler that knows the step count: a pipeline (or a
    world model) gives both, a bare transformer only itself."""
    transformer = getattr(model, "transformer", None)
    if isinstance(transformer, nn.Module) and not isinstance(model, nn.Module):
        return transformer, getattr(model, "scheduler", None)
    return model, None


def apply_hero(model: nn.Module | Any, config: HeroConfig | None = None) -> None:
    """Accelerate a transformer, or the transformer of a pipeline (whose scheduler then gives the
    step count), with HERO (``config`` None: the default preset). Calls must run under
    ``cache_context``, as stock pipelines do."""
    config = config or HeroConfig.preset("default")
    transformer, scheduler = transformer_of(model)
    if root_hook(transformer) is not None:
        raise ValueError("HERO is already applied to this transformer; call remove_hero first")
    adapter = adapter_for(transformer)
    blocks = adapter.blocks(transformer)
    runtime = HeroRuntime(config, adapter, blocks, config.resolve_split(len(blocks)),
                          scheduler)
    manager = StateManager(HeroState)
    install_hooks(transformer,
                  [(block, BLOCK_HOOK, HeroBlockHook(manager, runtime, i))
                   for i, block in enumerate(blocks)],
                  (ROOT_HOOK, HeroRootHook(manager, runtime)))


def remove_hero(model: nn.Module | Any) -> None:
    """Remove HERO's hooks and state; the model's own ``forward`` methods are back as they were."""
    transformer, _ = transformer_of(model)
    if root_hook(transformer) is not None:
        uninstall_hooks(transformer, HOOK_NAMES, adapter_for(transformer).blocks(transformer))


def reset_hero(model: nn.Module | Any) -> None:
    """Forget every cache context's state (the next call starts a fresh generation)."""
    transformer, _ = transformer_of(model)
    hook = root_hook(transformer)
    if hook is None:
        raise ValueError(f"HERO is not applied to this {type(transformer).__name__}")
    hook.reset_state(transformer)


def hero_stats(model: nn.Module | Any) -> dict[str, Any]:
    """Statistics of the latest generation of every cache context of a HERO-accelerated model
    (after a stock pipeline's call, which resets the hooks at its end: that call's)."""
    transformer, _ = transformer_of(model)
    hook = root_hook(transformer)
    if hook is None:
        raise ValueError(f"HERO is not applied to this {type(transformer).__name__}")
    return hook.stats()

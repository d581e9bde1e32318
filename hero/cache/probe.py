"""Feature-coupling probe: how much each block's residual changes, and how well it is forecast.

From one run without acceleration it measures, per block ``i`` and step ``s``, over (a fixed
subsample of) the video tokens:

- the relative change ``|r_i(s) - r_i(s-1)| / |r_i(s-1)|`` of the block residual
  ``r_i = x_{i+1} - x_i`` (the paper's feature coupling);
- the relative error of forecasting ``r_i(s)`` linearly from the two steps before it, in timestep
  positions: ``|r_i(s) - r̂_i(s)| / |r_i(s)|``, which is what HERO's deep extrapolation pays.

The split ``k`` comes from the forecast error: shallow blocks are the leading ones that are forecast
worst. Metrics stay on the device until read (no sync per block). :class:`FeatureCouplingProbe`
hooks a model for an explicit run (:func:`run_probe` writes a calibration JSON and a PNG); HERO's
own ``split="auto"`` records with :class:`CouplingRecorder` during its first generation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from torch import nn

from hero.cache.adapters import BlockAdapter, adapter_for, bind_model_inputs, call_timestep
from hero.cache.hooking import install_hooks, uninstall_hooks

PROBE_HOOK = "hero_feature_coupling_probe"
PROBE_ROOT_HOOK = "hero_feature_coupling_probe_root"
METRIC = "mean relative error of forecasting the block residual linearly from the two steps before"
SEPARATION = 1.5  # shallow blocks must be forecast this many times worse than deep ones
MIN_PROBE_STEPS = 3  # a linear forecast needs two steps before the one it is checked against


class CouplingRecorder:
    """Per block: the residual change between steps and the error of its linear forecast."""

    def __init__(self, num_layers: int, max_tokens: int = 4096) -> None:
        self.max_tokens = max_tokens
        self.calls = 0
        self.position: torch.Tensor | None = None
        self.history: list[list[tuple[torch.Tensor, torch.Tensor]]] = \
            [[] for _ in range(num_layers)]
        self.changes: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.errors: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def observe(self, block: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        """Record block ``block``'s residual at the current position (set by the caller)."""
        stride = max(1, math.ceil(hidden_in.shape[1] / self.max_tokens))
        residual = (hidden_out[:, ::stride] - hidden_in[:, ::stride]).float()
        history = self.history[block]
        if history and history[-1][1].shape != residual.shape:
            history.clear()
        if history:
            previous = history[-1][1]
            self.changes[block].append((residual - previous).norm() /
                                       previous.norm().clamp_min(1e-12))
        if len(history) == 2:
            (b, d_b), (a, d_a) = history
            forecast = d_a + (self.position - a) / (a - b) * (d_a - d_b)
            self.errors[block].append((residual - forecast).norm() /
                                      residual.norm().clamp_min(1e-12))
        self.history[block] = [*history[-1:], (self.position, residual)]

    def profiles(self) -> dict[str, list[float]]:
        """Per block, the mean change (``"change"``) and forecast error (``"forecast_error"``)."""
        if not any(self.errors):
            raise RuntimeError(f"the probe saw fewer than {MIN_PROBE_STEPS} steps; run a whole "
                               "generation first")
        return {"change": _means(self.changes), "forecast_error": _means(self.errors)}

    def per_step(self) -> list[list[float]]:
        """The forecast error per block (rows) and step (columns)."""
        return [[float(e) for e in errors] for errors in self.errors]


def _means(values: list[list[torch.Tensor]]) -> list[float]:
    return [float(torch.stack(v).mean()) if v else 0.0 for v in values]


class _ProbeState(BaseState):
    def __init__(self, num_layers: int, max_tokens: int) -> None:
        self.recorder = CouplingRecorder(num_layers, max_tokens)
        self.block_input: torch.Tensor | None = None

    def reset(self) -> None:
        self.__init__(len(self.recorder.history), self.recorder.max_tokens)


class _KeepRecording:
    """A probe hook's reset leaves the recording alone: a pipeline resets stateful hooks at the end
    of every call, and the probe is read after it."""

    def reset_state(self, module: nn.Module) -> nn.Module:
        return module


class _ProbeRootHook(_KeepRecording, ModelHook):
    """Sets each context's recorder to the call's position: its timestep (the call count when the
    model takes none)."""

    _is_stateful = True

    def __init__(self, state: StateManager) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        recorder: CouplingRecorder = self.state.get_state().recorder
        timestep = call_timestep(bind_model_inputs(module, args, kwargs))
        recorder.calls += 1
        recorder.position = torch.tensor(float(recorder.calls)) if timestep is None else timestep
        return args, kwargs


class _ProbeHook(_KeepRecording, ModelHook):
    _is_stateful = True

    def __init__(self, state: StateManager, adapter: BlockAdapter, index: int) -> None:
        super().__init__()
        self.state = state
        self.adapter = adapter
        self.index = index

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.state.get_state().block_input = self.adapter.bind(args, kwargs).hidden
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        state: _ProbeState = self.state.get_state()
        state.recorder.observe(self.index, state.block_input, self.adapter.split_output(output)[0])
        state.block_input = None
        return output


class FeatureCouplingProbe:
    """Hooks that record every block's residual change and forecast error until :meth:`remove`."""

    def __init__(self, transformer: nn.Module, max_tokens: int = 4096) -> None:
        self.transformer = transformer
        self.adapter = adapter_for(transformer)
        self.blocks = list(self.adapter.blocks(transformer))
        self.state = StateManager(_ProbeState, (len(self.blocks), max_tokens))
        install_hooks(transformer, [(block, PROBE_HOOK, _ProbeHook(self.state, self.adapter, i))
                                    for i, block in enumerate(self.blocks)],
                      (PROBE_ROOT_HOOK, _ProbeRootHook(self.state)))

    def recorder(self) -> CouplingRecorder:
        """The first cache context's recorder."""
        states = list(self.state._state_cache.values())
        if not states:
            raise RuntimeError("the probe saw no call; run a whole generation first")
        return states[0].recorder

    def remove(self) -> None:
        uninstall_hooks(self.transformer, (PROBE_ROOT_HOOK, PROBE_HOOK), self.blocks)


def choose_split(forecast_error: list[float], min_shallow: int = 0, min_deep: int = 1,
                 separation: float = SEPARATION) -> int:
    """The split ``k``: leading blocks forecast worst are shallow (refreshed), the rest deep.

    Two-segment least squares on ``log(error)``: ``k`` minimises the squared deviation of each part
    from its own mean, with at least one (and ``min_shallow``) shallow and ``min_deep`` deep
    blocks. Unless that cut separates the parts' (geometric) mean errors by ``separation`` or
    more, extrapolation serves every block about as well as it serves any, and the cheapest split,
    the smallest shallow part ``min_shallow``, is taken (a flat, noisy profile has some best cut
    anywhere; on toyworld v2's flat profile no shallow block at all measured best, and a verified
    schedule needs one, whose refreshed tokens are its evidence).
    """
    values = [math.log(max(v, 1e-12)) for v in forecast_error]
    num = len(values)
    candidates = range(max(1, min_shallow), num - max(1, min_deep) + 1)
    if not candidates:
        return min(num, min_shallow)

    def cost(k: int) -> float:
        return sum(_sse(part) for part in (values[:k], values[k:]))

    best = min(candidates, key=lambda k: (cost(k), k))
    shallow, deep = values[:best], values[best:]
    gap = sum(shallow) / len(shallow) - sum(deep) / len(deep)
    return best if gap >= math.log(separation) else min_shallow


def _sse(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values)


def calibration_record(recorder: CouplingRecorder, split: int, model: str, num_steps: int | None
                       ) -> dict[str, Any]:
    """What a calibration JSON holds: both per-block profiles, the per-step errors and ``k``."""
    profiles = recorder.profiles()
    return {"model": model, "num_layers": len(profiles["forecast_error"]), "split": int(split),
            "metric": METRIC, "profile": profiles["forecast_error"], "change": profiles["change"],
            "num_steps": num_steps, "per_step": recorder.per_step()}


def save_calibration(path: str | Path, record: dict[str, Any]) -> Path:
    """Write the calibration JSON that ``HeroConfig(split="auto", calibration_path=path)`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


def plot_profile(path: str | Path, profile: list[float], split: int, title: str = "",
                 ylabel: str = "residual forecast error (relative)") -> Path:
    """A PNG of the per-block profile with the chosen split marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=120)
    colors = ["tab:orange" if i < split else "tab:blue" for i in range(len(profile))]
    ax.bar(range(len(profile)), profile, color=colors)
    ax.axvline(split - 0.5, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"feature coupling: shallow [0, {split}) refresh, deep [{split}, "
                 f"{len(profile)}) extrapolate")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_probe(transformer: nn.Module, run: Callable[[], Any], out_dir: str | Path,
              max_tokens: int = 4096, min_shallow: int = 0, min_deep: int = 1) -> dict[str, Any]:
    """Probe one generation (``run()``) without acceleration, choose the split, save
    ``calibration.json`` and ``coupling.png`` under ``out_dir``; returns the calibration with the
    files' paths."""
    probe = FeatureCouplingProbe(transformer, max_tokens)
    try:
        run()
        recorder = probe.recorder()
    finally:
        probe.remove()
    profile = recorder.profiles()["forecast_error"]
    split = choose_split(profile, min_shallow, min_deep)
    out_dir = Path(out_dir)
    record = calibration_record(recorder, split, type(transformer).__name__,
                                len(recorder.per_step()[0]) + 2)
    calibration = save_calibration(out_dir / "calibration.json", record)
    plot = plot_profile(out_dir / "coupling.png", profile, split)
    return {**record, "calibration_path": str(calibration), "plot_path": str(plot)}

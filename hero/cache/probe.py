"""Feature-coupling probe: how much each block's residual changes from one step to the next.

From one FULL run (no accelerator) it measures, per block ``i`` and step ``s``, the relative change
``|r_i(s) - r_i(s-1)| / |r_i(s-1)|`` of the block residual ``r_i = x_{i+1} - x_i`` over (a fixed
subsample of) the video tokens, averages it over steps and cache contexts, picks the shallow/deep
split from that profile, and writes a calibration JSON (``HeroConfig(split="auto",
calibration_path=...)`` reads it) and a PNG plot of the profile.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from torch import nn

from hero.cache.adapters import BlockAdapter, adapter_for
from hero.cache.hooking import install_hooks, uninstall_hooks

PROBE_HOOK = "hero_feature_coupling_probe"


class _ProbeState(BaseState):
    """Per cache context: the previous residual of every block and the changes seen so far."""

    def __init__(self) -> None:
        self.previous: dict[int, torch.Tensor] = {}
        self.changes: dict[int, list[float]] = {}

    def reset(self) -> None:
        self.__init__()


class _ProbeHook(ModelHook):
    _is_stateful = True

    def __init__(self, state: StateManager, adapter: BlockAdapter, index: int, max_tokens: int
                 ) -> None:
        super().__init__()
        self.state = state
        self.adapter = adapter
        self.index = index
        self.max_tokens = max_tokens
        self.block_input: torch.Tensor | None = None

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.block_input = self.adapter.bind(args, kwargs).hidden
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        hidden = self.adapter.split_output(output)[0]
        stride = max(1, math.ceil(hidden.shape[1] / self.max_tokens))
        residual = (hidden[:, ::stride] - self.block_input[:, ::stride]).float()
        self.block_input = None
        state: _ProbeState = self.state.get_state()
        previous = state.previous.get(self.index)
        if previous is not None and previous.shape == residual.shape:
            change = (residual - previous).norm() / previous.norm().clamp_min(1e-12)
            state.changes.setdefault(self.index, []).append(float(change))
        state.previous[self.index] = residual
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.reset()
        return module


class FeatureCouplingProbe:
    """Hooks that record the per-block residual change of every call until :meth:`remove`."""

    def __init__(self, transformer: nn.Module, max_tokens: int = 4096) -> None:
        self.transformer = transformer
        self.adapter = adapter_for(transformer)
        self.state = StateManager(_ProbeState)
        self.blocks = list(self.adapter.blocks(transformer))
        install_hooks(transformer, [(block, PROBE_HOOK, _ProbeHook(self.state, self.adapter, i,
                                                                   max_tokens))
                                    for i, block in enumerate(self.blocks)])

    def profile(self) -> list[float]:
        """Mean relative residual change per block, over steps and cache contexts."""
        per_block: list[list[float]] = [[] for _ in self.blocks]
        for state in self.state._state_cache.values():
            for i, changes in state.changes.items():
                per_block[i].extend(changes)
        if not any(per_block):
            raise RuntimeError("the probe saw fewer than two steps; run a whole generation first")
        return [sum(c) / len(c) if c else 0.0 for c in per_block]

    def per_step(self) -> list[list[float]]:
        """Relative residual change per block (rows) and step transition (columns), first
        context."""
        states = list(self.state._state_cache.values())
        return [states[0].changes.get(i, []) for i in range(len(self.blocks))] if states else []

    def remove(self) -> None:
        uninstall_hooks(self.transformer, (PROBE_HOOK,), self.blocks)


def choose_split(profile: list[float], min_shallow: int = 1, min_deep: int = 1) -> int:
    """The split ``k`` that best cuts the profile into a variable shallow and a stable deep part.

    Two-segment least squares on ``log(change)``: ``k`` minimises the squared deviation of each part
    from its own mean, with at least ``min_shallow`` shallow and ``min_deep`` deep blocks. When the
    deep part is no more stable than the shallow one, no block is called deep (``k = L``).
    """
    values = [math.log(max(v, 1e-12)) for v in profile]
    num = len(values)
    candidates = range(max(1, min_shallow), num - max(1, min_deep) + 1)
    if not candidates:
        return num

    def cost(k: int) -> float:
        return sum(_sse(part) for part in (values[:k], values[k:]))

    best = min(candidates, key=lambda k: (cost(k), k))
    shallow, deep = values[:best], values[best:]
    return best if sum(deep) / len(deep) < sum(shallow) / len(shallow) else num


def _sse(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values)


def save_calibration(path: str | Path, profile: list[float], split: int, model: str,
                     num_steps: int | None = None, per_step: list[list[float]] | None = None
                     ) -> Path:
    """Write the calibration JSON that ``HeroConfig(split="auto", calibration_path=path)`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "model": model, "num_layers": len(profile), "split": int(split),
        "metric": "mean relative change of the block residual between consecutive steps",
        "profile": profile, "num_steps": num_steps, "per_step": per_step or [],
    }, indent=1))
    return path


def plot_profile(path: str | Path, profile: list[float], split: int, title: str = "") -> Path:
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
    ax.set_ylabel("relative residual change / step")
    ax.set_title(title or f"feature coupling: shallow [0, {split}) refresh, deep [{split}, "
                 f"{len(profile)}) extrapolate")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_probe(transformer: nn.Module, run: Callable[[], Any], out_dir: str | Path,
              max_tokens: int = 4096, min_shallow: int = 1, min_deep: int = 1) -> dict[str, Any]:
    """Probe one FULL generation (``run()``), choose the split, save ``calibration.json`` and
    ``coupling.png`` under ``out_dir``; returns the calibration with the files' paths."""
    probe = FeatureCouplingProbe(transformer, max_tokens)
    try:
        run()
        profile, per_step = probe.profile(), probe.per_step()
    finally:
        probe.remove()
    split = choose_split(profile, min_shallow, min_deep)
    out_dir = Path(out_dir)
    calibration = save_calibration(out_dir / "calibration.json", profile, split,
                                   type(transformer).__name__, len(per_step[0]) + 1 if per_step else
                                   None, per_step)
    plot = plot_profile(out_dir / "coupling.png", profile, split)
    return {"split": split, "profile": profile, "calibration_path": str(calibration),
            "plot_path": str(plot)}

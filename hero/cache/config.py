"""HERO's configuration: one validated dataclass, named presets, and the shallow/deep split rule."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

ATTENTION_BACKENDS = ("sdpa", "flash")
KV_MODES = ("recompute_kv", "cached_kv")
POSITIONS = ("timestep", "step")
SHALLOW_FORECASTS = ("reuse", "linear")
DEEP_FORECASTS = ("features", "residual")


@dataclass
class HeroConfig:
    """How HERO accelerates a diffusion transformer (DESIGN §3; ``docs/hero.md``).

    Schedule: step ``s`` of ``S`` is FULL when ``s < warmup_steps``, when
    ``s >= S - final_full_steps``, or when ``interval`` steps have passed since the last FULL step;
    otherwise it is PARTIAL. ``interval=1`` makes every step FULL (HERO then changes nothing). With
    ``verify_threshold`` the schedule also checks itself: on a PARTIAL step the refreshed shallow
    tokens measure how far the forecast features are from the truth (relative error, worst batch
    row) and, above the threshold, the next step runs FULL.

    Shallow blocks ``[0, k)`` refresh a fraction ``rho`` of the video tokens on PARTIAL steps: the
    T×H×W token grid is cut into ``patch_size`` patches and every patch refreshes
    ``rho * prod(patch_size)`` tokens (which must be a whole number), stalest first. The other
    tokens take their cached residual (``shallow_forecast="reuse"``) or extrapolate it to first
    order (``"linear"``). Condition (text) tokens are not recomputed on PARTIAL steps: their
    keys/values are those of the last FULL step, like those of the video tokens not refreshed
    (their outputs never reach the model's output); ``kv_mode="recompute_kv"``, which needs their
    current hidden states, recomputes them. Deep blocks ``[k, L)`` are skipped on PARTIAL steps
    and what they add is extrapolated from the last FULL steps by the polynomial of degree
    ``forecast_order`` through them (1: the line through the last two; 2: the parabola through the
    last three; 3: the cubic through the last four; :mod:`hero.cache.extrapolate`): with
    ``deep_forecast="features"`` every deep block's sub-layer outputs before their gates, which
    then take the gates of the step forecast (more cache: ``forecast_order + 1`` tensors per
    sub-layer of every deep block), with ``"residual"`` the deep stack's whole residual
    (``forecast_order + 1`` tensors). Forecasts run in ``positions``: the call's ``"timestep"``
    (non-uniform schedules are extrapolated along the curve they sample) or the ``"step"`` index.
    The field defaults are the paper's reconstruction; :data:`PRESETS` are what measurement
    picked. ``max_cache_gib`` bounds the deep forecast's memory: when ``forecast_order + 1``
    levels would not fit, the forecast takes the highest order that does (down to 1; the order
    used is in ``hero_stats``). None: on a CUDA device, what it has free when the forecast is first
    stored, less a tenth; elsewhere no bound.

    ``split`` is ``k``: an int, ``"auto"`` (the feature-coupling probe's choice from how well each
    block's residual is forecast: read from ``calibration_path``, or from the calibration cache in
    ``calibration_dir`` keyed by model and shape, and measured on the first generation when
    absent), or None (``round(L * shallow_fraction)``). ``kv_mode`` says where the keys/values of a
    partial shallow block come from: ``"cached_kv"`` (default) recomputes those of the refreshed
    tokens and reuses the cached ones for the rest; ``"recompute_kv"`` projects every token of the
    block input (exact attention for the refreshed queries, more FLOPs, less cache memory).
    ``attention_backend`` is the kernel of HERO's block function: ``"sdpa"`` (torch) or
    ``"flash"`` (flash-attn, CUDA, half precision).
    ``num_inference_steps`` is used only when neither the pipeline's ``cache_context`` nor its
    scheduler (``apply_hero(pipeline)``) give the step count. ``count_flops`` counts, with torch's
    FLOP counter, the first FULL and first PARTIAL call of each input shape; ``compile`` runs the
    block computations through ``torch.compile`` with ``compile_backend`` (static shapes, so no
    recompilation from step to step).
    """

    warmup_steps: int = 2
    final_full_steps: int = 1
    interval: int = 2
    rho: float = 0.25
    patch_size: tuple[int, int, int] = (1, 2, 2)
    split: int | str | None = None
    shallow_fraction: float = 1 / 3
    calibration_path: str | None = None
    calibration_dir: str | None = None
    verify_threshold: float | None = None
    positions: str = "timestep"
    shallow_forecast: str = "reuse"
    deep_forecast: str = "residual"
    forecast_order: int = 1
    max_cache_gib: float | None = None
    kv_mode: str = "cached_kv"
    attention_backend: str = "sdpa"
    num_inference_steps: int | None = None
    count_flops: bool = True
    compile: bool = False
    compile_backend: str = "inductor"
    preset_name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        _check(self.warmup_steps >= 1, "warmup_steps", self.warmup_steps,
               "must be >= 1: step 0 fills the caches")
        _check(self.final_full_steps >= 0, "final_full_steps", self.final_full_steps,
               "must be >= 0")
        _check(self.interval >= 1, "interval", self.interval, "must be >= 1")
        _check(0.0 < self.rho <= 1.0, "rho", self.rho, "must be in (0, 1]")
        _check(len(self.patch_size) == 3 and min(self.patch_size) >= 1, "patch_size",
               self.patch_size, "must be three positive ints (t, h, w)")
        per_patch = self.rho * math.prod(self.patch_size)
        _check(abs(per_patch - round(per_patch)) < 1e-6 and round(per_patch) >= 1, "rho", self.rho,
               f"times the patch volume {math.prod(self.patch_size)} must be a whole number >= 1 "
               f"(got {per_patch:g} tokens per patch); pick rho as a multiple of "
               f"1/{math.prod(self.patch_size)} or change patch_size")
        _check(0.0 <= self.shallow_fraction <= 1.0, "shallow_fraction", self.shallow_fraction,
               "must be in [0, 1]")
        _check(self.split is None or self.split == "auto" or
               (isinstance(self.split, int) and self.split >= 0), "split", self.split,
               'must be an int >= 0, "auto" or None')
        _check(self.forecast_order in (1, 2, 3), "forecast_order", self.forecast_order,
               "must be 1, 2 or 3 (the degree of the polynomial through the last FULL steps)")
        _check(self.max_cache_gib is None or self.max_cache_gib > 0, "max_cache_gib",
               self.max_cache_gib, "must be > 0 or None (CUDA's free memory; no bound on CPU)")
        _check(self.verify_threshold is None or self.verify_threshold > 0, "verify_threshold",
               self.verify_threshold, "must be > 0 or None (static schedule)")
        for name, choices in (("positions", POSITIONS), ("shallow_forecast", SHALLOW_FORECASTS),
                              ("deep_forecast", DEEP_FORECASTS),
                              ("kv_mode", KV_MODES), ("attention_backend", ATTENTION_BACKENDS)):
            _check(getattr(self, name) in choices, name, getattr(self, name),
                   f"must be one of {choices}")
        if self.attention_backend == "flash" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError('HeroConfig.attention_backend="flash" needs the flash-attn package '
                             "(CUDA only; `pip install flash-attn`); use \"sdpa\" otherwise")
        _check(self.num_inference_steps is None or self.num_inference_steps >= 1,
               "num_inference_steps", self.num_inference_steps, "must be >= 1 or None")

    @property
    def tokens_per_patch(self) -> int:
        """How many tokens every patch refreshes on a PARTIAL step."""
        return round(self.rho * math.prod(self.patch_size))

    def affordable_order(self, bytes_per_level: int, free_bytes: int | None) -> int:
        """The highest forecast order up to ``forecast_order`` whose ``order + 1`` levels of
        ``bytes_per_level`` each fit the memory bound (``max_cache_gib``, else ``free_bytes``, the
        device's free memory; None: unbounded), and at least 1."""
        budget = self.max_cache_gib * 2**30 if self.max_cache_gib is not None else free_bytes
        if budget is None:
            return self.forecast_order
        return max(1, min(self.forecast_order, int(budget // max(bytes_per_level, 1)) - 1))

    def resolve_split(self, num_layers: int) -> int | None:
        """The number of shallow blocks ``k`` for a model with ``num_layers`` blocks; None for
        ``"auto"``, which :mod:`hero.cache.calibration` resolves per input shape."""
        if self.split == "auto":
            return None
        split = round(num_layers * self.shallow_fraction) if self.split is None else self.split
        if not 0 <= split <= num_layers:
            raise ValueError(f"HeroConfig.split={split} is outside [0, {num_layers}] for this "
                             "model")
        return split

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view, for sample metadata."""
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> HeroConfig:
        """A named preset (``"quality"``, ``"default"``, ``"fast"``, ``"turbo"``), fields
        overridable."""
        if name not in PRESETS:
            raise ValueError(f"unknown HERO preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "preset_name": name, **overrides})


# Derived on toyworld v2 (revision d128c199ad2d, 8 held-out scenes; docs/hero.md "Presets",
# docs/bench/ablation.md). All take one warm-up step (the first forecast holds, the next
# extrapolates over a whole interval), forecast every deep block's sub-layer outputs before their
# gates (a whole-residual forecast lost 5-13 dB against full compute at the same FLOPs), reuse the
# shallow tokens they do not refresh (a first-order forecast measured no better), and let the probe
# pick the split. They differ in the interval and the forecast's order: a higher order pays over
# short intervals (at interval 4, orders 1/2/3 gave 46.5/49.7/51.5 dB against full compute) and
# not over long ones (interval 5: 41.5/45.5/45.3; interval 6: 38.1/42.2/40.6), and every order
# keeps one more tensor per sub-layer.
_TUNED = dict(warmup_steps=1, final_full_steps=1, rho=0.25, patch_size=(1, 2, 2), split="auto",
              shallow_forecast="reuse", deep_forecast="features")
PRESETS: dict[str, dict[str, Any]] = {
    # one PARTIAL step per FULL step: 60.6 dB against full compute, 1.85x fewer FLOPs
    "quality": dict(_TUNED, interval=2, forecast_order=3),
    # three PARTIAL steps per FULL step: 51.5 dB, 3.21x fewer FLOPs
    "default": dict(_TUNED, interval=4, forecast_order=3),
    # four PARTIAL steps per FULL step: 45.5 dB, 4.07x fewer FLOPs
    "fast": dict(_TUNED, interval=5, forecast_order=2),
    # seven PARTIAL steps per FULL step: 38.6 dB, 5.55x fewer FLOPs (30 steps)
    "turbo": dict(_TUNED, interval=8, forecast_order=2),
}


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"HeroConfig.{name}={value!r} {rule}")

"""HERO's configuration: one validated dataclass, named presets, and the shallow/deep split rule."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_BACKENDS = ("sdpa", "flash")
KV_MODES = ("recompute_kv", "cached_kv")


@dataclass
class HeroConfig:
    """How HERO accelerates a diffusion transformer (DESIGN §3).

    Schedule: step ``s`` of ``S`` is FULL when ``s < warmup_steps``, when
    ``s >= S - final_full_steps``, or when ``(s - warmup_steps) % interval == interval - 1``;
    otherwise it is PARTIAL. ``interval=1`` makes every step FULL (HERO then changes nothing).

    Shallow blocks ``[0, k)`` refresh a fraction ``rho`` of the video tokens on PARTIAL steps: the
    T×H×W token grid is cut into ``patch_size`` patches and every patch refreshes
    ``rho * prod(patch_size)`` tokens (which must be a whole number), stalest first; with
    ``rate_weight > 0`` tokens whose cached residual changes fast are preferred too. Deep blocks
    ``[k, L)`` are skipped on PARTIAL steps and their residual is extrapolated linearly from the
    last two FULL steps.

    ``split`` is ``k``: an int, ``"auto"`` (read from the probe's ``calibration_path`` JSON), or
    None (``round(L * shallow_fraction)``). ``kv_mode`` says where the keys/values of a partial
    shallow block come from: ``"cached_kv"`` (default) recomputes those of the refreshed and
    condition tokens and reuses the ones cached for the rest (the same staleness as the reused
    residuals; 2.4-2.8x HERO's cache memory); ``"recompute_kv"`` projects every token of the
    block input (exact attention for the refreshed queries, 2% more FLOPs at Aether's shape).
    ``attention_backend`` is the kernel of HERO's block function: ``"sdpa"`` (torch) or
    ``"flash"`` (flash-attn, CUDA, half precision).
    ``num_inference_steps`` is used only when the pipeline's ``cache_context`` does not carry it.
    ``count_flops`` counts, with torch's FLOP counter, the first FULL and first PARTIAL call of each
    input shape; ``compile`` runs the block computations through ``torch.compile`` with
    ``compile_backend`` (static shapes, so no recompilation from step to step).
    """

    warmup_steps: int = 2
    final_full_steps: int = 1
    interval: int = 2
    rho: float = 0.25
    patch_size: tuple[int, int, int] = (1, 2, 2)
    split: int | str | None = None
    shallow_fraction: float = 1 / 3
    calibration_path: str | None = None
    rate_weight: float = 0.0
    rate_momentum: float = 0.5
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
        _check(self.split != "auto" or self.calibration_path is not None, "calibration_path",
               self.calibration_path, 'is required when split="auto"')
        _check(self.rate_weight >= 0.0, "rate_weight", self.rate_weight, "must be >= 0")
        _check(0.0 <= self.rate_momentum < 1.0, "rate_momentum", self.rate_momentum,
               "must be in [0, 1)")
        _check(self.kv_mode in KV_MODES, "kv_mode", self.kv_mode, f"must be one of {KV_MODES}")
        _check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
               self.attention_backend, f"must be one of {ATTENTION_BACKENDS}")
        if self.attention_backend == "flash" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError('HeroConfig.attention_backend="flash" needs the flash-attn package '
                             "(CUDA only; `pip install flash-attn`); use \"sdpa\" otherwise")
        _check(self.num_inference_steps is None or self.num_inference_steps >= 1,
               "num_inference_steps", self.num_inference_steps, "must be >= 1 or None")

    @property
    def tokens_per_patch(self) -> int:
        """How many tokens every patch refreshes on a PARTIAL step."""
        return round(self.rho * math.prod(self.patch_size))

    def resolve_split(self, num_layers: int) -> int:
        """The number of shallow blocks ``k`` for a model with ``num_layers`` blocks."""
        if self.split == "auto":
            calibration = load_calibration(self.calibration_path)
            if calibration["num_layers"] != num_layers:
                raise ValueError(f"calibration {self.calibration_path} is for "
                                 f"{calibration['num_layers']} blocks, the model has {num_layers}")
            split = int(calibration["split"])
        elif self.split is None:
            split = round(num_layers * self.shallow_fraction)
        else:
            split = int(self.split)
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
        """A named preset (``"default"``, ``"fast"``, ``"quality"``), fields overridable."""
        if name not in PRESETS:
            raise ValueError(f"unknown HERO preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "preset_name": name, **overrides})


# FLOP ratios: Aether's shape, 50 steps (`python -m hero.cache.measure flops`)
PRESETS: dict[str, dict[str, Any]] = {
    # every other step PARTIAL, a quarter of the shallow tokens refreshed: 0.563 of full FLOPs
    "default": dict(warmup_steps=2, final_full_steps=1, interval=2, rho=0.25, patch_size=(1, 2, 2)),
    # two PARTIAL steps per FULL step: 0.417 of full FLOPs
    "fast": dict(warmup_steps=2, final_full_steps=1, interval=3, rho=0.25, patch_size=(1, 2, 2)),
    # longer warm-up and tail, half the shallow tokens refreshed: 0.636 of full FLOPs
    "quality": dict(warmup_steps=4, final_full_steps=2, interval=2, rho=0.5, patch_size=(1, 2, 2)),
}


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read a feature-coupling calibration written by :func:`hero.cache.probe.save_calibration`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"HERO calibration file {path} does not exist; run the probe "
                                "(hero.cache.probe.run_probe) first") from None
    for key in ("num_layers", "split", "profile"):
        if key not in data:
            raise ValueError(f"HERO calibration {path} lacks the field {key!r}")
    return data


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"HeroConfig.{name}={value!r} {rule}")

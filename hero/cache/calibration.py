"""Where ``split="auto"`` finds its split: a calibration JSON, cached per model revision and shape.

A calibration is one generation without acceleration recorded by the feature-coupling probe
(:mod:`hero.cache.probe`). HERO keys it by the model's fingerprint (class, config and a sample of
its weights, so a retrained checkpoint gets its own), the token grid, the condition length and the
step count, and keeps it as ``<calibration_dir>/<key>.json`` (``HeroConfig.calibration_dir``, else
``$HERO_CALIBRATION_DIR``, else ``~/.cache/hero/calibration``), or at ``calibration_path`` when the
config names one. A missing calibration is measured on the first generation of that shape.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

CACHE_ENV = "HERO_CALIBRATION_DIR"
WEIGHT_SAMPLE = 1024


def model_fingerprint(transformer: nn.Module) -> str:
    """A short hash of the model's class, config and a strided sample of its first and last
    weights: equal for the same checkpoint, different for a retrained one."""
    digest = hashlib.sha1(type(transformer).__name__.encode())
    config = getattr(transformer, "config", {})
    digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    parameters = list(transformer.parameters())
    for parameter in (parameters[:1] + parameters[-1:]):
        if parameter.device.type == "meta":
            continue
        flat = parameter.detach().flatten()
        sample = flat[:: max(1, flat.numel() // WEIGHT_SAMPLE)].float().cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def calibration_file(transformer_fingerprint: str, grid: tuple[int, int, int],
                     condition_tokens: int, num_steps: int, calibration_dir: str | None = None
                     ) -> Path:
    """The cache file of one model and shape."""
    folder = Path(calibration_dir or os.environ.get(CACHE_ENV) or
                  Path.home() / ".cache" / "hero" / "calibration")
    t, h, w = grid
    return folder / (f"{transformer_fingerprint}_grid{t}x{h}x{w}_text{condition_tokens}"
                     f"_steps{num_steps}.json")


def load_calibration(path: str | Path, num_layers: int | None = None) -> dict[str, Any]:
    """Read a calibration written by :func:`hero.cache.probe.save_calibration`; with
    ``num_layers``, refuse one made for another depth."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"HERO calibration file {path} does not exist; run the probe "
                                "(hero.cache.probe.run_probe) first") from None
    for key in ("num_layers", "split", "profile"):
        if key not in data:
            raise ValueError(f"HERO calibration {path} lacks the field {key!r}")
    if num_layers is not None and data["num_layers"] != num_layers:
        raise ValueError(f"calibration {path} is for {data['num_layers']} blocks, the model has "
                         f"{num_layers}")
    return data


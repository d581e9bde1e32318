"""Checkpoints that resume a training stage exactly, and the CSV logs that survive restarts.

A checkpoint is one safetensors file (no pickles) holding the stage's modules, the optimiser's
state, the torch generator that draws the stage's noise, and (in its metadata) the step and the
numpy generator that draws its batches, so a run killed at any moment continues the same random
sequence from its last checkpoint. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save_checkpoint(path: Path, step: int, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, rng: np.random.Generator,
                    noise: torch.Generator) -> None:
    """Write modules, Adam state and both generators to one safetensors file, atomically."""
    tensors = {f"{name}/{key}": value.detach().contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim/{index}/{key}"] = torch.as_tensor(value).contiguous()
    tensors["rng/noise"] = noise.get_state()
    write_atomically(tensors, path, {"step": str(step), "rng": json.dumps(rng.bit_generator.state)})


def write_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name and rename it: never half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, rng: np.random.Generator,
                    noise: torch.Generator) -> int:
    """Restore what :func:`save_checkpoint` wrote into the given objects; returns the step reached
    (0, touching nothing, when there is no checkpoint yet)."""
    if not path.exists():
        return 0
    tensors = load_file(str(path))
    for name, module in modules.items():
        module.load_state_dict(_prefixed(tensors, name))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    noise.set_state(tensors["rng/noise"])
    info = metadata(path)
    rng.bit_generator.state = json.loads(info["rng"])
    return int(info["step"])


def metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (a checkpoint's step, a latent file's scale)."""
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was written at (0 when there is none)."""
    return int(metadata(path)["step"]) if path.exists() else 0


def load_module(path: Path, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Load one module's weights out of a checkpoint (e.g. the EMA transformer) in eval mode."""
    module.load_state_dict(_prefixed(load_file(str(path)), name))
    return module.eval()


def _prefixed(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}/"
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


class CsvLog:
    """An append-only CSV keyed by step that survives restarts: rows past ``resume_from`` (written
    after the checkpoint a restarted run continues from) are dropped when it is opened."""

    def __init__(self, path: Path, columns: tuple[str, ...], resume_from: int = 0) -> None:
        self.path = path
        self.columns = ("step",) + columns + ("seconds",)
        self.started = time.time()
        if path.exists():
            rows = path.read_text().splitlines()
            kept = rows[:1] + [r for r in rows[1:] if int(r.split(",")[0]) <= resume_from]
            path.write_text("".join(r + "\n" for r in kept))

    def write(self, step: int, **values: float) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.columns)
            writer.writerow([step] + [f"{values[c]:.6g}" for c in self.columns[1:-1]]
                            + [f"{time.time() - self.started:.1f}"])


def read_log(path: Path) -> dict[str, np.ndarray]:
    """A :class:`CsvLog` file as columns of floats (empty when it does not exist)."""
    if not path.exists():
        return {}
    rows = list(csv.DictReader(path.open()))
    return {name: np.array([float(r[name]) for r in rows]) for name in (rows[0] if rows else {})}

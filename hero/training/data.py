"""Training data for toyworld: rendered clips on disk, and the tensors the VAE and transformer see.

Clips are rendered once, in parallel, into memory-mapped ``.npy`` arrays under ``<workdir>/clips``
(resumable: a progress file records how many leading clips are complete). Validation clips come
from their own seed range (:data:`VALIDATION_SEED_BASE`), disjoint from training seeds and from
the held-out evaluation seeds, so progress monitoring never peeks at the scored scenes.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hero import geometry
from hero.world import CLIP_FRAMES, HEIGHT, HELDOUT_SEED_BASE, WIDTH, Clip, clip_for_seed

VALIDATION_SEED_BASE = HELDOUT_SEED_BASE + 500_000
FIELDS = {  # name -> (per-clip shape, dtype)
    "rgb": ((CLIP_FRAMES, HEIGHT, WIDTH, 3), np.uint8),
    "depth": ((CLIP_FRAMES, HEIGHT, WIDTH), np.float16),
    "objects": ((CLIP_FRAMES, HEIGHT, WIDTH), np.bool_),
    "c2w": ((CLIP_FRAMES, 4, 4), np.float32),
    "k": ((CLIP_FRAMES, 3, 3), np.float32),
}


def _render(seed: int) -> Clip:
    return clip_for_seed(seed)[0]


def render_clips(directory: Path, clips: int, workers: int, flush_every: int = 200) -> None:
    """Render training clips ``0 .. clips-1`` into memory-mapped arrays (resumes where it stopped)."""
    directory.mkdir(parents=True, exist_ok=True)
    progress = directory / "progress.json"
    done = json.loads(progress.read_text())["clips"] if progress.exists() else 0
    if done >= clips:
        return
    mode = "r+" if done else "w+"
    arrays = {name: np.lib.format.open_memmap(directory / f"{name}.npy", mode=mode, dtype=dtype,
                                              shape=(clips, *shape))
              for name, (shape, dtype) in FIELDS.items()}
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        rendered = pool.imap(_render, range(done, clips), chunksize=8)
        for i, clip in enumerate(tqdm(rendered, desc="render clips", initial=done, total=clips), start=done):
            for name in FIELDS:
                arrays[name][i] = getattr(clip, name)
            if (i + 1) % flush_every == 0 or i + 1 == clips:
                for array in arrays.values():
                    array.flush()
                progress.write_text(json.dumps({"clips": i + 1}))


def load_clips(directory: Path) -> dict[str, np.ndarray]:
    """The rendered training clips, memory-mapped read-only."""
    return {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in FIELDS}


def validation_clips(count: int) -> list[Clip]:
    """``count`` validation clips (never trained on, never scored by the evaluation)."""
    return [_render(VALIDATION_SEED_BASE + i) for i in range(count)]


def to_unit(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).float().div(127.5).sub(1)
    return x.movedim(-1, -3)


def disparity_unit(depth: np.ndarray, dmax: float) -> torch.Tensor:
    """Metric depth (..., H, W) -> Aether's disparity image (..., 3, H, W) in [-1, 1]."""
    disp = geometry.depth_to_disparity(np.asarray(depth, dtype=np.float32), dmax)
    return torch.from_numpy(disp * 2 - 1).float().unsqueeze(-3).expand(*disp.shape[:-2], 3, *disp.shape[-2:])


def from_unit(x: torch.Tensor) -> np.ndarray:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3)."""
    return ((x.movedim(-3, -1).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()

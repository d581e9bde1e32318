"""Previews a person can look at: a contact sheet (PNG) and an animation (GIF) of RGB and depth.

Depth is shown as inverse depth through a matplotlib colormap, with one colour range for the whole
clip (near = bright), so motion towards an object reads as a colour change. Used for the
pipeline's per-run preview and for the figures in ``docs/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import imageio.v3 as iio
import numpy as np


class Frames(Protocol):
    """Anything with RGB (T, H, W, 3) uint8 and depth (T, H, W): a Rollout or a rendered Clip."""

    rgb: np.ndarray
    depth: np.ndarray


def inverse_depth_range(depth: np.ndarray, low: float = 2.0, high: float = 98.0) -> tuple[float, float]:
    """Percentile range of finite positive inverse depth over a whole clip (for one colour scale)."""
    inverse = _inverse(depth)
    values = inverse[np.isfinite(inverse)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [low, high])
    return float(lo), float(max(hi, lo + 1e-6))


def colorize_depth(depth: np.ndarray, value_range: tuple[float, float] | None = None,
                   cmap: str = "turbo") -> np.ndarray:
    """Depth (..., H, W) -> uint8 (..., H, W, 3): inverse depth mapped through ``cmap``."""
    from matplotlib import colormaps

    lo, hi = value_range or inverse_depth_range(depth)
    inverse = np.nan_to_num(_inverse(depth), nan=lo, posinf=hi, neginf=lo)
    unit = np.clip((inverse - lo) / (hi - lo), 0.0, 1.0)
    return (colormaps[cmap](unit)[..., :3] * 255 + 0.5).astype(np.uint8)


def frame_indices(frames: int, columns: int) -> np.ndarray:
    """``columns`` frame indices spread evenly over ``frames``, first and last included."""
    return np.unique(np.linspace(0, frames - 1, min(columns, frames)).round().astype(int))


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (..., H, W, C) by an integer ``factor``."""
    return np.repeat(np.repeat(images, factor, axis=-3), factor, axis=-2)


def tile_rows(rows: list[np.ndarray], indices: np.ndarray, gap: int = 2) -> np.ndarray:
    """One uint8 image: row r shows frames ``indices`` of ``rows[r]`` (T, H, W, 3), with white gaps."""
    height, width = rows[0].shape[1:3]
    sheet = np.full((len(rows) * (height + gap) - gap, len(indices) * (width + gap) - gap, 3), 255,
                    np.uint8)
    for r, frames in enumerate(rows):
        for c, index in enumerate(indices):
            top, left = r * (height + gap), c * (width + gap)
            sheet[top: top + height, left: left + width] = frames[index]
    return sheet


def contact_sheet(rows: list[tuple[str, np.ndarray]], path: Path, columns: int = 12,
                  title: str | None = None) -> Path:
    """Save labelled rows of frames (label, (T, H, W, 3) uint8) as a PNG, frame numbers on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, height, width = rows[0][1].shape[:3]
    indices = frame_indices(frames, columns)
    sheet = tile_rows([images for _, images in rows], indices)
    fig, ax = plt.subplots(figsize=(max(4.0, sheet.shape[1] / 60), max(2.0, sheet.shape[0] / 60 + 0.6)))
    ax.imshow(sheet, interpolation="nearest")
    ax.set_xticks([c * (width + 2) + width / 2 for c in range(len(indices))], [str(i) for i in indices])
    ax.set_yticks([r * (height + 2) + height / 2 for r in range(len(rows))], [label for label, _ in rows])
    ax.tick_params(length=0, labelsize=8)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9, pad=18)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def animation(grid: list[list[np.ndarray]], scale: int = 2, gap: int = 2) -> np.ndarray:
    """Frames (T, H', W', 3): every time step laid out as ``grid`` (rows of (T, H, W, 3) clips)."""
    frames = grid[0][0].shape[0]
    out = []
    for t in range(frames):
        rows = [np.concatenate(_spaced([clip[t] for clip in row], gap, axis=1), axis=1) for row in grid]
        out.append(np.concatenate(_spaced(rows, gap, axis=0), axis=0))
    return upscale(np.stack(out), scale)


def write_gif(frames: np.ndarray, path: Path, fps: float = 8.0) -> Path:
    """An endlessly looping GIF of uint8 frames (T, H, W, 3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, frames, extension=".gif", duration=1000.0 / fps, loop=0)
    return path


def write_preview(rollout: Frames, directory: str | Path, name: str, columns: int = 12,
                  fps: float = 8.0, scale: int = 2) -> list[Path]:
    """``<name>_sheet.png`` (RGB and depth rows) and ``<name>.gif`` (RGB | depth) for one rollout."""
    directory = Path(directory)
    depth = colorize_depth(rollout.depth)
    sheet = contact_sheet([("RGB", rollout.rgb), ("depth", depth)], directory / f"{name}_sheet.png",
                          columns, title=name)
    gif = write_gif(animation([[rollout.rgb, depth]], scale), directory / f"{name}.gif", fps)
    return [sheet, gif]


def comparison_rows(rollout: Frames, truth: Frames, label: str = "") -> list[tuple[str, np.ndarray]]:
    """Sheet rows truth/model RGB and truth/model depth; both depths share the truth's colour range,
    so a colour difference is a depth error."""
    value_range = inverse_depth_range(truth.depth)
    return [(f"{label}truth RGB", truth.rgb), (f"{label}model RGB", rollout.rgb),
            (f"{label}truth depth", colorize_depth(truth.depth, value_range)),
            (f"{label}model depth", colorize_depth(rollout.depth, value_range))]


def write_comparison(rollout: Frames, truth: Frames, directory: str | Path, name: str,
                     columns: int = 12, fps: float = 8.0, scale: int = 2) -> list[Path]:
    """Rollout against the truth: ``<name>_sheet.png`` (:func:`comparison_rows`) and ``<name>.gif``
    (truth on top, model below)."""
    directory = Path(directory)
    rows = comparison_rows(rollout, truth)
    sheet = contact_sheet(rows, directory / f"{name}_sheet.png", columns, title=name)
    (_, true_rgb), (_, model_rgb), (_, true_depth), (_, model_depth) = rows
    gif = write_gif(animation([[true_rgb, true_depth], [model_rgb, model_depth]], scale),
                    directory / f"{name}.gif", fps)
    return [sheet, gif]


def _inverse(depth: np.ndarray) -> np.ndarray:
    depth = np.asarray(depth, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(depth > 0, 1.0 / depth, np.nan)


def _spaced(parts: list[np.ndarray], gap: int, axis: int) -> list[np.ndarray]:
    """``parts`` with white separators of ``gap`` pixels between them along ``axis``."""
    if gap == 0 or len(parts) == 1:
        return parts
    shape = list(parts[0].shape)
    shape[axis] = gap
    white = np.full(shape, 255, np.uint8)
    out = [parts[0]]
    for part in parts[1:]:
        out += [white, part]
    return out

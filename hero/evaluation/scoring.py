"""Scoring rollouts against the procedural world's rendered truth, and summarising over scenes.

Every figure is computed per frame, then per scene (the mean of its finite frames), then over
scenes as a mean with its 95% confidence interval (Student's t over scenes), so two figures can be
compared by their intervals. The baseline every table carries is "repeat the first frame": its RGB
and depth held still, its camera never moving.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hero import metrics
from hero.models.base import Rollout
from hero.world import FAR, Clip

METRICS = ("psnr", "ssim", "object_psnr", "abs_rel", "rot_err_deg", "trans_err")
LOWER_IS_BETTER = {"psnr": False, "ssim": False, "object_psnr": False, "abs_rel": True,
                   "rot_err_deg": True, "trans_err": True}
LABELS = {"psnr": "RGB PSNR (dB)", "ssim": "RGB SSIM", "object_psnr": "object-pixel PSNR (dB)",
          "abs_rel": "depth AbsRel (sky excluded)", "rot_err_deg": "camera rotation error (deg)",
          "trans_err": "camera translation error (m)"}


def baseline_rollout(clip: Clip, frames: int | None = None) -> Rollout:
    """"Repeat the first frame": its RGB and depth held still, the camera never moving."""
    frames = frames or clip.rgb.shape[0]
    return Rollout(
        rgb=np.repeat(clip.rgb[:1], frames, axis=0), depth=np.repeat(clip.depth[:1], frames, axis=0),
        depth_is_metric=True, k=np.repeat(clip.k[:1], frames, axis=0).astype(np.float32),
        c2w=np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1)),
        actions=np.zeros((frames, 6), np.float32), meta={"model": "repeat-first-frame"})


def score_against_truth(rollout: Rollout, clip: Clip, frames: slice = slice(1, None)
                        ) -> dict[str, np.ndarray]:
    """Per-frame scores of ``rollout`` against the truth over ``frames`` (default: all but the
    given first), :data:`METRICS` each.

    Sky (depth at the renderer's far plane) is left out of AbsRel; relative-depth rollouts are
    median-aligned per frame and their translations scale-aligned.
    """
    relative = not rollout.depth_is_metric
    scores = metrics.score_frames(
        rollout.rgb[frames], rollout.depth[frames], clip.rgb[frames], clip.depth[frames],
        rollout.c2w[frames], clip.c2w[frames], max_depth=FAR,
        depth_align="median" if relative else "none", pose_align_scale=relative)
    scores["object_psnr"] = metrics.object_psnr(rollout.rgb[frames], clip.rgb[frames], clip.objects[frames])
    return scores


def scene_means(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """One number per metric for a clip: the mean over its finite per-frame values."""
    return {name: float(finite_mean(values)) for name, values in scores.items()}


def compare(model_scores: list[dict[str, float]], base_scores: list[dict[str, float]]
            ) -> dict[str, Any]:
    """Per metric: model and baseline over scenes (mean, 95% CI, median, std), and how often and
    how surely the model wins."""
    summary = {}
    for name in METRICS:
        ours = np.array([s[name] for s in model_scores])
        theirs = np.array([s[name] for s in base_scores])
        both = np.isfinite(ours) & np.isfinite(theirs)
        wins = (ours < theirs) if LOWER_IS_BETTER[name] else (ours > theirs)
        difference = metrics.mean_ci95((ours - theirs)[both])
        model_stats, base_stats = over_scenes(ours), over_scenes(theirs)
        better = model_stats["mean"] < base_stats["mean"] if LOWER_IS_BETTER[name] \
            else model_stats["mean"] > base_stats["mean"]
        summary[name] = {"model": model_stats, "baseline": base_stats, "difference": difference,
                         "model_wins": int((wins & both).sum()), "scenes": int(both.sum()),
                         "model_better": bool(better)}
    return summary


def over_scenes(values: np.ndarray | list[float]) -> dict[str, float | int]:
    """Mean with its 95% CI half-width, plus median, std, min, max of the finite values."""
    return {**metrics.summarize(values), **metrics.mean_ci95(values)}


def finite_mean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Mean over the finite entries (NaN where there are none)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    count = finite.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def ci(stats: dict[str, float]) -> str:
    """``mean ± ci95`` for a table cell."""
    return f"{stats['mean']:.3f} ± {stats['ci95']:.3f}"


def json_safe(value: Any) -> Any:
    """Non-finite floats become None, so the JSON is strict."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value

"""How far a method's output is from full compute's, and from the rendered truth (toyworld), with
95% confidence intervals over scenes.

Frames 1.. are scored (frame 0 is the given observation). Each metric is averaged over a scene's
frames first (identical frames, PSNR = inf, are counted apart, so a bit-exact method reports its
PSNR as null with ``identical_frames`` > 0), then over scenes: the figure is the mean of the scene
means and its interval the Student-t 95% interval of that mean (``ci`` holds the half-widths), so
scenes, not frames, are the independent samples. Per-scene values are kept (``scenes``) so two
methods run on the same scenes can be compared pairwise (:func:`paired_difference`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hero import metrics
from hero.evaluation import score_against_truth
from hero.models.base import Rollout
from hero.world import FAR, Clip

SCORED = slice(1, None)


def mean_ci(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean of the finite ``values`` and the half-width of its 95% interval
    (:func:`hero.metrics.mean_ci95`); None where there is none (no finite value; fewer than two)."""
    stats = metrics.mean_ci95([math.nan if v is None else v for v in values])
    return _finite_or_none(stats["mean"]), _finite_or_none(stats["ci95"])


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _summary(per_scene: dict[str, list[float]]) -> dict[str, Any]:
    """Mean over scenes of each metric, the 95% half-widths under ``ci``, the scene values."""
    out: dict[str, Any] = {"ci": {}, "scenes": per_scene}
    for name, values in per_scene.items():
        out[name], out["ci"][name] = mean_ci(values)
    return out


def versus_full(rollouts: list[Rollout], full: list[Rollout]) -> dict[str, Any]:
    """PSNR and SSIM of RGB, AbsRel of depth, of ``rollouts`` against the full-compute rollouts."""
    per_scene: dict[str, list[float]] = {"psnr": [], "ssim": [], "abs_rel": []}
    identical = 0
    for ours, reference in zip(rollouts, full):
        psnr = metrics.summarize(metrics.psnr(ours.rgb[SCORED], reference.rgb[SCORED]))
        identical += psnr["nonfinite"]
        per_scene["psnr"].append(psnr["mean"])
        per_scene["ssim"].append(metrics.summarize(
            metrics.ssim(ours.rgb[SCORED], reference.rgb[SCORED]))["mean"])
        per_scene["abs_rel"].append(metrics.summarize(metrics.abs_rel(
            ours.depth[SCORED], reference.depth[SCORED], max_depth=FAR))["mean"])
    return {**_summary(per_scene), "identical_frames": identical}


def versus_truth(rollouts: list[Rollout], truths: list[Clip]) -> dict[str, Any]:
    """PSNR, SSIM, AbsRel and camera errors against the rendered truth, per scene and over
    scenes."""
    per_scene: dict[str, list[float]] = {}
    for rollout, clip in zip(rollouts, truths):
        for name, values in score_against_truth(rollout, clip, SCORED).items():
            per_scene.setdefault(name, []).append(metrics.summarize(values)["mean"])
    return _summary(per_scene)


def paired_difference(ours: list[float], theirs: list[float]) -> tuple[float | None, float | None]:
    """Mean and 95% half-width of ``ours - theirs`` over the scenes both scored (same scenes, so
    the scene-to-scene spread cancels)."""
    return mean_ci([a - b for a, b in zip(ours, theirs)
                    if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)])


def latent_error(latents: torch.Tensor, full: torch.Tensor) -> float:
    """Relative L2 distance of a method's clean latents to full compute's."""
    return float((latents.float() - full.float()).norm() / full.float().norm().clamp_min(1e-12))

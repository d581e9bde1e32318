"""How far a method's output is from full compute's, and from the rendered truth (toyworld).

Frames 1.. are scored (frame 0 is the given observation); per-frame values are averaged over
frames and scenes with :func:`hero.metrics.summarize` (identical frames, PSNR = inf, are counted
apart, so a bit-exact method reports its PSNR as null with ``identical_frames`` > 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hero import metrics
from hero.models.base import Rollout
from hero.evaluation import score_against_truth
from hero.world import FAR, Clip

SCORED = slice(1, None)


def versus_full(rollouts: list[Rollout], full: list[Rollout]) -> dict[str, Any]:
    """PSNR and SSIM of RGB, AbsRel of depth, of ``rollouts`` against the full-compute rollouts."""
    psnr, ssim, abs_rel = [], [], []
    for ours, reference in zip(rollouts, full):
        psnr.append(metrics.psnr(ours.rgb[SCORED], reference.rgb[SCORED]))
        ssim.append(metrics.ssim(ours.rgb[SCORED], reference.rgb[SCORED]))
        abs_rel.append(metrics.abs_rel(ours.depth[SCORED], reference.depth[SCORED], max_depth=FAR))
    psnr_stats = metrics.summarize(np.concatenate(psnr))
    return {"psnr": psnr_stats["mean"], "identical_frames": psnr_stats["nonfinite"],
            "ssim": metrics.summarize(np.concatenate(ssim))["mean"],
            "abs_rel": metrics.summarize(np.concatenate(abs_rel))["mean"]}


def versus_truth(rollouts: list[Rollout], truths: list[Clip]) -> dict[str, Any]:
    """Mean PSNR, SSIM, AbsRel and camera errors against the rendered truth, over frames and scenes."""
    scores: dict[str, list[np.ndarray]] = {}
    for rollout, clip in zip(rollouts, truths):
        for name, values in score_against_truth(rollout, clip, SCORED).items():
            scores.setdefault(name, []).append(values)
    return {name: metrics.summarize(np.concatenate(values))["mean"] for name, values in scores.items()}


def latent_error(latents: torch.Tensor, full: torch.Tensor) -> float:
    """Relative L2 distance of a method's clean latents to full compute's."""
    return float((latents.float() - full.float()).norm() / full.float().norm().clamp_min(1e-12))

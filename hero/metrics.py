"""Scores of a rollout against the truth: RGB PSNR and SSIM, depth AbsRel, camera pose errors.

Every metric is computed per frame (leading axes are frames, or any batch shape) and aggregated
with :func:`summarize`. Images are (..., H, W, C) on a ``data_range`` scale (255 for uint8); depth
maps are (..., H, W); poses are camera-to-world (..., 4, 4) as in :mod:`hero.geometry`.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from hero import geometry

SSIM_K1, SSIM_K2 = 0.01, 0.03  # the stabilising constants of Wang et al. (2004)
DEPTH_ALIGNMENTS = ("none", "median")


def psnr(pred: np.ndarray, true: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Peak signal-to-noise ratio (dB) per image (..., H, W, C) -> (...); +inf for identical images."""
    pred, true = _pair(pred, true, "psnr")
    mse = np.mean(np.square(pred - true), axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """A normalised 1-D Gaussian of ``size`` taps (SSIM's separable window)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    window = np.exp(-np.square(offsets) / (2 * sigma ** 2))
    return window / window.sum()


def gaussian_filter(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (..., H, W): output (..., H - n + 1, W - n + 1)."""
    rows = sliding_window_view(image, window.size, axis=-1) @ window
    return sliding_window_view(rows, window.size, axis=-2) @ window


def ssim_map(pred: np.ndarray, true: np.ndarray, data_range: float = 255.0, size: int = 11,
             sigma: float = 1.5) -> np.ndarray:
    """The local SSIM of every full window position, per channel: (..., H', W', C)."""
    pred, true = _pair(pred, true, "ssim")
    if min(pred.shape[-3:-1]) < size:
        raise ValueError(f"ssim: images {pred.shape[-3:-1]} are smaller than the {size}-tap window")
    window = gaussian_window(size, sigma)
    x, y = np.moveaxis(pred, -1, -3), np.moveaxis(true, -1, -3)  # channels before H, W
    mu_x, mu_y = gaussian_filter(x, window), gaussian_filter(y, window)
    var_x = gaussian_filter(x * x, window) - mu_x ** 2
    var_y = gaussian_filter(y * y, window) - mu_y ** 2
    cov = gaussian_filter(x * y, window) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
             / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return np.moveaxis(value, -3, -1)


def ssim(pred: np.ndarray, true: np.ndarray, data_range: float = 255.0, size: int = 11,
         sigma: float = 1.5) -> np.ndarray:
    """Mean structural similarity per image (..., H, W, C) -> (...), Gaussian window, channels averaged."""
    return ssim_map(pred, true, data_range, size, sigma).mean(axis=(-3, -2, -1))


def depth_valid_mask(true: np.ndarray, min_depth: float = 1e-3, max_depth: float | None = None
                     ) -> np.ndarray:
    """Pixels whose true depth can be scored: finite, above ``min_depth``, below ``max_depth``.

    Pass the renderer's far value as ``max_depth`` to leave sky (and anything clipped to far) out.
    """
    valid = np.isfinite(true) & (true > min_depth)
    if max_depth is not None:
        valid &= true < max_depth
    return valid


def abs_rel(pred: np.ndarray, true: np.ndarray, valid: np.ndarray | None = None,
            min_depth: float = 1e-3, max_depth: float | None = None, align: str = "none"
            ) -> np.ndarray:
    """Mean |pred - true| / true over the valid pixels of each depth map (..., H, W) -> (...).

    ``valid`` defaults to :func:`depth_valid_mask`; predictions are clipped to the scored range
    (non-finite ones to its top). ``align="median"`` first scales each predicted map by
    median(true) / median(pred) over its valid pixels, for relative-depth models. A map with no
    valid pixel scores NaN.
    """
    if align not in DEPTH_ALIGNMENTS:
        raise ValueError(f"align: {align!r} is not one of {DEPTH_ALIGNMENTS}")
    pred, true = _pair(pred, true, "abs_rel")
    if valid is None:
        valid = depth_valid_mask(true, min_depth, max_depth)
    valid = np.broadcast_to(valid, true.shape)
    top = max_depth if max_depth is not None else np.finfo(np.float64).max
    pred = np.clip(np.nan_to_num(pred, nan=top, posinf=top, neginf=min_depth), min_depth, top)
    flat_pred = pred.reshape(-1, *pred.shape[-2:])
    flat_true = true.reshape(-1, *true.shape[-2:])
    flat_valid = valid.reshape(-1, *valid.shape[-2:])
    out = np.full(flat_pred.shape[0], np.nan)
    for i, (p, t, m) in enumerate(zip(flat_pred, flat_true, flat_valid)):
        if not m.any():
            continue
        p, t = p[m], t[m]
        if align == "median":
            p = p * (np.median(t) / np.median(p))
        out[i] = np.mean(np.abs(p - t) / t)
    return out.reshape(pred.shape[:-2])


def rotation_error_deg(pred_c2w: np.ndarray, true_c2w: np.ndarray) -> np.ndarray:
    """Geodesic angle (degrees) between predicted and true camera rotations, per frame (T, 4, 4) -> (T,)."""
    return geometry.rotation_error_deg(np.asarray(pred_c2w, np.float64), np.asarray(true_c2w, np.float64))


def translation_error(pred_c2w: np.ndarray, true_c2w: np.ndarray, align_scale: bool = False
                      ) -> np.ndarray:
    """Distance between predicted and true camera centres per frame (T, 4, 4) -> (T,).

    ``align_scale`` first rescales the predicted centres by the least-squares factor onto the true
    ones (for models whose translation is only known up to scale).
    """
    pred = np.array(pred_c2w, dtype=np.float64, copy=True)
    true = np.asarray(true_c2w, dtype=np.float64)
    if align_scale:
        p, t = pred[:, :3, 3], true[:, :3, 3]
        norm = float(np.sum(p * p))
        pred[:, :3, 3] *= float(np.sum(p * t)) / norm if norm > 0 else 1.0
    return geometry.translation_error(pred, true)


def score_frames(rgb: np.ndarray, depth: np.ndarray, true_rgb: np.ndarray, true_depth: np.ndarray,
                 c2w: np.ndarray | None = None, true_c2w: np.ndarray | None = None, *,
                 max_depth: float | None = None, depth_align: str = "none",
                 pose_align_scale: bool = False) -> dict[str, np.ndarray]:
    """Every metric for a clip, per frame: psnr, ssim, abs_rel and (with poses) rot_err_deg, trans_err."""
    scores = {"psnr": psnr(rgb, true_rgb), "ssim": ssim(rgb, true_rgb),
              "abs_rel": abs_rel(depth, true_depth, max_depth=max_depth, align=depth_align)}
    if c2w is not None and true_c2w is not None:
        scores["rot_err_deg"] = rotation_error_deg(c2w, true_c2w)
        scores["trans_err"] = translation_error(c2w, true_c2w, align_scale=pose_align_scale)
    return scores


def summarize(values: np.ndarray | list[float]) -> dict[str, float | int]:
    """Mean, std, median, min and max of the finite values; ``count`` of those, ``nonfinite`` of the rest.

    Non-finite values (PSNR of identical images, AbsRel of a map without valid pixels) are left out
    and counted, so one perfect frame cannot turn a mean into infinity.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    stats: dict[str, float | int] = {"count": int(finite.size), "nonfinite": int(values.size - finite.size)}
    for name, fn in (("mean", np.mean), ("std", np.std), ("median", np.median), ("min", np.min),
                     ("max", np.max)):
        stats[name] = float(fn(finite)) if finite.size else math.nan
    return stats


def object_psnr(pred: np.ndarray, true: np.ndarray, objects: np.ndarray, data_range: float = 255.0
                ) -> np.ndarray:
    """PSNR (dB) per image (..., H, W, C) -> (...) over the pixels marked in ``objects`` (..., H, W);
    NaN for an image with no marked pixel. The renderer knows which pixels show an object, so this
    scores what a blurry model loses first apart from the floor and the sky."""
    pred, true = _pair(pred, true, "object_psnr")
    mask = np.broadcast_to(np.asarray(objects, dtype=bool)[..., None], true.shape)
    count = mask.sum(axis=(-3, -2, -1))
    sse = np.where(mask, np.square(pred - true), 0.0).sum(axis=(-3, -2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, 10.0 * np.log10(data_range ** 2 / (sse / np.maximum(count, 1))), np.nan)


# Student's t 97.5% quantiles for 1..30 degrees of freedom (two-sided 95% intervals).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def t975(dof: int) -> float:
    """Student's t 97.5% quantile (table to 30 degrees of freedom, then a Cornish-Fisher expansion)."""
    if dof < 1:
        return math.nan
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


def mean_ci95(values: np.ndarray | list[float]) -> dict[str, float | int]:
    """Mean of the finite values with the half-width of its two-sided 95% t-interval (``ci95``)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "ci95": math.nan, "count": 0}
    half = t975(finite.size - 1) * float(np.std(finite, ddof=1)) / math.sqrt(finite.size) \
        if finite.size > 1 else math.nan
    return {"mean": float(finite.mean()), "ci95": half, "count": int(finite.size)}


def _pair(pred: np.ndarray, true: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"{name}: prediction shape {pred.shape} differs from truth {true.shape}")
    return pred, true

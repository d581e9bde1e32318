"""Scores against the truth (hero.metrics): known values, masks, alignment and aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hero import geometry, metrics


def _images(seed: int, shape=(2, 24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


def _pose(rotation: np.ndarray | None = None, translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    pose = np.eye(4)
    if rotation is not None:
        pose[:3, :3] = rotation
    pose[:3, 3] = translation
    return pose


# ----------------------------------------------------------------------------------------- PSNR
def test_psnr_of_identical_images_is_infinite():
    images = _images(0)
    assert np.all(np.isinf(metrics.psnr(images, images)))


def test_psnr_of_a_constant_offset_matches_the_formula():
    true = np.full((3, 8, 8, 3), 100, np.uint8)
    pred = true + np.array([10, 5, 1], np.uint8)[:, None, None, None]  # one offset per frame
    expected = [20 * math.log10(255 / d) for d in (10, 5, 1)]
    np.testing.assert_allclose(metrics.psnr(pred, true), expected, rtol=1e-12)


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="psnr: prediction shape"):
        metrics.psnr(_images(0), _images(1)[:1])


# ----------------------------------------------------------------------------------------- SSIM
def test_gaussian_window_is_a_normalised_symmetric_bump():
    window = metrics.gaussian_window(11, 1.5)
    assert window.shape == (11,)
    assert window.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(window, window[::-1])
    assert window.argmax() == 5


def test_gaussian_filter_keeps_constants_and_crops_to_valid_positions():
    out = metrics.gaussian_filter(np.full((2, 20, 30), 7.0), metrics.gaussian_window(11, 1.5))
    assert out.shape == (2, 10, 20)
    np.testing.assert_allclose(out, 7.0)


def test_ssim_of_identical_images_is_one():
    images = _images(2)
    np.testing.assert_allclose(metrics.ssim(images, images), 1.0, atol=1e-12)


def test_ssim_of_flat_images_is_the_luminance_term():
    a, c = 80.0, 40.0
    true = np.full((1, 16, 16, 3), a)
    pred = true + c
    c1 = (metrics.SSIM_K1 * 255) ** 2
    expected = (2 * a * (a + c) + c1) / (a ** 2 + (a + c) ** 2 + c1)
    np.testing.assert_allclose(metrics.ssim(pred, true), expected, rtol=1e-10)


def test_ssim_map_matches_a_direct_weighted_sum_at_one_window():
    x, y = _images(3, (1, 20, 22, 3)).astype(float), _images(4, (1, 20, 22, 3)).astype(float)
    row, col, channel = 4, 7, 1
    weights = np.outer(metrics.gaussian_window(), metrics.gaussian_window())
    px = x[0, row: row + 11, col: col + 11, channel]
    py = y[0, row: row + 11, col: col + 11, channel]
    mx, my = (weights * px).sum(), (weights * py).sum()
    vx, vy = (weights * (px - mx) ** 2).sum(), (weights * (py - my) ** 2).sum()
    cov = (weights * (px - mx) * (py - my)).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    direct = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    value = metrics.ssim_map(x, y)[0, row, col, channel]
    assert value == pytest.approx(direct, rel=1e-9)


def test_ssim_falls_as_noise_grows():
    rng = np.random.default_rng(5)
    true = _images(5).astype(float)
    scores = [metrics.ssim(np.clip(true + rng.normal(0, sigma, true.shape), 0, 255), true).mean()
              for sigma in (2, 10, 40, 120)]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] < 1.0


def test_ssim_rejects_images_smaller_than_the_window():
    tiny = np.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="smaller than the 11-tap window"):
        metrics.ssim(tiny, tiny)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.integers(0, 2 ** 31 - 1))
def test_psnr_and_ssim_are_symmetric_and_ssim_is_bounded(seed_a, seed_b):
    a, b = _images(seed_a, (1, 16, 16, 3)), _images(seed_b, (1, 16, 16, 3))
    np.testing.assert_allclose(metrics.psnr(a, b), metrics.psnr(b, a))
    np.testing.assert_allclose(metrics.ssim(a, b), metrics.ssim(b, a), atol=1e-12)
    assert np.all(metrics.ssim(a, b) <= 1.0 + 1e-12)


# --------------------------------------------------------------------------------------- AbsRel
def _depth_with_sky(far: float = 60.0) -> np.ndarray:
    depth = np.random.default_rng(6).uniform(1.0, 20.0, size=(2, 12, 16))
    depth[:, :4] = far  # the top rows are sky, at the far plane
    return depth


def test_abs_rel_of_a_ten_percent_overestimate():
    true = np.random.default_rng(7).uniform(1.0, 20.0, size=(3, 12, 16))
    np.testing.assert_allclose(metrics.abs_rel(true * 1.1, true), 0.1, rtol=1e-12)
    np.testing.assert_allclose(metrics.abs_rel(true, true), 0.0)


def test_abs_rel_leaves_sky_out_when_given_the_far_plane():
    true = _depth_with_sky()
    pred = true * 1.1
    pred[:, :4] = 3.0  # nonsense in the sky
    np.testing.assert_allclose(metrics.abs_rel(pred, true, max_depth=60.0), 0.1, rtol=1e-12)
    assert np.all(metrics.abs_rel(pred, true) > 0.3)  # without the far plane, sky counts


def test_abs_rel_median_alignment_removes_a_global_scale():
    true = np.random.default_rng(8).uniform(1.0, 20.0, size=(2, 12, 16))
    np.testing.assert_allclose(metrics.abs_rel(true * 3, true), 2.0, rtol=1e-12)
    np.testing.assert_allclose(metrics.abs_rel(true * 3, true, align="median"), 0.0, atol=1e-12)


def test_abs_rel_clips_non_finite_predictions_to_the_scored_range():
    true = np.full((1, 4, 4), 10.0)
    pred = np.full((1, 4, 4), np.inf)
    np.testing.assert_allclose(metrics.abs_rel(pred, true, max_depth=60.0), 5.0)


def test_abs_rel_without_valid_pixels_is_nan_and_bad_alignment_is_refused():
    sky = np.full((1, 4, 4), 60.0)
    assert np.isnan(metrics.abs_rel(sky, sky, max_depth=60.0)).all()
    with pytest.raises(ValueError, match="align"):
        metrics.abs_rel(sky, sky, align="mean")


def test_depth_valid_mask():
    depth = np.array([[0.0, 1.0, np.inf, np.nan, 60.0, 59.9]])
    np.testing.assert_array_equal(metrics.depth_valid_mask(depth, max_depth=60.0),
                                  [[False, True, False, False, False, True]])


# --------------------------------------------------------------------------------------- camera
def test_rotation_and_translation_errors_of_known_offsets():
    true = np.stack([np.eye(4), _pose(translation=(1.0, 0.0, 2.0))])
    pred = np.stack([_pose(geometry.rotation_y(np.deg2rad(10.0))), _pose(translation=(4.0, 4.0, 2.0))])
    np.testing.assert_allclose(metrics.rotation_error_deg(pred, true), [10.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(metrics.translation_error(pred, true), [0.0, 5.0], atol=1e-12)


def test_translation_error_scale_alignment_removes_a_global_scale():
    true = np.stack([_pose(translation=(0.1 * t, 0.0, 0.3 * t)) for t in range(5)])
    pred = true.copy()
    pred[:, :3, 3] *= 2.5
    assert metrics.translation_error(pred, true).max() > 0.5
    np.testing.assert_allclose(metrics.translation_error(pred, true, align_scale=True), 0.0, atol=1e-12)


# ------------------------------------------------------------------------------- all together
def test_score_frames_returns_every_metric_per_frame():
    rgb, depth = _images(9, (4, 16, 16, 3)), np.random.default_rng(9).uniform(1, 5, (4, 16, 16))
    poses = np.tile(np.eye(4), (4, 1, 1))
    scores = metrics.score_frames(rgb, depth, rgb, depth, poses, poses)
    assert set(scores) == {"psnr", "ssim", "abs_rel", "rot_err_deg", "trans_err"}
    assert all(values.shape == (4,) for values in scores.values())
    assert set(metrics.score_frames(rgb, depth, rgb, depth)) == {"psnr", "ssim", "abs_rel"}


def test_summarize_leaves_out_and_counts_non_finite_values():
    stats = metrics.summarize([1.0, 2.0, 3.0, np.inf, np.nan])
    assert stats["mean"] == pytest.approx(2.0)
    assert stats["std"] == pytest.approx(np.std([1.0, 2.0, 3.0]))
    assert (stats["count"], stats["nonfinite"], stats["min"], stats["max"]) == (3, 2, 1.0, 3.0)
    assert math.isnan(metrics.summarize([np.inf])["mean"])

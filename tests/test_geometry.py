"""Cameras, poses, raymaps and depth <-> disparity (hero.geometry) on random rigid trajectories."""

from __future__ import annotations

import numpy as np
import pytest

from hero import geometry


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def random_trajectory(rng: np.random.Generator, frames: int, step: float = 0.3) -> np.ndarray:
    """Rigid c2w (frames, 4, 4): random rotations, a random walk of camera centres."""
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    for t in range(frames):
        c2w[t, :3, :3] = random_rotation(rng)
    c2w[:, :3, 3] = np.cumsum(rng.normal(scale=step, size=(frames, 3)), axis=0)
    return c2w


def general_intrinsics(height: int, width: int, frames: int) -> np.ndarray:
    """K with unequal focal lengths and an off-centre principal point, so nothing is symmetric."""
    k = np.array([[0.9 * width, 0.0, 0.47 * width], [0.0, 0.8 * width, 0.55 * height], [0, 0, 1]])
    return np.repeat(k[None], frames, axis=0)


# ------------------------------------------------------------------------------------ is_rigid
def test_is_rigid_accepts_rigid_trajectories():
    rng = np.random.default_rng(0)
    assert geometry.is_rigid(np.eye(4)[None])
    assert geometry.is_rigid(random_trajectory(rng, 9))


@pytest.mark.parametrize("break_it", ["scale", "reflect", "shear", "last_row", "nan", "shape"])
def test_is_rigid_rejects_non_rigid(break_it):
    c2w = random_trajectory(np.random.default_rng(1), 5)
    if break_it == "scale":
        c2w[2, :3, :3] *= 1.1
    elif break_it == "reflect":
        c2w[3, :3, 0] *= -1
    elif break_it == "shear":
        c2w[1, 0, 1] += 0.2
    elif break_it == "last_row":
        c2w[4, 3, 0] = 0.5
    elif break_it == "nan":
        c2w[0, 0, 3] = np.nan
    else:
        c2w = c2w[:, :3]
    assert not geometry.is_rigid(c2w)


# --------------------------------------------------------------------------------- relative_to
@pytest.mark.parametrize("index", [0, 4, 8])
def test_relative_to_makes_the_index_frame_identity_and_keeps_relative_motion(index):
    c2w = random_trajectory(np.random.default_rng(2), 9)
    rel = geometry.relative_to(c2w, index)
    np.testing.assert_allclose(rel[index], np.eye(4), atol=1e-12)
    assert geometry.is_rigid(rel)
    for a, b in [(0, 8), (3, 5)]:
        np.testing.assert_allclose(np.linalg.inv(rel[a]) @ rel[b], np.linalg.inv(c2w[a]) @ c2w[b],
                                   atol=1e-10)


# ------------------------------------------------------------------------ depth <-> disparity
def test_depth_disparity_round_trip_inside_the_valid_range():
    rng = np.random.default_rng(3)
    dmax, far = 2.0, 60.0  # nearest representable depth 1 / dmax = 0.5
    depth = rng.uniform(0.5, 59.0, size=(4, 8, 8))
    disparity = geometry.depth_to_disparity(depth, dmax)
    assert disparity.min() >= 0.0 and disparity.max() <= 1.0
    np.testing.assert_allclose(geometry.disparity_to_depth(disparity, dmax, far), depth, rtol=1e-9)


def test_depth_disparity_edges_clip_to_near_and_far():
    dmax, far = 2.0, 60.0
    depth = np.array([0.1, 0.0, np.inf, -1.0, 100.0])
    disparity = geometry.depth_to_disparity(depth, dmax)
    np.testing.assert_allclose(disparity[:4], [1.0, 0.0, 0.0, 0.0])
    back = geometry.disparity_to_depth(disparity, dmax, far)
    np.testing.assert_allclose(back, [0.5, far, far, far, far])


def test_disparity_is_monotone_decreasing_in_depth():
    depth = np.linspace(0.6, 50.0, 200)
    assert np.all(np.diff(geometry.depth_to_disparity(depth, 2.0)) < 0)


# ----------------------------------------------------------------------------------- raymaps
def test_raymap_centre_ray_is_the_optical_axis_and_origin_is_encoded():
    rng = np.random.default_rng(4)
    c2w = random_trajectory(rng, 3)
    height, width, dmax = 6, 8, 0.5
    k = geometry.intrinsics(height, width, 60.0, 3)
    raymap = geometry.poses_to_raymap(c2w, k, height, width, dmax)
    assert raymap.shape == (3, 6, height, width) and raymap.dtype == np.float32
    # the principal point (4, 3) lies on the corner shared by pixels (3, 2) and (4, 3): average them
    centre = 0.5 * (raymap[:, :3, 2, 3] + raymap[:, :3, 3, 4])
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    np.testing.assert_allclose(centre, c2w[:, :3, 2], atol=0.02)
    expected = geometry.signed_log1p(c2w[:, :3, 3] * dmax * geometry.ORIGIN_SCALE)
    np.testing.assert_allclose(raymap[:, 3:, 0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(raymap[:, 3:].std(axis=(2, 3)), 0.0, atol=1e-7)


@pytest.mark.parametrize("seed", [5, 6, 7])
@pytest.mark.parametrize("dmax", [1.0, 0.37])
def test_raymap_to_poses_inverts_poses_to_raymap(seed, dmax):
    rng = np.random.default_rng(seed)
    frames, height, width = 7, 9, 13
    c2w = random_trajectory(rng, frames)
    k = general_intrinsics(height, width, frames)
    raymap = geometry.poses_to_raymap(c2w, k, height, width, dmax)
    c2w_back, k_back = geometry.raymap_to_poses(raymap, dmax)
    assert geometry.is_rigid(c2w_back)
    np.testing.assert_allclose(c2w_back, c2w, atol=1e-4)
    np.testing.assert_allclose(k_back, k, rtol=1e-4, atol=1e-5)
    assert geometry.rotation_error_deg(c2w_back, c2w).max() < 0.01
    assert geometry.translation_error(c2w_back, c2w).max() < 1e-4


def test_signed_log1p_round_trip():
    x = np.array([-1e4, -3.0, -1e-6, 0.0, 1e-6, 2.5, 1e4])
    np.testing.assert_allclose(geometry.signed_expm1(geometry.signed_log1p(x)), x, rtol=1e-12)


# --------------------------------------------------------------------------------- intrinsics
def test_intrinsics_field_of_view_and_scaling():
    k = geometry.intrinsics(48, 64, 90.0, frames=2)
    assert k.shape == (2, 3, 3)
    np.testing.assert_allclose(k[0], [[32, 0, 32], [0, 32, 24], [0, 0, 1]], atol=1e-9)
    half = geometry.scale_intrinsics(k, 0.5)
    np.testing.assert_allclose(half[0], [[16, 0, 16], [0, 16, 12], [0, 0, 1]], atol=1e-9)
    np.testing.assert_allclose(k[0, 0, 0], 32.0)  # the input is not modified


def test_pose_errors_measure_known_offsets():
    c2w = random_trajectory(np.random.default_rng(8), 4)
    moved = c2w.copy()
    moved[:, :3, :3] = c2w[:, :3, :3] @ geometry.rotation_y(np.deg2rad(10.0))
    moved[:, :3, 3] += [0.0, 0.3, 0.4]
    np.testing.assert_allclose(geometry.rotation_error_deg(c2w, c2w), 0.0, atol=1e-5)
    np.testing.assert_allclose(geometry.rotation_error_deg(moved, c2w), 10.0, atol=1e-6)
    np.testing.assert_allclose(geometry.translation_error(moved, c2w), 0.5, atol=1e-12)

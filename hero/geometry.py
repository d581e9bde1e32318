"""Cameras, poses, raymaps and depth <-> disparity, in the conventions every model here shares.

Conventions: OpenCV cameras (x right, y down, z forward), camera-to-world poses ``c2w`` (T, 4, 4)
with frame 0 the identity, pinhole intrinsics ``K`` (T, 3, 3) in pixels. A raymap is Aether's
6-channel camera encoding: per pixel the world-space ray direction R @ K^-1 [u, v, 1] and the
camera origin, the origin scaled by ``dmax * origin_scale`` and passed through signed log1p.
"""

from __future__ import annotations

import numpy as np

ORIGIN_SCALE = 10.0  # Aether's ray-origin scale; AetherV1 was trained with exactly this value.


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def signed_expm1(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`signed_log1p`."""
    return np.sign(x) * np.expm1(np.abs(x))


def intrinsics(height: int, width: int, fov_x_deg: float, frames: int = 1) -> np.ndarray:
    """Pinhole K with square pixels, principal point at the image centre, repeated ``frames`` times."""
    focal = 0.5 * width / np.tan(np.deg2rad(fov_x_deg) / 2)
    k = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)
    return np.repeat(k[None], frames, axis=0)


def scale_intrinsics(k: np.ndarray, factor: float) -> np.ndarray:
    """K for an image resized by ``factor`` (pixel-centre consistent)."""
    k = np.array(k, dtype=np.float64, copy=True)
    k[..., 0, 0] *= factor
    k[..., 1, 1] *= factor
    k[..., 0, 2] *= factor
    k[..., 1, 2] *= factor
    return k


def rotation_y(angle_rad: float) -> np.ndarray:
    """Rotation about the camera's y axis (down): positive turns the camera to the right."""
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def relative_to(c2w: np.ndarray, index: int = 0) -> np.ndarray:
    """Re-express poses in the frame of camera ``index`` (that camera becomes the identity)."""
    return np.linalg.inv(c2w[index])[None] @ c2w


def is_rigid(c2w: np.ndarray, atol: float = 1e-3) -> bool:
    """True when every pose is finite, has a proper rotation block and a [0, 0, 0, 1] last row."""
    c2w = np.asarray(c2w, dtype=np.float64)
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or not np.isfinite(c2w).all():
        return False
    rot = c2w[:, :3, :3]
    orthonormal = np.allclose(rot @ rot.transpose(0, 2, 1), np.eye(3), atol=atol)
    proper = np.allclose(np.linalg.det(rot), 1.0, atol=atol)
    return orthonormal and proper and np.allclose(c2w[:, 3], [0, 0, 0, 1], atol=atol)


def depth_to_disparity(depth: np.ndarray, dmax: float) -> np.ndarray:
    """Aether's disparity encoding: sqrt(clip(1 / (depth * dmax), 0, 1)); zero where depth <= 0 or inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        disparity = np.where(depth > 0, 1.0 / depth, 0.0) / dmax
    return np.sqrt(np.clip(np.nan_to_num(disparity, nan=0.0, posinf=1.0), 0.0, 1.0))


def disparity_to_depth(disparity: np.ndarray, dmax: float, far: float) -> np.ndarray:
    """Invert :func:`depth_to_disparity`; pixels with (near) zero disparity get ``far``."""
    d = np.square(np.clip(disparity, 0.0, 1.0)) * dmax
    with np.errstate(divide="ignore"):
        return np.where(d > 1.0 / far, 1.0 / np.maximum(d, 1e-12), far)


def poses_to_raymap(
    c2w: np.ndarray, k: np.ndarray, height: int, width: int, dmax: float = 1.0,
    origin_scale: float = ORIGIN_SCALE,
) -> np.ndarray:
    """Raymaps (T, 6, height, width) sampled at pixel centres of a ``height`` x ``width`` grid.

    ``k`` must already describe that grid (see :func:`scale_intrinsics`).
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5, indexing="xy")
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)  # (HW, 3)
    cam_dirs = pixels @ np.linalg.inv(k).transpose(0, 2, 1)  # (T, HW, 3)
    world_dirs = cam_dirs @ c2w[:, :3, :3].transpose(0, 2, 1)
    origin = signed_log1p(c2w[:, :3, 3] * dmax * origin_scale)  # (T, 3)
    frames = c2w.shape[0]
    dirs = world_dirs.reshape(frames, height, width, 3).transpose(0, 3, 1, 2)
    origins = np.broadcast_to(origin[:, :, None, None], (frames, 3, height, width))
    return np.concatenate([dirs, origins], axis=1).astype(np.float32)


def raymap_to_poses(
    raymap: np.ndarray, dmax: float = 1.0, origin_scale: float = ORIGIN_SCALE
) -> tuple[np.ndarray, np.ndarray]:
    """Recover (c2w, K) from raymaps (T, 6, h, w) by a least-squares fit per frame.

    Directions satisfy d = R K^-1 [u, v, 1]; M = R K^-1 is fitted linearly, K^-1 is the
    Cholesky factor of M^T M (R is orthonormal), and R is the nearest rotation to M K.
    """
    raymap = np.asarray(raymap, dtype=np.float64)
    frames, _, height, width = raymap.shape
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5, indexing="xy")
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    ks = np.zeros((frames, 3, 3))
    for t in range(frames):
        dirs = raymap[t, :3].reshape(3, -1).T
        m_t, *_ = np.linalg.lstsq(pixels, dirs, rcond=None)  # dirs = pixels @ M^T
        m = m_t.T
        k_inv = np.linalg.cholesky(m.T @ m + 1e-9 * np.eye(3)).T  # jitter: a degenerate map stays finite
        k = np.linalg.inv(k_inv)
        ks[t] = k / k[2, 2]
        uu, _, vt = np.linalg.svd(m @ k)
        rot = uu @ vt
        if np.linalg.det(rot) < 0:
            rot = uu @ np.diag([1, 1, -1]) @ vt
        c2w[t, :3, :3] = rot
        c2w[t, :3, 3] = signed_expm1(raymap[t, 3:].reshape(3, -1).mean(axis=1)) / (dmax * origin_scale)
    return c2w, ks


def rotation_error_deg(pred_c2w: np.ndarray, true_c2w: np.ndarray) -> np.ndarray:
    """Per-frame geodesic angle (degrees) between predicted and true camera rotations."""
    rel = pred_c2w[:, :3, :3].transpose(0, 2, 1) @ true_c2w[:, :3, :3]
    cos = np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1.0, 1.0)
    return np.rad2deg(np.arccos(cos))


def translation_error(pred_c2w: np.ndarray, true_c2w: np.ndarray) -> np.ndarray:
    """Per-frame Euclidean distance between predicted and true camera centres."""
    return np.linalg.norm(pred_c2w[:, :3, 3] - true_c2w[:, :3, 3], axis=-1)

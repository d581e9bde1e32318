"""Clips of the procedural world: a seeded scene rendered along a camera path, the truth that
toyworld is trained on and every rollout is scored against.

Training uses seeds below :data:`HELDOUT_SEED_BASE`; evaluation uses seeds from it up, so a
scored scene was never seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hero import geometry
from hero.world.scene import Scene, render
from hero.world.trajectory import Trajectory

HEIGHT, WIDTH = 48, 64  # the world's camera: pixels
FOV_X_DEG = 70.0
CLIP_FRAMES = 17
OBJECTS = 12
HELDOUT_SEED_BASE = 1_000_000


@dataclass(frozen=True)
class Clip:
    """A rendered clip: RGB, metric depth, which pixels show an object, intrinsics and poses."""

    rgb: np.ndarray  # (T, H, W, 3) uint8
    depth: np.ndarray  # (T, H, W) float32 metres
    objects: np.ndarray  # (T, H, W) bool: the pixel's centre ray hit a sphere or a box
    k: np.ndarray  # (T, 3, 3)
    c2w: np.ndarray  # (T, 4, 4), OpenCV, frame 0 = identity


def render_clip(scene_seed: int, trajectory: Trajectory, frames: int, height: int = HEIGHT,
                width: int = WIDTH, fov_x_deg: float = FOV_X_DEG, objects: int = OBJECTS) -> Clip:
    """Render ``frames`` frames of the seeded scene along ``trajectory``."""
    c2w = trajectory.poses(frames)
    scene = Scene.random(scene_seed, objects=objects, clear_path=c2w[:, :3, 3])
    k = geometry.intrinsics(height, width, fov_x_deg, frames)
    rendered = render(scene, c2w, k, height, width)
    return Clip(rgb=rendered.rgb, depth=rendered.depth, objects=rendered.objects, k=k, c2w=c2w)


def trajectory_for_seed(seed: int, frames: int = CLIP_FRAMES) -> Trajectory:
    """The random camera path that goes with scene ``seed``."""
    return Trajectory.random(np.random.default_rng(seed + 7_919), frames)


def clip_for_seed(seed: int, frames: int = CLIP_FRAMES) -> tuple[Clip, Trajectory]:
    """The training/evaluation clip of ``seed``: its scene along its random path, rendered."""
    trajectory = trajectory_for_seed(seed, frames)
    return render_clip(seed, trajectory, frames), trajectory

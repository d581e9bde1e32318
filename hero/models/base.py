"""The one interface every world-model backend implements: a request in, a rollout out.

The pipeline's actors only talk to :class:`WorldModel`; Aether, toyworld and the tiny random
configuration used in tests are interchangeable behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

TASKS = ("prediction", "planning", "reconstruction")


@dataclass
class RolloutRequest:
    """What to generate.

    ``image`` is the initial observation (H, W, 3) uint8; ``goal`` the goal observation for
    planning; ``video`` (T, H, W, 3) the input clip for reconstruction. ``c2w`` (T, 4, 4) is the
    commanded camera path (OpenCV, frame 0 = identity) and ``k`` (T, 3, 3) its intrinsics at the
    observation's resolution; either may be None where the task does not need them. ``steps`` and
    ``guidance`` of None take the model's per-task defaults.
    """

    id: str
    task: str = "prediction"
    frames: int = 17
    image: np.ndarray | None = None
    goal: np.ndarray | None = None
    video: np.ndarray | None = None
    c2w: np.ndarray | None = None
    k: np.ndarray | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """What a model generated, in the units and conventions training loaders expect.

    ``depth`` is metric metres when ``depth_is_metric`` and relative (normalised disparity-derived)
    depth otherwise. ``actions`` (T, 6) is the per-frame camera motion in the previous camera's frame
    (translation xyz, rotation vector xyz), row 0 zero.
    """

    rgb: np.ndarray  # (T, H, W, 3) uint8
    depth: np.ndarray  # (T, H, W) float32
    depth_is_metric: bool
    k: np.ndarray  # (T, 3, 3) float32
    c2w: np.ndarray  # (T, 4, 4) float32
    actions: np.ndarray  # (T, 6) float32
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return int(self.rgb.shape[0])


@runtime_checkable
class WorldModel(Protocol):
    """A diffusion world model: ``generate`` turns requests into rollouts.

    ``transformer`` is exposed so accelerators (HERO, diffusers caches) can hook into it; every
    transformer call inside ``generate`` runs under ``transformer.cache_context(...)``.
    """

    name: str
    revision: str
    height: int
    width: int
    frame_options: tuple[int, ...]
    transformer: torch.nn.Module

    def default_steps(self, task: str) -> int: ...

    def generate(self, requests: list[RolloutRequest]) -> list[Rollout]: ...


def pose_deltas(c2w: np.ndarray) -> np.ndarray:
    """Per-frame camera motion (T, 6): translation and rotation vector of c2w[t-1]^-1 c2w[t]."""
    c2w = np.asarray(c2w, dtype=np.float64)
    deltas = np.zeros((c2w.shape[0], 6), dtype=np.float32)
    for t in range(1, c2w.shape[0]):
        rel = np.linalg.inv(c2w[t - 1]) @ c2w[t]
        deltas[t, :3] = rel[:3, 3]
        deltas[t, 3:] = _rotation_vector(rel[:3, :3])
    return deltas


def _rotation_vector(rot: np.ndarray) -> np.ndarray:
    angle = np.arccos(np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0))
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    return axis / (2 * np.sin(angle)) * angle

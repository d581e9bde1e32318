"""The one interface every world-model backend implements: a request in, a rollout out.

The pipeline's actors only talk to :class:`WorldModel`; Aether, toyworld and the tiny random
configuration used in tests are interchangeable behind it. The tasks (:data:`TASKS`, with the
inputs each one needs), a checkpoint's :class:`ModelSpec` and the invariants of a storable
:class:`Rollout` (:func:`check_rollout`) are declared here once; manifests, stages and backends
read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from hero import geometry

if TYPE_CHECKING:  # the declarations here load without torch: manifests and the CLI read them
    import torch


@dataclass(frozen=True)
class Task:
    """A task every world model serves: the observations a request for it must carry, and whether
    the request's camera path (``c2w``) conditions the model (otherwise the model predicts it)."""

    name: str
    observations: tuple[str, ...]
    follows_camera: bool


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("prediction", observations=("image",), follows_camera=True),
    Task("planning", observations=("image", "goal"), follows_camera=False),
    Task("reconstruction", observations=("video",), follows_camera=False),
)}
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]  # the names above, for pydantic schemas

OBSERVED_AT = {"image": "first", "goal": "last", "video": "all"}
"""Which frames of the clip each observation shows: the first, the last, or every frame."""


def observed_frames(name: str, frames: int) -> list[int]:
    """Indices of the frames of a ``frames``-long clip that observation ``name`` shows."""
    return {"first": [0], "last": [frames - 1], "all": list(range(frames))}[OBSERVED_AT[name]]


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a checkpoint that is not a weight: resolution, tasks' defaults, depth units.

    ``frame_options`` are the clip lengths the model generates (the first is the default);
    ``metric_dmax`` fixes the disparity normalisation (toyworld: metric depth and poses); None
    means Aether's per-clip normalisation, so depth and camera translation are relative.
    ``fps`` is the frame rate the checkpoint was trained at; a request may ask for one of
    ``fps_options`` (``extra["fps"]``), which stretches the temporal rotary positions by
    ``fps / requested``. ``guidance_ramp`` picks the dynamic-guidance formula
    (:func:`hero.models.cogvideox_world.guidance_at`). ``latent_mean`` and ``latent_std`` (one
    value per channel of the packed latents: RGB, disparity, folded raymaps) standardise every
    channel to zero mean and unit variance before the transformer sees it, so that no channel is
    drowned by the noise earlier than the others or counts less in the loss; None (Aether) leaves
    the latents as the VAE's scaling factor makes them.
    """

    name: str
    revision: str
    height: int
    width: int
    frame_options: tuple[int, ...]
    fov_x_deg: float = 60.0
    fps: int = 12
    fps_options: tuple[int, ...] = ()
    guidance_ramp: str = "normalised"
    metric_dmax: float | None = None
    far: float = 60.0
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None
    default_steps: dict[str, int] = field(
        default_factory=lambda: {"prediction": 50, "planning": 50, "reconstruction": 4})
    default_guidance: dict[str, float] = field(
        default_factory=lambda: {"prediction": 3.0, "planning": 3.0, "reconstruction": 1.0})
    dynamic_guidance: dict[str, bool] = field(
        default_factory=lambda: {"prediction": True, "planning": False, "reconstruction": False})


@dataclass
class RolloutRequest:
    """What to generate.

    ``image`` is the initial observation (H, W, 3) uint8; ``goal`` the goal observation for
    planning; ``video`` (T, H, W, 3) the input clip for reconstruction (:data:`TASKS` says which
    a task needs). ``c2w`` (T, 4, 4) is the commanded camera path (OpenCV, frame 0 = identity) and
    ``k`` (T, 3, 3) its intrinsics at the observation's resolution; a task that follows the camera
    without one lets the model choose the camera, the others ignore it. ``steps`` and
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


def check_rollout(rollout: Rollout, frames: int) -> None:
    """Refuse a rollout that must not be stored: raise ``ValueError("<field>: <reason>")`` unless
    every array has ``frames`` frames, depth, intrinsics, poses and actions are finite, depth is
    non-negative, focal lengths are positive and every pose is rigid."""
    arrays = {"rgb": rollout.rgb, "depth": rollout.depth, "k": rollout.k, "c2w": rollout.c2w,
              "actions": rollout.actions}
    for name, array in arrays.items():
        if np.shape(array)[0] != frames:
            raise ValueError(f"rollout.{name}: {np.shape(array)[0]} frames, the request asked for {frames}")
        if name != "rgb" and not np.isfinite(array).all():
            raise ValueError(f"rollout.{name}: holds non-finite values")
    if (rollout.depth < 0).any():
        raise ValueError("rollout.depth: holds negative depth")
    if not ((rollout.k[:, 0, 0] > 0) & (rollout.k[:, 1, 1] > 0)).all():
        raise ValueError("rollout.k: focal lengths must be positive")
    if not geometry.is_rigid(rollout.c2w):
        raise ValueError("rollout.c2w: a pose is not rigid")

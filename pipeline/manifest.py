"""The manifest row schema and its validation: every bad row becomes a :class:`RowError` naming
the row and the field, never an exception that stops the run.

A row is one rollout to generate (see docs/manifest.md). Validation here is the part that needs
no I/O and no model: types, ranges, finite, rigid and bounded poses, safe ids, and the inputs its
task needs (declared once, in :data:`hero.models.base.TASKS`). Decoding image/video URIs and
frame counts against the model happen in the prep stage, checking outputs in the generate stage;
all report failures with the same :class:`RowError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from hero import geometry
from hero.models.base import TASKS, TaskName
from hero.world import MOTIONS, OBJECTS

SCHEMA_VERSION = 1
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")
SAFE_ID_RULE = "1-80 characters from [A-Za-z0-9_-], starting with a letter or digit (no dots or slashes)"
MAX_TRANSLATION_M = 1e5
"""Bound on every coordinate of an explicit camera position (metres). Motion primitives stay within
it by their own bounds (10 m per frame, 10000 frames); beyond it float32 outputs lose precision
and products overflow (a camera at 1e39 m puts inf into actions)."""
INPUT_SOURCES = {
    "image": ("observation", "an image, a scene or a video (its first frame)"),
    "goal": ("goal", "a goal image, or a scene with a trajectory (its last frame is the goal)"),
    "video": ("observation", "a video, or a scene with a trajectory to render one"),
    "c2w": ("trajectory", "a trajectory (its camera path conditions the model)"),
}
"""Each input a task can need (:data:`hero.models.base.TASKS`): the field a row gives it in, and
how, for the error naming what is missing."""


@dataclass
class RowError:
    """Why one manifest row produced no sample: the row (id, or source and line when the id is
    unreadable), the field at fault and the reason, plus the stage that found it."""

    id: str | None
    field: str
    reason: str
    stage: str = "manifest"
    source: str | None = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        where = f"row {self.id!r}" if self.id else f"{self.source} line {self.line}"
        return f"{where}: field {self.field!r}: {self.reason}"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", frozen=True)


class SceneSpec(_Strict):
    """A procedural toyworld scene (``hero.world.Scene.random``)."""

    seed: int
    objects: int = OBJECTS

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int) -> int:
        if not 0 <= value < 2**32:
            raise ValueError("must be in [0, 2**32)")
        return value

    @field_validator("objects")
    @classmethod
    def _objects_range(cls, value: int) -> int:
        if not 0 <= value <= 256:
            raise ValueError("must be in [0, 256]")
        return value


class Observation(_Strict):
    """The initial observation: exactly one of a toyworld scene, an image URI or a video URI."""

    scene: SceneSpec | None = None
    image: str | None = None
    video: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Observation":
        given = [name for name in ("scene", "image", "video") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of scene, image, video (got {given or 'none'})")
        return self


class Goal(_Strict):
    """The goal observation for planning, as an image URI."""

    image: str


class TrajectorySpec(_Strict):
    """The camera path: motion primitives (``segments``) or explicit camera-to-world ``c2w`` poses."""

    segments: tuple[tuple[str, int], ...] | None = None
    speed: float = 0.10
    turn_deg: float = 2.5
    c2w: list[list[list[float]]] | None = None

    @field_validator("segments", mode="before")
    @classmethod
    def _segments(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError("must be a non-empty list of [motion, frames] pairs")
        parsed = []
        for index, segment in enumerate(value):
            if isinstance(segment, dict) and set(segment) == {"motion", "frames"}:
                segment = (segment["motion"], segment["frames"])
            if not isinstance(segment, (list, tuple)) or len(segment) != 2:
                raise ValueError(f"segment {index} must be a [motion, frames] pair")
            motion, frames = segment
            if not isinstance(motion, str) or set(motion.split("+")) - set(MOTIONS):
                raise ValueError(f"segment {index}: unknown motion {motion!r}; motions are {MOTIONS} joined by '+'")
            if isinstance(frames, bool) or not isinstance(frames, int) or not 0 <= frames <= 10_000:
                raise ValueError(f"segment {index}: frames must be an integer in [0, 10000], got {frames!r}")
            parsed.append((motion, frames))
        return tuple(parsed)

    @field_validator("c2w")
    @classmethod
    def _rigid(cls, value: list | None) -> list | None:
        if value is None:
            return None
        poses = np.asarray(value, dtype=np.float64) if _is_box(value, 4, 4) else None
        if poses is None or poses.shape[0] < 1:
            raise ValueError("must be a non-empty list of 4x4 matrices")
        for index in range(poses.shape[0]):
            if not geometry.is_rigid(poses[index : index + 1]):
                raise ValueError(f"pose {index} is not rigid (rotation must be orthonormal with det +1, last row [0, 0, 0, 1])")
        farthest = np.abs(poses[:, :3, 3]).max(axis=1)
        if (farthest > MAX_TRANSLATION_M).any():
            index = int(np.argmax(farthest))
            raise ValueError(f"pose {index} is translated by {farthest[index]:.3g} m; every coordinate of a "
                             f"camera position must be within {MAX_TRANSLATION_M:g} m of the origin")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "TrajectorySpec":
        if (self.segments is None) == (self.c2w is None):
            raise ValueError("give exactly one of segments (motion primitives) or c2w (poses)")
        if not 0 <= self.speed <= 10:
            raise ValueError("speed must be in [0, 10] metres per frame")
        if not -45 <= self.turn_deg <= 45:
            raise ValueError("turn_deg must be in [-45, 45] degrees per frame")
        return self

    def poses(self, frames: int) -> np.ndarray:
        """c2w (frames, 4, 4) with frame 0 the identity."""
        if self.c2w is not None:
            return geometry.relative_to(np.asarray(self.c2w, dtype=np.float64))[:frames]
        from hero.world import Trajectory

        return Trajectory(segments=self.segments, speed=self.speed, turn_deg=self.turn_deg).poses(frames)


class ManifestRow(_Strict):
    """One rollout to generate. ``frames``/``steps``/``guidance`` of None take the model's defaults."""

    id: str
    task: TaskName = "prediction"
    observation: Observation
    trajectory: TrajectorySpec | None = None
    goal: Goal | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    fov_deg: float = 70.0

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        if not SAFE_ID.fullmatch(value):
            raise ValueError(f"id {value[:80]!r} is not a safe key: {SAFE_ID_RULE}")
        return value

    @field_validator("frames")
    @classmethod
    def _frames(cls, value: int | None) -> int | None:
        if value is not None and not 2 <= value <= 10_000:
            raise ValueError("must be in [2, 10000]")
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 1000:
            raise ValueError("must be in [1, 1000]")
        return value

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 50:
            raise ValueError("must be in [0, 50]")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        if not 0 <= value < 2**32:
            raise ValueError("must be in [0, 2**32)")
        return value

    @field_validator("fov_deg")
    @classmethod
    def _fov(cls, value: float) -> float:
        if not 1 <= value <= 170:
            raise ValueError("must be in [1, 170] degrees")
        return value

    @model_validator(mode="after")
    def _task_inputs(self) -> "ManifestRow":
        missing = _missing_input(self)
        if missing:
            raise ValueError(missing)
        return self


def _given_inputs(row: ManifestRow) -> set[str]:
    """The request inputs a row gives: its observation (a video also gives its first frame as the
    image), goal and trajectory, plus what a scene renders along the trajectory."""
    obs = row.observation
    given = {"image"} if obs.image is not None or obs.scene is not None else set()
    if obs.video is not None:
        given |= {"video", "image"}
    if obs.scene is not None and row.trajectory is not None:
        given |= {"goal", "video"}
    if row.goal is not None:
        given.add("goal")
    if row.trajectory is not None:
        given.add("c2w")
    return given


def _missing_input(row: ManifestRow) -> str | None:
    """``"<field>: <reason>"`` for the first input the row's task needs that the row does not give."""
    task = TASKS[row.task]
    given = _given_inputs(row)
    for name in task.observations + (("c2w",) if task.follows_camera else ()):
        if name not in given:
            field, what = INPUT_SOURCES[name]
            return f"{field}: task {row.task!r} needs {what}"
    if row.trajectory is not None and row.trajectory.c2w is not None and row.frames is not None:
        if len(row.trajectory.c2w) < row.frames:
            return f"trajectory.c2w: {len(row.trajectory.c2w)} poses, fewer than frames={row.frames}"
    return None


def _is_box(value: Any, rows: int, cols: int) -> bool:
    return all(len(m) == rows and all(len(r) == cols for r in m) for m in value)


def _field_of(error: dict[str, Any]) -> str:
    parts: list[str] = []
    for part in error["loc"]:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "row"


def validate_row(obj: Any, *, source: str | None = None, line: int | None = None) -> ManifestRow | RowError:
    """Validate one decoded manifest object; return the row, or the first error naming its field."""
    row_id = readable_id(obj)
    if not isinstance(obj, dict):
        return RowError(row_id, "row", f"expected a JSON object, got {type(obj).__name__}", source=source, line=line)
    try:
        return ManifestRow.model_validate(obj)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        reason = error["msg"].removeprefix("Value error, ")
        field = _field_of(error)
        if field == "row" and error["type"] == "value_error":  # a cross-field rule says "<field>: <reason>"
            field, _, reason = reason.partition(": ")
        if error["type"] == "missing":
            reason = "required field is missing"
        elif error["type"] == "extra_forbidden":
            reason = "unknown field"
        return RowError(row_id if field != "id" else None, field, reason, source=source, line=line)


def parse_line(text: str, *, source: str, line: int) -> ManifestRow | RowError:
    """Decode and validate one JSONL line."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return RowError(_id_in_text(text), "row", f"malformed JSON: {exc}", source=source, line=line)
    return validate_row(obj, source=source, line=line)


def readable_id(obj: Any) -> str | None:
    """The row's id if it is a safe key string, else None (errors then name the line)."""
    if isinstance(obj, dict) and isinstance(obj.get("id"), str) and SAFE_ID.fullmatch(obj["id"]):
        return obj["id"]
    return None


def _id_in_text(text: str) -> str | None:
    match = re.search(r'"id"\s*:\s*"([^"\\]{1,128})"', text)
    return match.group(1) if match and SAFE_ID.fullmatch(match.group(1)) else None


def row_digest(row: ManifestRow) -> str:
    """A short content hash of a validated row, stored in completion markers to detect edits."""
    text = json.dumps(row.model_dump(mode="json"), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


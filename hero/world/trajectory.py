"""Camera paths of the procedural world: sequences of motion primitives, seeded and deterministic.

A path is a list of (motion, frames) segments; motions are ``forward``, ``back``, ``turn_left``,
``turn_right``, ``strafe_left``, ``strafe_right`` and their sums (``forward+turn_left``). World frame
= first camera (OpenCV: x right, y down, z forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hero import geometry

MOTIONS = ("forward", "back", "turn_left", "turn_right", "strafe_left", "strafe_right")
@dataclass(frozen=True)
class Trajectory:
    """A camera path: ``segments`` of (motion, frames); motions may be joined with '+'."""

    segments: tuple[tuple[str, int], ...]
    speed: float = 0.10  # metres per frame
    turn_deg: float = 2.5  # degrees per frame

    def __post_init__(self) -> None:
        for motion, frames in self.segments:
            unknown = set(motion.split("+")) - set(MOTIONS)
            if unknown:
                raise ValueError(f"unknown motion {sorted(unknown)}; choose from {MOTIONS}")
            if int(frames) < 0:
                raise ValueError(f"segment frame count must be >= 0, got {frames}")

    @property
    def steps(self) -> int:
        return sum(int(n) for _, n in self.segments)

    def poses(self, frames: int) -> np.ndarray:
        """c2w (frames, 4, 4), frame 0 = identity; the last motion continues if the path is short."""
        moves = [m for m, n in self.segments for _ in range(int(n))]
        moves = (moves + [moves[-1] if moves else "forward"] * frames)[: frames - 1]
        c2w = [np.eye(4)]
        for motion in moves:
            c2w.append(c2w[-1] @ _step(motion, self.speed, np.deg2rad(self.turn_deg)))
        return np.stack(c2w)

    @classmethod
    def random(cls, rng: np.random.Generator, frames: int) -> "Trajectory":
        """A random path of one to three segments covering ``frames - 1`` steps."""
        cuts = np.sort(rng.choice(np.arange(1, frames - 1), size=rng.integers(0, 3), replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [frames - 1]])).astype(int)
        combos = list(MOTIONS) + ["forward+turn_left", "forward+turn_right", "forward+strafe_left"]
        weights = np.array([4, 1, 2, 2, 1, 1, 2, 2, 1], dtype=float)
        picks = rng.choice(len(combos), size=len(lengths), p=weights / weights.sum())
        return cls(
            segments=tuple((combos[p], int(n)) for p, n in zip(picks, lengths)),
            speed=float(rng.uniform(0.05, 0.14)),
            turn_deg=float(rng.uniform(1.5, 3.5)),
        )


def _step(motion: str, speed: float, turn: float) -> np.ndarray:
    """The camera-frame transform of one frame of ``motion`` (right-multiplied onto c2w)."""
    step = np.eye(4)
    for part in motion.split("+"):
        if part == "forward":
            step[2, 3] += speed
        elif part == "back":
            step[2, 3] -= speed
        elif part == "strafe_left":
            step[0, 3] -= speed
        elif part == "strafe_right":
            step[0, 3] += speed
        elif part == "turn_left":
            step[:3, :3] = step[:3, :3] @ geometry.rotation_y(-turn)
        elif part == "turn_right":
            step[:3, :3] = step[:3, :3] @ geometry.rotation_y(turn)
    return step

"""The procedural 3-D world toyworld is trained on and scored against.

A scene is a checkered floor, a sky gradient and shaded spheres and boxes; a camera path is a list
of motion primitives (``forward``, ``back``, ``turn_left``, ``turn_right``, ``strafe_left``,
``strafe_right`` and their sums). Both are plain data, seeded and deterministic, so a manifest row
can describe them and any rollout can be scored against the rendered truth. World frame = first
camera (OpenCV: x right, y down, z forward); the floor is the plane y = camera height.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hero import geometry

FAR = 60.0  # metres: depth given to sky pixels
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


@dataclass(frozen=True)
class Scene:
    """Everything needed to render: floor, sky, light and primitives (world coordinates)."""

    camera_height: float
    floor_colors: np.ndarray  # (2, 3)
    tile: float
    sky_top: np.ndarray
    sky_horizon: np.ndarray
    light: np.ndarray  # unit vector towards the light
    spheres: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))  # cx cy cz r R G B
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 9)))  # min xyz, max xyz, RGB

    @classmethod
    def random(cls, seed: int, objects: int = 24, clear_path: np.ndarray | None = None) -> "Scene":
        """A seeded scene; primitives never stand within 0.6 m of the points of ``clear_path``."""
        rng = np.random.default_rng(seed)
        height = rng.uniform(0.9, 1.6)
        floor = rng.uniform(0.15, 0.8, size=(1, 3)) * np.array([[1.0], [0.6]])
        sky_top = rng.uniform([0.2, 0.35, 0.6], [0.45, 0.6, 0.95])
        sky_horizon = np.clip(sky_top + rng.uniform(0.2, 0.4), 0, 1)
        elevation, azimuth = rng.uniform(0.5, 1.2), rng.uniform(0, 2 * np.pi)
        light = np.array([np.cos(elevation) * np.sin(azimuth), -np.sin(elevation),
                          np.cos(elevation) * np.cos(azimuth)])
        spheres, boxes = [], []
        path = np.zeros((1, 3)) if clear_path is None else clear_path
        while len(spheres) + len(boxes) < objects:
            r_dist, angle = rng.uniform(1.5, 12.0), rng.uniform(-np.pi, np.pi)
            x, z = r_dist * np.sin(angle), r_dist * np.cos(angle)
            color = rng.uniform(0.05, 1.0, size=3)
            size = rng.uniform(0.25, 1.1)
            if np.min(np.hypot(path[:, 0] - x, path[:, 2] - z)) < size * 1.5 + 0.6:
                continue
            if rng.random() < 0.5:
                spheres.append([x, height - size, z, size, *color])
            else:
                half = size * rng.uniform(0.5, 1.0, size=3)
                lo = [x - half[0], height - 2 * half[1], z - half[2]]
                hi = [x + half[0], height, z + half[2]]
                boxes.append([*lo, *hi, *color])
        return cls(height, floor, float(rng.uniform(0.5, 1.5)), sky_top, sky_horizon, light,
                   np.array(spheres).reshape(-1, 7), np.array(boxes).reshape(-1, 9))


def render(scene: Scene, c2w: np.ndarray, k: np.ndarray, height: int, width: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast every frame: RGB uint8 (T, H, W, 3) and metric z-depth float32 (T, H, W)."""
    frames = c2w.shape[0]
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5, indexing="xy")
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)
    cam_dirs = pixels @ np.linalg.inv(k).transpose(0, 2, 1)  # z = 1: distance along ray = z-depth
    dirs = (cam_dirs @ c2w[:, :3, :3].transpose(0, 2, 1)).reshape(-1, 3)
    origins = np.repeat(c2w[:, :3, 3], height * width, axis=0)
    rgb, depth = _shade(scene, origins, dirs)
    rgb = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8).reshape(frames, height, width, 3)
    return rgb, depth.astype(np.float32).reshape(frames, height, width)


def _shade(scene: Scene, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour and z-depth of rays (origins and directions both (N, 3)) against the whole scene."""
    n = dirs.shape[0]
    hit_t = np.full(n, np.inf)
    normal = np.zeros((n, 3))
    albedo = np.zeros((n, 3))

    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = (scene.camera_height - origin[:, 1]) / dirs[:, 1]
    t_floor = np.where((dirs[:, 1] > 1e-6) & (t_floor > 0), t_floor, np.inf)
    floor_hit = origin + np.where(np.isfinite(t_floor), t_floor, 0.0)[:, None] * dirs
    checker = (np.floor(floor_hit[:, 0] / scene.tile) + np.floor(floor_hit[:, 2] / scene.tile)) % 2
    checker = checker.astype(int)
    closer = t_floor < hit_t
    hit_t[closer] = t_floor[closer]
    normal[closer] = [0.0, -1.0, 0.0]
    albedo[closer] = scene.floor_colors[checker[closer]]

    for cx, cy, cz, r, *color in scene.spheres:
        oc = origin - np.array([cx, cy, cz])
        b = np.einsum("ij,ij->i", dirs, oc)
        a = np.einsum("ij,ij->i", dirs, dirs)
        disc = b * b - a * (np.einsum("ij,ij->i", oc, oc) - r * r)
        with np.errstate(invalid="ignore"):
            t_s = (-b - np.sqrt(disc)) / a
        t_s = np.where((disc > 0) & (t_s > 1e-4), t_s, np.inf)
        closer = t_s < hit_t
        hit_t[closer] = t_s[closer]
        normal[closer] = (origin[closer] + t_s[closer, None] * dirs[closer] - [cx, cy, cz]) / r
        albedo[closer] = color

    for box in scene.boxes:
        lo, hi, color = box[:3], box[3:6], box[6:]
        with np.errstate(divide="ignore", invalid="ignore"):
            t0, t1 = (lo - origin) / dirs, (hi - origin) / dirs
        t_near = np.nanmax(np.minimum(t0, t1), axis=1)
        t_far = np.nanmin(np.maximum(t0, t1), axis=1)
        t_b = np.where((t_near <= t_far) & (t_near > 1e-4), t_near, np.inf)
        closer = t_b < hit_t
        hit_t[closer] = t_b[closer]
        face = np.argmax(np.minimum(t0, t1)[closer], axis=1)
        box_normal = np.zeros((closer.sum(), 3))
        box_normal[np.arange(face.size), face] = -np.sign(dirs[closer][np.arange(face.size), face])
        normal[closer] = box_normal
        albedo[closer] = color

    lambert = np.clip(normal @ scene.light, 0.0, 1.0)[:, None]
    color = albedo * (0.35 + 0.65 * lambert)
    hit = np.isfinite(hit_t)
    fog = np.clip(hit_t / FAR, 0, 1)[:, None] ** 1.5
    up = np.clip(-dirs[:, 1] / np.linalg.norm(dirs, axis=1), 0, 1)[:, None]
    sky = scene.sky_horizon * (1 - up) + scene.sky_top * up
    color = np.where(hit[:, None], color * (1 - fog) + sky * fog, sky)
    return color, np.where(hit, np.minimum(hit_t, FAR), FAR)


@dataclass(frozen=True)
class Clip:
    """A rendered clip: the truth a toyworld rollout is trained on and scored against."""

    rgb: np.ndarray  # (T, H, W, 3) uint8
    depth: np.ndarray  # (T, H, W) float32 metres
    k: np.ndarray  # (T, 3, 3)
    c2w: np.ndarray  # (T, 4, 4)


def render_clip(scene_seed: int, trajectory: Trajectory, frames: int, height: int, width: int,
                fov_x_deg: float = 70.0, objects: int = 24) -> Clip:
    """Render ``frames`` frames of the seeded scene along ``trajectory``."""
    c2w = trajectory.poses(frames)
    scene = Scene.random(scene_seed, objects=objects, clear_path=c2w[:, :3, 3])
    k = geometry.intrinsics(height, width, fov_x_deg, frames)
    rgb, depth = render(scene, c2w, k, height, width)
    return Clip(rgb=rgb, depth=depth, k=k, c2w=c2w)

"""Scenes of the procedural world and their ray-cast renderer.

A scene is a checkered floor, a sky gradient, a directional light and shaded spheres and boxes,
all plain seeded data, so a manifest row can name one and any rollout can be scored against the
rendered truth. World frame = first camera (OpenCV: x right, y down, z forward); the floor is the
plane y = camera height.

Rendering is supersampled (``samples`` x ``samples`` rays per pixel, averaged in linear colour), as
a real camera integrates light over a pixel: without it distant floor checkers alias into noise
that no 4x-compressing VAE can reproduce. Depth and the object mask come from each pixel's centre
ray, so depth stays a depth of one surface (no blends across an object's silhouette).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FAR = 60.0  # metres: depth given to sky pixels


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
    def random(cls, seed: int, objects: int = 12, clear_path: np.ndarray | None = None) -> "Scene":
        """A seeded scene; primitives never stand within 0.6 m of the points of ``clear_path``.

        Objects stand 1.5-9 m from the start (most of them ahead), 0.3-1.0 m in size, in saturated
        colours: near and large enough to cover several pixels at 48x64 and to be told from the floor.
        """
        rng = np.random.default_rng(seed)
        height = rng.uniform(0.9, 1.6)
        floor = rng.uniform(0.2, 0.75, size=(1, 3)) * np.array([[1.0], [0.55]])
        sky_top = rng.uniform([0.2, 0.35, 0.6], [0.45, 0.6, 0.95])
        sky_horizon = np.clip(sky_top + rng.uniform(0.2, 0.4), 0, 1)
        elevation, azimuth = rng.uniform(0.5, 1.2), rng.uniform(0, 2 * np.pi)
        light = np.array([np.cos(elevation) * np.sin(azimuth), -np.sin(elevation),
                          np.cos(elevation) * np.cos(azimuth)])
        spheres, boxes = [], []
        path = np.zeros((1, 3)) if clear_path is None else clear_path
        while len(spheres) + len(boxes) < objects:
            ahead = rng.random() < 0.6  # most objects in front, where the camera starts looking
            angle = rng.uniform(-1.0, 1.0) if ahead else rng.uniform(-np.pi, np.pi)
            r_dist = rng.uniform(1.5, 9.0)
            x, z = r_dist * np.sin(angle), r_dist * np.cos(angle)
            color = _saturated(rng)
            size = rng.uniform(0.3, 1.0)
            if np.min(np.hypot(path[:, 0] - x, path[:, 2] - z)) < size * 1.5 + 0.6:
                continue
            if rng.random() < 0.5:
                spheres.append([x, height - size, z, size, *color])
            else:
                half = size * rng.uniform(0.5, 1.0, size=3)
                lo = [x - half[0], height - 2 * half[1], z - half[2]]
                hi = [x + half[0], height, z + half[2]]
                boxes.append([*lo, *hi, *color])
        return cls(height, floor, float(rng.uniform(0.6, 1.5)), sky_top, sky_horizon, light,
                   np.array(spheres).reshape(-1, 7), np.array(boxes).reshape(-1, 9))


def _saturated(rng: np.random.Generator) -> np.ndarray:
    """A bright, saturated colour: one channel high, one low, one anywhere (shuffled)."""
    color = np.array([rng.uniform(0.75, 1.0), rng.uniform(0.0, 0.25), rng.uniform(0.0, 1.0)])
    return color[rng.permutation(3)]


@dataclass(frozen=True)
class Frames:
    """Rendered frames: RGB uint8 (T, H, W, 3), metric z-depth float32 (T, H, W), object mask (T, H, W)."""

    rgb: np.ndarray
    depth: np.ndarray
    objects: np.ndarray


def render(scene: Scene, c2w: np.ndarray, k: np.ndarray, height: int, width: int,
           samples: int = 2) -> Frames:
    """Ray-cast every frame with ``samples`` x ``samples`` rays per pixel for colour."""
    offsets = (np.arange(samples) + 0.5) / samples
    colour = np.zeros((c2w.shape[0] * height * width, 3))
    for dy in offsets:
        for dx in offsets:
            origins, dirs = _rays(c2w, k, height, width, dx, dy)
            colour += _shade(scene, origins, dirs)[0]
    colour /= samples * samples
    origins, dirs = _rays(c2w, k, height, width, 0.5, 0.5)
    _, depth, is_object = _shade(scene, origins, dirs)
    shape = (c2w.shape[0], height, width)
    rgb = np.clip(colour * 255 + 0.5, 0, 255).astype(np.uint8).reshape(*shape, 3)
    return Frames(rgb=rgb, depth=depth.astype(np.float32).reshape(shape), objects=is_object.reshape(shape))


def _rays(c2w: np.ndarray, k: np.ndarray, height: int, width: int, dx: float, dy: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """World-space origins and directions (z = 1 in the camera: distance along a ray = z-depth)."""
    u, v = np.meshgrid(np.arange(width) + dx, np.arange(height) + dy, indexing="xy")
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)
    cam_dirs = pixels @ np.linalg.inv(k).transpose(0, 2, 1)
    dirs = (cam_dirs @ c2w[:, :3, :3].transpose(0, 2, 1)).reshape(-1, 3)
    origins = np.repeat(c2w[:, :3, 3], height * width, axis=0)
    return origins, dirs


def _shade(scene: Scene, origin: np.ndarray, dirs: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colour, z-depth and "hit an object" of rays (origins and directions both (N, 3))."""
    n = dirs.shape[0]
    hit_t = np.full(n, np.inf)
    normal = np.zeros((n, 3))
    albedo = np.zeros((n, 3))
    is_object = np.zeros(n, dtype=bool)

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
        is_object[closer] = True

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
        is_object[closer] = True

    lambert = np.clip(normal @ scene.light, 0.0, 1.0)[:, None]
    color = albedo * (0.35 + 0.65 * lambert)
    hit = np.isfinite(hit_t)
    fog = np.clip(hit_t / FAR, 0, 1)[:, None] ** 1.5
    up = np.clip(-dirs[:, 1] / np.linalg.norm(dirs, axis=1), 0, 1)[:, None]
    sky = scene.sky_horizon * (1 - up) + scene.sky_top * up
    color = np.where(hit[:, None], color * (1 - fog) + sky * fog, sky)
    depth = np.where(hit, np.minimum(hit_t, FAR), FAR)
    return color, depth, is_object & (hit_t < FAR)

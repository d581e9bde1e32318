"""CPU prep stage (Ray tasks): a validated manifest row in, the model's inputs at its resolution out.

Images and videos are read through fsspec and fitted to the model; procedural scenes are rendered
(only the frames the task's observations show, :data:`hero.models.base.TASKS`). The driver passes
the model's :class:`~hero.models.base.ModelSpec`, read from the model registry without weights.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import fsspec
import imageio.v3 as iio
import numpy as np
from PIL import Image

from hero import geometry, world
from hero.models.base import OBSERVED_AT, TASKS, ModelSpec, observed_frames
from pipeline.manifest import ManifestRow
from pipeline.stages.rows import ROW_COLUMNS, RowFailure, columns, error_json, pack, rows


def load_image(uri: str, field: str, storage_options: dict[str, Any]) -> np.ndarray:
    """An image URI to (H, W, 3) uint8; missing or undecodable files raise RowFailure naming ``field``."""
    data = _read(uri, field, storage_options)
    try:
        image = np.asarray(iio.imread(data))
    except Exception as exc:
        raise RowFailure(field, f"cannot decode image {uri}: {type(exc).__name__}") from None
    return _as_rgb(image, field, uri)


def load_video(uri: str, field: str, storage_options: dict[str, Any]) -> np.ndarray:
    data = _read(uri, field, storage_options)
    try:
        frames = np.asarray(iio.imread(data, index=None, extension=os.path.splitext(uri)[1] or ".mp4"))
    except Exception as exc:
        raise RowFailure(field, f"cannot decode video {uri}: {type(exc).__name__}") from None
    if frames.ndim != 4:
        raise RowFailure(field, f"{uri} is not a video (decoded shape {frames.shape})")
    return np.stack([_as_rgb(f, field, uri) for f in frames])


def _read(uri: str, field: str, storage_options: dict[str, Any]) -> bytes:
    try:
        with fsspec.open(uri, "rb", **storage_options) as f:
            return f.read()
    except FileNotFoundError:
        raise RowFailure(field, f"not found: {uri}") from None
    except (OSError, ValueError) as exc:
        raise RowFailure(field, f"cannot read {uri}: {type(exc).__name__}") from None


def _as_rgb(image: np.ndarray, field: str, uri: str) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or min(image.shape[:2]) < 2:
        raise RowFailure(field, f"{uri}: expected an RGB image, decoded shape {image.shape}")
    if image.dtype != np.uint8:
        raise RowFailure(field, f"{uri}: expected 8-bit pixels, got {image.dtype}")
    return image[..., :3]


def fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the target aspect ratio and resize (bicubic) to height x width."""
    h, w = image.shape[:2]
    scale = min(h / height, w / width)
    crop_h, crop_w = int(round(height * scale)), int(round(width * scale))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    cropped = Image.fromarray(np.ascontiguousarray(image[top: top + crop_h, left: left + crop_w]))
    return np.asarray(cropped.resize((width, height), Image.Resampling.BICUBIC))


def prepare_row(row: ManifestRow, spec: ModelSpec, storage_options: dict[str, Any]) -> dict[str, np.ndarray]:
    """Decode or render the inputs the row's task needs at the model's resolution: image/goal/video,
    c2w and K for ``frames`` frames (the row's, else the model's clip length)."""
    frames = row.frames or spec.frame_options[0]
    if frames not in spec.frame_options and (row.task != "prediction" or frames < min(spec.frame_options)):
        raise RowFailure("frames", f"model {spec.name} takes frames in {spec.frame_options} for {row.task} "
                                   f"(prediction chains chunks for more), got {frames}")
    trajectory = row.trajectory
    if trajectory is not None and trajectory.c2w is not None and len(trajectory.c2w) < frames:
        raise RowFailure("trajectory.c2w", f"{len(trajectory.c2w)} poses for a {frames}-frame rollout (without "
                                           f"'frames' a row takes model {spec.name}'s clip length)")
    k = geometry.intrinsics(spec.height, spec.width, row.fov_deg or spec.fov_x_deg, frames)
    c2w = trajectory.poses(frames) if trajectory is not None else np.tile(np.eye(4), (frames, 1, 1))
    arrays: dict[str, np.ndarray] = {"k": k, "c2w": c2w}
    obs, observations = row.observation, TASKS[row.task].observations
    if obs.scene is not None:
        arrays.update(_render_inputs(row, c2w, k, spec))
    elif obs.image is not None:
        arrays["image"] = fit(load_image(obs.image, "observation.image", storage_options), spec.height, spec.width)
    else:
        video = load_video(obs.video, "observation.video", storage_options)
        if "video" in observations:
            if video.shape[0] < frames:
                raise RowFailure("observation.video", f"{obs.video} has {video.shape[0]} frames, the row asks for {frames}")
            arrays["video"] = np.stack([fit(f, spec.height, spec.width) for f in video[:frames]])
        if "image" in observations:
            arrays["image"] = fit(video[0], spec.height, spec.width)
    if row.goal is not None:
        arrays["goal"] = fit(load_image(row.goal.image, "goal.image", storage_options), spec.height, spec.width)
    return arrays


def _render_inputs(row: ManifestRow, c2w: np.ndarray, k: np.ndarray, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Render the observations the task needs, and only the frames they show (a goal the row gives
    as an image replaces the rendered one)."""
    scene = world.Scene.random(row.observation.scene.seed, objects=row.observation.scene.objects,
                               clear_path=c2w[:, :3, 3])
    observations = TASKS[row.task].observations
    shown = {name: observed_frames(name, len(c2w)) for name in observations}
    needed = sorted(set().union(*shown.values()))
    rgb = dict(zip(needed, world.render(scene, c2w[needed], k[needed], spec.height, spec.width).rgb))
    return {name: np.stack([rgb[i] for i in frames]) if OBSERVED_AT[name] == "all" else rgb[frames[0]]
            for name, frames in shown.items()}


def prepare_batch(batch: dict[str, np.ndarray], spec: ModelSpec, storage_options: dict[str, Any]) -> dict[str, np.ndarray]:
    """CPU prep stage (Ray tasks): validated manifest rows in, model-ready inputs (an .npz blob) out."""
    out = []
    for item in rows(batch):
        item = dict(item, inputs=b"", meta="{}")
        if not item["error"]:
            started = time.perf_counter()
            try:
                row = ManifestRow.model_validate_json(item["row"])
                item["inputs"] = pack(prepare_row(row, spec, storage_options))
            except RowFailure as exc:
                item["error"] = error_json(item["id"], exc.field, exc.reason, "prep")
            except Exception as exc:
                item["error"] = error_json(item["id"], "observation", f"{type(exc).__name__}: {exc}", "prep")
            item["meta"] = json.dumps({"timings": {"prep_s": time.perf_counter() - started}})
        out.append(item)
    return columns(out, ROW_COLUMNS + ("inputs",))

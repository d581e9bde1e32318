"""The Ray Data stages: CPU prep -> generate (an actor pool; each actor owns a world model and its
accelerator) -> CPU encode. One dataset row is one manifest row (one rollout).

Rows travel as Arrow-native columns: ints, JSON strings and binary blobs of ``.npz`` arrays (no
pickles). A row that fails in any stage becomes an error row (``error`` holds a
:class:`pipeline.manifest.RowError` as JSON) and is passed through untouched by later stages, so the
driver sees every row of a unit come back and the run goes on.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import imageio.v3 as iio
import numpy as np
from PIL import Image

from hero import geometry
from hero.models.base import Rollout, RolloutRequest
from hero import world
from hero.rollout import generate_any_length
from pipeline import faults
from pipeline.manifest import ManifestRow, RowError
from pipeline.samples import encode_sample

ROW_COLUMNS = ("unit", "position", "id", "row", "error", "meta")
BINARY_COLUMNS = ("inputs", "rollout", "files")
FIELD_IN_MESSAGE = re.compile(r"^([a-z_][a-z0-9_.]*): ")


@dataclass(frozen=True)
class Geometry:
    """What prep needs to know about the model: its resolution, frame counts and default field of view."""

    name: str
    height: int
    width: int
    frame_options: tuple[int, ...]
    fov_x_deg: float


class RowFailure(Exception):
    """A row-level failure raised inside a stage; becomes an error row naming ``field``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def model_geometry(name: str, options: dict[str, Any]) -> Geometry:
    """The model's geometry, from its spec in the model registry: the driver never loads weights."""
    from hero.models import model_spec

    spec = model_spec(name, **options)
    return Geometry(spec.name, spec.height, spec.width, tuple(spec.frame_options), float(spec.fov_x_deg))


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays to an uncompressed .npz blob (loads with ``allow_pickle=False``)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def error_json(row_id: str | None, field: str, reason: str, stage: str) -> str:
    return json.dumps(RowError(row_id, field, reason, stage=stage).to_dict())


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


def _columns(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name in ("unit", "position"):
            columns[name] = np.array(values, dtype=np.int64)
        else:
            column = np.empty(len(values), dtype=object)
            column[:] = [b"" if v is None and name in BINARY_COLUMNS else ("" if v is None else v) for v in values]
            columns[name] = column
    return columns


# ------------------------------------------------------------------------------------------ prep
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


def prepare_row(row: ManifestRow, geo: Geometry, storage_options: dict[str, Any]) -> dict[str, np.ndarray]:
    """Decode or render a row's inputs at the model's resolution: image/goal/video, c2w and K."""
    frames = row.frames or geo.frame_options[0]
    if frames not in geo.frame_options and (row.task != "prediction" or frames < min(geo.frame_options)):
        raise RowFailure("frames", f"model {geo.name} takes frames in {geo.frame_options} for {row.task} "
                                   f"(prediction chains chunks for more), got {frames}")
    k = geometry.intrinsics(geo.height, geo.width, row.fov_deg or geo.fov_x_deg, frames)
    c2w = row.trajectory.poses(frames) if row.trajectory is not None else np.tile(np.eye(4), (frames, 1, 1))
    arrays: dict[str, np.ndarray] = {"k": k, "c2w": c2w}
    obs = row.observation
    if obs.scene is not None:
        arrays.update(_render_inputs(row, c2w, k, geo))
    elif obs.image is not None:
        arrays["image"] = fit(load_image(obs.image, "observation.image", storage_options), geo.height, geo.width)
    else:
        video = load_video(obs.video, "observation.video", storage_options)
        if video.shape[0] < frames:
            raise RowFailure("observation.video", f"{obs.video} has {video.shape[0]} frames, the row asks for {frames}")
        arrays["video"] = np.stack([fit(f, geo.height, geo.width) for f in video[:frames]])
        arrays["image"] = arrays["video"][0]
    if row.goal is not None:
        arrays["goal"] = fit(load_image(row.goal.image, "goal.image", storage_options), geo.height, geo.width)
    return arrays


def _render_inputs(row: ManifestRow, c2w: np.ndarray, k: np.ndarray, geo: Geometry) -> dict[str, np.ndarray]:
    """Render only the frames the task consumes: the first, the last (planning goal) or all (reconstruction)."""
    scene = world.Scene.random(row.observation.scene.seed, objects=row.observation.scene.objects,
                               clear_path=c2w[:, :3, 3])
    needed = {"prediction": [0], "planning": [0, len(c2w) - 1], "reconstruction": list(range(len(c2w)))}[row.task]
    rgb = world.render(scene, c2w[needed], k[needed], geo.height, geo.width).rgb
    arrays = {"image": rgb[0]}
    if row.task == "planning" and row.goal is None:
        arrays["goal"] = rgb[-1]
    if row.task == "reconstruction":
        arrays["video"] = rgb
    return arrays


def prepare_batch(batch: dict[str, np.ndarray], geo: Geometry, storage_options: dict[str, Any]) -> dict[str, np.ndarray]:
    """CPU prep stage (Ray tasks): validated manifest rows in, model-ready inputs (an .npz blob) out."""
    out = []
    for item in _rows(batch):
        item = dict(item, inputs=b"", meta="{}")
        if not item["error"]:
            started = time.perf_counter()
            try:
                row = ManifestRow.model_validate_json(item["row"])
                item["inputs"] = pack(prepare_row(row, geo, storage_options))
            except RowFailure as exc:
                item["error"] = error_json(item["id"], exc.field, exc.reason, "prep")
            except Exception as exc:
                item["error"] = error_json(item["id"], "observation", f"{type(exc).__name__}: {exc}", "prep")
            item["meta"] = json.dumps({"timings": {"prep_s": time.perf_counter() - started}})
        out.append(item)
    return _columns(out, ROW_COLUMNS + ("inputs",))


# -------------------------------------------------------------------------------------- generate
class RolloutMetrics:
    """Ray metrics of the generate actors (on each node's metrics endpoint, tagged model/accel)."""

    def __init__(self, model: str, accel: str) -> None:
        from ray.util import metrics

        tags = {"model": model, "accel": accel}
        keys = tuple(tags)
        self.rollouts = metrics.Counter("hero_rollouts", "rollouts generated", tag_keys=keys)
        self.frames = metrics.Counter("hero_frames", "frames generated", tag_keys=keys)
        self.failures = metrics.Counter("hero_rollout_failures", "rows the model failed on", tag_keys=keys)
        self.seconds = metrics.Histogram("hero_rollout_seconds", "generation seconds per rollout",
                                         boundaries=[1, 5, 15, 30, 60, 120, 300, 900], tag_keys=keys)
        self.skipped = metrics.Gauge("hero_cache_skipped_fraction",
                                     "fraction of block-token computations the accelerator skipped", tag_keys=keys)
        for metric in (self.rollouts, self.frames, self.failures, self.seconds, self.skipped):
            metric.set_default_tags(tags)

    def record(self, rollouts: list[Rollout], failures: int, seconds: float, stats: dict[str, Any]) -> None:
        if rollouts:
            self.rollouts.inc(len(rollouts))
            self.frames.inc(sum(r.frames for r in rollouts))
            self.seconds.observe(seconds)
        if failures:
            self.failures.inc(failures)
        if isinstance(stats.get("skipped_block_token_fraction"), (int, float)):
            self.skipped.set(float(stats["skipped_block_token_fraction"]))


class GenerateRollouts:
    """Generate stage (an actor pool): each actor loads the world model and applies the accelerator
    once, in ``__init__``, then turns batches of prepared rows into rollouts."""

    def __init__(self, model: str, model_options: dict[str, Any], accel: str, accel_options: dict[str, Any],
                 steps: int | None) -> None:
        started = time.time()
        from hero.accelerators import apply_accelerator
        from hero.models import load_model

        options = dict(model_options)
        if _has_cuda():
            options.setdefault("device", "cuda")
        self.model = load_model(model, **options)
        self.accel_name = accel
        self.accel_options = accel_options
        self.accelerator = apply_accelerator(self.model.transformer, accel, **accel_options)
        self.steps = steps
        self.metrics = RolloutMetrics(model, accel)
        ready = time.time()
        self.startup = {"init_s": ready - started, "ready_at": ready}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [dict(item, rollout=b"") for item in _rows(batch)]
        pending = [item for item in items if not item["error"]]
        self._generate(pending)
        if pending and faults.inject("actor_exit"):
            os._exit(1)
        return _columns(items, ROW_COLUMNS + ("rollout",))

    def _generate(self, items: list[dict[str, Any]]) -> None:
        if not items:
            return
        requests = [self._request(item) for item in items]
        started = time.perf_counter()
        try:
            rollouts = self._run(requests)
        except Exception:
            rollouts = [self._generate_one(request, item) for request, item in zip(requests, items)]
        seconds = (time.perf_counter() - started) / len(items)
        stats = self._accel_stats()
        done = [r for r in rollouts if r is not None]
        self.metrics.record(done, len(items) - len(done), seconds, stats)
        for item, rollout in zip(items, rollouts):
            if rollout is None:
                continue
            meta = json.loads(item["meta"] or "{}")
            timings = dict(rollout.meta.get("timings", {}), **meta.get("timings", {}), generate_s=seconds)
            meta = dict(rollout.meta, timings=timings, actor=self.startup,
                        accelerator={"name": self.accel_name, "options": self.accel_options, "stats": stats})
            item["rollout"] = pack({"rgb": rollout.rgb, "depth": rollout.depth, "k": rollout.k, "c2w": rollout.c2w,
                                    "actions": rollout.actions, "depth_is_metric": np.array(rollout.depth_is_metric)})
            item["meta"] = json.dumps(meta, default=_jsonable)

    def _run(self, requests: list[RolloutRequest]) -> list[Rollout]:
        """Generate; requests longer than the model's clips are chained (``hero.rollout``)."""
        return generate_any_length(self.model, requests)

    def _generate_one(self, request: RolloutRequest, item: dict[str, Any]) -> Rollout | None:
        """Retry one request alone so a bad row fails by itself, not its whole batch."""
        try:
            return self._run([request])[0]
        except Exception as exc:
            message = str(exc)
            match = FIELD_IN_MESSAGE.match(message)
            field, reason = (match.group(1), message[match.end():]) if match else ("model", f"{type(exc).__name__}: {message}")
            item["error"] = error_json(item["id"], field, reason, "generate")
            return None

    def _request(self, item: dict[str, Any]) -> RolloutRequest:
        row = ManifestRow.model_validate_json(item["row"])
        arrays = unpack(item["inputs"])
        return RolloutRequest(
            id=row.id, task=row.task, frames=int(arrays["c2w"].shape[0]), image=arrays.get("image"),
            goal=arrays.get("goal"), video=arrays.get("video"), c2w=arrays["c2w"], k=arrays["k"],
            steps=self.steps or row.steps, guidance=row.guidance, seed=row.seed)

    def _accel_stats(self) -> Any:
        return self.accelerator.stats()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ---------------------------------------------------------------------------------------- encode
def encode_batch(batch: dict[str, np.ndarray], run_id: str, model: str) -> dict[str, np.ndarray]:
    """CPU encode stage (Ray tasks): rollouts to sample files (rgb.mp4, depth.npz, camera.npz,
    action.npy, meta.json), packed into one blob per row."""
    out = []
    for item in _rows(batch):
        files: dict[str, bytes] = {}
        if not item["error"]:
            try:
                files = _encode(item, run_id, model)
            except Exception as exc:
                item["error"] = error_json(item["id"], "rollout", f"{type(exc).__name__}: {exc}", "encode")
        out.append({"unit": item["unit"], "position": item["position"], "id": item["id"],
                    "error": item["error"], "files": pack_files(files)})
    return _columns(out, ("unit", "position", "id", "error", "files"))


def _encode(item: dict[str, Any], run_id: str, model: str) -> dict[str, bytes]:
    arrays = unpack(item["rollout"])
    row = json.loads(item["row"])
    meta = json.loads(item["meta"])
    meta.update(id=row["id"], key=row["id"], run_id=run_id, task=row["task"], seed=row["seed"],
                observation=row["observation"], trajectory=row.get("trajectory"))
    meta.setdefault("model", model)
    rollout = Rollout(rgb=arrays["rgb"], depth=arrays["depth"], depth_is_metric=bool(arrays["depth_is_metric"]),
                      k=arrays["k"], c2w=arrays["c2w"], actions=arrays["actions"], meta=meta)
    return encode_sample(rollout, meta)


def pack_files(files: dict[str, bytes]) -> bytes:
    """A sample's files as one .npz blob of uint8 arrays (empty for error rows)."""
    if not files:
        return b""
    return pack({name: np.frombuffer(data, dtype=np.uint8) for name, data in files.items()})


def unpack_files(blob: bytes) -> dict[str, bytes]:
    return {name: array.tobytes() for name, array in unpack(blob).items()} if blob else {}

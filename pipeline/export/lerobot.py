"""A run as a LeRobot v3 dataset (``codebase_version`` v3.0), loadable by ``lerobot``'s
``LeRobotDataset(repo_id, root=DEST)``; one rollout is one episode.

Layout (LeRobot v3's)::

    meta/info.json                       fps, features (dtype, shape, names, units), paths, totals
    meta/stats.json                      min, max, mean, std, count per feature (video per channel, in [0, 1])
    meta/tasks.parquet                   task string -> task_index (pandas index, as LeRobot writes it)
    meta/episodes/chunk-000/file-000.parquet   per episode: length, tasks, data/video file and range, stats
    meta/hero_rollouts_schema.json       the run's schema.json (conventions), when the run has one
    data/chunk-000/file-000.parquet      one row per frame: timestamp, indices, action, depth, K, poses
    videos/observation.images.rgb/chunk-000/file-NNN.mp4   one per episode: the shard's rgb.mp4, copied as is

Per frame: ``observation.images.rgb`` (video), ``observation.depth`` (float32 H x W, metres for
metric models, decoded from the run's compact depth: relative error at most 0.5 %),
``observation.camera.intrinsics`` (3 x 3 pixels), ``observation.camera.c2w`` (4 x 4, the predicted
camera, OpenCV, frame 0 = identity), ``observation.camera.commanded_c2w`` (the commanded path, NaN
where none) and ``action`` (6: the command issued at t, motion t -> t+1 in camera t's frame), as in
the run's samples (:mod:`pipeline.samples`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from pipeline.loader import read_schema, rollout_files
from pipeline.samples import ARRAYS, DEPTH_LOG_STEP, decode_sample
from pipeline.storage import is_local_uri

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
DATA_FILE_MB = 100
VIDEO_FILE_MB = 200
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
RGB = "observation.images.rgb"
ACTION_NAMES = ["tx", "ty", "tz", "rx", "ry", "rz"]


class ExportError(ValueError):
    """An export that cannot be made as asked (a destination in use, a run of mixed frame rates)."""


def task_text(meta: dict[str, Any]) -> str:
    """The episode's task string: the task and, for motion primitives, the commanded motions."""
    trajectory = meta.get("trajectory") or {}
    segments = trajectory.get("segments")
    if not segments:
        return str(meta.get("task", "prediction"))
    motions = ", ".join(f"{motion} for {frames} frames" for motion, frames in segments)
    return f"{meta.get('task', 'prediction')}: {motions}"


@dataclass
class RunningStats:
    """min, max, mean, std (over finite values) and frame count of one feature, reduced over ``axes``
    of each batch of frames."""

    axes: tuple[int, ...]
    frames: int = 0
    finite: Any = 0
    total: Any = 0.0
    squares: Any = 0.0
    low: Any = np.inf
    high: Any = -np.inf

    def add(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float64)
        finite = np.isfinite(batch)
        values = np.where(finite, batch, 0.0)

        def reduce(array: np.ndarray, how=np.sum) -> np.ndarray:
            return how(array, axis=self.axes, keepdims=True)[0]

        self.frames += int(batch.shape[0])
        self.finite = self.finite + reduce(finite)
        self.total = self.total + reduce(values)
        self.squares = self.squares + reduce(values ** 2)
        self.low = np.minimum(self.low, reduce(np.where(finite, batch, np.inf), np.min))
        self.high = np.maximum(self.high, reduce(np.where(finite, batch, -np.inf), np.max))

    def values(self) -> dict[str, list]:
        count = np.maximum(self.finite, 1)
        mean = self.total / count
        std = np.sqrt(np.maximum(self.squares / count - mean ** 2, 0.0))
        return {"min": _list(self.low), "max": _list(self.high), "mean": _list(mean), "std": _list(std),
                "count": [self.frames]}


def _list(array: Any) -> list:
    """JSON numbers; a feature with no finite value (a path never commanded) gets zeros."""
    return np.nan_to_num(np.asarray(array, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0).tolist()


FEATURE_OF = {"depth": "observation.depth", "k": "observation.camera.intrinsics", "c2w": "observation.camera.c2w",
              "commanded_c2w": "observation.camera.commanded_c2w", "actions": "action"}
STAT_AXES = {RGB: (0, 2, 3), "observation.depth": (0, 1, 2), "observation.camera.intrinsics": (0,),
             "observation.camera.c2w": (0,), "observation.camera.commanded_c2w": (0,), "action": (0,)}
"""Statistics per channel for RGB (as LeRobot), over all pixels for depth, per element for the rest."""


def feature_spec(height: int, width: int, video: dict[str, Any], fps: int, metric: bool,
                 depth_range: list[float]) -> dict[str, Any]:
    """info.json's ``features``: every feature with dtype, shape, names and units."""
    unit = "m" if metric else "relative"
    pose = {"dtype": "float32", "shape": [4, 4], "names": ["row", "col"]}
    return {
        RGB: {"dtype": "video", "shape": [video["height"], video["width"], 3], "names": ["height", "width", "channels"],
              "info": {"video.height": video["height"], "video.width": video["width"], "video.codec": video["codec"],
                       "video.pix_fmt": video["pix_fmt"], "video.is_depth_map": False, "video.fps": fps,
                       "video.channels": 3, "has_audio": False}},
        "observation.depth": {"dtype": "float32", "shape": [height, width], "names": ["height", "width"],
                              "info": {"unit": unit, "metric": metric, "range": depth_range,
                                       "relative_error_max": float(np.expm1(DEPTH_LOG_STEP / 2)),
                                       "zero": "no depth at this pixel",
                                       "meaning": "z-depth along the optical axis"}},
        "observation.camera.intrinsics": {"dtype": "float32", "shape": [3, 3], "names": ["row", "col"],
                                          "info": {"unit": "pixels of the video frame", "model": "pinhole K"}},
        "observation.camera.c2w": dict(pose, info={
            "unit": unit, "convention": "OpenCV camera-to-world (x right, y down, z forward), frame 0 = identity",
            "source": "predicted by the world model"}),
        "observation.camera.commanded_c2w": dict(pose, info={
            "unit": unit, "convention": "as observation.camera.c2w",
            "source": "the camera path the episode commanded (NaN where it commanded none)"}),
        "action": {"dtype": "float32", "shape": [6], "names": ACTION_NAMES,
                   "info": {"meaning": "command issued at frame t: camera motion from t to t+1 in camera t's "
                                       "frame (translation, rotation vector in radians); zero at the last frame",
                            "unit": [unit] * 3 + ["rad"] * 3}},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }


def _video_info(data: bytes) -> dict[str, Any]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        return {"height": stream.codec_context.height, "width": stream.codec_context.width,
                "codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt}


class _DataWriter:
    """Frames into ``data/chunk-CCC/file-FFF.parquet``, a new file past :data:`DATA_FILE_MB`."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.file = 0
        self.bytes = 0
        self.writer = None

    def location(self) -> tuple[int, int]:
        return divmod(self.file, CHUNKS_SIZE)

    def write(self, table) -> tuple[int, int]:
        import pyarrow.parquet as pq

        if self.writer is not None and self.bytes + table.nbytes > DATA_FILE_MB * 1e6:
            self.close()
            self.file += 1
        if self.writer is None:
            chunk, index = self.location()
            path = os.path.join(self.root, DATA_PATH.format(chunk_index=chunk, file_index=index))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.writer, self.bytes = pq.ParquetWriter(path, table.schema, compression="snappy"), 0
        self.writer.write_table(table)
        self.bytes += table.nbytes
        return self.location()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _frame_table(decoded: dict[str, Any], episode: int, first_index: int, task_index: int, fps: int):
    """One episode's frames as an Arrow table in LeRobot's column layout."""
    import pyarrow as pa

    frames = int(decoded["meta"]["frames"])
    height, width = decoded["depth"].shape[1:]

    def matrices(array: np.ndarray, rows: int, cols: int) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(array, dtype=np.float32).reshape(-1))
        return pa.ListArray.from_arrays(
            pa.array(np.arange(0, frames * rows + 1, rows, dtype=np.int32)),
            pa.ListArray.from_arrays(pa.array(np.arange(0, frames * rows * cols + 1, cols, dtype=np.int32)), flat))

    return pa.table({
        "action": pa.FixedSizeListArray.from_arrays(pa.array(decoded["actions"].astype(np.float32).reshape(-1)), 6),
        "observation.depth": matrices(decoded["depth"], height, width),
        "observation.camera.intrinsics": matrices(decoded["k"], 3, 3),
        "observation.camera.c2w": matrices(decoded["c2w"], 4, 4),
        "observation.camera.commanded_c2w": matrices(decoded["commanded_c2w"], 4, 4),
        "timestamp": pa.array(np.arange(frames, dtype=np.float32) / np.float32(fps)),
        "frame_index": pa.array(np.arange(frames, dtype=np.int64)),
        "episode_index": pa.array(np.full(frames, episode, dtype=np.int64)),
        "index": pa.array(np.arange(first_index, first_index + frames, dtype=np.int64)),
        "task_index": pa.array(np.full(frames, task_index, dtype=np.int64)),
    })


def export_lerobot(run: str, dest: str, *, storage_options: dict[str, Any] | None = None,
                   dest_storage_options: dict[str, Any] | None = None, on_error: str = "raise") -> dict[str, Any]:
    """Write the run at ``run`` (local or any fsspec URL) as a LeRobot v3 dataset at ``dest`` (a local
    folder that is absent or empty, or an object-store prefix); return its info.json.

    Shards are verified against the run's index as the loader does (``on_error``). The dataset is
    built in a temporary folder and moved (local) or uploaded (remote) only when complete.
    """
    if is_local_uri(dest):
        root = os.path.abspath(dest.removeprefix("file://"))
        if os.path.exists(root) and os.listdir(root):
            raise ExportError(f"destination {root} is not empty; give a new folder")
        os.makedirs(os.path.dirname(root), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".hero-export-", dir=os.path.dirname(root))
        try:
            info = _write(run, staging, storage_options or {}, on_error)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if os.path.exists(root):
            os.rmdir(root)
        os.rename(staging, root)  # the whole dataset appears at once, or nothing does
        return info
    with tempfile.TemporaryDirectory(prefix="hero-export-") as root:
        info = _write(run, root, storage_options or {}, on_error)
        fs, path = fsspec.core.url_to_fs(dest, **(dest_storage_options or storage_options or {}))
        if fs.exists(path) and fs.ls(path):
            raise ExportError(f"destination {dest} is not empty; give a new prefix")
        fs.put(root.rstrip("/") + "/", path.rstrip("/"), recursive=True)
    return info


def _write(run: str, root: str, storage_options: dict[str, Any], on_error: str) -> dict[str, Any]:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = read_schema(run, storage_options)
    data = _DataWriter(root)
    tasks: dict[str, int] = {}
    episodes: list[dict[str, Any]] = []
    stats: dict[str, RunningStats] = {}
    fps = video = size = metric = model = None
    depth_range = [np.inf, -np.inf]
    total = 0
    for sample in rollout_files(run, storage_options=storage_options, on_error=on_error):
        decoded = decode_sample({name: value for name, value in sample.items() if not name.startswith("__")}, ARRAYS)
        meta = decoded["meta"]
        episode, frames = len(episodes), int(meta["frames"])
        if fps is None:
            fps, metric, video = int(meta["fps"]), decoded["depth_is_metric"], _video_info(sample["rgb.mp4"])
            model = meta.get("model")
            size = decoded["depth"].shape[1:]
        elif int(meta["fps"]) != fps or decoded["depth"].shape[1:] != size:
            raise ExportError(f"sample {sample['__key__']}: {meta['fps']} fps at {decoded['depth'].shape[1:]}, the "
                              f"run's first sample has {fps} fps at {size}; a LeRobot dataset has one of each")
        task = task_text(meta)
        task_index = tasks.setdefault(task, len(tasks))
        table = _frame_table(decoded, episode, total, task_index, fps)
        chunk, file = data.write(table)
        video_chunk, video_file = divmod(episode, CHUNKS_SIZE)
        video_path = os.path.join(root, VIDEO_PATH.format(video_key=RGB, chunk_index=video_chunk, file_index=video_file))
        os.makedirs(os.path.dirname(video_path), exist_ok=True)
        with open(video_path, "wb") as f:
            f.write(sample["rgb.mp4"])
        valid = decoded["depth"][decoded["depth"] > 0]
        if valid.size:
            depth_range = [min(depth_range[0], float(valid.min())), max(depth_range[1], float(valid.max()))]
        for name, values in _stat_arrays(decoded).items():
            stats.setdefault(name, RunningStats(STAT_AXES[name])).add(values)
        episodes.append({
            "episode_index": episode, "tasks": [task], "length": frames,
            "data/chunk_index": chunk, "data/file_index": file,
            "dataset_from_index": total, "dataset_to_index": total + frames,
            f"videos/{RGB}/chunk_index": video_chunk, f"videos/{RGB}/file_index": video_file,
            f"videos/{RGB}/from_timestamp": 0.0, f"videos/{RGB}/to_timestamp": frames / fps,
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
            "hero/sample_id": sample["__key__"], "hero/source_shard": sample["__url__"]})
        total += frames
    data.close()
    if not episodes:
        raise ExportError(f"run {run} has no samples to export")
    os.makedirs(os.path.join(root, "meta", "episodes", "chunk-000"), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes), os.path.join(root, EPISODES_PATH))
    pd.DataFrame({"task_index": list(tasks.values())}, index=list(tasks)).to_parquet(
        os.path.join(root, "meta", "tasks.parquet"))
    with open(os.path.join(root, "meta", "stats.json"), "w") as f:
        json.dump({name: s.values() for name, s in stats.items()}, f, indent=2)
    info = {
        "codebase_version": CODEBASE_VERSION, "robot_type": f"hero-rollouts/{model}",
        "total_episodes": len(episodes), "total_frames": total, "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": DATA_FILE_MB, "video_files_size_in_mb": VIDEO_FILE_MB,
        "fps": fps, "splits": {"train": f"0:{len(episodes)}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH,
        "features": feature_spec(size[0], size[1], video, fps, bool(metric), depth_range),
    }
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=4)
    if schema is not None:
        with open(os.path.join(root, "meta", "hero_rollouts_schema.json"), "w") as f:
            json.dump(schema, f, indent=2)
    return info


def _stat_arrays(decoded: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays statistics are taken over: RGB (T, 3, H, W) in [0, 1], the rest as exported."""
    return {RGB: decoded["rgb"].transpose(0, 3, 1, 2) / 255.0,
            **{feature: decoded[name] for name, feature in FEATURE_OF.items()}}

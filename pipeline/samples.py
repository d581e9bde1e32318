"""The files of one WebDataset sample, both ways: a rollout to bytes, bytes to arrays.

Per sample: ``rgb.mp4`` (H.264), ``depth.npz`` (float16 depth + ``metric`` flag), ``camera.npz``
(K, c2w), ``action.npy`` (T, 6) and ``meta.json``. Depth is never a 16-bit PNG (stock decoders
crush it to 8 bits) and nothing is pickled: every array loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import av
import numpy as np

from hero.models.base import Rollout

SCHEMA_VERSION = 1
FIELDS = ("rgb.mp4", "depth.npz", "camera.npz", "action.npy", "meta.json")
VIDEO_FPS = 8


def _threads(height: int, width: int) -> int:
    """One codec thread for small clips (spawning threads costs more than it saves), auto for large."""
    return 1 if height * width <= 256 * 256 else 0


def encode_video(rgb: np.ndarray, fps: int = VIDEO_FPS) -> bytes:
    """(T, H, W, 3) uint8 to an H.264 mp4 (yuv420p, crf 18); odd sizes are padded by edge
    replication (meta.json keeps the true size)."""
    frames, height, width, _ = rgb.shape
    padded = np.pad(rgb, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = padded.shape[2], padded.shape[1], "yuv420p"
        stream.codec_context.thread_count = _threads(height, width)
        stream.options = {"crf": "18", "preset": "fast"}
        for frame in padded:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def decode_video(data: bytes, height: int | None = None, width: int | None = None) -> np.ndarray:
    """An mp4 back to (T, H, W, 3) uint8, cropped to ``height`` x ``width`` when given."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = _threads(stream.codec_context.height, stream.codec_context.width)
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
    return np.ascontiguousarray(frames[:, :height, :width])


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_sample(rollout: Rollout, meta: dict[str, Any]) -> dict[str, bytes]:
    """The sample's files (without ``__key__``), ready to be written into a shard; ``meta.json``
    gets the schema version, the clip's size and the encoding time on top of ``meta``."""
    started = time.perf_counter()
    frames, height, width = rollout.rgb.shape[:3]
    files = {
        "rgb.mp4": encode_video(np.asarray(rollout.rgb, dtype=np.uint8)),
        "depth.npz": _npz(depth=np.asarray(rollout.depth, dtype=np.float16),
                          metric=np.array(bool(rollout.depth_is_metric))),
        "camera.npz": _npz(k=np.asarray(rollout.k, dtype=np.float32), c2w=np.asarray(rollout.c2w, dtype=np.float32)),
        "action.npy": _npy(np.asarray(rollout.actions, dtype=np.float32)),
    }
    timings = dict(meta.get("timings", {}), encode_s=time.perf_counter() - started)
    meta = dict(meta, schema_version=SCHEMA_VERSION, frames=int(frames), height=int(height), width=int(width),
                depth_is_metric=bool(rollout.depth_is_metric), fps=VIDEO_FPS, timings=timings)
    files["meta.json"] = json.dumps(meta, sort_keys=True, allow_nan=False, default=_json_default).encode()
    return files


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON serialisable")


def decode_sample(files: dict[str, bytes]) -> dict[str, Any]:
    """Sample files to numpy: rgb (T,H,W,3) uint8, depth (T,H,W) float32, k, c2w, actions, meta."""
    meta = json.loads(files["meta.json"])
    with np.load(io.BytesIO(files["depth.npz"]), allow_pickle=False) as depth:
        depth_map, metric = depth["depth"].astype(np.float32), bool(depth["metric"])
    with np.load(io.BytesIO(files["camera.npz"]), allow_pickle=False) as camera:
        k, c2w = camera["k"], camera["c2w"]
    return {
        "rgb": decode_video(files["rgb.mp4"], meta["height"], meta["width"]),
        "depth": depth_map,
        "depth_is_metric": metric,
        "k": k,
        "c2w": c2w,
        "actions": np.load(io.BytesIO(files["action.npy"]), allow_pickle=False),
        "meta": meta,
    }

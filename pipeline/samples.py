"""The files of one WebDataset sample, both ways: a rollout to bytes, bytes to arrays.

Per sample (format 2, :data:`FIELDS`):

- ``rgb.mp4``: H.264 (yuv420p, crf 18) at the rollout's frame rate (``meta.json`` ``fps``);
- ``depth.mkv``: compact depth: FFV1 (lossless) 16-bit grey frames of log depth quantised in steps
  of ``meta.json`` ``depth_encoding.step`` (0.01 by default: relative error at most 0.5 %, the
  files are about 3x smaller than float16 ``.npz``); code 0 means "no depth" and decodes to 0;
- ``camera.npz``: ``k`` (T, 3, 3), ``c2w`` (T, 4, 4), ``commanded_c2w`` (T, 4, 4; NaN where the row
  commanded no camera path);
- ``action.npy``: (T, 6) float32, ``actions[t]`` is the command issued at frame t, the camera motion
  from frame t to t+1 in frame t's camera coordinates (translation xyz, rotation vector xyz), as in
  LeRobot; the last row, after which nothing is commanded, is zero;
- ``meta.json``: format version, model, task, seed, steps, accelerator, timings, ``fps``,
  ``depth_is_metric``, ``depth_encoding``, ``poses_from``, ``actions_from``.

Format 1 (``depth.npz`` float16, ``actions[t]`` the motion from t-1 to t, the commanded path inside
``meta.json``) still decodes, to the same arrays and conventions as format 2. Depth is never a
16-bit PNG (stock decoders crush it to 8 bits) and nothing is pickled: every array loads with
``allow_pickle=False``. The conventions are written out for readers in :mod:`pipeline.schema`.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable
from typing import Any

import av
import numpy as np

from hero.models.base import Rollout

SCHEMA_VERSION = 2
FIELDS = ("rgb.mp4", "depth.mkv", "camera.npz", "action.npy", "meta.json")
LEGACY_DEPTH_FIELD = "depth.npz"
DEFAULT_FPS = 8  # for a model that declares no frame rate (every shipped model declares one)
DEPTH_LOG_STEP = 0.01  # quantisation step of ln(depth): relative error <= step / 2
DEPTH_CODEC = "ffv1-log-depth-u16"
ARRAYS = ("rgb", "depth", "k", "c2w", "commanded_c2w", "actions")
FILES_OF = {"rgb": "rgb.mp4", "depth": "depth.mkv", "k": "camera.npz", "c2w": "camera.npz",
            "commanded_c2w": "camera.npz", "actions": "action.npy"}


def _threads(height: int, width: int) -> int:
    """One codec thread for small clips (spawning threads costs more than it saves), auto for large."""
    return 1 if height * width <= 256 * 256 else 0


def encode_video(rgb: np.ndarray, fps: int = DEFAULT_FPS) -> bytes:
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


def encode_depth(depth: np.ndarray, step: float = DEPTH_LOG_STEP, fps: int = DEFAULT_FPS
                 ) -> tuple[bytes, dict[str, Any]]:
    """(T, H, W) positive depth to FFV1 16-bit grey frames of quantised log depth, and the
    parameters that decode it (``meta.json`` ``depth_encoding``).

    code = round((ln d - log_min) / step) + 1, so a decoded value is within a factor
    exp(+-step/2) of the original; non-finite or non-positive depth gets code 0 ("no depth").
    """
    depth = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    log_depth = np.log(np.where(valid, depth, 1.0))
    log_min = float(log_depth[valid].min()) if valid.any() else 0.0
    codes = np.round((log_depth - log_min) / step) + 1
    if valid.any() and codes[valid].max() > np.iinfo(np.uint16).max:
        raise ValueError(f"depth: range {depth[valid].min():.3g}..{depth[valid].max():.3g} needs more than "
                         f"16 bits at log step {step}")
    codes = np.where(valid, codes, 0).astype(np.uint16)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = codes.shape[2], codes.shape[1], "gray16le"
        stream.codec_context.thread_count = 1
        stream.options = {"level": "3", "coder": "1", "context": "0", "g": "1"}
        for frame in codes:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray16le")))
        container.mux(stream.encode())
    return buffer.getvalue(), {"codec": DEPTH_CODEC, "log_min": log_min, "step": step}


def decode_depth(data: bytes, encoding: dict[str, Any]) -> np.ndarray:
    """``depth.mkv`` back to (T, H, W) float32 depth (0 where there is none)."""
    if encoding.get("codec") != DEPTH_CODEC:
        raise ValueError(f"depth.mkv: unknown depth codec {encoding.get('codec')!r}; this reader knows {DEPTH_CODEC!r}")
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = _threads(stream.codec_context.height, stream.codec_context.width)
        codes = np.stack([frame.to_ndarray(format="gray16le") for frame in container.decode(stream)])
    table = np.exp(encoding["log_min"] + (np.arange(int(codes.max()) + 1) - 1) * encoding["step"]).astype(np.float32)
    table[0] = 0.0
    return table[codes]


def issued_actions(deltas: np.ndarray) -> np.ndarray:
    """Motions ``deltas[t]`` from frame t-1 to t (row 0 zero, :class:`hero.models.base.Rollout`'s
    convention) to commands issued at frame t, the motion from t to t+1 (last row zero)."""
    deltas = np.asarray(deltas, dtype=np.float32)
    return np.concatenate([deltas[1:], np.zeros_like(deltas[:1])])


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def commanded_path(meta: dict[str, Any], frames: int) -> np.ndarray:
    """The commanded camera path a rollout's (or a format-1 sample's) meta carries
    (``commanded_c2w``), or NaN poses when the row commanded none (reconstruction, planning)."""
    commanded = meta.get("commanded_c2w")
    if commanded is None:
        return np.full((frames, 4, 4), np.nan, dtype=np.float32)
    return np.asarray(commanded, dtype=np.float32).reshape(frames, 4, 4)


def encode_sample(rollout: Rollout, meta: dict[str, Any]) -> dict[str, bytes]:
    """The sample's files (without ``__key__``), ready to be written into a shard.

    ``meta.json`` gets the format version, the clip's size, frame rate, depth encoding, where poses
    and actions come from and the encoding time on top of ``meta``; the commanded path the model
    reported (``rollout.meta["commanded_c2w"]``) goes into ``camera.npz``, not into ``meta.json``.
    """
    started = time.perf_counter()
    frames, height, width = rollout.rgb.shape[:3]
    fps = int(meta.get("fps") or DEFAULT_FPS)
    commanded = commanded_path(rollout.meta, frames)
    depth, depth_encoding = encode_depth(rollout.depth, fps=fps)
    files = {
        "rgb.mp4": encode_video(np.asarray(rollout.rgb, dtype=np.uint8), fps),
        "depth.mkv": depth,
        "camera.npz": _npz(k=np.asarray(rollout.k, dtype=np.float32), c2w=np.asarray(rollout.c2w, dtype=np.float32),
                           commanded_c2w=commanded),
        "action.npy": _npy(issued_actions(rollout.actions)),
    }
    timings = dict(meta.get("timings", {}), encode_s=time.perf_counter() - started)
    meta = {key: value for key, value in meta.items() if key != "commanded_c2w"}
    meta.update(schema_version=SCHEMA_VERSION, frames=int(frames), height=int(height), width=int(width),
                depth_is_metric=bool(rollout.depth_is_metric), fps=fps, depth_encoding=depth_encoding,
                poses_from=meta.get("poses_from", "predicted"),
                actions_from="commanded" if np.isfinite(commanded).all() else "predicted", timings=timings)
    files["meta.json"] = json.dumps(meta, sort_keys=True, allow_nan=False, default=_json_default).encode()
    return files


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON serialisable")


def decode_sample(files: dict[str, bytes], fields: Iterable[str] = ARRAYS) -> dict[str, Any]:
    """Sample files to numpy: of ``fields`` (default all of :data:`ARRAYS`) rgb (T,H,W,3) uint8,
    depth (T,H,W) float32, k, c2w, commanded_c2w, actions; always ``meta`` and ``depth_is_metric``.

    Files of fields not asked for are never decoded (depth is the costliest after video).
    Format-1 samples come back in format 2's conventions.
    """
    fields = set(fields)
    unknown = fields - set(ARRAYS)
    if unknown:
        raise ValueError(f"fields: unknown {sorted(unknown)}; choose from {ARRAYS}")
    meta = json.loads(files["meta.json"])
    legacy = int(meta.get("schema_version", 1)) < 2
    out: dict[str, Any] = {"meta": meta, "depth_is_metric": bool(meta.get("depth_is_metric", True))}
    if "rgb" in fields:
        out["rgb"] = decode_video(files["rgb.mp4"], meta["height"], meta["width"])
    if "depth" in fields:
        if legacy:
            with np.load(io.BytesIO(files[LEGACY_DEPTH_FIELD]), allow_pickle=False) as depth:
                out["depth"] = depth["depth"].astype(np.float32)
        else:
            out["depth"] = decode_depth(files["depth.mkv"], meta["depth_encoding"])
    if fields & {"k", "c2w", "commanded_c2w"}:
        with np.load(io.BytesIO(files["camera.npz"]), allow_pickle=False) as camera:
            poses = {"k": camera["k"], "c2w": camera["c2w"],
                     "commanded_c2w": commanded_path(meta, len(camera["c2w"])) if legacy else camera["commanded_c2w"]}
        out.update({name: array for name, array in poses.items() if name in fields})
    if "actions" in fields:
        actions = np.load(io.BytesIO(files["action.npy"]), allow_pickle=False)
        out["actions"] = issued_actions(actions) if legacy else actions
    return out

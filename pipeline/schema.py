"""Data that describes itself: the run's ``schema.json`` and each shard's metadata table.

- :func:`schema_document` is written once at the run root: every field of a sample with its dtype,
  shape and unit, and the conventions a trainer needs (OpenCV cameras, frame 0 = identity, what an
  action is, the frame rate, metric or relative depth, which poses are predicted and which
  commanded). :func:`pipeline.loader.read_schema` reads it back.
- :func:`shard_metadata` is written beside every shard, by the worker that writes the shard
  (``shards/<run id>-<unit>-<token>.parquet`` beside the ``.tar`` of that name): one row per
  sample (id, task, frames, model, accelerator, quality figures), so a trainer can choose samples
  without opening a tar (:func:`pipeline.loader.read_metadata`).
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import numpy as np

from pipeline.samples import DEPTH_CODEC, DEPTH_LOG_STEP, FIELDS, SCHEMA_VERSION

SCHEMA_FILE = "schema.json"
FORMAT = "hero-rollouts/webdataset"

CONVENTIONS = {
    "camera": "OpenCV: x right, y down, z forward; c2w maps camera coordinates to world coordinates",
    "world": "the first frame's camera: c2w[0] is the identity (windows are re-based on their first frame)",
    "intrinsics": "k[t] in pixels of the stored frames (height x width)",
    "actions": "actions[t] is the command issued at frame t, the camera motion from frame t to t+1 expressed "
               "in frame t's camera (translation xyz, rotation vector xyz in radians), as LeRobot's action[t]; "
               "the last frame's action is zero. They are the motions of the commanded path "
               "(meta.actions_from = 'commanded') or, for rows that commanded none, of the predicted one",
    "poses": "c2w is the camera the model predicted (meta.poses_from = 'predicted'); chained rollouts made "
             "with poses='commanded' carry the commanded path there instead (meta.poses_from = 'commanded'). "
             "commanded_c2w is always the path the manifest row asked for (NaN where it asked for none: "
             "reconstruction, planning)",
    "time": "frame t is at t / fps seconds",
    "depth": "z-depth along the camera's optical axis; 0 means no depth at that pixel",
}


def schema_document(model: str, model_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's ``schema.json`` for samples of ``model`` (its frame rate, size and depth units come
    from the model's spec; no weights are loaded)."""
    from hero.models import model_spec

    spec = model_spec(model, **(model_options or {}))
    metric = getattr(spec, "metric_dmax", None) is not None
    frames, height, width = "T", int(spec.height), int(spec.width)
    depth_unit = "m" if metric else "relative (scale-free, consistent within a clip)"
    return {
        "format": FORMAT,
        "format_version": SCHEMA_VERSION,
        "model": {"name": spec.name, "revision": spec.revision},
        "fps": int(spec.fps),
        "frame_size": {"height": height, "width": width},
        "frames_per_sample": "variable: meta.json 'frames' (clip length asked for by the manifest row)",
        "depth": {"metric": metric, "unit": depth_unit, "encoding": DEPTH_CODEC, "log_step": DEPTH_LOG_STEP,
                  "relative_error_max": float(np.expm1(DEPTH_LOG_STEP / 2))},
        "conventions": CONVENTIONS,
        "files": {
            "rgb.mp4": {"codec": "h264 yuv420p crf 18", "decoded": "uint8", "shape": [frames, height, width, 3],
                        "unit": "sRGB 0-255"},
            "depth.mkv": {"codec": "ffv1 gray16le", "decoded": "float32", "shape": [frames, height, width],
                          "unit": depth_unit,
                          "decoding": "depth = exp(log_min + (code - 1) * step), code 0 -> 0 (no depth); "
                                      "log_min and step in meta.json depth_encoding; use pipeline.samples.decode_depth"},
            "camera.npz": {
                "k": {"dtype": "float32", "shape": [frames, 3, 3], "unit": "pixels"},
                "c2w": {"dtype": "float32", "shape": [frames, 4, 4],
                        "unit": "m" if metric else "relative (the depth's scale)"},
                "commanded_c2w": {"dtype": "float32", "shape": [frames, 4, 4], "unit": "the manifest's units"},
            },
            "action.npy": {"dtype": "float32", "shape": [frames, 6],
                           "names": ["tx", "ty", "tz", "rx", "ry", "rz"], "unit": "translation as c2w, radians"},
            "meta.json": {"keys": ["id", "task", "seed", "steps", "guidance", "model", "revision", "frames",
                                   "height", "width", "fps", "depth_is_metric", "depth_encoding", "poses_from",
                                   "actions_from", "accelerator", "timings", "schema_version", "audit (audited samples)"]},
        },
        "sample_files": list(FIELDS),
        "shard_metadata": {"path": "beside each shard, the same name with .parquet for .tar",
                           "columns": list(METADATA_COLUMNS)},
    }


METADATA_COLUMNS = {
    "id": "string", "task": "string", "frames": "int32", "height": "int32", "width": "int32", "fps": "int32",
    "model": "string", "revision": "string", "accelerator": "string", "seed": "int64", "steps": "int32",
    "depth_is_metric": "bool", "poses_from": "string", "actions_from": "string",
    "path_length": "float32", "skipped_fraction": "float32", "generate_s": "float32",
    "audit_psnr_db": "float32", "audit_depth_abs_rel": "float32",
}


def metadata_path(shard: str) -> str:
    """Where a shard's metadata table lives: ``shards/<name>.tar`` -> ``shards/<name>.parquet``."""
    root, _ = posixpath.splitext(shard)
    return f"{root}.parquet"


def metadata_row(key: str, files: dict[str, bytes]) -> dict[str, Any]:
    """One sample's row of the shard metadata table (from its meta.json and action.npy)."""
    meta = json.loads(files["meta.json"])
    accelerator = meta.get("accelerator") or {}
    stats = accelerator.get("stats") or {}
    audit = meta.get("audit") or {}
    actions = np.load(io.BytesIO(files["action.npy"]), allow_pickle=False)
    return {
        "id": key, "task": meta.get("task"), "frames": meta.get("frames"), "height": meta.get("height"),
        "width": meta.get("width"), "fps": meta.get("fps"), "model": meta.get("model"),
        "revision": meta.get("revision"), "accelerator": accelerator.get("name"), "seed": meta.get("seed"),
        "steps": meta.get("steps"), "depth_is_metric": meta.get("depth_is_metric"),
        "poses_from": meta.get("poses_from"), "actions_from": meta.get("actions_from"),
        "path_length": float(np.linalg.norm(actions[:, :3], axis=1).sum()),
        "skipped_fraction": stats.get("skipped_block_token_fraction"),
        "generate_s": (meta.get("timings") or {}).get("generate_s"),
        "audit_psnr_db": audit.get("psnr_db"), "audit_depth_abs_rel": audit.get("depth_abs_rel"),
    }


def shard_metadata(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A shard's metadata table as Parquet bytes: one row per ``(key, files)`` sample, in order,
    with the columns of :data:`METADATA_COLUMNS` (null where a figure does not apply)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [metadata_row(key, files) for key, files in samples]
    schema = pa.schema([(name, pa.type_for_alias(dtype)) for name, dtype in METADATA_COLUMNS.items()])
    table = pa.Table.from_pylist(rows, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()

"""CPU encode stage (Ray tasks): a rollout to its sample files (``pipeline.samples``), one blob per row."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from hero.models.base import Rollout
from pipeline.redact import redact
from pipeline.samples import encode_sample
from pipeline.stages.rows import columns, error_json, pack_files, rows, unpack


def encode_batch(batch: dict[str, np.ndarray], run_id: str, model: str) -> dict[str, np.ndarray]:
    """CPU encode stage (Ray tasks): rollouts to sample files (rgb.mp4, depth.npz, camera.npz,
    action.npy, meta.json), packed into one blob per row."""
    out = []
    for item in rows(batch):
        files: dict[str, bytes] = {}
        if not item["error"]:
            try:
                files = _encode(item, run_id, model)
            except Exception as exc:
                item["error"] = error_json(item["id"], "rollout", f"{type(exc).__name__}: {exc}", "encode")
        out.append({"unit": item["unit"], "position": item["position"], "id": item["id"],
                    "error": item["error"], "files": pack_files(files)})
    return columns(out, ("unit", "position", "id", "error", "files"))


def _encode(item: dict[str, Any], run_id: str, model: str) -> dict[str, bytes]:
    arrays = unpack(item["rollout"])
    row = json.loads(item["row"])
    meta = json.loads(item["meta"])
    meta.update(id=row["id"], key=row["id"], run_id=run_id, task=row["task"], seed=row["seed"],
                observation=row["observation"], trajectory=row.get("trajectory"))
    meta.setdefault("model", model)
    meta = redact(meta)  # the observation's URIs, as the source reference, never a presigned token
    rollout = Rollout(rgb=arrays["rgb"], depth=arrays["depth"], depth_is_metric=bool(arrays["depth_is_metric"]),
                      k=arrays["k"], c2w=arrays["c2w"], actions=arrays["actions"], meta=meta)
    return encode_sample(rollout, meta)

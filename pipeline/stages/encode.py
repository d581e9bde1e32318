"""Encode stage and write path (Ray tasks): each unit's rollouts become sample files
(``pipeline.samples``), and the same worker writes them as the unit's shard and commits it through
the sink's :class:`~pipeline.sink.ShardWriter`. Only the commit record (metadata) goes on to the
driver; sample bytes never leave the worker."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from hero.models.base import Rollout
from pipeline.redact import redact
from pipeline.samples import encode_sample
from pipeline.sink import ShardWriter
from pipeline.stages.rows import columns, error_json, rows, unpack
from pipeline.stages.units import unpack_rows

OUTCOME_COLUMNS = ("unit", "outcome")


def encode_and_write(batch: dict[str, np.ndarray], writer: ShardWriter, model: str) -> dict[str, np.ndarray]:
    """Encode every unit in ``batch`` and commit it; one ``outcome`` (JSON: the commit record, or
    why the unit could not commit) per unit."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    out = []
    for unit in rows(batch):
        plan = json.loads(unit["plan"])
        samples, metas, errors = [], [], list(plan["errors"])
        for item in sorted(unpack_rows(unit["rows"]), key=lambda r: r["position"]):
            if not item["error"]:
                try:
                    files = _encode(item, writer.run_id, model)
                    samples.append((item["id"], files))
                    metas.append(json.loads(files["meta.json"]))
                    continue
                except Exception as exc:
                    item["error"] = error_json(item["id"], "rollout", f"{type(exc).__name__}: {exc}", "encode")
            source, line = plan["where"][str(item["position"])]
            errors.append(dict(json.loads(item["error"]), source=source, line=line))
        outcome = writer.write(int(unit["unit"]), samples, metas, errors, plan, node)
        out.append({"unit": unit["unit"], "outcome": json.dumps(outcome)})
    return columns(out, OUTCOME_COLUMNS)


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

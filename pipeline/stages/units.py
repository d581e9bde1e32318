"""The unit row: a unit's manifest rows travel through the stages as one dataset row, so the worker
that encodes a unit holds all of its samples and writes and commits its shard itself.

A unit row has three columns: ``unit`` (its number), ``plan`` (JSON: the unit's rows and their
digest, its manifest errors, and where each valid row came from) and ``rows`` (its valid rows in the
per-row wire format of :mod:`pipeline.stages.rows`, as one Arrow IPC stream: typed, no pickles).
The per-row stages run unchanged on a unit's rows through the two adapters here: prep as tasks,
generate on the actor pool, which batches rows across units up to ``generate.batch_size``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from hero.models.base import ModelSpec
from pipeline.plan import Unit
from pipeline.stages.prep import prepare_batch
from pipeline.stages.rows import ROW_COLUMNS, columns, rows

UNIT_COLUMNS = ("unit", "plan", "rows")


def pack_rows(items: list[dict[str, Any]]) -> bytes:
    """Row dicts (one unit's) as one Arrow IPC stream."""
    table = pa.Table.from_pylist([{k: _plain(v) for k, v in item.items()} for item in items])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack_rows(blob: bytes) -> list[dict[str, Any]]:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all().to_pylist()


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def unit_block(units: list[Unit]) -> pa.Table:
    """Planned units as one block of unit rows (built on the driver, fed to the read stage)."""
    plans = [{"rows": unit.rows(), "digest": unit.digest(), "errors": [e.to_dict() for e in unit.errors],
              "where": {str(e.position): [e.source, e.line] for e in unit.valid}} for unit in units]
    packed = [pack_rows([{"unit": unit.number, "position": e.position, "id": e.row.id, "row": e.row.model_dump_json(),
                          "error": "", "meta": ""} for e in unit.valid]) for unit in units]
    return pa.table({"unit": [unit.number for unit in units], "plan": [json.dumps(p) for p in plans], "rows": packed})


def prepare_units(batch: dict[str, np.ndarray], spec: ModelSpec, storage_options: dict[str, Any]) -> dict[str, np.ndarray]:
    """CPU prep stage (Ray tasks) over unit rows: :func:`pipeline.stages.prep.prepare_batch` on
    each unit's rows."""
    out = []
    for unit in rows(batch):
        valid = unpack_rows(unit["rows"])
        if valid:
            unit = dict(unit, rows=pack_rows(rows(prepare_batch(columns(valid, ROW_COLUMNS), spec, storage_options))))
        out.append(unit)
    return columns(out, UNIT_COLUMNS)


class GenerateUnits:
    """Generate stage (the actor pool) over unit rows: one
    :class:`pipeline.stages.generate.GenerateRollouts` per actor, called on the batch's rows in
    model batches of ``rows_per_call``; tells the feed once the model is loaded."""

    def __init__(self, feed: Any, rows_per_call: int, **generate: Any) -> None:
        from pipeline.stages.generate import GenerateRollouts

        self.rollouts = GenerateRollouts(**generate)
        self.rows_per_call = rows_per_call
        feed.actor_ready.remote()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        units = rows(batch)
        owners, items = [], []
        for index, unit in enumerate(units):
            for item in unpack_rows(unit["rows"]):
                owners.append(index)
                items.append(item)
        done: list[dict[str, Any]] = []
        for start in range(0, len(items), self.rows_per_call):
            chunk = items[start: start + self.rows_per_call]
            done += rows(self.rollouts(columns(chunk, ROW_COLUMNS + ("inputs",))))
        per_unit: list[list[dict[str, Any]]] = [[] for _ in units]
        for owner, item in zip(owners, done):
            per_unit[owner].append(item)
        return columns([dict(unit, rows=pack_rows(items)) if items else unit for unit, items in zip(units, per_unit)],
                       UNIT_COLUMNS)

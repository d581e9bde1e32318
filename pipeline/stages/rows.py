"""The row wire format every stage shares: one dataset row is one manifest row (one rollout).

Rows travel as Arrow-native columns: ints, JSON strings and binary blobs of ``.npz`` arrays (no
pickles). A row that fails in any stage becomes an error row (``error`` holds a
:class:`pipeline.manifest.RowError` as JSON) and is passed through untouched by later stages, so the
driver sees every row of a unit come back and the run goes on.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from pipeline.manifest import RowError

ROW_COLUMNS = ("unit", "position", "id", "row", "error", "meta")
BINARY_COLUMNS = ("inputs", "rollout", "files")
FIELD_IN_MESSAGE = re.compile(r"^([a-z_][a-z0-9_.]*): ")


class RowFailure(Exception):
    """A row-level failure raised inside a stage; becomes an error row naming ``field``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

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


def rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray Data batch (columns) as a list of row dicts."""
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


def columns(items: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Row dicts back to a batch of the named columns (missing binary values become empty blobs)."""
    columns = {}
    for name in names:
        values = [item.get(name) for item in items]
        if name in ("unit", "position"):
            columns[name] = np.array(values, dtype=np.int64)
        else:
            column = np.empty(len(values), dtype=object)
            column[:] = [b"" if v is None and name in BINARY_COLUMNS else ("" if v is None else v) for v in values]
            columns[name] = column
    return columns


def pack_files(files: dict[str, bytes]) -> bytes:
    """A sample's files as one .npz blob of uint8 arrays (empty for error rows)."""
    if not files:
        return b""
    return pack({name: np.frombuffer(data, dtype=np.uint8) for name, data in files.items()})


def unpack_files(blob: bytes) -> dict[str, bytes]:
    return {name: array.tobytes() for name, array in unpack(blob).items()} if blob else {}

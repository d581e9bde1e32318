"""Reading prompt/trajectory manifests through fsspec: JSONL or Parquet, one file or a prefix of
shards, from local paths, ``file://``, ``s3://`` or any other fsspec protocol.

Rows come out in a stable order (files sorted by name, rows in file order) with their position,
so units of work and sample keys are the same on every run. Nothing here raises for a bad row:
it yields a :class:`pipeline.manifest.RowError` in that row's place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.manifest import ManifestRow, RowError, parse_line, readable_id, validate_row

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
NESTED_FIELDS = ("observation", "trajectory", "goal")


@dataclass
class ManifestEntry:
    """One manifest row in run order: its position, where it came from, and the row or its error."""

    position: int
    source: str
    line: int
    row: ManifestRow | None = None
    error: RowError | None = None


def default_manifest() -> str:
    """Path of the manifest shipped inside the package (the embedded default's input)."""
    return str(resources.files("pipeline") / "data" / "default.jsonl")


def manifest_files(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The manifest files ``uri`` names: itself if it is a file, else every manifest under the prefix."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()
    if fs.isfile(path):
        return [_unstrip(fs, path)]
    found = fs.find(path) if fs.isdir(path) else fs.glob(path.rstrip("/") + "*")
    names = sorted(p for p in found if p.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES))
    if not names:
        raise FileNotFoundError(f"no manifest (*.jsonl, *.parquet) at {uri}")
    return [_unstrip(fs, p) for p in names]


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def read_manifest(
    uri: str, storage_options: dict[str, Any] | None = None, limit: int | None = None
) -> Iterator[ManifestEntry]:
    """Yield validated entries of the manifest at ``uri``, at most ``limit`` of them."""
    position = 0
    for source in manifest_files(uri, storage_options):
        reader = _parquet_rows if source.endswith(PARQUET_SUFFIXES) else _jsonl_rows
        for line, parsed in reader(source, storage_options or {}):
            if limit is not None and position >= limit:
                return
            entry = ManifestEntry(position, source, line)
            if isinstance(parsed, RowError):
                entry.error = parsed
            else:
                entry.row = parsed
            yield entry
            position += 1


def _jsonl_rows(source: str, storage_options: dict[str, Any]) -> Iterator[tuple[int, ManifestRow | RowError]]:
    with fsspec.open(source, "rt", encoding="utf-8", errors="replace", compression="infer", **storage_options) as f:
        for line, text in enumerate(f, start=1):
            if text.strip():
                yield line, parse_line(text, source=source, line=line)


def _parquet_rows(source: str, storage_options: dict[str, Any]) -> Iterator[tuple[int, ManifestRow | RowError]]:
    with fsspec.open(source, "rb", **storage_options) as f:
        table = pq.ParquetFile(f)
        line = 0
        for batch in table.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                line += 1
                yield line, _validate_parquet_row(obj, source, line)


def _validate_parquet_row(obj: dict[str, Any], source: str, line: int) -> ManifestRow | RowError:
    """Parquet rows hold nested fields as JSON text or structs; absent columns come as None."""
    row = {key: value for key, value in obj.items() if value is not None}
    for name in NESTED_FIELDS:
        if isinstance(row.get(name), str):
            try:
                row[name] = json.loads(row[name])
            except json.JSONDecodeError as exc:
                return RowError(readable_id(row), name, f"malformed JSON: {exc}", source=source, line=line)
        if isinstance(row.get(name), dict):
            row[name] = _drop_nulls(row[name])
    return validate_row(row, source=source, line=line)


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    return value

"""Reading prompt/trajectory manifests through fsspec: JSONL or Parquet, one file or a prefix of
shards, from local paths, ``file://``, ``s3://`` or any other fsspec protocol.

Rows come out in a stable order (files sorted by name, rows in file order) with their position,
so units of work and sample keys are the same on every run. Nothing here raises for a bad row:
it yields a :class:`pipeline.manifest.RowError` in that row's place.

Files are units of failure too. A file that cannot be read, or whose format breaks part way (a
corrupt Parquet file, a truncated ``.jsonl.gz``), becomes one error record (field ``file``, stage
``read``, ``source`` the file) and reading goes on with the next file, keeping the rows read
before the break. Hidden files and folders under a prefix (a name starting with ``.`` or ``_``:
notebook checkpoints, ``_SUCCESS`` markers, editors' temporary copies) are skipped and reported
the same way. Only two things stop a read: an input with no rows at all (:class:`InputError`,
unless allowed) and trouble a rerun may not meet, such as a dropped connection
(:class:`InputUnavailable`: rows after it would change position, so nothing may be planned past it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.manifest import ManifestRow, RowError, parse_line, readable_id, validate_row
from pipeline.redact import redact_text
from pipeline.storage import TRANSIENT_MODULES, is_transient

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
NESTED_FIELDS = ("observation", "trajectory", "goal")
HIDDEN_PREFIXES = (".", "_")
BOM = "\ufeff"


class InputError(ValueError):
    """The input as a whole cannot be used (nothing there, no rows, a URI the store refuses):
    found before any work, so the job exits with status 2 naming the input."""


class InputUnavailable(RuntimeError):
    """Reading the input failed in a way a rerun may not meet (network trouble, throttling): the
    job stops before planning past it and exits with status 1 (incomplete, rerun)."""


@dataclass
class ManifestEntry:
    """One manifest row in run order: its position, where it came from, and the row or its error."""

    position: int
    source: str
    line: int
    row: ManifestRow | None = None
    error: RowError | None = None


class Listing(NamedTuple):
    """The manifest files under an input, in read order, and the hidden ones skipped."""

    files: list[str]
    hidden: list[str]


def default_manifest() -> str:
    """Path of the manifest shipped inside the package (the embedded default's input)."""
    return str(resources.files("pipeline") / "data" / "default.jsonl")


def manifest_files(uri: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """The manifest files ``uri`` names: itself if it is a file, else every manifest under the
    prefix (a folder, recursively, or a key prefix), hidden ones set apart."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        fs.invalidate_cache()
        if fs.isfile(path):
            return Listing([_unstrip(fs, path)], [])
        if fs.isdir(path):
            root, found = path.rstrip("/"), fs.find(path)
        else:
            root, found = path.rsplit("/", 1)[0] if "/" in path else "", fs.glob(path.rstrip("/") + "*")
    except Exception as exc:
        raise input_failure(uri, exc) from None
    names = sorted(p for p in found if p.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES))
    hidden = [p for p in names if _is_hidden(p[len(root):])]
    files = [p for p in names if p not in hidden]
    if not files and not hidden:
        raise InputError(f"no manifest (*.jsonl, *.parquet) at {redact_text(uri)}")
    return Listing([_unstrip(fs, p) for p in files], [_unstrip(fs, p) for p in hidden])


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(HIDDEN_PREFIXES) for part in relative.split("/") if part)


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _is_outage(exc: BaseException) -> bool:
    """Whether a read failed for the store's sake (network, throttling, 5xx), not the file's: a
    transient error that is, or was raised from, a connection, timeout or object-store client
    error. A bare OSError is a decoder's verdict on the bytes (gzip, Parquet pages): permanent."""
    if not is_transient(exc):
        return False
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, (ConnectionError, TimeoutError)) or type(cause).__module__.split(".")[0] in TRANSIENT_MODULES:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def input_failure(uri: str, exc: Exception) -> Exception:
    """The error to stop with when the input itself cannot be listed or read."""
    reason = f"{redact_text(uri)}: {type(exc).__name__}: {redact_text(str(exc))}"
    if _is_outage(exc):
        return InputUnavailable(f"cannot read input {reason}")
    return InputError(f"cannot use input {reason}")


def file_error(source: str, reason: str, line: int | None = None) -> RowError:
    """The record of a manifest file (or its tail from ``line`` on) that yielded no rows."""
    return RowError(None, "file", reason, stage="read", source=source, line=line)


class Manifest:
    """The validated entries of the manifest at ``uri`` (at most ``limit``), read lazily on
    iteration. ``problems`` collects, as they are met, the files skipped or not (fully) read.
    An input without a single row raises :class:`InputError` unless ``allow_empty``."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, limit: int | None = None,
                 allow_empty: bool = False) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.limit = limit
        self.allow_empty = allow_empty
        self.problems: list[RowError] = []

    def __iter__(self) -> Iterator[ManifestEntry]:
        self.problems = []
        listing = manifest_files(self.uri, self.storage_options)
        self.problems += [file_error(p, "skipped: hidden (a name in its path starts with '.' or '_')")
                          for p in listing.hidden]
        position = 0
        for source in listing.files:
            for entry in self._read_file(source, position):
                if self.limit is not None and position >= self.limit:
                    return
                yield entry
                position += 1
        if position == 0 and not self.allow_empty:
            unread = "; ".join(f"{p.source}: {p.reason}" for p in self.problems)
            raise InputError(redact_text(f"no manifest rows at {self.uri}" + (f" ({unread})" if unread else "")
                                         + "; set input_allow_empty to run an empty input"))

    def _read_file(self, source: str, first: int) -> Iterator[ManifestEntry]:
        """Entries of one file; where the file breaks, a problem record, and the entries before it."""
        reader = _parquet_rows if source.endswith(PARQUET_SUFFIXES) else _jsonl_rows
        line = 0
        try:
            for line, parsed in reader(source, self.storage_options):
                entry = ManifestEntry(first, source, line)
                if isinstance(parsed, RowError):
                    entry.error = parsed
                else:
                    entry.row = parsed
                yield entry
                first += 1
        except Exception as exc:
            if _is_outage(exc):
                raise input_failure(source, exc) from None
            where = f"unreadable after line {line}, the rows before it are kept" if line else "unreadable"
            self.problems.append(file_error(source, f"{where}: {type(exc).__name__}: {redact_text(str(exc))}",
                                            line + 1 if line else None))


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None, limit: int | None = None,
                  allow_empty: bool = False) -> Manifest:
    """The manifest at ``uri``: iterate it for entries, then read its ``problems``."""
    return Manifest(uri, storage_options, limit, allow_empty)


def _jsonl_rows(source: str, storage_options: dict[str, Any]) -> Iterator[tuple[int, ManifestRow | RowError]]:
    with fsspec.open(source, "rt", encoding="utf-8", errors="replace", compression="infer", **storage_options) as f:
        for line, text in enumerate(f, start=1):
            text = text.lstrip(BOM)  # a byte-order mark opens a file, or each file of a concatenation
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

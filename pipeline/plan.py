"""Planning a run: manifest entries grouped into units (the unit of commit and resume), as they stream.

Unit ``u`` holds the rows at positions ``[u * rows_per_shard, (u + 1) * rows_per_shard)`` of the
manifest, counting bad rows too, so unit membership (and every sample key) is the same on every run
of the same manifest. Entries are grouped as they are read, so the driver holds one unit at a time
(and the ids seen, to find duplicates), never the manifest. A committed unit's record carries the
digest of its rows; a run whose manifest disagrees with a committed unit is refused instead of
mixing two manifests in one dataset.

The run id derives from :func:`manifest_digest`, a digest of the manifest's content (file names
relative to the input and each file's bytes or the store's checksum of them), never of the path it
was read from: the same manifest from two copies of a checkout, or from a job's temporary working
directory, is the same run.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.manifest import RowError, row_digest
from pipeline.sources import InputUnavailable, ManifestEntry, input_failure, manifest_files

DIGEST_CHUNK = 1 << 20


class PlanMismatch(ValueError):
    """The manifest disagrees with a committed unit (it changed since the unit was written)."""


@dataclass
class Unit:
    """One future shard: its number and its manifest entries (valid or not)."""

    number: int
    entries: list[ManifestEntry] = field(default_factory=list)

    @property
    def valid(self) -> list[ManifestEntry]:
        return [e for e in self.entries if e.row is not None]

    @property
    def errors(self) -> list[RowError]:
        return [e.error for e in self.entries if e.error is not None]

    def rows(self) -> list[dict[str, Any]]:
        """Who is in this unit, as stored in its commit record."""
        return [{"position": e.position, "id": e.row.id if e.row else (e.error.id if e.error else None),
                 "digest": row_digest(e.row) if e.row else None} for e in self.entries]

    def digest(self) -> str:
        """A short hash of :meth:`rows`: equal units, equal digests (kept in the commit record)."""
        return hashlib.sha256(json.dumps(self.rows(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PlanCounts:
    """How far planning got: rows and units read, units found committed, units queued to do, and
    the error records of manifest files skipped or not fully read (:mod:`pipeline.sources`)."""

    rows: int = 0
    units: int = 0
    committed: int = 0
    todo: int = 0
    done: bool = False
    unread: list[dict[str, Any]] = field(default_factory=list)

    def line(self) -> str:
        unread = f"; {len(self.unread)} manifest files skipped or not fully read" if self.unread else ""
        return f"{self.rows} rows in {self.units} units; {self.committed} already committed, {self.todo} to do{unread}"


def plan_units(entries: Iterable[ManifestEntry], rows_per_shard: int) -> Iterator[Unit]:
    """Group entries into units as they stream by (positions only grow); a repeated id is an error
    on every occurrence after the first."""
    first_seen: dict[str, tuple[str, int]] = {}
    unit: Unit | None = None
    for entry in entries:
        if entry.row is not None:
            where = first_seen.setdefault(entry.row.id, (entry.source, entry.line))
            if where != (entry.source, entry.line):
                entry.error = RowError(entry.row.id, "id", f"duplicate id (first at {where[0]} line {where[1]})",
                                       source=entry.source, line=entry.line)
                entry.row = None
        number = entry.position // rows_per_shard
        if unit is not None and unit.number != number:
            yield unit
            unit = None
        unit = unit or Unit(number)
        unit.entries.append(entry)
    if unit is not None:
        yield unit


def units_to_do(units: Iterable[Unit], committed: Mapping[int, Any], counts: PlanCounts) -> Iterator[Unit]:
    """The units without a commit record, counted into ``counts``; committed units whose rows
    differ from the manifest's raise :class:`PlanMismatch`. ``committed`` maps unit numbers to
    objects with a ``rows_digest``."""
    for unit in units:
        counts.rows += len(unit.entries)
        counts.units += 1
        record = committed.get(unit.number)
        if record is None:
            counts.todo += 1
            yield unit
        elif record.rows_digest != unit.digest():
            raise PlanMismatch(f"unit {unit.number} was committed from different manifest rows")
        else:
            counts.committed += 1
    beyond = [number for number in committed if number >= counts.units]
    counts.done = True
    if beyond:
        raise PlanMismatch(f"unit {min(beyond)} is committed but the manifest (with this limit) has no such unit")


def manifest_digest(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """A digest of the manifest's content: each file's name relative to ``uri`` (nothing for a
    single file) and its bytes (locally) or the store's checksum of them (its ETag). Hidden files
    are left out (no run reads them) and a file that cannot be read counts by its name."""
    options = storage_options or {}
    files = manifest_files(uri, options).files
    fs, root = fsspec.core.url_to_fs(uri, **options)
    root = root.rstrip("/")
    hasher = hashlib.sha256()
    for url in files:
        path = fsspec.core.url_to_fs(url, **options)[1]
        name = "" if len(files) == 1 else posixpath.relpath(path, root)
        try:
            content = _content_digest(fs, path)
        except Exception as exc:
            failure = input_failure(url, exc)
            if isinstance(failure, InputUnavailable):
                raise failure from None
            content = "unreadable"  # the run reports the file (pipeline.sources); its name still counts
        hasher.update(f"{name}\0{content}\n".encode())
    return hasher.hexdigest()[:16]


def _content_digest(fs: fsspec.AbstractFileSystem, path: str) -> str:
    etag = fs.info(path).get("ETag")
    if etag:
        return str(etag).strip('"')
    hasher = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(DIGEST_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()

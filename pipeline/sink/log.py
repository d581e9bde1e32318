"""The commit log: which units are committed, where their shards are, and what happened to their rows.

A worker commits a unit by writing its marker ``_commits/unit-<unit>.e<epoch>.json`` (create-only)
after the unit's shard is stored and verified: that write is the commit point. The driver collects
the records the workers hand back and, every ``sink.compact_every`` commits, writes them as one
segment ``_commits/log-e<epoch>-<seq>.jsonl`` (create-only) and deletes their markers, so reading
the log costs a listing plus one read per segment, fetched in parallel. A record is the same JSON
in a marker and in a segment; of two records of one unit, the later lease epoch's wins.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline import faults
from pipeline.config import OutputError
from pipeline.sink.layout import COMMITS_DIR, is_temp, marker_path, segment_path
from pipeline.sink.shards import StoredShard
from pipeline.storage import Store

RECORD_SCHEMA = "hero-rollouts/commit-1"
STAGE_SECONDS = ("prep_s", "generate_s", "encode_s", "write_s")


def unit_stats(metas: list[dict[str, Any]], write_s: float, checksum_failures: int) -> dict[str, Any]:
    """Per-unit figures kept in its record: frames, seconds spent per stage (summed over rows) and
    the audited samples' drift records (``meta["audit"]``, :mod:`pipeline.audit`)."""
    stats: dict[str, Any] = {"frames": sum(int(m.get("frames", 0)) for m in metas),
                             "write_s": write_s, "checksum_failures": checksum_failures,
                             "audits": [m["audit"] for m in metas if "audit" in m]}
    for stage in STAGE_SECONDS[:-1]:
        stats[stage] = sum(float(m.get("timings", {}).get(stage, 0.0)) for m in metas)
    return stats


def commit_record(run_id: str, unit: int, epoch: int, plan: dict[str, Any], keys: list[str],
                  shard: StoredShard | None, errors: list[dict[str, Any]], stats: dict[str, Any],
                  node: str | None) -> dict[str, Any]:
    """The record of one committed unit (the marker's content; see docs/pipeline.md); ``plan``
    holds the unit's rows and their digest (:meth:`pipeline.plan.Unit.rows`)."""
    return {"schema": RECORD_SCHEMA, "run_id": run_id, "unit": unit, "epoch": epoch,
            "rows": plan["rows"], "rows_digest": plan["digest"], "keys": keys, "nsamples": len(keys),
            "shard": shard.path if shard else None, "sha256": shard.sha256 if shard else None,
            "filesize": shard.filesize if shard else 0, "etag": shard.etag if shard else None,
            "errors": errors, "stats": stats, "node": node, "committed_at": time.time()}


def record_line(record: dict[str, Any]) -> bytes:
    """A record as stored: one line of JSON, alone in a marker or one of many in a segment."""
    return json.dumps(record, sort_keys=True, allow_nan=False).encode() + b"\n"


@dataclass(slots=True)
class CommittedUnit:
    """What a run keeps in memory of one committed unit (not its rows or errors)."""

    epoch: int
    rows_digest: str
    shard: str | None
    nsamples: int
    filesize: int
    sha256: str | None
    etag: str | None
    stats: dict[str, Any]

    @classmethod
    def of(cls, record: dict[str, Any]) -> "CommittedUnit":
        return cls(int(record["epoch"]), record["rows_digest"], record["shard"], int(record["nsamples"]),
                   int(record["filesize"]), record["sha256"], record["etag"], dict(record["stats"]))


@dataclass
class CommitState:
    """The winning record of every committed unit, compact, with each unit's errors; ``markers``
    are the marker files read that no segment holds yet."""

    units: dict[int, CommittedUnit] = field(default_factory=dict)
    errors: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    markers: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> bool:
        """Keep ``record`` if no record of a later epoch holds its unit; True if it was kept."""
        unit = int(record["unit"])
        current = self.units.get(unit)
        if current is not None and current.epoch >= int(record["epoch"]):
            return False
        self.units[unit] = CommittedUnit.of(record)
        if record["errors"]:
            self.errors[unit] = record["errors"]
        else:
            self.errors.pop(unit, None)
        return True

    def shard_names(self) -> set[str]:
        return {unit.shard.rsplit("/", 1)[-1] for unit in self.units.values() if unit.shard}


def read_log(store: Store, segments: list[str], markers: list[str], workers: int) -> CommitState:
    """Every record in the log's segments and markers (``workers`` reads in flight)."""
    state = CommitState()
    marker_files = set(markers)
    for rel, record in _records(store, segments + markers, workers):
        state.add(record)
        if rel in marker_files:
            state.markers.append(record)
    return state


def read_records(store: Store, workers: int = 8) -> dict[int, dict[str, Any]]:
    """Every committed unit's winning record in full, by unit (for tools and tests; a run keeps
    only the compact :class:`CommitState`)."""
    records: dict[int, dict[str, Any]] = {}
    for _, record in _records(store, [f"{COMMITS_DIR}/{name}" for name in store.listdir(COMMITS_DIR)], workers):
        unit = int(record["unit"])
        if unit not in records or records[unit]["epoch"] < record["epoch"]:
            records[unit] = record
    return records


def _records(store: Store, names: list[str], workers: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(file, record)`` for every record in the log files ``names`` (unfinished writes skipped)."""
    for rel, data in store.read_many([rel for rel in names if not is_temp(rel)], workers):
        for line in data.splitlines():
            if line.strip():
                yield rel, _parse(store, rel, line)


def _parse(store: Store, rel: str, text: bytes) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OutputError(store.url(rel), "is not a JSON commit record") from None
    if not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA:
        raise OutputError(store.url(rel), f"is not a {RECORD_SCHEMA} commit record")
    return record


@dataclass
class LogCompactor:
    """The driver's side of the log: records gathered into segments of ``every`` records; after a
    segment is written its markers are deleted."""

    store: Store
    epoch: int
    every: int
    pending: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0

    def add(self, record: dict[str, Any]) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Write the pending records as one segment, then delete their markers."""
        if not self.pending:
            return
        data = b"".join(record_line(r) for r in self.pending)
        segment = segment_path(self.epoch, self.written)
        if not self.store.create(segment, data):  # only this epoch's driver names its segments
            raise RuntimeError(f"{self.store.url(segment)} already holds other records")
        self.written += 1
        faults.crash_point("driver_after_segment")
        self.store.delete_many(marker_path(int(r["unit"]), int(r["epoch"])) for r in self.pending)
        self.pending.clear()

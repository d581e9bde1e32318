"""WebDataset shards with an atomic commit, per-unit completion markers, and the run's index.

Output layout under the output URI::

    run.json                  what ran (config fingerprint), written before any work
    shards/shard-000003.tar   one shard per unit of manifest rows, named by unit number
    _markers/unit-000003.json completion marker: the commit point of unit 3
    _staging/...              uploads in flight; never read, cleaned at the start of every run
    errors.jsonl, summary.json, index.json (wids shard index, written last)

A unit is committed by: write the tar locally, upload it to a unique staging key, read it back and
verify its sha256, publish it (rename locally, copy-then-delete on object stores), verify the
published object, then write the marker. Only units with a marker are in the index, so a reader
that follows the index never sees a partial, unverified or uncommitted shard; a rerun skips every
unit with a marker and redoes the rest, so each key is written exactly once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
import uuid
from typing import Any

from pipeline import faults
from pipeline.redact import redact
from pipeline.samples import FIELDS
from pipeline.storage import Store

RUN_FILE = "run.json"
INDEX_FILE = "index.json"
SUMMARY_FILE = "summary.json"
ERRORS_FILE = "errors.jsonl"
SHARDS_DIR = "shards"
MARKERS_DIR = "_markers"
STAGING_DIR = "_staging"
MARKER_PATTERN = re.compile(r"unit-(\d{6,})\.json")
INDEX_KIND = "wids-shard-index-v1"
CHECKSUM_ATTEMPTS = 3


class ShardCommitError(RuntimeError):
    """A shard could not be published intact (its checksum never matched); the unit stays uncommitted."""


def shard_path(unit: int) -> str:
    return f"{SHARDS_DIR}/shard-{unit:06d}.tar"


def marker_path(unit: int) -> str:
    return f"{MARKERS_DIR}/unit-{unit:06d}.json"


def write_tar(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> tuple[str, int]:
    """Write samples as a byte-for-byte reproducible USTAR file; return (sha256, size).

    Member names stay in the 100-byte name field (keys are at most 80 characters), which is the
    only field ``wids``' memory-mapped tar reader looks at.
    """
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for field in FIELDS:
                data = files[field]
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest(), os.path.getsize(path)


def commit_unit(store: Store, unit: int, samples: list[tuple[str, dict[str, bytes]]],
                record: dict[str, Any]) -> dict[str, Any]:
    """Publish unit ``unit``'s shard and write its marker; return the marker.

    ``record`` carries the unit's rows, errors and statistics into the marker. A unit someone
    else already committed is left as it is (its marker is returned), so retried tasks are no-ops.
    """
    if store.exists(marker_path(unit)):
        return store.read_json(marker_path(unit))
    marker = dict(record, unit=unit, shard=None, keys=[key for key, _ in samples], nsamples=len(samples),
                  sha256=None, filesize=0, checksum_failures=0)
    if samples:
        with tempfile.TemporaryDirectory(prefix="hero-shard-") as tmp:
            local = os.path.join(tmp, "shard.tar")
            digest, size = write_tar(local, samples)
            marker["checksum_failures"] = _stage_and_publish(store, unit, local, digest, size)
        marker.update(shard=shard_path(unit), sha256=digest, filesize=size)
    marker["committed_at"] = time.time()
    marker = redact(marker)  # errors may quote a presigned URL
    store.write_json(marker_path(unit), marker)
    return marker


def _stage_and_publish(store: Store, unit: int, local: str, digest: str, size: int) -> int:
    """Upload to a fresh staging key until its read-back checksum matches, then publish it."""
    failures = 0
    for _ in range(CHECKSUM_ATTEMPTS):
        staging = f"{STAGING_DIR}/shard-{unit:06d}.{uuid.uuid4().hex}.tar"
        store.upload(local, staging)
        if faults.inject("corrupt_staging"):
            store.write_bytes(staging, b"\0" * min(size, 512) + store.read_bytes(staging)[512:])
        if store.sha256(staging) == digest:
            store.publish(staging, shard_path(unit))
            if store.size(shard_path(unit)) == size and store.sha256(shard_path(unit)) == digest:
                return failures
            store.delete(shard_path(unit))
        else:
            store.delete(staging)
        failures += 1
    raise ShardCommitError(f"unit {unit}: shard checksum did not match after {CHECKSUM_ATTEMPTS} uploads")


def committed_units(store: Store) -> dict[int, dict[str, Any]]:
    """Every committed unit's marker, from a fresh listing of the marker prefix."""
    markers = {}
    for name in store.listdir(MARKERS_DIR):
        match = MARKER_PATTERN.fullmatch(name)
        if match:
            markers[int(match.group(1))] = store.read_json(f"{MARKERS_DIR}/{name}")
    return markers


def clean_stale(store: Store, committed: dict[int, dict[str, Any]]) -> int:
    """Delete staging leftovers and shards no marker vouches for (a run that died mid-commit)."""
    removed = 0
    for name in store.listdir(STAGING_DIR):
        store.delete(f"{STAGING_DIR}/{name}")
        removed += 1
    vouched = {m["shard"] for m in committed.values() if m.get("shard")}
    for name in store.listdir(SHARDS_DIR):
        if f"{SHARDS_DIR}/{name}" not in vouched:
            store.delete(f"{SHARDS_DIR}/{name}")
            removed += 1
    return removed


def build_index(run_id: str, committed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A wids dataset description; shard URLs are relative to the index, so outputs can move."""
    shards = [
        {"url": m["shard"], "nsamples": m["nsamples"], "filesize": m["filesize"], "sha256": m["sha256"]}
        for _, m in sorted(committed.items()) if m.get("shard")
    ]
    return {"__kind__": INDEX_KIND, "wids_version": 1, "name": run_id, "shardlist": shards}


def finalize(store: Store, run_id: str, committed: dict[int, dict[str, Any]],
             summary: dict[str, Any], extra_errors: list[dict[str, Any]]) -> None:
    """Write errors.jsonl, summary.json and, last, index.json."""
    errors = [e for _, m in sorted(committed.items()) for e in m.get("errors", [])] + redact(extra_errors)
    store.write_bytes(ERRORS_FILE, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    store.write_json(SUMMARY_FILE, summary)
    store.write_json(INDEX_FILE, build_index(run_id, committed))

"""The sink: a run's output, shaped like Ray Data's ``Datasink``.

    driver   RolloutSink.inspect()   what the prefix holds: ownership, run record, commit log, shards
             RolloutSink.start()     the lease, the run record, schema.json, stray markers compacted,
                                     own leftovers removed
    workers  ShardWriter.write()     one unit: its shard stored and verified with its metadata table,
                                     then its marker (the commit point)
    driver   RolloutSink.commit()    each unit's record, compacted into the commit log
             RolloutSink.finalize()  once: errors.jsonl, summary.json, preview, index.json (last)

Readers follow ``index.json``, which lists only committed units whose shards are intact, so they
never see a partial, unverified or uncommitted shard. A rerun verifies every committed shard
against the store's listing (size, and the store's checksum where it keeps one), regenerates the
units whose shards are missing or damaged, skips the rest, and writes nothing at all when the run
is already complete. Layout and ownership: :mod:`pipeline.sink.layout`; the lease:
:mod:`pipeline.sink.lease`; the log: :mod:`pipeline.sink.log`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import faults
from pipeline.config import ConfigError, OutputError
from pipeline.redact import redact, redact_text
from pipeline.schema import SCHEMA_FILE, schema_document
from pipeline.sink.layout import (
    COMMITS_DIR, ERRORS_FILE, INDEX_FILE, LAYOUT, PREVIEW_FILES, RUN_FILE, SHARDS_DIR, SUMMARY_FILE, Inventory,
    marker_path, shard_name_pattern, take_inventory,
)
from pipeline.sink.lease import Lease, LeaseHeld, LeaseLost
from pipeline.sink.log import CommitState, LogCompactor, commit_record, read_log, record_line, unit_stats
from pipeline.sink.report import build_index, build_summary, collect_errors, write_preview
from pipeline.sink.shards import Sample, read_samples, write_shard
from pipeline.storage import Store, json_bytes

if TYPE_CHECKING:
    from pipeline.config import JobConfig
    from pipeline.plan import PlanCounts

__all__ = ["ERRORS_FILE", "INDEX_FILE", "RUN_FILE", "SUMMARY_FILE", "LeaseHeld", "LeaseLost", "OutputError",
           "RolloutSink", "ShardWriter", "read_samples", "write_committed_run"]


@dataclass(frozen=True)
class ShardWriter:
    """The sink's worker side (``Datasink.write``): commits one unit from the worker that encoded
    it. Small and picklable: the store's URI and options, the run id and the lease epoch."""

    store: Store
    run_id: str
    epoch: int

    def write(self, unit: int, samples: list[Sample], metas: list[dict[str, Any]], errors: list[dict[str, Any]],
              plan: dict[str, Any], node: str | None) -> dict[str, Any]:
        """Store the unit's shard, then create its marker; return ``{"record": ...}``, or
        ``{"error": ...}`` when the unit could not be committed (it stays uncommitted). ``plan``
        carries the unit's rows and their digest, ``node`` the Ray node writing."""
        started = time.perf_counter()
        try:
            shard = write_shard(self.store, self.run_id, unit, samples) if samples else None
            faults.crash_point("worker_after_shard")
            stats = unit_stats(metas, time.perf_counter() - started, shard.checksum_failures if shard else 0)
            record = redact(commit_record(self.run_id, unit, self.epoch, plan, [key for key, _ in samples], shard,
                                          errors, stats, node))  # row errors may quote a presigned URL
            if not self.store.create(marker_path(unit, self.epoch), record_line(record)):
                if shard:  # an earlier attempt of this task committed the unit: keep its files, drop ours
                    self.store.delete_many(shard.files)
                return {"record": self.store.read_json(marker_path(unit, self.epoch))}
            faults.crash_point("worker_after_marker")
            return {"record": record}
        except Exception as exc:
            return {"error": {"id": None, "unit": unit, "field": "shard", "stage": "commit",
                              "reason": redact_text(f"{type(exc).__name__}: {exc}"), "source": None, "line": None}}


def write_committed_run(store: Store, run_id: str, units: Iterable[list[Sample]]) -> CommitState:
    """Commit ready-made samples as units 0, 1, ... through the workers' write path and write their
    index: an output the loaders read like a job's, for tools, tests and benchmarks that need shards
    without running a job (no lease, run record or summary)."""
    writer, state = ShardWriter(store, run_id, epoch=1), CommitState()
    compactor = LogCompactor(store, epoch=1, every=1 << 30)
    for number, samples in enumerate(units):
        plan = {"rows": [{"id": key} for key, _ in samples], "digest": ""}
        metas = [json.loads(files["meta.json"]) for _, files in samples]
        record = writer.write(number, samples, metas, [], plan, None)["record"]
        state.add(record)
        compactor.add(record)
    compactor.flush()
    store.write_json(INDEX_FILE, build_index(run_id, state))
    return state


class RolloutSink:
    """The sink's driver side (see the module docstring)."""

    def __init__(self, store: Store, config: "JobConfig") -> None:
        self.store = store
        self.config = config
        self.inventory = Inventory()
        self.run_record: dict[str, Any] | None = None
        self.state = CommitState()
        self.damaged: set[int] = set()
        self.lease: Lease | None = None
        self.compactor: LogCompactor | None = None
        self.failed: list[dict[str, Any]] = []
        self.started = time.time()
        self.this_run: dict[str, Any] = {"units_committed": 0, "rollouts": 0, "frames": 0, "orphans_removed": 0}

    # --- start (driver) -------------------------------------------------------------------------

    def inspect(self) -> None:
        """Read, never write: can the output hold this run, what does it hold (foreign files are
        refused unless ``sink.adopt_foreign``), its run record, the commit log, and which committed
        shards are missing or damaged (those units count as not committed)."""
        try:
            self.store.check_location()
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            raise OutputError(self.store.url(), str(exc)) from None
        self.inventory = take_inventory(self.store, self.config.run_id)
        self.run_record = self._check_run_record()  # another run's output is named as such first
        if self.inventory.foreign and not self.config.sink.adopt_foreign:
            first = self.inventory.foreign[0]
            raise OutputError(self.store.url(first), f"is not a file this run wrote ({len(self.inventory.foreign)} such "
                                                     "entries in the output); give another --output, or "
                                                     "--adopt-foreign to write beside them without touching them")
        try:
            self.state = read_log(self.store, self.inventory.segments, self.inventory.markers,
                                  self.config.sink.parallel_reads)
        except PermissionError as exc:
            raise OutputError(self.store.url(COMMITS_DIR), f"cannot be read: {exc.strerror or exc}") from None
        self.damaged = self._verify_shards()

    def _check_run_record(self) -> dict[str, Any] | None:
        """The run record, if the output has one; a record of another run, layout or settings is
        refused (exit status 2), naming what differs."""
        if not self.inventory.has(RUN_FILE):
            return None
        url = self.store.url(RUN_FILE)
        try:
            record = json.loads(self.store.read_bytes(RUN_FILE))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OutputError(url, "is not a JSON run record") from None
        except PermissionError as exc:
            raise OutputError(url, f"cannot be read: {exc.strerror or exc}") from None
        if not isinstance(record, dict) or record.get("layout") != LAYOUT:
            layout = record.get("layout") if isinstance(record, dict) else None
            raise OutputError(url, f"was not written by this version of the sink (layout {layout!r}, not {LAYOUT!r}); "
                                   "give another --output")
        run_id = self.config.run_id
        if record.get("run_id") != run_id:
            raise ConfigError("run_id", f"output {self.store.url()} holds run {record.get('run_id')!r}, not "
                                        f"{run_id!r}; give another --output or the same --run-id")
        for key, value in self.config.fingerprint_values().items():
            if record.get("settings", {}).get(key) != value:
                raise ConfigError(key, f"output {self.store.url()} holds run {run_id!r} made with {key}="
                                       f"{record['settings'].get(key)!r}, not {value!r}; give another --output or --run-id")
        return record

    def _verify_shards(self) -> set[int]:
        """Units whose committed shard is missing from the listing, or differs from its record in
        size or in the store's checksum; they are dropped from the state, to be regenerated."""
        damaged = set()
        for number, unit in list(self.state.units.items()):
            entry = self.inventory.shards.get(unit.shard.rsplit("/", 1)[-1]) if unit.shard else None
            if unit.shard and (entry is None or entry.size != unit.filesize
                               or (entry.etag and unit.etag and entry.etag != unit.etag)):
                damaged.add(number)
                del self.state.units[number]
                self.state.errors.pop(number, None)
        return damaged

    def manifest_changed(self) -> bool:
        """Whether the manifest's content differs from the one the run record names (the units
        already committed must then be checked against it before any work)."""
        return self.run_record is not None and self.run_record.get("manifest") != self.config.manifest_digest()

    def up_to_date(self) -> dict[str, Any] | None:
        """The existing summary if the run is complete and nothing changed since it was written
        (same fingerprint, every shard intact, the index current): a rerun then writes nothing."""
        if self.damaged or self.state.markers or not self.inventory.has(SUMMARY_FILE) or not self.inventory.has(INDEX_FILE):
            return None
        try:
            summary = self.store.read_json(SUMMARY_FILE)
            index = self.store.read_json(INDEX_FILE)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        current = (summary.get("complete") and summary.get("fingerprint") == self.config.fingerprint()
                   and summary.get("units", {}).get("total") == len(self.state.units)
                   and index.get("shardlist") == build_index(self.config.run_id, self.state)["shardlist"])
        return summary if current else None

    def start(self) -> ShardWriter:
        """Take the lease (:class:`LeaseHeld` if another driver has it), write the run record and
        schema.json, compact markers earlier drivers left, remove this run's own leftovers; the
        writer the workers commit with. Everything is read again if another driver wrote since
        :meth:`inspect`."""
        self.lease = Lease(self.store, self.config.run_id, self.config.sink.lease_s)
        seen = self.inventory.latest_epoch()
        try:
            epoch = self.lease.acquire()
            if epoch != seen + 1:
                self.inspect()
            self.lease.keep_alive()
            if self.run_record is None:
                self.run_record = self._new_run_record()
                self.store.create(RUN_FILE, json_bytes(self.run_record))
            if not self.inventory.has(SCHEMA_FILE):
                self.store.write_json(SCHEMA_FILE, schema_document(self.config.model.name, self.config.model.options))
        except PermissionError as exc:
            raise OutputError(self.store.url(), f"cannot be written: {exc.strerror or exc}") from None
        self.compactor = LogCompactor(self.store, epoch, self.config.sink.compact_every)
        for record in self.state.markers:
            self.compactor.add(record)
        self.compactor.flush()
        self.this_run.update(epoch=epoch, damaged_found=len(self.damaged), orphans_removed=self._remove_leftovers())
        return ShardWriter(self.store, self.config.run_id, epoch)

    def _new_run_record(self) -> dict[str, Any]:
        return {"layout": LAYOUT, "run_id": self.config.run_id, "fingerprint": self.config.fingerprint(),
                "settings": self.config.fingerprint_values(), "manifest": self.config.manifest_digest(),
                "created_at": time.time()}

    def accept_manifest(self) -> None:
        """Record the current manifest in the run record (its committed units were checked)."""
        self.run_record = dict(self.run_record or self._new_run_record(), manifest=self.config.manifest_digest(),
                               fingerprint=self.config.fingerprint())
        self.store.write_bytes(RUN_FILE, json_bytes(self.run_record))

    def _remove_leftovers(self) -> int:
        """Delete this run's files no record vouches for (shards and side files of attempts that
        never committed, superseded or damaged shards, unfinished local writes) once older than the
        lease TTL, so a stalled driver's upload in flight is never taken from under it. Never a
        foreign file."""
        cutoff = time.time() - self.config.sink.lease_s
        stem = shard_name_pattern(self.config.run_id)
        vouched = {stem.fullmatch(name)["stem"] for name in self.state.shard_names()}
        stale = [f"{SHARDS_DIR}/{name}" for name, entry in self.inventory.shards.items()
                 if stem.fullmatch(name)["stem"] not in vouched and entry.mtime < cutoff]
        stale += [rel for rel, entry in self.inventory.temps.items() if entry.mtime < cutoff]
        self.store.delete_many(stale)
        return len(stale)

    # --- commit (driver, per unit) --------------------------------------------------------------

    def commit(self, outcome: dict[str, Any]) -> None:
        """Take one unit's outcome from the workers: its record into the state and the log, or
        its failure into the error list. Raises :class:`LeaseLost` once another driver took over."""
        if "error" in outcome:
            self.failed.append(outcome["error"])
            return
        record = outcome["record"]
        if self.state.add(record):
            self.damaged.discard(int(record["unit"]))
            self.compactor.add(record)
            self.this_run["units_committed"] += 1
            self.this_run["rollouts"] += int(record["nsamples"])
            self.this_run["frames"] += int(record["stats"].get("frames", 0))
        faults.crash_point("driver_after_commit")
        if self.lease.lost:
            self.lease.check()

    # --- finalize (driver, once) ----------------------------------------------------------------

    def finalize(self, plan: "PlanCounts", run_error: str | None) -> dict[str, Any]:
        """Flush the log, then write errors.jsonl, summary.json, the preview and, last, index.json
        (only while this driver still holds the lease); return the summary."""
        self.compactor.flush()
        self.lease.check()
        errors = collect_errors(self.state, plan.unread + self.failed)
        this_run = dict(self.this_run, wall_s=time.time() - self.started,
                        transient_errors_retried=self.store.transient_errors)
        summary = build_summary(self._identity(), plan, self.state, errors, self.failed, run_error,
                                this_run, self._earlier_runs())
        if self.this_run["units_committed"] or not self.inventory.has(PREVIEW_FILES[0]):
            summary["preview"] = write_preview(self.store, self.state)
        else:
            summary["preview"] = self.store.url(PREVIEW_FILES[0])
        self.store.write_bytes(ERRORS_FILE, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
        self.store.write_json(SUMMARY_FILE, summary)
        faults.crash_point("driver_before_index")
        self.store.write_json(INDEX_FILE, build_index(self.config.run_id, self.state))
        return summary

    def _identity(self) -> dict[str, Any]:
        config = self.config
        return {"run_id": config.run_id, "input": config.input, "output": self.store.url(),
                "config": config.public_dict(), "fingerprint": config.fingerprint(),
                "manifest": config.manifest_digest(), "index": self.store.url(INDEX_FILE),
                "errors_file": self.store.url(ERRORS_FILE)}

    def _earlier_runs(self) -> list[dict[str, Any]]:
        """The figures of the runs that generated this dataset before, from the last summary."""
        if not self.inventory.has(SUMMARY_FILE):
            return []
        try:
            return list(self.store.read_json(SUMMARY_FILE).get("runs", []))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return []

    def close(self) -> None:
        """Flush what is pending (if the run did not finalize) and release the lease."""
        if self.lease is not None and self.lease.epoch:
            if self.compactor is not None and not self.lease.lost:
                self.compactor.flush()
            self.lease.release()

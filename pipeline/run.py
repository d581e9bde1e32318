"""The driver: plan, resume, run the Ray Data plan, commit shards as units complete, summarise.

    read manifest (driver, fsspec) -> units -> skip committed units
      -> ray.data.from_items -> prep (tasks) -> generate (actor pool) -> encode (tasks)
      -> driver: group rows by unit, commit each complete unit (sink.commit_unit)
      -> errors.jsonl, summary.json, index.json (last)

The driver holds only what is needed to finish the units in flight; everything that survives a
crash (markers, shards) lives in the output storage, so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline import faults, sink
from pipeline.config import ConfigError, JobConfig
from pipeline.manifest import RowError
from pipeline.plan import Unit, mismatched_unit, plan_units
from pipeline.redact import redact, redact_text
from pipeline.samples import FIELDS, decode_sample
from pipeline.sources import InputError, InputUnavailable, read_manifest
from pipeline.stages.rows import unpack_files
from pipeline.storage import Store

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
logger = logging.getLogger("pipeline.run")


def open_store(config: JobConfig) -> Store:
    return Store(config.output, config.sink.storage_options, config.sink.retries, config.sink.retry_backoff_s)


def check_run_record(store: Store, config: JobConfig) -> None:
    """Write run.json on first use of an output; refuse an output that holds a different run."""
    record = {"run_id": config.run_id, "fingerprint": config.fingerprint(), "settings": config.fingerprint_values(),
              "created_at": time.time()}
    if not store.exists(sink.RUN_FILE):
        store.write_json(sink.RUN_FILE, record)
        return
    existing = store.read_json(sink.RUN_FILE)
    if existing.get("run_id") != config.run_id:
        raise ConfigError("run_id", f"output {store.url()} holds run {existing.get('run_id')!r}, not "
                                    f"{config.run_id!r}; give another --output or the same --run-id")
    for key, value in config.fingerprint_values().items():
        if existing.get("settings", {}).get(key) != value:
            raise ConfigError(key, f"output {store.url()} holds run {config.run_id!r} made with {key}="
                                   f"{existing['settings'].get(key)!r}, not {value!r}; give another --output or --run-id")


def plan(config: JobConfig, store: Store) -> tuple[list[Unit], dict[int, dict[str, Any]], list[RowError]]:
    """Units of the manifest, the markers already committed (validated against each other) and the
    manifest files skipped or not fully read."""
    manifest = read_manifest(config.input, config.sink.storage_options, config.limit, config.input_allow_empty)
    try:
        entries = list(manifest)
    except InputError as exc:
        raise ConfigError("input", str(exc)) from None
    units = plan_units(entries, config.sink.rows_per_shard)
    committed = sink.committed_units(store)
    mismatch = mismatched_unit(units, committed)
    if mismatch:
        raise ConfigError("input", f"{mismatch}; the manifest changed since output {store.url()} was written; "
                                   "give another --output or --run-id")
    return units, committed, manifest.problems


def forwarded_env() -> dict[str, str]:
    """Environment the workers need (object-store endpoint, region, fault switches), never credentials;
    variables the enclosing Ray job already sets are left to it."""
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars", {})
    names = [n for n in os.environ if n in FORWARDED_ENV or n.startswith("HERO_FAULT_")]
    return {n: os.environ[n] for n in names if n not in job_env}


def connect_ray(config: JobConfig) -> None:
    """Join the cluster at ``ray.address`` / ``RAY_ADDRESS``, or start a private local instance
    (token authentication, set explicitly before Ray reads its configuration)."""
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    env = forwarded_env()
    if not address:  # workers of a private local instance import this very checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    runtime_env = {"env_vars": env} if env else None
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False,
                 runtime_env=runtime_env, logging_level=logging.WARNING)


def build_dataset(config: JobConfig, units: list[Unit]):
    """The Ray Data plan over the rows of ``units``: prep -> generate (actor pool) -> encode."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.stages.encode import encode_batch
    from pipeline.stages.generate import GenerateRollouts
    from hero.models import model_spec
    from pipeline.stages.prep import prepare_batch

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    items = [{"unit": unit.number, "position": e.position, "id": e.row.id, "row": e.row.model_dump_json(),
              "error": ""} for unit in units for e in unit.valid]
    spec = model_spec(config.model.name, **config.model.options)
    gen = config.generate
    return (
        ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 200)))
        .map_batches(prepare_batch, batch_size=1, num_cpus=config.ray.prep_num_cpus,
                     fn_kwargs={"spec": spec, "storage_options": config.sink.storage_options})
        .map_batches(GenerateRollouts, batch_size=gen.batch_size,
                     compute=ActorPoolStrategy(size=gen.actors), num_gpus=gen.num_gpus, num_cpus=gen.num_cpus,
                     fn_constructor_kwargs={"model": config.model.name, "model_options": config.model.options,
                                            "accel": config.accel.name, "accel_options": config.accel.options,
                                            "steps": gen.steps})
        .map_batches(encode_batch, batch_size=1, num_cpus=config.ray.encode_num_cpus,
                     fn_kwargs={"run_id": config.run_id, "model": config.model.name})
    )


class UnitCommitter:
    """Collects result rows per unit and commits each unit (in a small thread pool) once complete."""

    def __init__(self, store: Store, units: list[Unit], progress: "Progress") -> None:
        self.store = store
        self.units = {unit.number: unit for unit in units}
        self.expected = {unit.number: len(unit.valid) for unit in units}
        self.results: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="commit")
        self.futures: dict[int, Future] = {}
        self.progress = progress

    def start_empty(self) -> None:
        """Units with no row to generate (all rows failed validation) commit straight away."""
        for number, count in self.expected.items():
            if count == 0:
                self._submit(number)

    def add(self, row: dict[str, Any]) -> None:
        number = int(row["unit"])
        self.results[number].append(row)
        self.progress.row(bool(row["error"]))
        if len(self.results[number]) == self.expected[number]:
            self._submit(number)

    def _submit(self, number: int) -> None:
        self.futures[number] = self.pool.submit(self._commit, number, self.results.pop(number, []))

    def _commit(self, number: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        unit = self.units[number]
        rows.sort(key=lambda r: int(r["position"]))
        samples = [(str(r["id"]), unpack_files(r["files"])) for r in rows if not r["error"]]
        where = {e.position: (e.source, e.line) for e in unit.entries}
        errors = [e.to_dict() for e in unit.errors]
        for r in rows:
            if r["error"]:
                source, line = where[int(r["position"])]
                errors.append(dict(json.loads(r["error"]), source=source, line=line))
        metas = [json.loads(files["meta.json"]) for _, files in samples]
        record = {"rows": unit.rows(), "errors": errors, "stats": unit_stats(metas)}
        marker = sink.commit_unit(self.store, number, samples, record)
        self.progress.committed(marker)
        if faults.inject("driver_kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        return marker

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Wait for commits; return (markers committed now, errors of units that could not commit)."""
        failed = []
        done = []
        for number, future in sorted(self.futures.items()):
            try:
                done.append(future.result())
            except Exception as exc:
                failed.append({"id": None, "unit": number, "field": "shard", "stage": "commit",
                               "reason": f"{type(exc).__name__}: {exc}", "source": None, "line": None})
        self.pool.shutdown()
        return done, failed


def unit_stats(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-unit figures kept in the marker: frames and seconds spent per stage."""
    stats: dict[str, Any] = {"frames": sum(int(m.get("frames", 0)) for m in metas)}
    for stage in ("prep_s", "generate_s", "encode_s"):
        stats[stage] = sum(float(m.get("timings", {}).get(stage, 0.0)) for m in metas)
    return stats


class Progress:
    """Progress that reads well both on a terminal (tqdm) and in `ray job logs` (one line per unit)."""

    def __init__(self, total_rows: int, total_units: int) -> None:
        self.tty = sys.stderr.isatty()
        self.total_units = total_units
        self.units_done = 0
        self.failures = 0
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_rows, unit="rollout", desc="generating")

    def row(self, failed: bool) -> None:
        self.failures += int(failed)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failures)

    def committed(self, marker: dict[str, Any]) -> None:
        self.units_done += 1
        if not self.tty:
            print(f"[unit {self.units_done}/{self.total_units}] committed unit {marker['unit']}: "
                  f"{marker['nsamples']} samples, {len(marker.get('errors', []))} failed", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(config: JobConfig) -> int:
    """Run a resolved job; return the exit status (0 complete, 1 some units left uncommitted)."""
    started = time.time()
    store = open_store(config)
    print(f"hero-rollouts: run {config.run_id}\n  input  {redact_text(config.input)}\n"
          f"  output {redact_text(store.url())}\n  model  {config.model.name} (accelerator: {config.accel.name})",
          flush=True)
    try:
        units, committed, unread = plan(config, store)  # before run.json: a bad input leaves no trace
    except InputUnavailable as exc:
        print(f"error: {exc}; nothing was planned past it, rerun to resume", file=sys.stderr, flush=True)
        return 1
    check_run_record(store, config)
    stale = sink.clean_stale(store, committed)
    todo = [unit for unit in units if unit.number not in committed]
    print(f"  plan   {sum(len(u.entries) for u in units)} rows in {len(units)} units; "
          f"{len(committed)} already committed, {len(todo)} to do; "
          f"{len(unread)} manifest files skipped or not fully read", flush=True)
    new, failed, run_error = [], [], None
    if todo:
        new, failed, run_error = generate(config, store, todo)
    committed = sink.committed_units(store)
    this_run = {"wall_s": time.time() - started, "units_committed": len(new), "stale_removed": stale,
                "transient_errors_retried": store.transient_errors,
                "rollouts": sum(m["nsamples"] for m in new),
                "frames": sum(m.get("stats", {}).get("frames", 0) for m in new)}
    read_errors = [e.to_dict() for e in unread]
    summary = build_summary(config, store, units, committed, read_errors, failed, run_error, this_run)
    summary["preview"] = write_preview(store, committed)
    sink.finalize(store, config.run_id, committed, summary, read_errors + failed)
    print_summary(summary)
    return 0 if summary["complete"] else 1


def generate(config: JobConfig, store: Store, todo: list[Unit]
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """Run the Ray Data plan for the units still to do and commit them as they complete."""
    progress = Progress(sum(len(u.valid) for u in todo), len(todo))
    committer = UnitCommitter(store, todo, progress)
    committer.start_empty()
    run_error = None
    if any(unit.valid for unit in todo):
        connect_ray(config)
        try:
            for row in build_dataset(config, todo).iter_rows():
                committer.add(row)
        except Exception as exc:
            run_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            logger.error("generation stopped: %s", run_error)
        finally:
            progress.close()
    new, failed = committer.finish()
    if any(unit.valid for unit in todo):
        import ray

        ray.shutdown()
    return new, failed, run_error


def build_summary(config: JobConfig, store: Store, units: list[Unit], committed: dict[int, dict[str, Any]],
                  read_errors: list[dict[str, Any]], failed: list[dict[str, Any]], run_error: str | None,
                  this_run: dict[str, Any]) -> dict[str, Any]:
    """The run's figures: what the dataset holds, what failed and why, and this run's throughput
    (credentials masked: it is printed and stored)."""
    errors = [e for m in committed.values() for e in m.get("errors", [])] + read_errors + failed
    rollouts = sum(m["nsamples"] for m in committed.values())
    frames = sum(m.get("stats", {}).get("frames", 0) for m in committed.values())
    wall = max(this_run["wall_s"], 1e-9)
    return redact({
        "run_id": config.run_id, "input": config.input, "output": store.url(), "config": config.public_dict(),
        "fingerprint": config.fingerprint(), "complete": len(committed) == len(units) and run_error is None,
        "units": {"total": len(units), "committed": len(committed), "failed_to_commit": len(failed)},
        "rollouts": rollouts, "frames": frames, "shards": sum(1 for m in committed.values() if m.get("shard")),
        "bytes": sum(m.get("filesize", 0) for m in committed.values()),
        "failures": len(errors), "failures_by_stage": dict(Counter(e.get("stage") for e in errors)),
        "failures_by_field": dict(Counter(e.get("field") for e in errors)),
        "checksum_failures": sum(m.get("checksum_failures", 0) for m in committed.values()),
        "run_error": run_error,
        "this_run": dict(this_run, rollouts_per_min=60 * this_run["rollouts"] / wall,
                         frames_per_s=this_run["frames"] / wall),
        "index": store.url(sink.INDEX_FILE), "errors_file": store.url(sink.ERRORS_FILE),
    })


def write_preview(store: Store, committed: dict[int, dict[str, Any]]) -> str | None:
    """preview.png (contact sheet of RGB and depth) and preview.gif of the run's first sample."""
    from hero.preview import write_preview as render_preview

    first = next((m for _, m in sorted(committed.items()) if m.get("shard")), None)
    if first is None:
        return None
    key = first["keys"][0]
    try:
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(first["shard"]))) as tar:
            files = {name: tar.extractfile(f"{key}.{name}").read() for name in FIELDS}
        sample = decode_sample(files)
        with tempfile.TemporaryDirectory(prefix="hero-preview-") as tmp:
            sheet, gif = render_preview(SimpleNamespace(rgb=sample["rgb"], depth=sample["depth"]), tmp, key)
            store.write_bytes("preview.png", sheet.read_bytes())
            store.write_bytes("preview.gif", gif.read_bytes())
    except Exception as exc:  # a preview is a convenience: never fail a finished run over it
        logger.warning("no preview: %s: %s", type(exc).__name__, exc)
        return None
    return store.url("preview.png")


def print_summary(summary: dict[str, Any]) -> None:
    """A one-screen closing report."""
    run = summary["this_run"]
    status = "complete" if summary["complete"] else "INCOMPLETE (rerun the same command to resume)"
    by_stage = ", ".join(f"{k}: {v}" for k, v in sorted(summary["failures_by_stage"].items())) or "none"
    lines = [
        f"hero-rollouts: run {summary['run_id']} {status}",
        f"  rollouts    {summary['rollouts']} in the dataset ({summary['shards']} shards, "
        f"{summary['bytes'] / 1e6:.1f} MB); {run['rollouts']} generated this run",
        f"  frames      {summary['frames']}",
        f"  failures    {summary['failures']} ({by_stage}) -> {summary['errors_file']}",
        f"  throughput  {run['rollouts_per_min']:.2f} rollouts/min, {run['frames_per_s']:.2f} frames/s "
        f"over {run['wall_s']:.1f} s",
        f"  output      {summary['output']}",
        f"  index       {summary['index']}",
        f"  preview     {summary['preview']}",
    ]
    if summary["run_error"]:
        lines.append(f"  error       {summary['run_error']}")
    print("\n".join(lines), flush=True)

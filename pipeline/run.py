"""The driver: look at the output, plan as the manifest streams, run the Ray Data plan, finalize.

    sink.inspect()      what the output holds (read only); a complete, intact run stops here
    check_input()       the manifest up to its first row: an unusable input stops before any write
    sink.start()        the lease, the run record, schema.json, the commit log tidied
    plan (a thread)     manifest -> units -> units not committed -> the feed
    Ray Data            read (feed) -> prep -> generate (actor pool) -> encode and write (commits)
    driver              each unit's commit record -> the commit log; progress every few seconds
    sink.finalize()     errors.jsonl, summary.json, preview, index.json (last)

The driver handles metadata only: sample bytes never reach it, and it holds one block of units at
a time. Everything that survives a crash (shards, commit records) is in the output storage, so a
rerun resumes where the last one stopped.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, JobConfig
from pipeline.faults import FORWARDED_PREFIX
from pipeline.plan import PlanCounts, PlanMismatch, Unit, plan_units, units_to_do
from pipeline.redact import redact_text
from pipeline.sink import LeaseHeld, LeaseLost, RolloutSink, ShardWriter
from pipeline.sources import InputError, Manifest, read_manifest
from pipeline.storage import Store

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# HERO's calibration cache (hero.cache.calibration.CACHE_ENV, named here so the driver imports no
# torch) too: without it a cluster's workers calibrate into each node's home folder
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "HERO_CALIBRATION_DIR")
PROGRESS_EVERY_S = 10.0
FEED_STATS_TIMEOUT_S = 5.0
FEED_BLOCKS_PER_ACTOR = 2
logger = logging.getLogger("pipeline.run")


def open_store(config: JobConfig) -> Store:
    return Store(config.output, config.sink.storage_options, config.sink.retries, config.sink.retry_backoff_s)


def forwarded_env() -> dict[str, str]:
    """Environment the workers need (object-store endpoint, region, HERO's calibration cache, fault
    switches), never credentials; variables the enclosing Ray job already sets are left to it."""
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars", {})
    names = [n for n in os.environ if n in FORWARDED_ENV or n.startswith(FORWARDED_PREFIX)]
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


def run(config: JobConfig) -> int:
    """Run a resolved job; return the exit status (0 complete, 1 incomplete or another driver is
    writing the output). Bad configuration, unusable inputs and outputs raise before any write, and
    so does an input the store cannot serve now (:class:`pipeline.sources.InputUnavailable`)."""
    store = open_store(config)
    print(f"hero-rollouts: run {config.run_id}\n  input  {redact_text(config.input)}\n"
          f"  output {redact_text(store.url())}\n  model  {config.model.name} (accelerator: {config.accel.name})",
          flush=True)
    sink = RolloutSink(store, config)
    sink.inspect()
    finished = sink.up_to_date()
    if finished is not None:
        counts = PlanCounts(finished["manifest_rows"], finished["units"]["total"], finished["units"]["total"], 0, True)
        print(f"  plan   {counts.line()} (complete and intact: nothing written)", flush=True)
        print_summary(finished)
        return 0
    check_input(config)
    try:
        writer = sink.start()
        counts, run_error = generate(config, sink, writer)
        summary = sink.finalize(counts, run_error)
    except (LeaseHeld, LeaseLost) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        sink.close()
    print_summary(summary)
    return 0 if summary["complete"] else 1


def generate(config: JobConfig, sink: RolloutSink, writer: ShardWriter) -> tuple[PlanCounts, str | None]:
    """Plan the units still to do and, if there are any, run the Ray Data plan over them while
    the manifest streams; return the plan's counts and what stopped the run early (or None)."""
    if sink.manifest_changed():
        check_manifest(config, sink)
    counts = PlanCounts()
    todo = planned_units(config, sink.state.units, counts)
    try:
        first = next(todo, None)
    except PlanMismatch as exc:
        raise ConfigError("input", f"{exc}; the manifest changed since output {sink.store.url()} was written") from None
    if first is None:
        print(f"  plan   {counts.line()}", flush=True)
        return counts, None
    connect_ray(config)
    import ray

    from pipeline.stages import build_dataset, units_per_call
    from pipeline.stages.feed import start_feed

    feed = start_feed(FEED_BLOCKS_PER_ACTOR * config.generate.actors)
    planner = Planner(itertools.chain([first], todo), feed, units_per_call(config), counts)
    progress = Progress(counts, sink, feed, config.generate.actors)
    run_error = None
    try:
        planner.start()
        progress.start()
        # whole blocks as they come, no prefetching: iter_rows would hold a finished unit back
        # behind a slower one queued before it
        for batch in build_dataset(config, feed, writer).iter_batches(batch_size=None, prefetch_batches=0):
            for outcome in batch["outcome"]:
                sink.commit(json.loads(outcome))
    except LeaseLost:
        raise
    except Exception as exc:
        run_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        logger.error("generation stopped: %s", run_error)
    finally:
        progress.stop()
        ray.kill(feed)  # a planner still waiting on a full feed gives up
        planner.join()
        ray.shutdown()
    return counts, run_error or planner.error


def open_manifest(config: JobConfig) -> Manifest:
    return read_manifest(config.input, config.sink.storage_options, config.limit, config.input_allow_empty)


def check_input(config: JobConfig) -> None:
    """Read the manifest up to its first row before anything is written, so that an input without
    rows (a ConfigError naming ``input``, unless ``input_allow_empty``) or one the store cannot
    serve now leaves no trace in the output."""
    try:
        next(iter(open_manifest(config)), None)
    except InputError as exc:
        raise ConfigError("input", str(exc)) from None


def planned_units(config: JobConfig, committed: Mapping[int, Any], counts: PlanCounts) -> Iterator[Unit]:
    """The manifest's units without a commit record in ``committed``, as the manifest streams,
    counted into ``counts``; once the manifest is read, ``counts.unread`` holds the error records
    of its files that were skipped or not fully read."""
    manifest = open_manifest(config)
    yield from units_to_do(plan_units(manifest, config.sink.rows_per_shard), committed, counts)
    counts.unread = [problem.to_dict() for problem in manifest.problems]


def check_manifest(config: JobConfig, sink: RolloutSink) -> None:
    """Before any work on a changed manifest: every committed unit must match it (a ConfigError
    naming ``input`` otherwise); then the run record takes the new manifest."""
    try:
        for _ in planned_units(config, sink.state.units, PlanCounts()):
            pass
    except PlanMismatch as exc:
        raise ConfigError("input", f"{exc}; the manifest changed since output {sink.store.url()} was written; "
                                   "give another --output or --run-id") from None
    sink.accept_manifest()


class Planner(threading.Thread):
    """Feeds the units still to do, in blocks of ``per_block`` units, while the manifest is read;
    closes the feed at the end and prints the plan's line. ``error`` says why it stopped early."""

    def __init__(self, units: Iterator[Unit], feed: Any, per_block: int, counts: PlanCounts) -> None:
        super().__init__(name="planner", daemon=True)
        self.units, self.feed, self.per_block, self.counts = units, feed, per_block, counts
        self.error: str | None = None

    def run(self) -> None:
        import ray

        from pipeline.stages.units import unit_block

        try:
            while block := list(itertools.islice(self.units, self.per_block)):
                ray.get(self.feed.put.remote(unit_block(block)))
            ray.get(self.feed.close.remote())
            print(f"  plan   {self.counts.line()}", flush=True)
        except PlanMismatch as exc:
            self.error = f"input: {exc}; the manifest changed during the run"
        except Exception as exc:  # a manifest that cannot be read, or the feed killed as the run ends
            self.error = f"planning stopped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Progress(threading.Thread):
    """A line every few seconds from the moment the plan starts, in a terminal and in `ray job
    logs` alike: rows planned, blocks queued, actors ready, units committed, rollouts per minute."""

    def __init__(self, counts: PlanCounts, sink: RolloutSink, feed: Any, actors: int) -> None:
        super().__init__(name="progress", daemon=True)
        self.counts, self.sink, self.feed, self.actors = counts, sink, feed, actors
        self.started = time.time()
        self.stopped = threading.Event()

    def start(self) -> None:
        """Report once now, before the plan runs (so before any unit commits), without waiting
        for the feed actor (the plan must not wait on a progress line), then every
        ``PROGRESS_EVERY_S`` seconds."""
        self.report(feed_wait_s=0)
        super().start()

    def run(self) -> None:
        while not self.stopped.wait(PROGRESS_EVERY_S):
            self.report()

    def report(self, feed_wait_s: float = FEED_STATS_TIMEOUT_S) -> None:
        import ray

        try:
            feed = ray.get(self.feed.stats.remote(), timeout=feed_wait_s)
            pipeline = (f"{feed['blocks_put'] - feed['blocks_taken']} blocks queued; "
                        f"actors ready {feed['actors_ready']}/{self.actors}")
        except Exception:  # the feed actor is still starting: the line goes out all the same
            pipeline = f"feed starting; actors ready ?/{self.actors}"
        elapsed = time.time() - self.started
        done = self.sink.this_run
        planned = f"{self.counts.rows} rows planned" + ("" if self.counts.done else " so far")
        print(f"[progress] {elapsed:.0f} s: {planned}, {pipeline}; committed {done['units_committed']} units, "
              f"{done['rollouts']} rollouts ({60 * done['rollouts'] / max(elapsed, 1e-9):.1f}/min)", flush=True)

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join()


def print_summary(summary: dict[str, Any]) -> None:
    """A one-screen closing report."""
    run = summary["this_run"]
    status = "complete" if summary["complete"] else "INCOMPLETE (rerun the same command to resume)"
    by_stage = ", ".join(f"{k}: {v}" for k, v in sorted(summary["failures_by_stage"].items())) or "none"
    lines = [
        f"hero-rollouts: run {summary['run_id']} {status}",
        f"  rollouts    {summary['rollouts']} in the dataset ({summary['shards']} shards, "
        f"{summary['bytes'] / 1e6:.1f} MB); {run['rollouts']} generated by the last generating run",
        f"  frames      {summary['frames']}",
        f"  failures    {summary['failures']} ({by_stage}) -> {summary['errors_file']}",
        f"  throughput  {run['rollouts_per_min']:.2f} rollouts/min, {run['frames_per_s']:.2f} frames/s "
        f"over {run['wall_s']:.1f} s",
        f"  output      {summary['output']}",
        f"  index       {summary['index']}",
        f"  preview     {summary['preview']}",
    ]
    if run.get("damaged_found"):
        lines.append(f"  repaired    {run['damaged_found']} units whose shards were missing or damaged")
    if summary["run_error"]:
        lines.append(f"  error       {summary['run_error']}")
    print("\n".join(lines), flush=True)

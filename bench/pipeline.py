"""What the pipeline costs around the model: ``python -m bench.pipeline``.

Runs the embedded job (``jobs/generate.py`` with no arguments: local Ray, the shipped manifest,
``file://`` output) in this process, then a plain loop that calls the same model, with the same
accelerator, on the same requests (built from the same manifest rows, untimed), with no Ray, no
encoding and no I/O. Reports the pipeline's overhead as ``job wall / plain model time - 1``, with
and without what a job pays once whatever its length (until its first actor is ready, and after its
last commit; Ray's start-up is also measured alone), and where the job's time goes per stage (prep,
generate, encode: busy seconds summed over rows, read back from each sample's ``meta.json``); then
the job's throughput for each number of actors and batch size asked for. Writes
``<out>/pipeline.json`` and ``<out>/pipeline.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from bench import command_line
from hero.accelerators import apply_accelerator
from hero.models import load_model, model_spec
from hero.models.base import RolloutRequest
from hero.rollout import generate_any_length
from pipeline.cli import load
from pipeline.config import JobConfig
from pipeline.loader import rollout_dataset
from pipeline.run import connect_ray, open_store, run as run_job
from pipeline.sink import SUMMARY_FILE
from pipeline.sink.log import read_records
from pipeline.sources import read_manifest
from pipeline.stages.prep import prepare_row
from pipeline.storage import Store

STAGES = ("prep_s", "generate_s", "encode_s")
log = logging.getLogger("bench.pipeline")


def job_config(workdir: Path, args: list[str]) -> JobConfig:
    """The embedded default job, with a fresh output folder and run id, plus ``args`` overrides."""
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    return load(["--output", str(workdir / run_id), "--run-id", run_id, *args])


def time_job(config: JobConfig) -> dict[str, Any]:
    """Run the job in this process; wall time, its summary, and per-stage seconds from the samples."""
    started_at, started = time.time(), time.perf_counter()
    status = run_job(config)
    wall = time.perf_counter() - started
    store = open_store(config)
    summary = store.read_json(SUMMARY_FILE)
    metas = [sample["meta"] for sample in rollout_dataset(config.output, split=False)]
    timings = [meta.get("timings", {}) for meta in metas]
    stages = {stage: sum(float(t.get(stage, 0.0)) for t in timings) for stage in STAGES}
    stages["model_total_s"] = sum(float(t.get("total_s", 0.0)) for t in timings)
    stages["model_sampling_s"] = sum(float(t.get("sampling_s", 0.0)) for t in timings)
    return {"status": status, "wall_s": wall, "rollouts": summary["rollouts"],
            "frames": summary["frames"], "failures": summary["failures"],
            "rollouts_per_min": 60 * summary["this_run"]["rollouts"] / wall,
            "frames_per_s": summary["this_run"]["frames"] / wall, "stages": stages,
            "actors": config.generate.actors, "batch_size": config.generate.batch_size,
            "milestones": milestones(store, metas, started_at, wall)}


def milestones(store: Store, metas: list[dict[str, Any]], started_at: float, wall: float
               ) -> dict[str, float]:
    """When the first actor was ready (the longest actor ``__init__`` too) and how long the driver
    ran after the last unit's commit (errors, summary, index, preview, Ray shutdown)."""
    startups = [m["actor"] for m in metas if "actor" in m]
    last_commit = max(float(r["committed_at"]) for r in read_records(store).values())
    return {"first_actor_ready_s": min(a["ready_at"] for a in startups) - started_at,
            "actor_init_s": max(a["init_s"] for a in startups),
            "after_last_commit_s": started_at + wall - last_commit}


def job_requests(config: JobConfig) -> list[RolloutRequest]:
    """The requests the job's generate stage builds from its manifest rows (prep included)."""
    geometry = model_spec(config.model.name, **config.model.options)
    requests = []
    for entry in read_manifest(config.input, config.sink.storage_options, config.limit):
        if entry.row is None:
            continue
        row = entry.row
        arrays = prepare_row(row, geometry, config.sink.storage_options)
        requests.append(RolloutRequest(
            id=row.id, task=row.task, frames=int(arrays["c2w"].shape[0]), image=arrays.get("image"),
            goal=arrays.get("goal"), video=arrays.get("video"), c2w=arrays["c2w"], k=arrays["k"],
            steps=config.generate.steps or row.steps, guidance=row.guidance, seed=row.seed))
    return requests


def time_ray_start(config: JobConfig) -> float:
    """Seconds to start and stop the job's Ray instance alone (``pipeline.run.connect_ray``)."""
    import ray

    started = time.perf_counter()
    connect_ray(config)
    ray.shutdown()
    return time.perf_counter() - started


def time_plain_loop(config: JobConfig, requests: list[RolloutRequest], threads: int) -> dict[str, Any]:
    """The same model and accelerator on the same requests, batch by batch, nothing else, with
    as many torch threads as a generate actor gets."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = load_model(config.model.name, **config.model.options)
    accelerator = apply_accelerator(model.transformer, config.accel.name, **config.accel.options)
    load_s = time.perf_counter() - started
    batch = config.generate.batch_size
    batch_s = []
    for start in range(0, len(requests), batch):
        started = time.perf_counter()
        generate_any_length(model, requests[start: start + batch])
        batch_s.append(time.perf_counter() - started)
    accelerator.remove()
    return {"model_s": sum(batch_s), "batch_s": batch_s, "model_load_s": load_s,
            "rollouts": len(requests), "batch_size": batch, "threads": threads}


def marginal_overhead(job: dict[str, Any], half: dict[str, Any], plain: dict[str, Any]
                      ) -> float | None:
    """Overhead per extra rollout: the job's extra wall time from ``half`` to all rows over the
    plain loop's extra model time for the same rows; every fixed cost cancels (None with a
    single row)."""
    batches = -(-half["rollouts"] // plain["batch_size"])
    if batches >= len(plain["batch_s"]):
        return None
    extra_model = plain["model_s"] - sum(plain["batch_s"][:batches])
    return (job["wall_s"] - half["wall_s"]) / extra_model - 1.0


def overhead(job: dict[str, Any], half: dict[str, Any], plain: dict[str, Any], ray_start_s: float
             ) -> dict[str, Any]:
    """The job's wall time beyond the plain loop's, as a ratio of model time, and where it went.

    ``steady_ratio`` leaves out what a job pays once, whatever its length: the time until its first
    actor is ready (Ray start, worker spawn, imports, model load) and the finish after its last
    commit (summary, index, preview, Ray shutdown). What remains grows with the number of rollouts.
    """
    stages, marks = job["stages"], job["milestones"]
    outside = job["wall_s"] - stages["generate_s"] / job["actors"]
    fixed = marks["first_actor_ready_s"] + marks["after_last_commit_s"]
    return {"ratio": job["wall_s"] / plain["model_s"] - 1.0,
            "extra_s": job["wall_s"] - plain["model_s"],
            "steady_ratio": (job["wall_s"] - fixed) / plain["model_s"] - 1.0,
            "marginal_ratio": marginal_overhead(job, half, plain),
            "generate_stage_beyond_model_s": stages["generate_s"] - stages["model_total_s"],
            "prep_busy_s": stages["prep_s"], "encode_busy_s": stages["encode_s"],
            "outside_stages_s": outside, "ray_start_stop_s": ray_start_s,
            "first_actor_ready_s": marks["first_actor_ready_s"], "actor_init_s": marks["actor_init_s"],
            "after_last_commit_s": marks["after_last_commit_s"], "outside_remaining_s": outside - fixed}


def markdown(result: dict[str, Any]) -> str:
    job, plain, over = result["embedded"], result["plain"], result["overhead"]
    lines = ["# Pipeline overhead", "", f"Command: `{result['command']}`", "",
             f"Embedded job: {job['rollouts']} rollouts ({job['frames']} frames), "
             f"{job['actors']} actor(s), batch size {job['batch_size']}, model `{result['model']}`, "
             f"accelerator `{result['accel']}`; {os.cpu_count()} CPUs, {plain['threads']} torch "
             "thread(s) in the plain loop as in each actor.",
             "", "| figure | seconds |", "|---|---|",
             f"| job wall clock (`jobs/generate.py`, in process) | {job['wall_s']:.2f} |",
             f"| plain loop: `model.generate` on the same requests | {plain['model_s']:.2f} |",
             f"| overhead: wall − plain | {over['extra_s']:.1f} ({100 * over['ratio']:.1f}% of model time) |",
             f"| generate stage, summed over rows | {job['stages']['generate_s']:.2f} |",
             f"| … of which `model.generate` (model's own timer) | {job['stages']['model_total_s']:.2f} |",
             f"| … of which sampling loop | {job['stages']['model_sampling_s']:.2f} |",
             f"| prep stage busy (render/decode inputs), summed | {over['prep_busy_s']:.2f} |",
             f"| encode stage busy (mp4, npz, meta), summed | {over['encode_busy_s']:.2f} |",
             f"| outside the generate stage | {over['outside_stages_s']:.2f} |",
             f"| … until the first actor is ready: Ray start, Ray Data planning, worker spawn, "
             f"imports, model load | {over['first_actor_ready_s']:.2f} |",
             f"| …… Ray start and stop, measured alone | {over['ray_start_stop_s']:.2f} |",
             f"| …… the actor's `__init__` (torch/diffusers imports, model load, accelerator) | "
             f"{over['actor_init_s']:.2f} |",
             f"| … after the last commit: errors, summary, index, preview, Ray shutdown | "
             f"{over['after_last_commit_s']:.2f} |",
             f"| … the rest: encode tasks, commits, the actor waiting between batches | "
             f"{over['outside_remaining_s']:.2f} |",
             f"| overhead without the fixed start-up and finish | "
             f"{100 * over['steady_ratio']:.1f}% of model time |",
             f"| overhead per extra rollout (job of {result['half']['rollouts']} rows vs "
             f"{job['rollouts']}: fixed costs cancel) | {_percent(over['marginal_ratio'])} |",
             ""]
    if result["sweep"]:
        lines += ["## Throughput by actors and batch size", "",
                  "| actors | batch size | wall (s) | rollouts/min | frames/s | generate busy (s) |",
                  "|---|---|---|---|---|---|"]
        for row in result["sweep"]:
            lines.append(f"| {row['actors']} | {row['batch_size']} | {row['wall_s']:.1f} | "
                         f"{row['rollouts_per_min']:.2f} | {row['frames_per_s']:.2f} | "
                         f"{row['stages']['generate_s']:.2f} |")
    return "\n".join(lines) + "\n"


def _percent(ratio: float | None) -> str:
    return "–" if ratio is None else f"{100 * ratio:.1f}% of model time"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts to sweep")
    parser.add_argument("--batch-sizes", default="1,2", help="comma-separated batch sizes to sweep")
    parser.add_argument("--job-args", default="", help="extra jobs/generate.py options for every run "
                                                       "(e.g. '--limit 4 --accel hero')")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the plain loop and in every "
                        "actor (OMP_NUM_THREADS of the job's workers); default: an actor's num_cpus, at least 1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    extra = shlex.split(args.job_args)
    if args.threads:  # the private Ray instance's workers inherit it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="hero-bench-pipeline-") as tmp:
        workdir = Path(tmp)
        embedded = job_config(workdir, extra)
        log.info("embedded job: %s", embedded.run_id)
        job = time_job(embedded)
        log.info("plain loop on the same requests")
        requests = job_requests(embedded)
        plain = time_plain_loop(embedded, requests, args.threads or max(1, int(embedded.generate.num_cpus)))
        ray_start_s = time_ray_start(embedded)
        log.info("the same job on the first %d rows", len(requests) // 2)
        half = time_job(job_config(workdir, [*extra, "--limit", str(max(1, len(requests) // 2))]))
        sweep = []
        for actors in (int(a) for a in args.actors.split(",") if a):
            for batch in (int(b) for b in args.batch_sizes.split(",") if b):
                config = job_config(workdir, [*extra, "--actors", str(actors), "--batch-size", str(batch)])
                log.info("sweep: %d actor(s), batch size %d", actors, batch)
                sweep.append(time_job(config))
    result = {"command": command_line("bench.pipeline", argv),
              "model": embedded.model.name, "accel": embedded.accel.name,
              "embedded": job, "half": half, "plain": plain,
              "overhead": overhead(job, half, plain, ray_start_s), "sweep": sweep}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "pipeline.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()

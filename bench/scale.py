"""How the driver and the sink scale with the manifest: ``python -m bench.scale``.

Four measurements, each driver in a process of its own (its peak RSS sampled every 50 ms), output on
moto's S3 server on loopback, which counts every request by kind:

1. planning only (no Ray): the planner's pass over manifests of 1k to 1M rows (read, validate,
   units, the blocks the feed gets): seconds to the first block, to the end, driver peak RSS;
2. time to the first committed unit of a real job (``--model tiny --steps 1``) on manifests of 1k
   to 100k rows, the driver stopped (SIGINT) once a unit is committed: planning streams, so this
   should not grow with the manifest;
3. a complete job of ``--generate-rows`` rows: rows per second between the first and the last
   commit, S3 requests per committed unit by kind, driver peak RSS; then its rerun;
4. the no-op rerun of complete runs of 1k to ``--noop-max`` rows: seconds, S3 requests, driver
   peak RSS, and that it writes nothing. Outputs bigger than the job of 3. are made through the
   real write path (``ShardWriter``, ``RolloutSink.commit`` and ``finalize``) with placeholder
   sample bytes, which a no-op rerun never reads.

Writes ``<out>/scale.json``, ``scale.md`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import command_line

REPO = Path(__file__).resolve().parents[1]
PLAN_SIZES = (1_000, 10_000, 100_000, 1_000_000)
FIRST_ROW_SIZES = (1_000, 10_000, 100_000)
ROWS_PER_SHARD = 8
JOB_ARGS = ("--model", "tiny", "--accel", "none", "--steps", "1", "--rows-per-shard", str(ROWS_PER_SHARD))
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
MANIFEST_CHUNK = 100_000


@dataclass
class CountingS3:
    """moto's S3 on loopback; ``counts`` holds requests by ``(method, kind)`` and ``first`` the
    time of the first request of each kind since the last :meth:`reset`."""

    endpoint: str = ""
    counts: Counter = field(default_factory=Counter)
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> "CountingS3":
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            self.count(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
            return app(environ, start_response)

        server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        return self

    def count(self, method: str, path: str, query: str) -> None:
        listing = method == "GET" and ("list-type" in query or "prefix=" in query or path.count("/") <= 1)
        kind = "LIST" if listing else f"{method} {_kind_of(path)}"
        now = time.time()
        with self.lock:
            self.counts[kind] += 1
            self.first.setdefault(kind, now)
            self.last[kind] = now

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.first.clear()
            self.last.clear()

    def bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials()).create_bucket(Bucket=name)
        return f"s3://{name}"


def _boto_credentials() -> dict[str, str]:
    return {"region_name": AWS_ENV["AWS_DEFAULT_REGION"], "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"]}


def _kind_of(path: str) -> str:
    for kind in ("shards", "_commits/unit-", "_commits/log-", "_lease", "index.json", "summary.json", "run.json",
                 "errors.jsonl", "preview"):
        if f"/{kind}" in path:
            return kind.rstrip("-")
    return "batch" if path.count("/") <= 1 else "other"  # POST /bucket?delete: a batched delete


def write_manifest(path: Path, rows: int) -> Path:
    """A manifest of ``rows`` toyworld prediction rows (written in chunks, cached)."""
    from pipeline.examples import example_rows

    if path.exists():
        return path
    with open(path.with_suffix(".tmp"), "w") as f:
        for start in range(0, rows, MANIFEST_CHUNK):
            chunk = example_rows(min(MANIFEST_CHUNK, rows - start), seed=start // MANIFEST_CHUNK, tasks=("prediction",),
                                 prefix=f"s{start // MANIFEST_CHUNK}")
            f.writelines(json.dumps(row) + "\n" for row in chunk)
    os.replace(path.with_suffix(".tmp"), path)
    return path


# --- 1. planning only ---------------------------------------------------------------------------


def plan_pass(manifest: str) -> dict[str, Any]:
    """The planner's work on the whole manifest, in this process: what a driver does with a
    manifest (apart from handing blocks to the feed), with nothing committed yet."""
    from pipeline.plan import PlanCounts, plan_units, units_to_do
    from pipeline.sources import read_manifest
    from pipeline.stages.units import unit_block

    started = time.perf_counter()
    first_block = None
    counts = PlanCounts()
    units = units_to_do(plan_units(read_manifest(manifest), ROWS_PER_SHARD), {}, counts)
    block: list = []
    for unit in units:
        block.append(unit)
        if len(block) == 1:  # one unit per block, as the job with batch size 1 feeds them
            unit_block(block)
            first_block = first_block or time.perf_counter() - started
            block = []
    return {"rows": counts.rows, "units": counts.units, "first_block_s": first_block,
            "plan_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss``, not inherited across
    fork and exec from the parent)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def plan_only(manifest: Path) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "bench.scale", "--plan-pass", str(manifest)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- drivers ------------------------------------------------------------------------------------


def driver(args: list[str], s3: CountingS3, stop_at_first_commit: bool = False, timeout: float = 3600) -> dict[str, Any]:
    """Run ``jobs/generate.py`` with ``args``; its wall time, peak RSS (the driver process only),
    the S3 requests it caused, and when the first and last unit were committed."""
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    s3.reset()
    started = time.time()
    process = subprocess.Popen([sys.executable, str(REPO / "jobs" / "generate.py"), *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    peak = 0
    watched = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if stop_at_first_commit and "PUT _commits/unit" in s3.first:
            process.send_signal(signal.SIGINT)
            stop_at_first_commit = False
        if time.time() - started > timeout:
            process.kill()
        time.sleep(0.05)
    process.wait()
    reader.join()
    first, last = s3.first.get("PUT _commits/unit"), s3.last.get("PUT _commits/unit")
    return {"returncode": process.returncode, "wall_s": time.time() - started, "peak_rss_mb": peak / 2**20,
            "first_commit_s": first - started if first else None, "last_commit_s": last - started if last else None,
            "requests": dict(s3.counts), "log": "".join(output)[-4000:]}


def synthesize(args: list[str], s3: CountingS3, workers: int = 16) -> None:
    """A complete run's output for ``args``, committed through the real write path (workers'
    ShardWriter, the driver's commit and finalize) with placeholder samples: a unit's shard holds
    one small file per sample field (an empty meta.json, one zero action), which a no-op rerun
    never reads."""
    import io

    import numpy as np

    from pipeline.cli import load
    from pipeline.plan import PlanCounts
    from pipeline.run import open_store, planned_units
    from pipeline.samples import FIELDS
    from pipeline.sink import RolloutSink

    config = load(args)
    sink = RolloutSink(open_store(config), config)
    sink.inspect()
    writer = sink.start()
    counts = PlanCounts()
    units = planned_units(config, sink.state.units, counts)
    action = io.BytesIO()
    np.save(action, np.zeros((1, 6), np.float32))
    placeholder = dict({name: b"placeholder" for name in FIELDS}, **{"meta.json": b"{}", "action.npy": action.getvalue()})

    def commit(unit):
        samples = [(e.row.id, placeholder) for e in unit.valid]
        plan = {"rows": unit.rows(), "digest": unit.digest()}
        return writer.write(unit.number, samples, [{"frames": 17}] * len(samples), [], plan, None)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for outcome in pool.map(commit, units):
            sink.commit(outcome)
    sink.finalize(counts, None)
    sink.close()


def startup(args: list[str]) -> float:
    """Seconds a fresh process takes to import the driver and resolve ``args`` (the manifest's
    digest included): what every run pays before it looks at its output."""
    code = "import sys, pipeline.run; from pipeline.cli import load; load(sys.argv[1:])"
    started = time.time()
    subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                   check=True, capture_output=True)
    return time.time() - started


def output_args(manifest: Path, bucket: str, name: str) -> list[str]:
    return ["--input", str(manifest), "--output", f"{bucket}/{name}", *JOB_ARGS]


# --- report -------------------------------------------------------------------------------------


def writes(requests: dict[str, int]) -> int:
    return sum(n for kind, n in requests.items() if kind.split()[0] in ("PUT", "POST", "DELETE"))


def markdown(result: dict[str, Any]) -> str:
    commands = sorted(set(result["commands"].values()))
    lines = ["# Scale study: the driver and the sink", "", *[f"Command: `{c}`" for c in commands], "",
             f"{result['cpus']} CPUs (shared); tiny model, 1 step, {ROWS_PER_SHARD} rows per shard, output on "
             "moto's S3 on loopback.", "", "## Planning only (no Ray)", "",
             "| rows | units | first block (s) | whole manifest (s) | driver peak RSS (MB) |", "|---|---|---|---|---|"]
    for row in result["planning"]:
        lines.append(f"| {row['rows']:,} | {row['units']:,} | {row['first_block_s']:.2f} | {row['plan_s']:.1f} | "
                     f"{row['peak_rss_mb']:.0f} |")
    lines += ["", "## Time to the first committed unit (driver started cold: Ray start included)", "",
              "| rows in the manifest | first commit (s) | driver peak RSS until then (MB) |", "|---|---|---|"]
    for row in result["first_row"]:
        lines.append(f"| {row['rows']:,} | {row['first_commit_s']:.1f} | {row['peak_rss_mb']:.0f} |")
    job = result["job"]
    units = max(1, job["units"])
    lines += ["", f"## A complete job of {job['rows']} rows", "",
              f"- wall {job['wall_s']:.0f} s, first commit after {job['first_commit_s']:.0f} s, "
              f"{job['rows_per_s']:.2f} rows/s between the first and the last commit (the model's cost on "
              f"this machine), driver peak RSS {job['peak_rss_mb']:.0f} MB",
              f"- S3 requests per committed unit: {sum(job['requests'].values()) / units:.1f} "
              f"({', '.join(f'{k} {v / units:.2f}' for k, v in sorted(job['requests'].items()))})",
              "", "## Committing, per unit (the write path alone, outputs made for the no-op reruns)", "",
              "| rows | units | S3 requests per unit |", "|---|---|---|"]
    for row in result["noop"]:
        if row["commit_requests"]:
            per_unit = ", ".join(f"{k} {v / row['units']:.3f}" for k, v in sorted(row["commit_requests"].items()))
            lines.append(f"| {row['rows']:,} | {row['units']:,} | {per_unit} |")
    lines += ["", "## No-op rerun of a complete run", "",
              "| rows | units | seconds | of which start-up (imports, config, manifest digest) | S3 requests | "
              "of which writes | driver peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
    for row in result["noop"]:
        lines.append(f"| {row['rows']:,} | {row['units']:,} | {row['wall_s']:.1f} | {row['startup_s']:.1f} | "
                     f"{sum(row['requests'].values())} | {writes(row['requests'])} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, seconds, requests) = plt.subplots(1, 3, figsize=(15, 4.2))
    planning, first, noop = result["planning"], result["first_row"], result["noop"]
    memory.plot([r["rows"] for r in planning], [r["peak_rss_mb"] for r in planning], "o-", label="planning only")
    memory.plot([r["rows"] for r in first], [r["peak_rss_mb"] for r in first], "s-", label="job, to first commit")
    memory.plot([r["rows"] for r in noop], [r["peak_rss_mb"] for r in noop], "^-", label="no-op rerun")
    memory.set(title="driver peak RSS", ylabel="MB")
    seconds.plot([r["rows"] for r in planning], [r["plan_s"] for r in planning], "o-", label="planning, whole manifest")
    seconds.plot([r["rows"] for r in planning], [r["first_block_s"] for r in planning], "o--", label="planning, first block")
    seconds.plot([r["rows"] for r in first], [r["first_commit_s"] for r in first], "s-", label="job, first commit")
    seconds.plot([r["rows"] for r in noop], [r["wall_s"] for r in noop], "^-", label="no-op rerun")
    seconds.set(title="seconds", ylabel="s", yscale="log")
    requests.plot([r["rows"] for r in noop], [sum(r["requests"].values()) for r in noop], "^-", label="no-op rerun")
    requests.set(title="S3 requests of a no-op rerun", ylabel="requests")
    for axis in (memory, seconds, requests):
        axis.set(xscale="log", xlabel="manifest rows")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    parser.add_argument("--workdir", type=Path, default=None, help="where manifests are kept (default: a temp dir)")
    parser.add_argument("--plan-sizes", default=",".join(map(str, PLAN_SIZES)))
    parser.add_argument("--first-row-sizes", default=",".join(map(str, FIRST_ROW_SIZES)))
    parser.add_argument("--generate-rows", type=int, default=128, help="rows of the complete job (3.)")
    parser.add_argument("--noop-max", type=int, default=100_000, help="largest complete run re-run as a no-op (4.)")
    parser.add_argument("--phases", default="planning,first-row,jobs",
                        help="which measurements to run (planning: 1., first-row: 2., jobs: 3. and 4.)")
    parser.add_argument("--plan-pass", metavar="MANIFEST", help=argparse.SUPPRESS)  # 1., in its own process
    return parser.parse_args(argv)


def sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def first_rows(args: argparse.Namespace, manifests: dict[int, Path], s3: CountingS3, bucket: str) -> list[dict]:
    """2.: time to the first committed unit, per manifest size."""
    runs = []
    for n in sizes(args.first_row_sizes):
        run = driver(output_args(manifests[n], bucket, f"first-{n}"), s3, stop_at_first_commit=True)
        runs.append(dict(run, rows=n))
        print(f"[scale] first commit of {n} rows after {run['first_commit_s']} s", flush=True)
    return runs


def job_and_noops(args: argparse.Namespace, manifests: dict[int, Path], s3: CountingS3, bucket: str
                  ) -> tuple[dict, list[dict]]:
    """3. and 4.: a complete job, then no-op reruns of it and of larger synthesized runs."""
    job_args = output_args(manifests[args.generate_rows], bucket, "job")
    job = driver(job_args, s3)
    assert job["returncode"] == 0, job["log"]
    span = max(job["last_commit_s"] - job["first_commit_s"], 1e-9)
    job.update(rows=args.generate_rows, units=-(-args.generate_rows // ROWS_PER_SHARD),
               rows_per_s=(args.generate_rows - ROWS_PER_SHARD) / span)
    noop = []
    for n in [args.generate_rows] + [n for n in PLAN_SIZES if n <= args.noop_max]:
        rerun_args = job_args if n == args.generate_rows else output_args(manifests[n], bucket, f"noop-{n}")
        commit_requests = {}
        if n != args.generate_rows:
            s3.reset()
            synthesize(rerun_args, s3)
            commit_requests = dict(s3.counts)
        run = driver(rerun_args, s3)
        assert run["returncode"] == 0 and "nothing written" in run["log"], run["log"]
        noop.append(dict(run, rows=n, units=-(-n // ROWS_PER_SHARD), startup_s=startup(rerun_args),
                         commit_requests=commit_requests))
        print(f"[scale] no-op rerun of {n} rows: {run['wall_s']:.1f} s", flush=True)
    return job, noop


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the phases asked for and merge their results into ``<out>/scale.json`` (a phase rerun
    alone replaces only its own figures, with its command)."""
    args = parse_args(argv)
    if args.plan_pass:
        print(json.dumps(plan_pass(args.plan_pass)))
        return {}
    phases = args.phases.split(",")
    command = command_line("bench.scale", argv)
    path = args.out / "scale.json"
    result = json.loads(path.read_text()) if path.exists() else {"commands": {}}
    result.update(cpus=os.cpu_count(), rows_per_shard=ROWS_PER_SHARD)
    with tempfile.TemporaryDirectory(prefix="hero-bench-scale-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        wanted = {*sizes(args.plan_sizes)} if "planning" in phases else set()
        wanted |= {*sizes(args.first_row_sizes)} if "first-row" in phases else set()
        wanted |= {args.generate_rows, *[n for n in PLAN_SIZES if n <= args.noop_max]} if "jobs" in phases else set()
        manifests = {n: write_manifest(work / f"manifest-{n}.jsonl", n) for n in sorted(wanted)}
        if "planning" in phases:
            result["planning"] = [plan_only(manifests[n]) for n in sizes(args.plan_sizes)]
            print(f"[scale] planning: {result['planning']}", flush=True)
        if "first-row" in phases or "jobs" in phases:
            s3 = CountingS3().start()
            os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=s3.endpoint)  # for the drivers and this process alike
            bucket = s3.bucket("scale")
        if "first-row" in phases:
            result["first_row"] = first_rows(args, manifests, s3, bucket)
        if "jobs" in phases:
            result["job"], result["noop"] = job_and_noops(args, manifests, s3, bucket)
    result["commands"].update(dict.fromkeys(phases, command))
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    if all(key in result for key in ("planning", "first_row", "job", "noop")):
        (args.out / "scale.md").write_text(markdown(result))
        plot(result, args.out / "scale.png")
        print(markdown(result))
    return result


if __name__ == "__main__":
    main()

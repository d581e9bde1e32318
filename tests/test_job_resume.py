"""Kill -9 at every moment of the commit protocol, with real driver and worker processes: after
each crash the output holds only complete shards and an index (if any) of committed units; the
reruns skip what was committed and end with exactly the expected keys (none missing, none twice),
every committed record unchanged, and no shard left that the index does not list."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile

from conftest import REPO, run_job

from pipeline import faults
from pipeline.examples import example_rows, write_manifest
from pipeline.loader import rollout_dataset
from pipeline.samples import FIELDS
from pipeline.schema import metadata_path
from pipeline.sink.log import read_records
from pipeline.storage import Store

ROWS = 4
DRIVER_MOMENTS = ("driver_after_commit", "driver_after_segment", "driver_before_index")
WORKER_MOMENTS = ("worker_after_shard", "worker_after_marker")


def complete_shard(path) -> bool:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        return len(members) > 0 and len(members) % len(FIELDS) == 0 and all(
            len(tar.extractfile(m).read()) == m.size for m in members)


def killed_driver(args, env) -> subprocess.CompletedProcess:
    return subprocess.run(["nice", "-n", "10", sys.executable, str(REPO / "jobs" / "generate.py"), *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def check_consistent(output, records_before):
    """What a crash may leave: complete shards only, and metadata tables only beside them; every
    committed record intact and unchanged; an index, if one exists, listing committed shards only."""
    records = read_records(Store(str(output)))
    for unit, record in records_before.items():
        assert records[unit] == record
    for path in (output / "shards").glob("*"):
        assert path.suffix in (".tar", ".parquet") and path.with_suffix(".tar").exists()
        assert path.suffix == ".parquet" or complete_shard(path)
    if (output / "index.json").exists():
        committed = {r["shard"] for r in records.values()}
        assert {s["url"] for s in json.loads((output / "index.json").read_text())["shardlist"]} <= committed
    return records


def test_killed_at_every_commit_moment_resumes_to_exactly_the_expected_keys(ray_head, tmp_path, monkeypatch):
    rows = example_rows(ROWS, seed=21, tasks=("prediction",), prefix="kr")
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(rows, str(manifest))
    output = tmp_path / "out"
    args = ["--input", str(manifest), "--output", str(output), "--steps", "1", "--rows-per-shard", "1",
            "--set", "sink.compact_every=2"]
    env = dict(ray_head.env, HERO_FAULT_DIR=str(tmp_path / "faults"))
    records = {}
    for moment in DRIVER_MOMENTS:  # each run dies at its moment; the next one resumes
        # the last driver run also carries the worker crashes (Ray retries those tasks), and one
        # damaged upload that the store's checksum must catch
        extra = dict.fromkeys(WORKER_MOMENTS + ("corrupt_upload",), "1") if moment == DRIVER_MOMENTS[-1] else {}
        switches = {f"HERO_FAULT_{name.upper()}": "1" for name in (moment, *extra)}
        killed = killed_driver(args, dict(env, **switches))
        assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
        records = check_consistent(output, records)
    assert not (output / "index.json").exists() and 1 <= len(records) <= ROWS

    result = run_job([*args, "--set", "sink.lease_s=1"], env)  # leftovers older than a second may go
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    monkeypatch.setenv("HERO_FAULT_DIR", str(tmp_path / "faults"))
    every_fault = DRIVER_MOMENTS + WORKER_MOMENTS + ("corrupt_upload",)
    assert {name: faults.taken(name) for name in every_fault} == dict.fromkeys(every_fault, 1)
    records = check_consistent(output, records)

    keys = [s["__key__"] for s in rollout_dataset(str(output))]
    assert keys == [r["id"] for r in rows]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["complete"] and summary["rollouts"] == ROWS  # the damaged upload never got in
    index = json.loads((output / "index.json").read_text())
    assert sorted(s["url"] for s in index["shardlist"]) == sorted(f"shards/{p.name}" for p in (output / "shards").glob("*.tar"))
    assert all((output / metadata_path(s["url"])).exists() for s in index["shardlist"])
    assert sorted(r["shard"] for r in records.values()) == sorted(s["url"] for s in index["shardlist"])

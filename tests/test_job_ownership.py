"""Real drivers sharing, or mistaking, an output prefix: a prefix holding foreign data is refused
with exit status 2 before anything is written; two drivers started together or staggered leave
every expected key exactly once (one of them writes, the other is told another driver is at work);
a driver that stalls past its lease is taken over, and on waking it stops without touching the
index; foreign files adopted into the prefix survive all of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, run_job

from pipeline.examples import example_rows, write_manifest
from pipeline.loader import rollout_dataset
from pipeline.sink.log import read_records
from pipeline.storage import Store

ROWS = 6
HELD = "is being written by another driver"


def setup(tmp_path, rows=ROWS):
    rows = example_rows(rows, seed=31, tasks=("prediction",), prefix="own")
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(rows, str(manifest))
    output = tmp_path / "out"
    args = ["--input", str(manifest), "--output", str(output), "--steps", "1", "--rows-per-shard", "1"]
    return [r["id"] for r in rows], output, args


def start_driver(args, env) -> subprocess.Popen:
    return subprocess.Popen(["nice", "-n", "10", sys.executable, str(REPO / "jobs" / "generate.py"), *args],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(driver: subprocess.Popen) -> tuple[int, str]:
    out, err = driver.communicate(timeout=900)
    return driver.returncode, out + err


def wait_for(condition, timeout=600):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)


def committed(output) -> int:
    return len(read_records(Store(str(output)))) if (output / "_commits").exists() else 0


def exactly_once(output, keys):
    assert [s["__key__"] for s in rollout_dataset(str(output))] == keys
    index = json.loads((output / "index.json").read_text())
    records = read_records(Store(str(output)))
    assert sorted(s["url"] for s in index["shardlist"]) == sorted(r["shard"] for r in records.values())


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_prefix_with_foreign_data_exits_2_naming_the_path_and_writes_nothing(tmp_path):
    _, output, args = setup(tmp_path, rows=2)
    (output / "shards").mkdir(parents=True)
    (output / "shards" / "shard-000000.tar").write_bytes(b"an existing dataset")
    (output / "_staging").symlink_to(tmp_path)
    before = snapshot(output)
    result = run_job(args, dict(os.environ, RAY_ADDRESS="127.0.0.1:1"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: output {output / '_staging'}: is not a file this run wrote" in result.stderr
    assert "Traceback" not in result.stderr and snapshot(output) == before


def test_two_drivers_started_together_write_every_key_once(ray_head, tmp_path):
    keys, output, args = setup(tmp_path)
    output.mkdir()
    (output / "README.txt").write_text("adopted: never touched")
    args += ["--adopt-foreign"]
    drivers = [start_driver(args, ray_head.env) for _ in range(2)]
    outcomes = sorted(finish(d) for d in drivers)
    assert outcomes[0][0] == 0, outcomes[0][1][-3000:]
    assert outcomes[1][0] == 0 or (outcomes[1][0] == 1 and HELD in outcomes[1][1]), outcomes[1][1][-3000:]
    rerun = run_job(args, ray_head.env)
    assert rerun.returncode == 0 and "nothing written" in rerun.stdout, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    exactly_once(output, keys)
    assert (output / "README.txt").read_text() == "adopted: never touched"


def test_a_second_driver_while_the_first_writes_is_told_and_loses_nothing(ray_head, tmp_path):
    keys, output, args = setup(tmp_path)
    first = start_driver(args, ray_head.env)
    wait_for(lambda: committed(output) >= 1 or first.poll() is not None)
    second = run_job(args, ray_head.env)
    status, log = finish(first)
    assert status == 0, log[-3000:]
    assert second.returncode in (0, 1), second.stdout[-3000:] + second.stderr[-3000:]
    if second.returncode == 1:  # it came while the first was still writing
        assert HELD in second.stderr and "Traceback" not in second.stderr
    exactly_once(output, keys)


def test_a_stalled_driver_is_taken_over_and_stops_without_touching_the_index(ray_head, tmp_path):
    keys, output, args = setup(tmp_path)
    stalled = start_driver([*args, "--set", "sink.lease_s=4"], ray_head.env)
    wait_for(lambda: committed(output) >= 1)
    stalled.send_signal(signal.SIGSTOP)  # it stops renewing; its workers may keep committing
    try:
        time.sleep(6)
        successor = run_job([*args, "--set", "sink.lease_s=4"], ray_head.env)
        assert successor.returncode == 0, successor.stdout[-3000:] + successor.stderr[-3000:]
        index_after_successor = (output / "index.json").read_bytes()
    finally:
        stalled.send_signal(signal.SIGCONT)
    status, log = finish(stalled)
    assert status == 1 and "was taken over" in log and "Traceback" not in log, log[-3000:]
    assert (output / "index.json").read_bytes() == index_after_successor
    exactly_once(output, keys)
    rerun = run_job(args, ray_head.env)  # folds in what the stalled driver's workers committed late
    assert rerun.returncode == 0 and "0 to do" in rerun.stdout, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    exactly_once(output, keys)

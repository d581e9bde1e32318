"""Kill-and-resume with a real driver process: SIGKILL mid-run leaves only complete shards, the
rerun skips what was committed and ends with exactly the expected keys (none missing, none
duplicated); a staged shard that fails its checksum in the rerun is re-uploaded, never published."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile

from conftest import REPO, run_job

from pipeline.examples import example_rows, write_manifest
from pipeline.loader import rollout_dataset
from pipeline.samples import FIELDS

ROWS = 4


def complete_shard(path) -> bool:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        return len(members) > 0 and len(members) % len(FIELDS) == 0 and all(
            len(tar.extractfile(m).read()) == m.size for m in members)


def test_killed_driver_resumes_to_exactly_the_expected_keys(ray_head, tmp_path):
    rows = example_rows(ROWS, seed=21, tasks=("prediction",), prefix="kr")
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(rows, str(manifest))
    output = tmp_path / "out"
    args = ["--input", str(manifest), "--output", str(output), "--steps", "1", "--rows-per-shard", "1"]
    env = dict(ray_head.env, HERO_FAULT_DIR=str(tmp_path / "faults"))

    killed = subprocess.run(["nice", "-n", "10", sys.executable, str(REPO / "jobs" / "generate.py"), *args],
                            env=dict(env, HERO_FAULT_DRIVER_KILL="1"), cwd=REPO, capture_output=True,
                            text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]

    committed_before = {p.name: json.loads(p.read_text()) for p in (output / "_markers").glob("unit-*.json")}
    assert 1 <= len(committed_before) < ROWS
    assert not (output / "index.json").exists()
    for shard in (output / "shards").glob("*"):
        assert shard.suffix == ".tar" and complete_shard(shard)

    result = run_job(args, dict(env, HERO_FAULT_CORRUPT_STAGING="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(committed_before)} already committed" in result.stdout

    keys = [s["__key__"] for s in rollout_dataset(str(output))]
    assert keys == [r["id"] for r in rows]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["complete"] and summary["rollouts"] == ROWS and summary["checksum_failures"] == 1
    for name, marker in committed_before.items():
        assert json.loads((output / "_markers" / name).read_text()) == marker
    assert list((output / "_staging").iterdir()) == []
    index = json.loads((output / "index.json").read_text())
    assert sorted(s["url"] for s in index["shardlist"]) == sorted(f"shards/{p.name}" for p in (output / "shards").iterdir())
    for shard in (output / "shards").iterdir():
        assert complete_shard(shard)

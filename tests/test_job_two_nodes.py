"""A real two-node Ray cluster on loopback (`ray start --head` and `ray start --address`, each node
with its own raylet and object store): one generate actor per node, and the workers on both nodes
write and commit shards themselves; the driver only receives the commit records."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import AWS_TEST_ENV, BIN, REPO, RayHead, _start_head, _stop_head, free_ports, run_job

from pipeline.examples import example_rows, write_manifest
from pipeline.loader import rollout_dataset
from pipeline.sink.log import read_records
from pipeline.storage import Store

NODE_CPUS = 4  # what conftest's head gets
ACTOR_CPUS = 3  # one actor per node; a CPU left on each for read, prep and encode-and-write tasks


def start_worker_node(head: RayHead) -> subprocess.Popen:
    """`ray start --block` joining ``head`` as a second node, every port chosen free on 127.0.0.1."""
    node_mgr, obj_mgr, runtime_env, agent, agent_grpc, metrics = free_ports(6)
    log = Path(head.temp_dir) / "worker-node.log"
    command = [str(BIN / "ray"), "start", "--block", f"--address={head.address}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={NODE_CPUS}", "--num-gpus=0", f"--node-manager-port={node_mgr}",
               f"--object-manager-port={obj_mgr}", f"--runtime-env-agent-port={runtime_env}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--object-store-memory={256 * 1024 * 1024}",
               "--include-log-monitor=false"]
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=head.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def alive_nodes(head: RayHead) -> int:
    code = ("import ray; ray.init(address='auto', logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    result = subprocess.run([sys.executable, "-c", code], env=head.env, capture_output=True, text=True, timeout=120)
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else 0


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node of NODE_CPUS each; stopped (their process groups only) at the end."""
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(AWS_TEST_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    head = _start_head(env, token, dashboard=False)
    worker = start_worker_node(head)
    try:
        deadline = time.time() + 300
        while alive_nodes(head) < 2:
            assert worker.poll() is None and time.time() < deadline, \
                (Path(head.temp_dir) / "worker-node.log").read_text()[-3000:]
            time.sleep(2)
        yield head
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.wait()
        _stop_head(head)


def test_workers_on_both_nodes_write_and_commit_shards(two_nodes, tmp_path):
    rows = example_rows(6, seed=41, tasks=("prediction",), prefix="2n")
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(rows, str(manifest))
    output = tmp_path / "out"
    result = run_job(["--input", str(manifest), "--output", str(output), "--steps", "1", "--rows-per-shard", "1",
                      "--actors", "2", "--set", f"generate.num_cpus={ACTOR_CPUS}"], two_nodes.env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [s["__key__"] for s in rollout_dataset(str(output))] == [r["id"] for r in rows]
    records = read_records(Store(str(output)))
    writers = {record["node"] for record in records.values()}
    assert len(writers) == 2, json.dumps({u: r["node"] for u, r in records.items()})
    index = json.loads((output / "index.json").read_text())
    assert sorted(s["url"] for s in index["shardlist"]) == sorted(r["shard"] for r in records.values())

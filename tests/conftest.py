"""Shared fixtures: one Ray head on loopback per test session, moto's S3 server on loopback (with a
switch that answers chosen requests with real 503s), and helpers to run the job as a subprocess.

Both fixtures are lazy (started only by tests that ask for them) and stop only what they started.
The pytest process itself never imports Ray: drivers run as subprocesses against the session head.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# One compute thread per process (pytest, job drivers, Ray workers inherit it): on two shared cores,
# multi-threaded tiny ops stall for seconds. Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_START_ATTEMPTS = 3
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
                "AWS_DEFAULT_REGION": "us-east-1"}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class RayHead:
    """A `ray start --head --block` on loopback; ``env`` reaches it (RAY_ADDRESS and the auth token);
    ``dashboard`` is the job API's URL (None when started without it)."""

    address: str
    dashboard: str | None
    env: dict[str, str]
    process: subprocess.Popen
    temp_dir: str


def _wait_until_up(url: str | None, token: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until `ray start` says the node is up and the dashboard (job API) answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if "Ray runtime started" in log.read_text(errors="replace"):
            if url is None:
                return
            request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"Ray head did not come up in {timeout}s:\n{log.read_text()[-3000:]}")


def _start_head(env: dict[str, str], token: str, dashboard: bool) -> RayHead:
    temp_dir = tempfile.mkdtemp(prefix="hrt-", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = free_ports(9)
    log = Path(temp_dir) / "ray-start.log"
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--num-cpus=4", "--num-gpus=0", f"--temp-dir={temp_dir}", f"--include-dashboard={str(dashboard).lower()}",
               "--include-log-monitor=false", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
               f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
               f"--object-manager-port={obj_mgr}", f"--object-store-memory={512 * 1024 * 1024}",
               "--disable-usage-stats"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}" if dashboard else None,
                   dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs}"), process, temp_dir)
    try:
        _wait_until_up(head.dashboard, token, process, log)
    except RuntimeError:
        _stop_head(head)
        raise
    return head


def _stop_head(head: RayHead) -> None:
    """Stop the `ray start --block` we started and every process of its session (its own process
    group, so nothing else on the machine is touched)."""
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        try:
            head.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.process.wait()
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def calibration_cache(tmp_path_factory):
    """HERO's ``split="auto"`` (the presets') keeps its calibrations in a folder per test module,
    not in the home folder: every module starts uncalibrated, as its tests expect."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HERO_CALIBRATION_DIR", str(tmp_path_factory.mktemp("calibration")))
        yield


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    """One Ray head for the session: 4 logical CPUs, token auth set explicitly, private temp dir
    (so no other `ray.init()` on this machine finds it), every port chosen free on 127.0.0.1.
    A starting raylet gives its Python agents 15 s to report their ports and aborts otherwise,
    which happens on a loaded two-core machine; the start is then retried. The dashboard (the
    job API) is most of the start-up cost: ``HERO_TEST_NO_DASHBOARD=1`` leaves it out on an
    overloaded machine, and the tests that submit jobs are then skipped."""
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(AWS_TEST_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    for attempt in range(HEAD_START_ATTEMPTS):
        try:
            head = _start_head(env, token, dashboard=os.environ.get("HERO_TEST_NO_DASHBOARD") != "1")
            break
        except RuntimeError:
            if attempt == HEAD_START_ATTEMPTS - 1:
                raise
    try:
        yield head
    finally:
        _stop_head(head)


@dataclass
class S3Server:
    """moto's S3 on loopback. ``fail(method, pattern, times)`` answers the next ``times`` matching
    requests with HTTP 503 SlowDown, as a struggling object store would."""

    endpoint: str
    rules: list[list] = field(default_factory=list)
    injected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, method: str, pattern: str, times: int) -> None:
        with self.lock:
            self.rules.append([method, re.compile(pattern), times])

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.injected = 0

    def take(self, method: str, path: str) -> bool:
        with self.lock:
            for rule in self.rules:
                if rule[0] == method and rule[2] > 0 and rule[1].search(path):
                    rule[2] -= 1
                    self.injected += 1
                    return True
        return False

    @property
    def env(self) -> dict[str, str]:
        return dict(AWS_TEST_ENV, AWS_ENDPOINT_URL=self.endpoint)

    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
                "secret": AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"]}

    def make_bucket(self, name: str) -> str:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    state = S3Server(endpoint="")

    def faulty(environ, start_response):
        if state.take(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")):
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            start_response("503 Slow Down", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, faulty, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    thread.join(timeout=10)


def run_job(args: list[str], env: dict[str, str], timeout: float = 900, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run jobs/generate.py as a real driver process; its output is kept for assertions."""
    return subprocess.run(["nice", "-n", "10", sys.executable, str(REPO / "jobs" / "generate.py"), *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def fake_samples(keys: list[str], frames: int = 5, height: int = 8, width: int = 10) -> list[tuple[str, dict]]:
    """Encoded samples of random rollouts (no model needed), for sink and loader tests."""
    import numpy as np

    from hero.models.base import Rollout, pose_deltas
    from pipeline.samples import encode_sample

    rng = np.random.default_rng(0)
    samples = []
    for key in keys:
        c2w = np.tile(np.eye(4), (frames, 1, 1))
        c2w[:, 2, 3] = np.arange(frames) * 0.1
        rollout = Rollout(rgb=rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8),
                          depth=rng.uniform(0.5, 20, (frames, height, width)).astype(np.float32),
                          depth_is_metric=True, k=np.tile(np.eye(3), (frames, 1, 1)).astype(np.float32),
                          c2w=c2w.astype(np.float32), actions=pose_deltas(c2w), meta={"commanded_c2w": c2w.tolist()})
        samples.append((key, encode_sample(rollout, {"id": key, "model": "fake", "task": "prediction", "fps": 12})))
    return samples


def write_fake_run(store, keys: list[str], frames: int = 5, per_shard: int = 2, described: bool = True) -> None:
    """A committed run of :func:`fake_samples`, ``per_shard`` samples a shard, with schema.json and
    each shard's metadata table; without them (``described`` False) it is a run from before sample
    format 2."""
    from pipeline.schema import SCHEMA_FILE, metadata_path, schema_document
    from pipeline.sink import write_committed_run

    units = [fake_samples(keys[first:first + per_shard], frames=frames) for first in range(0, len(keys), per_shard)]
    state = write_committed_run(store, "fake-run", units)
    if described:
        store.write_json(SCHEMA_FILE, schema_document("tiny"))
    else:
        store.delete_many(metadata_path(committed.shard) for committed in state.units.values())

"""Hostile inputs and secrets: bad manifest files, odd-but-valid rows, absurd values and credentials
in every place a user can put them.

Each case asserts what the issue asks of it: the good rows are generated, the bad input is named
(in errors.jsonl, or in an exit-2 message before any work), no file outside the run's output is
touched, and no secret reaches an output file or a log line. Two real jobs (a shared Ray head,
moto's S3/HTTP server on loopback) carry most cases; the rest are exit-status cases that end
before Ray starts, and the parts (sources, redaction, checks) on their own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.config import Config
from conftest import REPO, run_job
from PIL import Image

from hero import geometry
from hero.models import model_spec
from hero.models.base import Rollout, check_rollout, pose_deltas
from pipeline.config import JobConfig
from pipeline.examples import example_rows, write_manifest
from pipeline.manifest import MAX_TRANSLATION_M, RowError, validate_row
from pipeline.redact import MASK, redact_config, redact_text
from pipeline.sources import InputError, InputUnavailable, read_manifest
from pipeline.stages.prep import prepare_row
from pipeline.stages.rows import RowFailure

JOB_ARGS = ["--model", "tiny", "--accel", "none", "--steps", "1", "--rows-per-shard", "2"]
SECRETS = {  # every credential a user hands the job below, each a unique string to grep for
    "userinfo": "hunter2-userinfo-Zq81x",
    "storage_option": "storage-option-key-Kx42v",
    "session_token": "presign-session-token-Wm77q",
    "presign_key_id": "AKIAHOSTILEPRESIGN01",
    "env": "env-secret-token-Pp09r",
}


# ----------------------------------------------------------------------------------- helpers
def png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def poses(count: int, step: float = 0.1, far_pose: int | None = None, far: float = 0.0) -> list:
    c2w = np.tile(np.eye(4), (count, 1, 1))
    c2w[:, 2, 3] = step * np.arange(count)
    if far_pose is not None:
        c2w[far_pose, 0, 3] = far
    return c2w.tolist()


def row(row_id: str, **changes) -> dict:
    return dict(example_rows(1, seed=sum(map(ord, row_id)), tasks=("prediction",))[0], id=row_id, **changes)


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int, str]]:
    """Size, mtime and sha256 of every file under ``root`` (except under ``skip``)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and (skip is None or skip not in path.parents):
            files[str(path)] = (path.stat().st_size, path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return files


def everything_written(output: Path, result: subprocess.CompletedProcess) -> bytes:
    """The bytes of every file the run wrote (shards hold meta.json uncompressed) and its logs."""
    blobs = [p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()]
    return b"\n".join(blobs + [result.stdout.encode(), result.stderr.encode()])


def ray_logs(ray_head) -> bytes:
    """Every log file of the session's Ray head: worker stdout/stderr included."""
    logs = b"\n".join(p.read_bytes() for p in Path(ray_head.temp_dir).rglob("*") if p.is_file()
                      and p.suffix in (".out", ".err", ".log"))
    assert b"worker" in logs  # the workers' logs are there to search
    return logs


def assert_no_secret(blob: bytes) -> None:
    found = [name for name, secret in SECRETS.items() if secret.encode() in blob]
    assert not found, f"secrets in the output or logs: {found}"


def errors_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "errors.jsonl").read_text().splitlines()]


def sample_keys(output: Path) -> list[str]:
    from pipeline.loader import rollout_dataset

    return [s["__key__"] for s in rollout_dataset(str(output), split=False)]


def truncated_gzip(rows: list[dict], keep: float) -> tuple[bytes, list[str]]:
    """The rows as .jsonl.gz cut to ``keep`` of its bytes, and the ids of the lines that survive whole."""
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    cut = data[: int(len(data) * keep)]
    readable = zlib.decompressobj(wbits=31).decompress(cut).decode(errors="replace")
    return cut, [json.loads(line)["id"] for line in readable.split("\n")[:-1]]


@pytest.fixture(scope="module")
def hostile_bucket(s3_server):
    """A bucket with one image, served over S3 and plain HTTP (moto), and presigned URLs to it and
    to a missing key, signed with a session token (so the URL carries X-Amz-Security-Token)."""
    bucket = s3_server.make_bucket("hostile").removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id=SECRETS["presign_key_id"], aws_secret_access_key="presign-secret",
                          aws_session_token=SECRETS["session_token"], config=Config(signature_version="s3v4"))
    client.put_object(Bucket=bucket, Key="images/start.png", Body=png())
    presign = lambda key: client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                        ExpiresIn=3600)
    image, missing = presign("images/start.png"), presign("images/missing.png")
    signatures = {f"signature_{i}": url.split("X-Amz-Signature=")[1].split("&")[0] for i, url in enumerate((image, missing))}
    SECRETS.update(signatures)
    return {"bucket": bucket, "client": client, "image": image, "missing": missing}


# ------------------------------------------------------------------ manifest files (no Ray)
def test_a_prefix_of_bad_files_keeps_every_readable_row_and_names_each_bad_file(tmp_path):
    good = [row(f"good-{i}") for i in range(3)]
    write_manifest(good[:1], str(tmp_path / "part-000.jsonl"))
    (tmp_path / "part-001.parquet").write_bytes(b"PAR1 but not really a parquet file")
    cut, survivors = truncated_gzip([row(f"gz-{i}") for i in range(8)], keep=0.6)
    (tmp_path / "part-002.jsonl.gz").write_bytes(cut)
    (tmp_path / "part-003.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "part-004.jsonl").symlink_to(tmp_path / "gone.jsonl")
    write_manifest(good[1:], str(tmp_path / "part-005.parquet"))
    assert 0 < len(survivors) < 8
    manifest = read_manifest(str(tmp_path))
    entries = list(manifest)
    assert [e.row.id for e in entries] == ["good-0", *survivors, "good-1", "good-2"]
    assert [e.position for e in entries] == list(range(len(entries)))
    problems = {Path(p.source).name: p for p in manifest.problems}
    assert sorted(problems) == ["part-001.parquet", "part-002.jsonl.gz", "part-003.jsonl.gz", "part-004.jsonl"]
    assert all(p.field == "file" and p.stage == "read" and p.id is None for p in problems.values())
    assert "ArrowInvalid" in problems["part-001.parquet"].reason
    assert "EOFError" in problems["part-002.jsonl.gz"].reason
    assert f"after line {len(survivors)}" in problems["part-002.jsonl.gz"].reason
    assert problems["part-002.jsonl.gz"].line == len(survivors) + 1
    assert "BadGzipFile" in problems["part-003.jsonl.gz"].reason
    assert "FileNotFoundError" in problems["part-004.jsonl"].reason


def test_hidden_files_and_folders_are_skipped_and_reported(tmp_path):
    rows = [row(f"real-{i}") for i in range(2)]
    write_manifest(rows, str(tmp_path / "m" / "part-000.jsonl"))
    write_manifest([row("stale-copy")] + rows, str(tmp_path / "m" / ".ipynb_checkpoints" / "part-000-checkpoint.jsonl"))
    write_manifest(rows, str(tmp_path / "m" / "_temporary" / "0" / "part-000.jsonl"))
    write_manifest(rows, str(tmp_path / "m" / ".part-000.jsonl.swp.jsonl"))
    write_manifest(rows, str(tmp_path / "_root_is_fine" / "part-000.jsonl"))
    manifest = read_manifest(str(tmp_path / "m") + "/")
    assert [e.row.id for e in manifest] == ["real-0", "real-1"]  # no duplicate ids from the stale copy
    skipped = sorted(Path(p.source).relative_to(tmp_path / "m").as_posix() for p in manifest.problems)
    assert skipped == [".ipynb_checkpoints/part-000-checkpoint.jsonl", ".part-000.jsonl.swp.jsonl",
                       "_temporary/0/part-000.jsonl"]
    assert all("hidden" in p.reason for p in manifest.problems)
    assert [e.row.id for e in read_manifest(str(tmp_path / "_root_is_fine"))] == ["real-0", "real-1"]
    explicit = tmp_path / "m" / ".ipynb_checkpoints" / "part-000-checkpoint.jsonl"
    assert [e.row.id for e in read_manifest(str(explicit))][0] == "stale-copy"  # named, so read


def test_byte_order_marks_are_accepted(tmp_path):
    lines = [json.dumps(row(f"bom-{i}")) for i in range(3)]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (lines[0] + "\n" + lines[1] + "\n").encode()
                     + b"\xef\xbb\xbf" + (lines[2] + "\n").encode())  # two files concatenated
    entries = list(read_manifest(str(path)))
    assert [e.row.id for e in entries if e.row] == ["bom-0", "bom-1", "bom-2"]
    gz = tmp_path / "m.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [e.row.id for e in read_manifest(str(gz))] == ["bom-0", "bom-1", "bom-2"]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_an_empty_input_is_an_error_unless_allowed(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"no manifest rows at {path}.*input_allow_empty"):
        list(read_manifest(str(path)))
    assert list(read_manifest(str(path), allow_empty=True)) == []


def test_an_input_of_only_bad_files_is_empty_and_says_why(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"garbage")
    write_manifest([row("hidden")], str(tmp_path / ".hidden.jsonl"))
    with pytest.raises(InputError) as error:
        list(read_manifest(str(tmp_path)))
    assert "a.parquet: unreadable: ArrowInvalid" in str(error.value) and ".hidden.jsonl: skipped" in str(error.value)


def test_an_outage_while_reading_stops_the_read(s3_server):
    bucket = s3_server.make_bucket("hostile-outage")
    options = s3_server.storage_options()
    write_manifest([row("outage-0")], f"{bucket}/m/part-000.jsonl", options)
    s3_server.fail("GET", r"/hostile-outage/m/part-000\.jsonl$", times=100)
    try:
        with pytest.raises(InputUnavailable, match="part-000.jsonl"):
            list(read_manifest(f"{bucket}/m/", dict(options, config_kwargs={"retries": {"max_attempts": 1}})))
    finally:
        s3_server.clear()
    assert [e.row.id for e in read_manifest(f"{bucket}/m/", options)] == ["outage-0"]


# ------------------------------------------------------------------- rows and outputs (no Ray)
def test_a_camera_translated_beyond_the_bound_is_rejected_with_its_field():
    far = validate_row(row("far", trajectory={"c2w": poses(17, far_pose=5, far=1e39)}))
    assert isinstance(far, RowError) and far.field == "trajectory.c2w"
    assert "pose 5" in far.reason and f"{MAX_TRANSLATION_M:g} m" in far.reason
    near = validate_row(row("near", trajectory={"c2w": poses(17, far_pose=5, far=0.9 * MAX_TRANSLATION_M)}))
    assert not isinstance(near, RowError)


def test_explicit_poses_must_cover_the_rollout_they_drive():
    spec = model_spec("tiny")
    short = validate_row(row("short", trajectory={"c2w": poses(3)}))
    with pytest.raises(RowFailure) as failure:
        prepare_row(short, spec, {})
    assert failure.value.field == "trajectory.c2w" and "3 poses for a 17-frame rollout" in failure.value.reason
    too_few = validate_row(row("too-few", frames=33, trajectory={"c2w": poses(20)}))
    assert isinstance(too_few, RowError) and too_few.field == "trajectory.c2w"
    exact = prepare_row(validate_row(row("exact", trajectory={"c2w": poses(17)})), spec, {})
    assert exact["c2w"].shape == (17, 4, 4) and exact["image"].shape == (spec.height, spec.width, 3)


def tiny_rollout(frames: int = 5) -> Rollout:
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    c2w[:, 2, 3] = np.arange(frames) * 0.1
    return Rollout(rgb=np.zeros((frames, 8, 10, 3), np.uint8), depth=np.ones((frames, 8, 10), np.float32),
                   depth_is_metric=True, k=geometry.intrinsics(8, 10, 60.0, frames).astype(np.float32),
                   c2w=c2w.astype(np.float32), actions=pose_deltas(c2w))


def _break(rollout: Rollout, name: str, change) -> Rollout:
    array = np.array(getattr(rollout, name))
    change(array)
    setattr(rollout, name, array)
    return rollout


@pytest.mark.parametrize("name,change,field", [
    ("depth", lambda a: a.__setitem__((2, 3, 4), np.nan), "rollout.depth"),
    ("depth", lambda a: a.__setitem__((2, 3, 4), -1.0), "rollout.depth"),
    ("actions", lambda a: a.__setitem__((3, 0), np.inf), "rollout.actions"),
    ("k", lambda a: a.__setitem__((1, 0, 0), 0.0), "rollout.k"),
    ("c2w", lambda a: a.__setitem__((2, 0, 1), 0.5), "rollout.c2w"),
    ("c2w", lambda a: a.__setitem__((2, 0, 3), np.inf), "rollout.c2w"),
])
def test_a_rollout_with_bad_values_is_refused_naming_the_array(name, change, field):
    check_rollout(tiny_rollout(), 5)
    with pytest.raises(ValueError, match=f"^{field}: "):
        check_rollout(_break(tiny_rollout(), name, change), 5)


def test_a_rollout_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="^rollout.rgb: 5 frames, the request asked for 17"):
        check_rollout(tiny_rollout(5), 17)


# ----------------------------------------------------------------------------- redaction
@pytest.mark.parametrize("text,secret", [
    ("s3://AKIAEXAMPLE:wJalr/K7MDENG+bPxRfi@bucket/m.jsonl", "wJalr/K7MDENG+bPxRfi"),
    ("https://user:p4ss@host/m.jsonl", "p4ss"),
    ("https://b.s3.amazonaws.com/x.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2026&"
     "X-Amz-Security-Token=FQoGZX&X-Amz-Signature=9f86d08", "9f86d08"),
    ("https://b.s3.amazonaws.com/x.png?X-Amz-Credential=AKIAID%2F2026%2Fus-east-1&X-Amz-Signature=00", "AKIAID"),
    ("https://b.s3.amazonaws.com/x.png?X-Amz-Security-Token=FQoGZXIvYXdzE&X-Amz-Signature=00", "FQoGZXIvYXdzE"),
    ("https://acct.blob.core.windows.net/c/x.png?sv=2022-11-02&sig=Zm9vYmFy%3D", "Zm9vYmFy"),
    ("https://storage.googleapis.com/b/x.png?X-Goog-Signature=abc123def", "abc123def"),
    ("https://api.example.com/x.png?access_token=ya29.tok&api_key=k-123", "ya29.tok"),
    ("https://api.example.com/x.png?access_token=ya29.tok&api_key=k-123", "k-123"),
    ("S3FileSystem({'key': 'AKIAQQ', 'secret': 'sssh-1'})", "sssh-1"),
    ('{"password": "pw-9", "endpoint_url": "http://127.0.0.1:9000"}', "pw-9"),
    ("--set sink.storage_options.secret=sssh-2", "sssh-2"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9", "eyJhbGciOiJIUzI1NiJ9"),
])
def test_redact_text_masks_every_credential_shape(text, secret):
    assert secret not in redact_text(text) and MASK in redact_text(text)


def test_redact_text_leaves_ordinary_text_alone():
    for text in ("s3://bucket/dir/file@v2.png", "https://host/x.png?width=64&X-Amz-Date=20261122",
                 "config key 'input': no manifest rows at /data/m.jsonl", "frames=17, steps=30"):
        assert redact_text(text) == text


def test_redact_masks_credentials():
    config = {"sink": {"storage_options": {"key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://x"}},
              "model": {"options": {"token": "t"}}}
    text = json.dumps(redact_config(config))
    assert "s3cr3t" not in text and "AKIA" not in text and "http://x" in text


def test_a_job_config_carries_no_credential_into_records():
    config = JobConfig(input="https://u:pw-1@host/m.jsonl?token=tk-1", output="/tmp/out",
                       sink={"storage_options": {"key": "AKIA1", "secret": "sk-1",
                                                 "client_kwargs": {"headers": {"X-Api-Key": "hk-1"}}}})
    stored = json.dumps([config.public_dict(), config.fingerprint_values()])
    assert not [s for s in ("pw-1", "tk-1", "AKIA1", "sk-1", "hk-1") if s in stored]
    rotated = config.model_copy(update={"input": "https://u:pw-2@host/m.jsonl?token=tk-2"})
    # a rotated credential is the same run: the fingerprint is these settings and the digest of the
    # manifest's content (pipeline.plan.manifest_digest), never its URI
    assert rotated.fingerprint_values() == config.fingerprint_values()
    assert redact_config({"keys": ["a"], "endpoint_url": "http://h"})["endpoint_url"] == "http://h"


def test_guarded_streams_mask_prints_logs_and_tracebacks():
    script = ("from pipeline.redact import guard_streams; guard_streams(); import logging, sys\n"
              "print('input s3://k:printed-secret@b/m')\n"
              "logging.getLogger('x').warning('GET https://h/x.png?X-Amz-Signature=logged-secret')\n"
              "raise RuntimeError('open http://u:traceback-secret@h/m.jsonl')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "RuntimeError" in result.stderr
    output = result.stdout + result.stderr
    assert output.count(MASK) == 3 and "secret" not in output.replace("X-Amz-Signature", "")


# ------------------------------------------------------------- exit 2 and 1 before any work
def refused(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the job where no Ray may start (RAY_ADDRESS points nowhere) and check it did no work."""
    output = tmp_path / "out"
    result = run_job([*args, "--output", str(output), *JOB_ARGS], dict(env, RAY_ADDRESS="127.0.0.1:1"))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not output.exists() or not any(output.iterdir())  # no run.json, nothing to resume from
    assert_no_secret((result.stdout + result.stderr).encode())
    return result


def test_an_empty_manifest_exits_2_naming_the_input_and_runs_when_allowed(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    result = refused(["--input", str(path)], dict(os.environ), tmp_path)
    assert result.returncode == 2 and f"config key 'input': no manifest rows at {path}" in result.stderr
    allowed = run_job(["--input", str(path), "--output", str(tmp_path / "allowed"), "--set", "input_allow_empty=true",
                       *JOB_ARGS], dict(os.environ, RAY_ADDRESS="127.0.0.1:1"))
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    summary = json.loads((tmp_path / "allowed" / "summary.json").read_text())
    assert summary["complete"] and summary["rollouts"] == 0 and summary["units"]["total"] == 0


@pytest.mark.parametrize("case", ["userinfo-in-s3-uri", "missing-bucket", "only-corrupt-files"])
def test_an_unusable_input_exits_2_naming_it_without_its_secret(case, tmp_path, s3_server):
    bucket = s3_server.make_bucket("hostile-unusable")
    options = s3_server.storage_options()
    s3_server_args = ["--set", f"sink.storage_options.endpoint_url={s3_server.endpoint}"]
    if case == "userinfo-in-s3-uri":
        uri, named = f"s3://AKIAHOSTILE:{SECRETS['userinfo']}@{bucket.removeprefix('s3://')}/m.jsonl", "s3://***@"
    elif case == "missing-bucket":
        uri, named = "s3://hostile-no-such-bucket/manifests/", "s3://hostile-no-such-bucket/manifests/"
    else:
        import fsspec

        fs = fsspec.filesystem("s3", **options)
        fs.pipe_file(f"{bucket}/corrupt/a.parquet", b"garbage")
        fs.pipe_file(f"{bucket}/corrupt/b.jsonl.gz", b"garbage")
        uri, named = f"{bucket}/corrupt/", "b.jsonl.gz: unreadable: BadGzipFile"
    result = refused(["--input", uri, *s3_server_args], dict(os.environ, **s3_server.env), tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "config key 'input'" in result.stderr and named in result.stderr


def test_an_input_outage_exits_1_before_any_work(tmp_path, s3_server):
    bucket = s3_server.make_bucket("hostile-flaky")
    write_manifest([row("flaky-0")], f"{bucket}/m/part-000.jsonl", s3_server.storage_options())
    args = ["--input", f"{bucket}/m/", "--set", f"sink.storage_options.endpoint_url={s3_server.endpoint}",
            "--set", "sink.storage_options.config_kwargs.retries.max_attempts=1"]
    s3_server.fail("GET", r"/hostile-flaky/m/part-000\.jsonl$", times=100)
    try:
        result = refused(args, dict(os.environ, **s3_server.env), tmp_path)
    finally:
        s3_server.clear()
    assert result.returncode == 1 and "cannot read input" in result.stderr and "rerun" in result.stderr
    assert "part-000.jsonl" in result.stderr


# ------------------------------------------------------------ a prefix of hostile files (Ray)
@pytest.fixture(scope="module")
def prefix_run(ray_head, tmp_path_factory):
    """A local prefix holding every kind of bad file and odd row beside good ones, run as a job."""
    root = tmp_path_factory.mktemp("hostile-prefix")
    manifests, output = root / "manifests", root / "runs" / "out"
    (root / "runs").mkdir()
    (root / "runs" / "neighbour.txt").write_text("another run's file: must stay as it is\n")
    bom_rows = [row("bom-good-0"), row("explicit-17-poses", trajectory={"c2w": poses(17)}),
                row("far-camera", trajectory={"c2w": poses(17, far_pose=4, far=1e39)}),
                row("three-poses-no-frames", trajectory={"c2w": poses(3)})]
    manifests.mkdir()
    (manifests / "part-000.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in bom_rows).encode())
    (manifests / "part-001.parquet").write_bytes(b"PAR1\x00\x00garbage")
    cut, survivors = truncated_gzip([row(f"gz-{i}") for i in range(8)], keep=0.45)
    (manifests / "part-002.jsonl.gz").write_bytes(cut)
    (manifests / "part-003.jsonl").symlink_to(root / "deleted.jsonl")
    write_manifest([row("parquet-good-0")], str(manifests / "part-004.parquet"))
    write_manifest(bom_rows, str(manifests / ".ipynb_checkpoints" / "part-000-checkpoint.jsonl"))
    write_manifest(bom_rows, str(manifests / "_tmp" / "part-000.jsonl"))
    before = snapshot(root, skip=output)
    result = run_job(["--input", str(manifests), "--output", str(output), *JOB_ARGS], ray_head.env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    good = ["bom-good-0", "explicit-17-poses", *survivors, "parquet-good-0"]
    return {"root": root, "output": output, "result": result, "before": before, "good": good,
            "survivors": survivors, "args": ["--input", str(manifests), "--output", str(output), *JOB_ARGS]}


def test_prefix_run_generates_every_good_row(prefix_run):
    assert 0 < len(prefix_run["survivors"]) < 8
    assert sample_keys(prefix_run["output"]) == prefix_run["good"]
    summary = json.loads((prefix_run["output"] / "summary.json").read_text())
    assert summary["complete"] and summary["rollouts"] == len(prefix_run["good"])
    assert summary["frames"] == 17 * len(prefix_run["good"])


def test_prefix_run_names_every_bad_input(prefix_run):
    errors = errors_of(prefix_run["output"])
    rows = {e["id"]: (e["field"], e["stage"]) for e in errors if e["id"]}
    assert rows == {"far-camera": ("trajectory.c2w", "manifest"),
                    "three-poses-no-frames": ("trajectory.c2w", "prep")}
    files = {Path(e["source"]).relative_to(prefix_run["root"] / "manifests").as_posix(): e["reason"]
             for e in errors if e["field"] == "file"}
    assert sorted(files) == [".ipynb_checkpoints/part-000-checkpoint.jsonl", "_tmp/part-000.jsonl",
                             "part-001.parquet", "part-002.jsonl.gz", "part-003.jsonl"]
    assert all(e["stage"] == "read" for e in errors if e["field"] == "file")
    assert "ArrowInvalid" in files["part-001.parquet"] and "EOFError" in files["part-002.jsonl.gz"]
    summary = json.loads((prefix_run["output"] / "summary.json").read_text())
    assert summary["failures"] == len(errors) == 7 and summary["failures_by_stage"]["read"] == 5
    assert "5 manifest files skipped or not fully read" in prefix_run["result"].stdout


def test_prefix_run_touches_no_foreign_file(prefix_run):
    assert snapshot(prefix_run["root"], skip=prefix_run["output"]) == prefix_run["before"]


def test_prefix_run_leaks_no_secret_and_stores_no_non_finite_value(prefix_run, ray_head):
    assert_no_secret(everything_written(prefix_run["output"], prefix_run["result"]) + ray_logs(ray_head))
    from pipeline.loader import rollout_dataset

    for sample in rollout_dataset(str(prefix_run["output"]), split=False):
        for name in ("depth", "k", "c2w", "actions"):
            assert sample[name].isfinite().all(), (sample["__key__"], name)


def test_prefix_rerun_is_a_noop_that_still_names_the_bad_files(prefix_run, ray_head):
    errors = (prefix_run["output"] / "errors.jsonl").read_text()
    result = run_job(prefix_run["args"], dict(ray_head.env, RAY_ADDRESS="127.0.0.1:1"))
    assert result.returncode == 0 and "0 to do" in result.stdout, result.stderr[-2000:]
    assert (prefix_run["output"] / "errors.jsonl").read_text() == errors


# ------------------------------------------------------------ secrets in every place (Ray)
@pytest.fixture(scope="module")
def secrets_run(ray_head, s3_server, hostile_bucket, tmp_path_factory):
    """A job fed credentials everywhere: userinfo in the input URI (HTTP), presigned image URLs
    (one missing), a credential in storage options, secrets in the driver's environment."""
    root = tmp_path_factory.mktemp("hostile-secrets")
    output = root / "out"
    rows = [row("scene-0"), row("presigned-image", observation={"image": hostile_bucket["image"]}),
            row("presigned-missing", observation={"image": hostile_bucket["missing"]})]
    hostile_bucket["client"].put_object(Bucket=hostile_bucket["bucket"], Key="manifests/m.jsonl",
                                        Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    host = s3_server.endpoint.removeprefix("http://")
    uri = f"http://hostile-user:{SECRETS['userinfo']}@{host}/{hostile_bucket['bucket']}/manifests/m.jsonl"
    args = ["--input", uri, "--output", str(output), *JOB_ARGS,
            "--set", f"sink.storage_options.client_kwargs.headers.X-Api-Key={SECRETS['storage_option']}"]
    env = dict(ray_head.env, HF_TOKEN=SECRETS["env"], AWS_SESSION_TOKEN=SECRETS["env"])
    objects = lambda: {o["Key"]: o["ETag"] for o in hostile_bucket["client"].list_objects_v2(
        Bucket=hostile_bucket["bucket"])["Contents"]}
    before = objects()
    result = run_job(args, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"output": output, "result": result, "objects": (before, objects()),
            "foreign": sorted(p.name for p in root.iterdir())}


def test_secrets_run_generates_the_good_rows_and_names_the_missing_image(secrets_run):
    assert sample_keys(secrets_run["output"]) == ["scene-0", "presigned-image"]
    (error,) = errors_of(secrets_run["output"])
    assert (error["id"], error["field"], error["stage"]) == ("presigned-missing", "observation.image", "prep")
    assert "images/missing.png?" in error["reason"] and "X-Amz-Signature=***" in error["reason"]


def test_secrets_run_touches_no_foreign_file_or_object(secrets_run):
    before, after = secrets_run["objects"]
    assert after == before and secrets_run["foreign"] == ["out"]


def test_secrets_run_records_a_redacted_source_reference(secrets_run):
    from pipeline.loader import rollout_dataset

    meta = {s["__key__"]: s["meta"] for s in rollout_dataset(str(secrets_run["output"]), split=False)}
    image = meta["presigned-image"]["observation"]["image"]
    assert "/hostile/images/start.png?" in image
    assert "X-Amz-Signature=***" in image and "X-Amz-Credential=***" in image and "X-Amz-Security-Token=***" in image
    summary = json.loads((secrets_run["output"] / "summary.json").read_text())
    assert summary["input"].startswith("http://***@127.0.0.1:")
    assert summary["config"]["sink"]["storage_options"]["client_kwargs"]["headers"]["X-Api-Key"] == MASK


def test_secrets_run_leaks_no_secret_into_any_output_or_log(secrets_run, ray_head):
    assert len(SECRETS) == 7  # the five handed in, and both presigned URLs' signatures
    assert_no_secret(everything_written(secrets_run["output"], secrets_run["result"]) + ray_logs(ray_head))

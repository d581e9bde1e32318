"""The sink's commit protocol on local disk and on moto's S3: staging, checksum, publish, markers,
index written last, cleanup of what a dead run left, retries of transient object-store errors."""

from __future__ import annotations

import json
import tarfile

import pytest
from conftest import fake_samples

from pipeline import sink
from pipeline.storage import Store


def test_commit_publishes_a_verified_shard_and_marker(tmp_path):
    store = Store(str(tmp_path / "out"))
    samples = fake_samples(["a-1", "a-2"])
    marker = sink.commit_unit(store, 3, samples, {"rows": [], "errors": []})
    assert marker["shard"] == "shards/shard-000003.tar" and marker["keys"] == ["a-1", "a-2"]
    assert store.sha256(marker["shard"]) == marker["sha256"]
    with tarfile.open(tmp_path / "out" / marker["shard"]) as tar:
        names = tar.getnames()
    assert names[:5] == [f"a-1.{field}" for field in ("rgb.mp4", "depth.mkv", "camera.npz", "action.npy", "meta.json")]
    assert store.listdir(sink.STAGING_DIR) == []
    assert sink.committed_units(store) == {3: json.loads(json.dumps(marker))}


def test_shards_are_reproducible_bytes(tmp_path):
    samples = fake_samples(["k-1"])
    first = sink.write_tar(str(tmp_path / "a.tar"), samples)
    second = sink.write_tar(str(tmp_path / "b.tar"), samples)
    assert first == second


def test_committed_unit_is_not_rewritten(tmp_path):
    store = Store(str(tmp_path))
    first = sink.commit_unit(store, 0, fake_samples(["x-1"]), {"rows": [], "errors": []})
    again = sink.commit_unit(store, 0, fake_samples(["x-9"]), {"rows": [], "errors": []})
    assert again["keys"] == first["keys"] == ["x-1"]


def test_unit_without_samples_commits_a_marker_only(tmp_path):
    store = Store(str(tmp_path))
    marker = sink.commit_unit(store, 1, [], {"rows": [], "errors": [{"id": "r", "field": "seed"}]})
    assert marker["shard"] is None and store.listdir(sink.SHARDS_DIR) == []
    sink.finalize(store, "run", sink.committed_units(store), {"ok": True}, [])
    assert json.loads((tmp_path / "index.json").read_text())["shardlist"] == []
    assert (tmp_path / "errors.jsonl").read_text().count("\n") == 1


def test_corrupted_upload_is_retried_and_never_published(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    monkeypatch.setenv("HERO_FAULT_DIR", str(tmp_path / "faults"))
    monkeypatch.setenv("HERO_FAULT_CORRUPT_STAGING", "1")
    marker = sink.commit_unit(store, 0, fake_samples(["c-1"]), {"rows": [], "errors": []})
    assert marker["checksum_failures"] == 1
    assert store.sha256(marker["shard"]) == marker["sha256"]

    monkeypatch.setenv("HERO_FAULT_DIR", str(tmp_path / "faults-always"))
    monkeypatch.setenv("HERO_FAULT_CORRUPT_STAGING", str(sink.CHECKSUM_ATTEMPTS))
    with pytest.raises(sink.ShardCommitError):
        sink.commit_unit(store, 1, fake_samples(["c-2"]), {"rows": [], "errors": []})
    assert not store.exists(sink.shard_path(1)) and not store.exists(sink.marker_path(1))
    assert store.listdir(sink.STAGING_DIR) == []


def test_clean_stale_removes_staging_and_unvouched_shards(tmp_path):
    store = Store(str(tmp_path))
    kept = sink.commit_unit(store, 0, fake_samples(["s-1"]), {"rows": [], "errors": []})
    store.write_bytes(f"{sink.STAGING_DIR}/shard-000001.dead.tar", b"partial upload")
    store.write_bytes(sink.shard_path(2), b"published but never marked")
    assert sink.clean_stale(store, sink.committed_units(store)) == 2
    assert store.listdir(sink.SHARDS_DIR) == ["shard-000000.tar"]
    assert store.listdir(sink.STAGING_DIR) == []
    assert store.sha256(kept["shard"]) == kept["sha256"]


def test_index_lists_only_committed_units_in_order(tmp_path):
    store = Store(str(tmp_path))
    for unit in (2, 0):
        sink.commit_unit(store, unit, fake_samples([f"u{unit}-a", f"u{unit}-b"]), {"rows": [], "errors": []})
    index = sink.build_index("r", sink.committed_units(store))
    assert index["wids_version"] == 1
    assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == [
        ("shards/shard-000000.tar", 2), ("shards/shard-000002.tar", 2)]


def test_paths_cannot_leave_the_prefix(tmp_path):
    store = Store(str(tmp_path / "out"))
    for bad in ("../x", "/etc/passwd", "a/../../b", "shards//x"):
        with pytest.raises(ValueError):
            store.path(bad)


def test_s3_commit_survives_transient_errors(s3_server):
    bucket = s3_server.make_bucket("sink-test")
    # botocore's and s3fs' own retries off: the Store's backoff must absorb the 503s
    options = dict(s3_server.storage_options(), config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}})
    store = Store(f"{bucket}/run", options, retries=5, backoff_s=0.05)
    store.fs.retries = 1
    s3_server.fail("PUT", r"/_staging/", times=2)
    s3_server.fail("PUT", r"/_markers/", times=1)
    try:
        marker = sink.commit_unit(store, 0, fake_samples(["s3-1", "s3-2"]), {"rows": [], "errors": []})
        injected = s3_server.injected
    finally:
        s3_server.clear()
    assert injected == 3 and store.transient_errors >= 3
    assert store.sha256(marker["shard"]) == marker["sha256"]
    assert store.listdir(sink.STAGING_DIR) == []
    assert list(sink.committed_units(store)) == [0]


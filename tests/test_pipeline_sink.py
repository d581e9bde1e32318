"""The sink without Ray, on local disk and on moto's S3: a worker's commit (shard stored and verified
by the store's checksum, its metadata table, then its create-only marker), schema.json, the commit
log and its compaction, the index, the summary's audit figures, shard verification on rerun, the
no-op rerun that writes nothing, and retries of transient errors."""

from __future__ import annotations

import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest
from conftest import fake_samples

from pipeline.config import build_config, resolve
from pipeline.examples import example_rows, write_manifest
from pipeline.plan import PlanCounts
from pipeline.schema import SCHEMA_FILE, metadata_path
from pipeline.sink import RolloutSink, ShardWriter
from pipeline.sink.layout import COMMITS_DIR, SHARDS_DIR, marker_path
from pipeline.sink.log import read_log
from pipeline.sink.report import build_index
from pipeline.sink.shards import CHECKSUM_ATTEMPTS, read_samples, tar_bytes
from pipeline.storage import Store

PLAN = {"rows": [], "digest": "0" * 16, "errors": [], "where": {}}


def job(tmp_path, output, **sink_options):
    """A resolved job config writing to ``output`` (a small manifest of its own)."""
    manifest = tmp_path / "manifest.jsonl"
    if not manifest.exists():
        write_manifest(example_rows(4, seed=3, tasks=("prediction",)), str(manifest))
    overrides = {"input": str(manifest), "output": output, "sink.rows_per_shard": 1}
    overrides.update({f"sink.{key}": value for key, value in sink_options.items()})
    return resolve(build_config(overrides=overrides))


def started_sink(config) -> tuple[RolloutSink, ShardWriter]:
    run = RolloutSink(Store(config.output, config.sink.storage_options), config)
    run.inspect()
    return run, run.start()


def commit_units(run: RolloutSink, writer: ShardWriter, units) -> dict[int, dict]:
    records = {}
    for unit in units:
        outcome = writer.write(unit, fake_samples([f"u{unit}-a", f"u{unit}-b"]), [], [], PLAN, None)
        run.commit(outcome)
        records[unit] = outcome["record"]
    return records


def listing(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_a_worker_commit_stores_a_verified_shard_then_its_marker(tmp_path):
    store = Store(str(tmp_path / "out"))
    outcome = ShardWriter(store, "run-1", 2).write(3, fake_samples(["a-1", "a-2"]), [], [], PLAN, "node-x")
    record = outcome["record"]
    assert record["shard"].startswith(f"{SHARDS_DIR}/run-1-000003-") and record["keys"] == ["a-1", "a-2"]
    assert store.sha256(record["shard"]) == record["sha256"] and store.size(record["shard"]) == record["filesize"]
    assert record["epoch"] == 2 and record["node"] == "node-x" and record["etag"] is None  # local: no store checksum
    with tarfile.open(tmp_path / "out" / record["shard"]) as tar:
        names = tar.getnames()
    assert names[:5] == [f"a-1.{field}" for field in ("rgb.mp4", "depth.mkv", "camera.npz", "action.npy", "meta.json")]
    assert store.read_json(marker_path(3, 2)) == json.loads(json.dumps(record))
    assert [key for key, _ in read_samples(store, record["shard"])] == ["a-1", "a-2"]
    table = pq.read_table(tmp_path / "out" / metadata_path(record["shard"]))
    assert table.column("id").to_pylist() == ["a-1", "a-2"] and table.column("model").to_pylist() == ["fake"] * 2


def test_shards_are_reproducible_bytes():
    samples = fake_samples(["k-1"])
    assert tar_bytes(samples) == tar_bytes(samples)


def test_a_unit_committed_twice_in_one_epoch_keeps_the_first_commit(tmp_path):
    store = Store(str(tmp_path))
    writer = ShardWriter(store, "run", 1)
    first = writer.write(0, fake_samples(["x-1"]), [], [], PLAN, None)["record"]
    again = writer.write(0, fake_samples(["x-9"]), [], [], PLAN, None)["record"]
    assert again == json.loads(json.dumps(first)) and again["keys"] == ["x-1"]
    name = first["shard"].split("/")[1]
    assert store.listdir(SHARDS_DIR) == [name.replace(".tar", ".parquet"), name]  # the retry's files are gone


def test_a_unit_without_samples_commits_a_marker_only(tmp_path):
    store = Store(str(tmp_path))
    record = ShardWriter(store, "run", 1).write(1, [], [], [{"id": "r", "field": "seed"}], PLAN, None)["record"]
    assert record["shard"] is None and store.listdir(SHARDS_DIR) == []
    state = read_log(store, [], [marker_path(1, 1)], 4)
    assert build_index("run", state)["shardlist"] == [] and state.errors == {1: [{"id": "r", "field": "seed"}]}


def test_a_damaged_upload_is_caught_by_its_checksum_and_never_committed(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    monkeypatch.setenv("HERO_FAULT_DIR", str(tmp_path / "faults"))
    monkeypatch.setenv("HERO_FAULT_CORRUPT_UPLOAD", "1")
    record = ShardWriter(store, "run", 1).write(0, fake_samples(["c-1"]), [], [], PLAN, None)["record"]
    assert record["stats"]["checksum_failures"] == 1
    shard_files = sorted(rel.split("/")[1] for rel in (record["shard"], metadata_path(record["shard"])))
    assert store.sha256(record["shard"]) == record["sha256"] and store.listdir(SHARDS_DIR) == shard_files

    monkeypatch.setenv("HERO_FAULT_DIR", str(tmp_path / "faults-always"))
    monkeypatch.setenv("HERO_FAULT_CORRUPT_UPLOAD", str(CHECKSUM_ATTEMPTS))
    outcome = ShardWriter(store, "run", 1).write(1, fake_samples(["c-2"]), [], [], PLAN, None)
    assert outcome["error"]["stage"] == "commit" and "checksum" in outcome["error"]["reason"]
    assert not store.exists(marker_path(1, 1)) and store.listdir(SHARDS_DIR) == shard_files


def test_the_run_starts_by_describing_its_samples_in_schema_json(tmp_path):
    run, _ = started_sink(job(tmp_path, str(tmp_path / "out")))
    run.close()
    schema = run.store.read_json(SCHEMA_FILE)
    assert schema["model"]["name"] == "toyworld" and schema["fps"] > 0 and "conventions" in schema


def test_audits_go_into_the_units_record_and_the_summary(tmp_path):
    run, writer = started_sink(job(tmp_path, str(tmp_path / "out")))
    audits = [{"accelerator": "hero", "psnr_db": 30.0 + unit, "depth_abs_rel": 0.01, "rot_err_deg": 0.1,
               "trans_err": 0.0} for unit in range(4)]
    for unit, audit in enumerate(audits):
        metas = [{"frames": 5, "audit": audit}, {"frames": 5}]
        outcome = writer.write(unit, fake_samples([f"u{unit}-a", f"u{unit}-b"]), metas, [], PLAN, None)
        assert outcome["record"]["stats"]["audits"] == [audit]
        run.commit(outcome)
    summary = run.finalize(PlanCounts(rows=4, units=4, committed=0, todo=4, done=True), None)
    run.close()
    assert summary["audit"]["hero"]["audited"] == 4 and summary["audit"]["hero"]["failed"] == 0
    assert summary["audit"]["hero"]["psnr_db"]["min"] == 30.0 and summary["audit"]["hero"]["psnr_db"]["max"] == 33.0


def test_the_driver_compacts_markers_into_segments_and_the_later_epoch_wins(tmp_path):
    config = job(tmp_path, str(tmp_path / "out"), compact_every=2)
    run, writer = started_sink(config)
    commit_units(run, writer, [0, 1, 2])
    store = run.store
    assert [n for n in store.listdir(COMMITS_DIR) if n.startswith("log-")] == ["log-e000001-000000.jsonl"]
    assert [n for n in store.listdir(COMMITS_DIR) if n.startswith("unit-")] == ["unit-00000002.e000001.json"]
    run.close()  # flushes the last record into a segment
    assert store.listdir(COMMITS_DIR) == ["log-e000001-000000.jsonl", "log-e000001-000001.jsonl"]

    again, writer2 = started_sink(config)
    assert writer2.epoch == 2 and sorted(again.state.units) == [0, 1, 2]
    newer = commit_units(again, writer2, [1])[1]
    again.close()
    state = read_log(store, [f"{COMMITS_DIR}/{n}" for n in store.listdir(COMMITS_DIR)], [], 4)
    assert state.units[1].epoch == 2 and state.units[1].shard == newer["shard"] and state.units[0].epoch == 1


def test_index_lists_the_committed_units_in_order_with_checksums(tmp_path):
    config = job(tmp_path, str(tmp_path / "out"))
    run, writer = started_sink(config)
    records = commit_units(run, writer, [2, 0])
    index = build_index("r", run.state)
    assert index["wids_version"] == 1
    assert [(s["url"], s["nsamples"], s["sha256"]) for s in index["shardlist"]] == [
        (records[u]["shard"], 2, records[u]["sha256"]) for u in (0, 2)]
    run.close()


def finished_run(tmp_path, output, **sink_options):
    """A run of the 4-unit test manifest committed by hand and finalized."""
    config = job(tmp_path, output, **sink_options)
    run, writer = started_sink(config)
    commit_units(run, writer, [0, 1, 2, 3])
    summary = run.finalize(PlanCounts(rows=4, units=4, committed=0, todo=4, done=True), None)
    run.close()
    return config, summary


def test_a_rerun_of_a_complete_run_writes_nothing(tmp_path):
    config, summary = finished_run(tmp_path, str(tmp_path / "out"))
    assert summary["complete"] and summary["rollouts"] == 8 and len(summary["runs"]) == 1
    before = listing(tmp_path / "out")
    rerun = RolloutSink(Store(config.output), config)
    rerun.inspect()
    assert rerun.up_to_date() == summary
    assert listing(tmp_path / "out") == before


def test_a_rerun_finds_missing_and_truncated_shards_and_drops_them(tmp_path):
    config, _ = finished_run(tmp_path, str(tmp_path / "out"))
    store = Store(config.output)
    state = read_log(store, [f"{COMMITS_DIR}/{n}" for n in store.listdir(COMMITS_DIR)], [], 4)
    os.remove(tmp_path / "out" / state.units[1].shard)
    with open(tmp_path / "out" / state.units[2].shard, "r+b") as f:
        f.truncate(state.units[2].filesize - 512)
    rerun = RolloutSink(store, config)
    rerun.inspect()
    assert rerun.damaged == {1, 2} and sorted(rerun.state.units) == [0, 3]
    assert rerun.up_to_date() is None


def test_cleanup_removes_only_this_runs_unvouched_files_once_they_are_old(tmp_path):
    config, _ = finished_run(tmp_path, str(tmp_path / "out"))
    shards = tmp_path / "out" / SHARDS_DIR
    vouched = sorted(p.name for p in shards.iterdir())
    assert len(vouched) == 8  # four shards, each with its metadata table
    stale = [shards / f"{config.run_id}-000009-0123abcd{suffix}" for suffix in (".tar", ".parquet")]
    fresh = shards / f"{config.run_id}-000008-4567abcd.tar"
    for orphan in (*stale, fresh):
        orphan.write_bytes(b"an attempt that never committed")
    for orphan in stale:
        os.utime(orphan, (1, 1))
    for committed in vouched:  # a committed shard's files are kept however old
        os.utime(shards / committed, (1, 1))
    run, _ = started_sink(job(tmp_path, str(tmp_path / "out"), adopt_foreign=True))
    run.close()
    assert run.this_run["orphans_removed"] == 2
    assert sorted(p.name for p in shards.iterdir()) == sorted(vouched + [fresh.name])


def test_paths_cannot_leave_the_prefix(tmp_path):
    store = Store(str(tmp_path / "out"))
    for bad in ("../x", "/etc/passwd", "a/../../b", "shards//x"):
        with pytest.raises(ValueError):
            store.path(bad)


def test_local_writes_and_deletes_never_go_through_a_symlinked_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.tar").write_bytes(b"not ours")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shards").symlink_to(elsewhere)
    store = Store(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="symbolic link"):
        store.delete("shards/keep.tar")
    with pytest.raises(ValueError, match="symbolic link"):
        store.write_bytes("shards/new.tar", b"x")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.tar"]


def test_s3_commit_survives_transient_errors_and_is_checked_by_etag(s3_server):
    bucket = s3_server.make_bucket("sink-test")
    # botocore's and s3fs' own retries off: the Store's backoff must absorb the 503s
    options = dict(s3_server.storage_options(), config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}})
    store = Store(f"{bucket}/run", options, retries=5, backoff_s=0.05)
    store.fs.retries = 1
    s3_server.fail("PUT", r"/shards/", times=2)
    s3_server.fail("PUT", r"/_commits/", times=1)
    try:
        record = ShardWriter(store, "run", 1).write(0, fake_samples(["s3-1", "s3-2"]), [], [], PLAN, None)["record"]
        injected = s3_server.injected
    finally:
        s3_server.clear()
    assert injected == 3 and store.transient_errors >= 3
    assert store.sha256(record["shard"]) == record["sha256"]
    assert record["etag"] and store.entry(record["shard"]).etag == record["etag"]  # S3's MD5 of what it received
    assert sorted(read_log(store, [], [marker_path(0, 1)], 4).units) == [0]


def test_s3_verification_sees_a_shard_replaced_by_other_bytes_of_the_same_size(s3_server, tmp_path):
    bucket = s3_server.make_bucket("sink-verify")
    config, _ = finished_run(tmp_path, f"{bucket}/out", storage_options=s3_server.storage_options())
    store = Store(config.output, config.sink.storage_options)
    shard = store.read_json("index.json")["shardlist"][0]["url"]
    data = bytearray(store.read_bytes(shard))
    data[-1] ^= 0xFF
    store.fs.pipe_file(store.path(shard), bytes(data))
    rerun = RolloutSink(store, config)
    rerun.inspect()
    assert rerun.damaged == {0}


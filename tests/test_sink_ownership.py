"""A run owns only what it wrote, without Ray: foreign files and folders in the output are refused
(exit-2 errors naming the path) or, when adopted, never touched; symbolic links and entries of the
wrong kind are refused; the output location is checked before any work; the lease lets one driver
write at a time (locally and on moto's S3) and hands over from a dead or expired driver."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from pipeline.config import ConfigError, build_config, resolve
from pipeline.examples import example_rows, write_manifest
from pipeline.sink import LeaseHeld, LeaseLost, OutputError, RolloutSink
from pipeline.sink.layout import LAYOUT, lease_path
from pipeline.sink.lease import Lease
from pipeline.storage import Store, json_bytes


def job(tmp_path, output, **sink_options):
    manifest = tmp_path / "manifest.jsonl"
    if not manifest.exists():
        write_manifest(example_rows(2, seed=5, tasks=("prediction",)), str(manifest))
    overrides = {"input": str(manifest), "output": output}
    overrides.update({f"sink.{key}": value for key, value in sink_options.items()})
    return resolve(build_config(overrides=overrides))


def inspected(config) -> RolloutSink:
    run = RolloutSink(Store(config.output, config.sink.storage_options), config)
    run.inspect()
    return run


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_prefix_holding_another_dataset_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "existing-dataset"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard-000000.tar").write_bytes(b"somebody's data")
    (out / "index.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(OutputError) as error:
        inspected(job(tmp_path, str(out)))
    assert error.value.path == str(out / "index.json") and "--adopt-foreign" in str(error.value)
    assert snapshot(out) == before


def test_an_adopted_prefix_keeps_its_foreign_files_untouched(tmp_path):
    out = tmp_path / "shared"
    (out / "shards").mkdir(parents=True)
    foreign = {"notes.txt": b"keep me", "shards/other-run-000001-aaaaaaaa.tar": b"another run's shard"}
    for name, data in foreign.items():
        (out / name).write_bytes(data)
    os.utime(out / "notes.txt", (1, 1))
    run = inspected(job(tmp_path, str(out), adopt_foreign=True))
    assert sorted(run.inventory.foreign) == ["notes.txt", "shards", "shards/other-run-000001-aaaaaaaa.tar"]
    run.start()
    run.close()
    assert {name: (out / name).read_bytes() for name in foreign} == foreign


@pytest.mark.parametrize("make, path, reason", [
    (lambda out, away: (out / "shards").symlink_to(away), "shards", "symbolic link"),
    (lambda out, away: (out / "run.json").mkdir(), "run.json", "folder where a file should be"),
    (lambda out, away: (out / "shards").write_text("x"), "shards", "file where a folder should be"),
])
def test_links_and_entries_of_the_wrong_kind_are_refused_even_when_adopting(tmp_path, make, path, reason):
    out, away = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    away.mkdir()
    (away / "precious.tar").write_bytes(b"outside the prefix")
    make(out, away)
    with pytest.raises(OutputError) as error:
        inspected(job(tmp_path, str(out), adopt_foreign=True))
    assert error.value.path == str(out / path) and reason in error.value.reason
    assert (away / "precious.tar").read_bytes() == b"outside the prefix"


def test_a_symlinked_staging_folder_is_foreign_and_never_followed(tmp_path):
    out, away = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    away.mkdir()
    (away / "shard-000000.dead.tar").write_bytes(b"outside the prefix")
    (out / "_staging").symlink_to(away)
    with pytest.raises(OutputError) as error:
        inspected(job(tmp_path, str(out)))
    assert error.value.path == str(out / "_staging")
    run = inspected(job(tmp_path, str(out), adopt_foreign=True))
    run.start()
    run.close()
    assert (away / "shard-000000.dead.tar").read_bytes() == b"outside the prefix"


def written_run(tmp_path, config) -> None:
    run = inspected(config)
    run.start()
    run.close()


@pytest.mark.parametrize("damage, path, reason", [
    (lambda out: (out / "run.json").write_text("{not json"), "run.json", "not a JSON run record"),
    (lambda out: (out / "shards" / "sub").mkdir(parents=True), "shards/sub", "not a file this run wrote"),
    (lambda out: (out / "run.json").write_text(json.dumps({"layout": "hero-rollouts/1"})), "run.json",
     "not written by this version"),
])
def test_a_damaged_output_is_refused_naming_the_path(tmp_path, damage, path, reason):
    config = job(tmp_path, str(tmp_path / "out"))
    written_run(tmp_path, config)
    damage(tmp_path / "out")
    with pytest.raises(OutputError) as error:
        inspected(config)
    assert error.value.path == str(tmp_path / "out" / path) and reason in error.value.reason


def test_an_output_of_another_run_or_other_settings_names_the_key(tmp_path):
    config = job(tmp_path, str(tmp_path / "out"))
    written_run(tmp_path, config)
    with pytest.raises(ConfigError) as error:
        inspected(config.model_copy(update={"run_id": "another-run"}))
    assert error.value.key == "run_id"
    other = resolve(build_config(overrides={"input": config.input, "output": config.output, "run_id": config.run_id,
                                            "sink.rows_per_shard": 7}))
    with pytest.raises(ConfigError) as error:
        inspected(other)
    assert error.value.key == "sink.rows_per_shard"


def test_a_missing_bucket_is_refused_before_any_write(s3_server, tmp_path):
    config = job(tmp_path, "s3://no-such-bucket/out", storage_options=s3_server.storage_options())
    with pytest.raises(OutputError) as error:
        inspected(config)
    assert error.value.path == "s3://no-such-bucket/out" and "does not exist" in error.value.reason


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    target = str(out) if os.geteuid() != 0 else "/sys/hero-rollouts-test-output"  # root writes anywhere but /sys
    try:
        run = inspected(job(tmp_path, target))
        with pytest.raises(OutputError, match="cannot be written"):
            run.start()
    finally:
        out.chmod(stat.S_IRWXU)


def test_a_file_where_the_output_folder_should_be_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputError) as error:
        inspected(job(tmp_path, str(tmp_path / "out")))
    assert error.value.path == str(tmp_path / "out")


# --- the lease ---------------------------------------------------------------------------------


def test_one_driver_holds_the_lease_and_the_next_waits_for_its_release(tmp_path):
    store = Store(str(tmp_path / "out"))
    first = Lease(store, "run", ttl_s=60)
    assert first.acquire() == 1
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        Lease(store, "run", ttl_s=60).acquire()
    first.release()
    assert Lease(store, "run", ttl_s=60).acquire() == 2


def test_the_lease_of_a_dead_local_driver_is_taken_over_at_once(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store = Store(str(tmp_path / "out"))
    holder = {"run_id": "run", "epoch": 1, "host": socket.gethostname(), "pid": int(gone.stdout),
              "expires_at": time.time() + 600, "released": False}
    store.write_bytes(lease_path(1), json_bytes(holder))
    assert Lease(store, "run", ttl_s=60).acquire() == 2


def test_an_expired_lease_is_taken_over_and_its_holder_stops(tmp_path):
    store = Store(str(tmp_path / "out"))
    stalled = Lease(store, "run", ttl_s=0.5)
    assert stalled.acquire() == 1
    time.sleep(0.7)  # the holder missed its renewals (stalled past its expiry)
    successor = Lease(store, "run", ttl_s=60)
    assert successor.acquire() == 2
    with pytest.raises(LeaseLost, match="taken over"):
        stalled.renew()


def test_two_drivers_racing_for_an_s3_lease_get_one_epoch(s3_server):
    bucket = s3_server.make_bucket("lease-race")
    store = Store(f"{bucket}/out", s3_server.storage_options())
    store.write_bytes(lease_path(4), json_bytes({"run_id": "run", "epoch": 4, "released": True}))
    assert Lease(store, "run", ttl_s=60).acquire() == 5
    # the loser of a race to create the same epoch is refused by S3 itself (If-None-Match: *)
    assert not store.create(lease_path(5), json_bytes({"run_id": "run", "epoch": 5, "session": "other"}))
    with pytest.raises(LeaseHeld):
        Lease(store, "run", ttl_s=60).acquire()


def test_a_lease_of_another_run_is_refused(tmp_path):
    store = Store(str(tmp_path / "out"))
    store.write_bytes(lease_path(1), json_bytes({"run_id": "other", "epoch": 1, "released": True}))
    with pytest.raises(OutputError, match="lease of run 'other'"):
        Lease(store, "run", ttl_s=60).acquire()


def test_the_run_record_names_its_layout_and_manifest(tmp_path):
    config = job(tmp_path, str(tmp_path / "out"))
    written_run(tmp_path, config)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["layout"] == LAYOUT and record["manifest"] == config.manifest_digest()
    assert "input" not in record["settings"]  # where the manifest was read from does not matter

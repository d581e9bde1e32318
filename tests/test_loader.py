"""pipeline.loader on shards the sink wrote: tensors with the right shapes and dtypes, fixed-length
windows and their collate, selectable fields, shuffling, splitting across DataLoader workers, wids
random access, reading straight from s3://, schema.json and per-shard metadata, and every shard
verified against the index (truncated, cut, corrupt or missing shards are named, or skipped)."""

from __future__ import annotations

import logging
import os
import re
import shutil

import pytest
import torch
import webdataset as wds
from conftest import write_fake_run

from pipeline.loader import (ShardError, collate_windows, random_access, read_metadata, read_schema, rollout_dataset,
                             rollout_windows, shard_urls)
from pipeline.samples import FIELDS
from pipeline.schema import SCHEMA_FILE, schema_document
from pipeline.storage import Store

KEYS = [f"ld-{i:03d}" for i in range(6)]
FRAMES = 5


def write_run(store: Store, described: bool = True) -> None:
    write_fake_run(store, KEYS, frames=FRAMES, described=described)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    write_run(Store(str(out)))
    return str(out)


def middle_shard(run: str) -> str:
    """The name of the run's second shard (unit 1), as its index lists it."""
    return os.path.basename(shard_urls(run)[1])


def damaged_copy(local_run: str, tmp_path, damage) -> str:
    """A copy of the run whose middle shard (:func:`middle_shard`) went through ``damage(path)``."""
    copy = str(tmp_path / "damaged")
    shutil.copytree(local_run, copy)
    damage(os.path.join(copy, "shards", middle_shard(local_run)))
    return copy


def check_sample(sample):
    assert sample["rgb"].shape == (FRAMES, 3, 8, 10) and sample["rgb"].dtype == torch.uint8
    assert sample["depth"].shape == (FRAMES, 1, 8, 10) and sample["depth"].dtype == torch.float32
    assert sample["k"].shape == (FRAMES, 3, 3) and sample["c2w"].shape == (FRAMES, 4, 4)
    assert sample["commanded_c2w"].shape == (FRAMES, 4, 4)
    assert sample["actions"].shape == (FRAMES, 6) and sample["actions"].dtype == torch.float32
    assert sample["meta"]["id"] == sample["__key__"] and sample["meta"]["schema_version"] == 2
    assert sample["depth_is_metric"] is True


def test_stream_follows_the_index(local_run):
    samples = list(rollout_dataset(local_run))
    assert [s["__key__"] for s in samples] == KEYS
    for sample in samples:
        check_sample(sample)


def test_shuffle_is_seeded_and_complete(local_run):
    first = [s["__key__"] for s in rollout_dataset(local_run, shuffle=4, seed=1)]
    second = [s["__key__"] for s in rollout_dataset(local_run, shuffle=4, seed=1)]
    assert first == second and sorted(first) == KEYS and first != KEYS


def test_dataloader_workers_split_the_shards(local_run):
    loader = torch.utils.data.DataLoader(rollout_dataset(local_run), batch_size=None, num_workers=2)
    keys = [s["__key__"] for s in loader]
    assert sorted(keys) == KEYS and len(keys) == len(set(keys))


def test_only_selected_fields_are_decoded(local_run):
    sample = next(iter(rollout_dataset(local_run, fields=["actions", "c2w"])))
    assert {"actions", "c2w"} <= set(sample) and not {"rgb", "depth", "k", "commanded_c2w"} & set(sample)


def test_windows_cover_every_clip_with_rebased_poses(local_run):
    windows = list(rollout_windows(local_run, length=3, stride=1))
    assert len(windows) == len(KEYS) * 3  # starts 0, 1, 2 of each 5-frame clip
    clips = {s["__key__"]: s for s in rollout_dataset(local_run)}
    for window in windows:
        clip, start = clips[window["__key__"]], window["start"]
        assert torch.equal(window["rgb"], clip["rgb"][start:start + 3])
        assert torch.equal(window["depth"], clip["depth"][start:start + 3])
        assert torch.allclose(window["c2w"][0], torch.eye(4), atol=1e-6)
        assert torch.allclose(window["c2w"], torch.linalg.inv(clip["c2w"][start]) @ clip["c2w"][start:start + 3], atol=1e-6)
        assert torch.allclose(window["actions"], clip["actions"][start:start + 3], atol=1e-5)
        assert torch.equal(window["frame_index"], torch.arange(start, start + 3))


def test_frame_step_composes_actions_and_short_clips_give_no_window(local_run):
    windows = list(rollout_windows(local_run, length=2, stride=5, frame_step=3))
    assert len(windows) == len(KEYS) and all(w["start"] == 0 for w in windows)
    window = windows[0]
    assert torch.equal(window["frame_index"], torch.tensor([0, 3]))
    assert torch.allclose(window["actions"][0, :3], torch.tensor([0.0, 0.0, 0.3]), atol=1e-5)  # 3 x 0.1 forward
    assert torch.allclose(window["actions"][1, :3], torch.tensor([0.0, 0.0, 0.1]), atol=1e-5)  # truncated at the end
    assert list(rollout_windows(local_run, length=6)) == []


def test_collate_batches_windows_from_mixed_clips(local_run):
    windows = rollout_windows(local_run, length=2, stride=1, shuffle=64, seed=3, fields=["rgb", "actions"])
    loader = torch.utils.data.DataLoader(windows, batch_size=8, collate_fn=collate_windows, num_workers=2)
    batches = list(loader)
    assert sum(len(b["__key__"]) for b in batches) == len(KEYS) * 4
    first = batches[0]
    assert first["rgb"].shape == (8, 2, 3, 8, 10) and first["actions"].shape == (8, 2, 6)
    assert first["timestamp"].shape == (8, 2) and first["start"].shape == (8,)
    assert "depth" not in first and "c2w" not in first  # decoded for actions, then dropped
    assert len(set(first["__key__"])) > 1


def test_plain_webdataset_reads_indexed_shards(local_run):
    samples = list(wds.WebDataset(shard_urls(local_run), shardshuffle=False))
    assert [s["__key__"] for s in samples] == KEYS
    assert set(samples[0]) >= set(FIELDS)


def test_wids_random_access(local_run, tmp_path):
    dataset = random_access(local_run, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == len(KEYS)
    sample = dataset[4]
    assert sample["__key__"] == KEYS[4]
    check_sample(sample)


def test_schema_and_shard_metadata_are_read_back(local_run):
    assert rollout_dataset(local_run).schema["fps"] == 12
    table = read_metadata(local_run)
    assert table.column("id").to_pylist() == KEYS
    assert table.column("shard").to_pylist()[0] == os.path.relpath(shard_urls(local_run)[0], local_run)
    assert table.column("path_length").to_pylist()[0] == pytest.approx(0.4, abs=1e-5)


def test_runs_without_schema_or_metadata_still_load(tmp_path):
    write_run(Store(str(tmp_path)), described=False)
    assert read_schema(str(tmp_path)) is None and read_metadata(str(tmp_path)).num_rows == 0
    assert [s["__key__"] for s in rollout_dataset(str(tmp_path))] == KEYS


def test_a_newer_format_is_refused(tmp_path):
    write_run(Store(str(tmp_path)))
    Store(str(tmp_path)).write_json(SCHEMA_FILE, dict(schema_document("tiny"), format_version=99))
    with pytest.raises(ValueError, match="newer than this reader"):
        rollout_dataset(str(tmp_path))


def truncate_at_member_boundary(path: str) -> None:
    """Drop the last sample's files (5 members of 512-byte-aligned data) and the end-of-archive."""
    import tarfile

    with tarfile.open(path) as tar:
        last = [m for m in tar.getmembers() if m.name.startswith(KEYS[3])][0]
    with open(path, "r+b") as f:
        f.truncate(last.offset)


def cut_mid_member(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 + 100)


def flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {"truncated at a member boundary": truncate_at_member_boundary, "cut mid-member": cut_mid_member,
          "one byte flipped": flip_a_byte, "deleted": os.remove}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_shard_is_named_by_the_stream(local_run, tmp_path, damage):
    run = damaged_copy(local_run, tmp_path, DAMAGE[damage])
    with pytest.raises(ShardError, match=re.escape(middle_shard(local_run))) as error:
        list(rollout_dataset(run))
    assert error.value.url.endswith(f"shards/{middle_shard(local_run)}")


@pytest.mark.parametrize("damage", ["truncated at a member boundary", "cut mid-member"])
def test_skip_leaves_the_damaged_shard_out_and_reports_it(local_run, tmp_path, damage, caplog):
    run = damaged_copy(local_run, tmp_path, DAMAGE[damage])
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        keys = [s["__key__"] for s in rollout_dataset(run, on_error="skip")]
    assert keys == KEYS[:2] + KEYS[4:]
    assert middle_shard(local_run) in caplog.text


def test_random_access_verifies_shards(local_run, tmp_path, caplog):
    run = damaged_copy(local_run, tmp_path, truncate_at_member_boundary)
    dataset = random_access(run, cache_dir=str(tmp_path / "cache"))
    assert dataset[0]["__key__"] == KEYS[0]
    with pytest.raises(ShardError, match=re.escape(middle_shard(local_run))):
        dataset[2]
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        skipping = random_access(run, cache_dir=str(tmp_path / "cache2"), on_error="skip")
    assert len(skipping) == 4 and skipping[2]["__key__"] == KEYS[4]
    assert middle_shard(local_run) in caplog.text


def test_loader_reads_from_s3(s3_server, tmp_path, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    output = f"{s3_server.make_bucket('loader-test')}/runs/r1"
    write_run(Store(output, s3_server.storage_options()))
    assert [s["__key__"] for s in rollout_dataset(output)] == KEYS
    assert read_metadata(output, s3_server.storage_options()).column("id").to_pylist() == KEYS
    dataset = random_access(output, cache_dir=str(tmp_path / "cache"), storage_options=s3_server.storage_options())
    check_sample(dataset[1])

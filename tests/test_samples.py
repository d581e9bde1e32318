"""pipeline.samples: compact depth within its documented precision, actions as commands issued at
t (LeRobot's convention) with the commanded path beside the predicted one, selective decoding, and
format-1 samples (depth.npz, actions from t-1 to t) decoding to the same arrays and conventions."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from hero.models.base import Rollout, pose_deltas
from pipeline.samples import (DEPTH_LOG_STEP, FIELDS, decode_depth, decode_sample, encode_depth, encode_sample,
                              issued_actions)

FRAMES, HEIGHT, WIDTH = 9, 12, 17


def commanded_path(frames: int = FRAMES) -> np.ndarray:
    """Forward 0.2 per frame while yawing 3 degrees per frame."""
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    for t in range(frames):
        angle = np.deg2rad(3 * t)
        c2w[t, :3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
        c2w[t, 2, 3] = 0.2 * t
    return c2w


def rollout(seed: int = 0) -> Rollout:
    rng = np.random.default_rng(seed)
    commanded = commanded_path()
    predicted = commanded.copy()
    predicted[:, 0, 3] += rng.normal(0, 0.01, FRAMES)
    depth = rng.uniform(0.3, 80.0, (FRAMES, HEIGHT, WIDTH)).astype(np.float32)
    return Rollout(rgb=rng.integers(0, 255, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8), depth=depth,
                   depth_is_metric=True, k=np.tile(np.eye(3), (FRAMES, 1, 1)).astype(np.float32),
                   c2w=predicted.astype(np.float32), actions=pose_deltas(commanded),
                   meta={"commanded_c2w": commanded.tolist()})


def test_depth_round_trips_within_the_documented_relative_error():
    depth = np.random.default_rng(1).uniform(0.05, 1000.0, (4, 7, 9)).astype(np.float32)
    data, encoding = encode_depth(depth)
    back = decode_depth(data, encoding)
    assert back.dtype == np.float32 and back.shape == depth.shape
    assert np.abs(back / depth - 1).max() <= np.expm1(DEPTH_LOG_STEP / 2) * (1 + 1e-5)


def test_missing_depth_is_code_zero_and_decodes_to_zero():
    depth = np.full((2, 3, 4), 5.0, np.float32)
    depth[0, 0, 0], depth[1, 2, 3], depth[1, 1, 1] = np.inf, 0.0, np.nan
    back = decode_depth(*encode_depth(depth))
    assert back[0, 0, 0] == back[1, 2, 3] == back[1, 1, 1] == 0.0
    assert np.allclose(back[0, 1:], 5.0, rtol=0.006)


def test_compact_depth_is_smaller_than_float16_npz():
    rows, cols = np.mgrid[0:48, 0:64]
    depth = np.stack([2 + 30 * rows / 48 + np.sin(cols / 9 + t / 4) for t in range(17)]).astype(np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, depth=depth.astype(np.float16))
    data, _ = encode_depth(depth)
    assert len(data) * 1.5 < len(buffer.getvalue())  # bench/loader.py measures real rollouts


def test_actions_are_commands_issued_at_t_from_the_commanded_path():
    sample = decode_sample(encode_sample(rollout(), {"id": "a", "fps": 12}))
    commanded = commanded_path()
    for t in range(FRAMES - 1):
        moved = np.linalg.inv(commanded[t]) @ commanded[t + 1]
        assert np.allclose(sample["actions"][t, :3], moved[:3, 3], atol=1e-6)
        assert np.allclose(sample["actions"][t, 3:], [0, np.deg2rad(3), 0], atol=1e-6)
    assert not sample["actions"][-1].any()
    assert np.allclose(sample["commanded_c2w"], commanded, atol=1e-6)
    assert not np.allclose(sample["c2w"], commanded, atol=1e-3)  # the predicted camera stays beside it
    meta = sample["meta"]
    assert meta["actions_from"] == "commanded" and meta["poses_from"] == "predicted" and meta["fps"] == 12
    assert "commanded_c2w" not in meta and meta["schema_version"] == 2


def test_rows_without_a_commanded_path_have_nan_commanded_poses():
    without = rollout()
    without.meta = {}
    sample = decode_sample(encode_sample(without, {"id": "b"}))
    assert np.isnan(sample["commanded_c2w"]).all() and sample["meta"]["actions_from"] == "predicted"


def test_only_the_fields_asked_for_are_decoded():
    files = encode_sample(rollout(), {"id": "c"})
    assert tuple(files) == FIELDS
    without_video_or_depth = {name: data for name, data in files.items() if name not in ("rgb.mp4", "depth.mkv")}
    sample = decode_sample(without_video_or_depth, ["actions", "c2w"])
    assert set(sample) == {"actions", "c2w", "meta", "depth_is_metric"}
    with pytest.raises(ValueError, match="unknown"):
        decode_sample(files, ["rgb", "normals"])


def format_1_files(source: Rollout) -> dict[str, bytes]:
    """A sample as format 1 wrote it: depth.npz (float16 + metric flag), actions from t-1 to t,
    the commanded path inside meta.json."""
    files = encode_sample(source, {"id": "old"})
    meta = json.loads(files.pop("meta.json"))
    files.pop("depth.mkv")
    depth, actions = io.BytesIO(), io.BytesIO()
    np.savez_compressed(depth, depth=source.depth.astype(np.float16), metric=np.array(True))
    np.save(actions, source.actions)
    meta.update(schema_version=1, commanded_c2w=source.meta["commanded_c2w"])
    for key in ("depth_encoding", "actions_from", "poses_from"):
        meta.pop(key)
    return dict(files, **{"depth.npz": depth.getvalue(), "action.npy": actions.getvalue(),
                          "meta.json": json.dumps(meta).encode()})


def test_format_1_samples_decode_to_the_same_conventions():
    source = rollout()
    new = decode_sample(encode_sample(source, {"id": "new"}))
    old = decode_sample(format_1_files(source))
    assert np.allclose(old["actions"], new["actions"]) and np.allclose(old["commanded_c2w"], new["commanded_c2w"])
    assert np.allclose(old["depth"], source.depth, rtol=1e-3) and old["depth_is_metric"]
    assert issued_actions(source.actions).shape == (FRAMES, 6)

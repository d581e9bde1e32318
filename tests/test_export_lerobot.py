"""``hero-export lerobot``: a run becomes a LeRobot v3 dataset that LeRobot's own ``LeRobotDataset``
loads, every episode, with frames, depth, poses, actions and tasks equal to the source shards;
local and s3:// in and out; a destination in use or a damaged shard stops it with exit status 2.

LeRobot 0.4.4 (the newest for Python 3.11) asks for torch < 2.11, which cannot sit beside this
project's torch 2.13, and its torchvision needs a CUDA build of torch. So the test builds a second
virtualenv once (cached in ``$HERO_LEROBOT_VENV``, default ``~/.cache/hero-rollouts/lerobot-0.4.4``)
with torch 2.14.1 + torchvision 0.29.1, lerobot without its pins, and the few packages its dataset
reader imports, and runs ``tests/lerobot_reader.py`` there. The build is refused (test skipped)
when pip would download torch rather than take it from a local wheel (several GB of CUDA), and
when FFmpeg's shared libraries that torchcodec loads are missing (``apt-get install libavcodec59
libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8``).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_fake_run

from pipeline.export.cli import main as export_main
from pipeline.loader import rollout_dataset
from pipeline.storage import Store

KEYS = [f"ep-{i:03d}" for i in range(5)]
FRAMES = 6
VENV = Path(os.environ.get("HERO_LEROBOT_VENV", Path.home() / ".cache" / "hero-rollouts" / "lerobot-0.4.4"))
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
READER_PACKAGES = ["torchcodec==0.17.0", "datasets>=4,<5", "huggingface-hub>=0.34.2,<0.36", "accelerate>=1.10",
                   "pandas", "pyarrow", "av>=15,<16", "jsonlines", "packaging", "draccus==0.10.0", "einops",
                   "termcolor", "deepdiff", "imageio"]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def torch_is_local(pip: Path) -> bool:
    """Whether pip would take the torch wheels from local disk (no multi-GB download)."""
    report = run([str(pip), "install", "--dry-run", "--quiet", "--report", "-", *TORCH])
    if report.returncode != 0:
        return False
    installs = json.loads(report.stdout).get("install", [])
    return bool(installs) and all(item["download_info"]["url"].startswith("file://") for item in installs
                                  if item["metadata"]["name"] in ("torch", "torchvision"))


def lerobot_python() -> Path:
    """The cached LeRobot virtualenv's python, built on first use; skips the test when it cannot be."""
    python = VENV / "bin" / "python"
    if (VENV / "ready").exists():
        return python
    if not ctypes.util.find_library("avcodec"):
        pytest.skip("torchcodec (LeRobot's video decoder) needs FFmpeg's shared libraries: apt-get install libavcodec59 "
                    "libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8")
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = VENV / "bin" / "pip"
    if not torch_is_local(pip):
        shutil.rmtree(VENV, ignore_errors=True)
        pytest.skip(f"pip would download {' '.join(TORCH)} (several GB of CUDA builds); LeRobot's reader needs "
                    "torchvision, whose CPU builds are not on PyPI")
    for step in (TORCH, ["--no-deps", "lerobot==0.4.4"], READER_PACKAGES):
        result = run([str(pip), "install", "--quiet", *step])
        if result.returncode != 0:
            shutil.rmtree(VENV, ignore_errors=True)
            pytest.skip(f"cannot build the LeRobot virtualenv ({' '.join(step)}): {result.stderr[-500:]}")
    check = run([str(python), "-c", "from lerobot.datasets.lerobot_dataset import LeRobotDataset"])
    assert check.returncode == 0, check.stderr[-2000:]
    (VENV / "ready").write_text("lerobot 0.4.4\n")
    return python


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("run")
    write_fake_run(Store(str(out)), KEYS, frames=FRAMES)
    return str(out)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("lerobot") / "dataset"
    assert export_main(["lerobot", source, str(dest)]) == 0
    return dest


def test_layout_and_info_are_lerobot_v3(exported):
    info = json.loads((exported / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 12
    assert info["total_episodes"] == len(KEYS) and info["total_frames"] == len(KEYS) * FRAMES
    features = info["features"]
    assert features["observation.images.rgb"]["dtype"] == "video"
    assert features["observation.depth"]["shape"] == [8, 10] and features["observation.depth"]["info"]["unit"] == "m"
    assert features["action"]["names"] == ["tx", "ty", "tz", "rx", "ry", "rz"]
    assert {"observation.camera.intrinsics", "observation.camera.c2w", "observation.camera.commanded_c2w"} <= set(features)
    for episode in range(len(KEYS)):
        assert (exported / info["video_path"].format(video_key="observation.images.rgb", chunk_index=0,
                                                     file_index=episode)).exists()
    episodes = pq.read_table(exported / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [e["hero/sample_id"] for e in episodes] == KEYS
    assert [e["dataset_from_index"] for e in episodes] == [i * FRAMES for i in range(len(KEYS))]
    assert (exported / "meta" / "hero_rollouts_schema.json").exists()


def test_lerobot_loads_every_episode_as_in_the_shards(source, exported, tmp_path):
    python = lerobot_python()
    reader = Path(__file__).with_name("lerobot_reader.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    result = run([str(python), str(reader), str(exported), str(tmp_path / "read")], env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "read.json").read_text())
    read = np.load(tmp_path / "read.npz")
    assert report["episodes"] == len(KEYS) and report["frames"] == len(KEYS) * FRAMES and report["fps"] == 12
    clips = list(rollout_dataset(source))
    rgb = np.concatenate([c["rgb"].numpy() for c in clips]) / 255.0
    assert np.abs(read["observation.images.rgb"] - rgb).max() <= 2 / 255  # the same mp4, another decoder build
    assert np.array_equal(read["observation.depth"], np.concatenate([c["depth"][:, 0].numpy() for c in clips]))
    for name, key in (("observation.camera.c2w", "c2w"), ("observation.camera.commanded_c2w", "commanded_c2w"),
                      ("observation.camera.intrinsics", "k"), ("action", "actions")):
        assert np.array_equal(read[name], np.concatenate([c[key].numpy() for c in clips])), name
    assert list(read["episode_index"]) == [i for i in range(len(KEYS)) for _ in range(FRAMES)]
    assert np.allclose(read["timestamp"], np.tile(np.arange(FRAMES) / 12, len(KEYS)))
    assert set(report["tasks"]) == {"prediction"}
    assert np.allclose(report["window_action"], clips[0]["actions"][1:4].numpy(), atol=1e-6)
    assert report["window_rgb_shape"] == [2, 3, 8, 10] and report["window_action_is_pad"] == [False] * 3
    assert "observation.depth" in report["stats_keys"]


def test_export_from_and_to_s3(s3_server, exported, tmp_path, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket("export-test")
    write_fake_run(Store(f"{bucket}/runs/r1", s3_server.storage_options()), KEYS, frames=FRAMES)
    assert export_main(["lerobot", f"{bucket}/runs/r1", f"{bucket}/lerobot/r1"]) == 0
    fs = Store(f"{bucket}/lerobot/r1", s3_server.storage_options()).fs
    local = tmp_path / "downloaded"
    fs.get("export-test/lerobot/r1/", str(local), recursive=True)
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert (local / "meta" / "info.json").read_text() == (exported / "meta" / "info.json").read_text()
    assert pq.read_table(local / "data" / "chunk-000" / "file-000.parquet").equals(
        pq.read_table(exported / "data" / "chunk-000" / "file-000.parquet"))


def test_a_destination_in_use_is_refused(source, exported, capsys):
    assert export_main(["lerobot", source, str(exported)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_damaged_shard_stops_the_export_unless_skipped(source, tmp_path, capsys):
    damaged = tmp_path / "run"
    shutil.copytree(source, damaged)
    middle = sorted((damaged / "shards").glob("*.tar"))[1]  # unit 1's shard
    with open(middle, "r+b") as f:
        f.truncate(1536)
    assert export_main(["lerobot", str(damaged), str(tmp_path / "out")]) == 2
    assert middle.name in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert export_main(["lerobot", str(damaged), str(tmp_path / "out2"), "--skip-damaged"]) == 0
    info = json.loads((tmp_path / "out2" / "meta" / "info.json").read_text())
    assert info["total_episodes"] == len(KEYS) - 2

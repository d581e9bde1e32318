"""The embedded default, end to end: the shipped manifest and model through jobs/generate.py on a
real Ray instance, with a quality audit; its shards, schema.json and metadata tables read back
through pipeline.loader, plain webdataset and wids; a rerun of the finished run is a no-op; a bad
configuration fails before any work with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import webdataset as wds
from conftest import REPO, run_job

from pipeline.cli import load
from pipeline.config import ConfigError
from pipeline.audit import is_audited
from pipeline.loader import random_access, read_metadata, read_schema, rollout_dataset, shard_urls
from pipeline.schema import metadata_path
from pipeline.sources import default_manifest, read_manifest

ROWS = 3
AUDIT_FRACTION = 0.5  # of the first three rows, only the short one is audited
ARGS = ["--limit", str(ROWS), "--steps", "1", "--rows-per-shard", "2", "--set", f"audit.fraction={AUDIT_FRACTION}"]


@pytest.fixture(scope="module")
def default_run(ray_head, tmp_path_factory):
    output = tmp_path_factory.mktemp("default-run") / "out"
    result = run_job([*ARGS, "--output", str(output)], ray_head.env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output, result


def default_frames() -> dict[str, int]:
    """Frames per row of the first ROWS default rows: the long rollouts lead the manifest."""
    return {e.row.id: e.row.frames or 17 for e in read_manifest(default_manifest(), limit=ROWS)}


def test_default_run_writes_every_row_with_toyworld_and_long_rollouts(default_run):
    output, result = default_run
    frames = default_frames()
    assert max(frames.values()) >= 100
    summary = json.loads((output / "summary.json").read_text())
    assert summary["complete"] and summary["rollouts"] == ROWS and summary["failures"] == 0
    assert summary["frames"] == sum(frames.values())
    assert (output / "errors.jsonl").read_text() == ""
    assert (output / "preview.png").stat().st_size > 0
    index = json.loads((output / "index.json").read_text())
    assert sorted(s["url"] for s in index["shardlist"]) == sorted(f"shards/{p.name}" for p in (output / "shards").glob("*.tar"))
    assert f"rollouts    {ROWS} in the dataset" in result.stdout and str(output) in result.stdout
    first_progress = next(line for line in result.stdout.splitlines() if line.startswith("[progress]"))
    assert "committed 0 units" in first_progress  # a person watching sees the run start before any commit
    # prep runs as its own tasks, never fused into the actors (docs/pipeline.md)
    assert ("TaskPoolMapOperator[MapBatches(prepare_units)] -> ActorPoolMapOperator[MapBatches(GenerateUnits)]"
            in result.stdout + result.stderr)
    keys = [s["__key__"] for s in rollout_dataset(str(output))]
    assert keys == list(frames)


def test_shards_read_back_with_the_right_shapes(default_run):
    output, _ = default_run
    frames = default_frames()
    for sample in rollout_dataset(str(output)):
        n = frames[sample["__key__"]]
        assert sample["rgb"].shape == (n, 3, 48, 64) and sample["rgb"].dtype == torch.uint8
        assert sample["depth"].shape == (n, 1, 48, 64) and sample["depth"].dtype == torch.float32
        assert sample["k"].shape == (n, 3, 3) and sample["c2w"].shape == (n, 4, 4)
        assert sample["actions"].shape == (n, 6)
        torch.testing.assert_close(sample["c2w"][0], torch.eye(4), atol=1e-3, rtol=0)
        meta = sample["meta"]
        assert meta["model"] == "toyworld" and meta["steps"] == 1 and meta["schema_version"] == 2
        assert meta["accelerator"]["name"] == "hero" and "generate_s" in meta["timings"]
        assert meta["task"] in ("prediction", "planning", "reconstruction")


def test_the_run_describes_its_samples_and_audits_its_accelerator(default_run):
    output, _ = default_run
    assert read_schema(str(output))["model"]["name"] == "toyworld"
    index = json.loads((output / "index.json").read_text())
    assert all((output / metadata_path(shard["url"])).exists() for shard in index["shardlist"])
    assert read_metadata(str(output)).column("id").to_pylist() == list(default_frames())
    audited = [key for key in default_frames() if is_audited(key, AUDIT_FRACTION)]
    assert len(audited) == 1
    metas = {s["__key__"]: s["meta"] for s in rollout_dataset(str(output))}
    assert [key for key, meta in metas.items() if "audit" in meta] == audited
    summary = json.loads((output / "summary.json").read_text())
    assert summary["audit"]["hero"]["audited"] == 1 and summary["audit"]["hero"]["failed"] == 0


def test_plain_webdataset_and_wids_read_the_run(default_run, tmp_path):
    output, _ = default_run
    plain = list(wds.WebDataset(shard_urls(str(output)), shardshuffle=False).decode())
    assert len(plain) == ROWS
    frames = list(default_frames().values())
    assert plain[0]["action.npy"].shape == (frames[0], 6) and isinstance(plain[0]["meta.json"], dict)
    dataset = random_access(str(output), cache_dir=str(tmp_path / "wids"))
    assert len(dataset) == ROWS
    assert dataset[ROWS - 1]["rgb"].shape == (frames[ROWS - 1], 3, 48, 64)


def test_rerun_of_a_finished_run_writes_nothing(default_run, ray_head):
    output, _ = default_run
    before = {str(p.relative_to(output)): p.stat().st_mtime_ns for p in output.rglob("*")}
    result = run_job([*ARGS, "--output", str(output)], dict(ray_head.env, RAY_ADDRESS="127.0.0.1:1"))  # and starts no Ray
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 to do (complete and intact: nothing written)" in result.stdout
    assert {str(p.relative_to(output)): p.stat().st_mtime_ns for p in output.rglob("*")} == before


@pytest.mark.parametrize("args,key", [
    (["--actors", "0"], "generate.actors"),
    (["--model", "nope"], "model.name"),
    (["--accel", "nope"], "accel.name"),
    (["--set", "accel.options.nope=1"], "accel.options"),
    (["--set", "sink.rows_per_shardz=3"], "sink.rows_per_shardz"),
    (["--set", "generate.batch_size=two"], "generate.batch_size"),
    (["--run-id", "a/b"], "run_id"),
])
def test_bad_config_names_the_key(args, key):
    with pytest.raises(ConfigError) as error:
        load(args)
    assert error.value.key == key and f"config key '{key}'" in str(error.value)


def test_bad_config_fails_before_work_with_status_2(tmp_path):
    output = tmp_path / "out"
    result = run_job(["--input", str(tmp_path / "missing.jsonl"), "--output", str(output)],
                     dict(os.environ, RAY_ADDRESS="127.0.0.1:1"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "config key 'input'" in result.stderr and "Traceback" not in result.stderr
    assert not (output / "shards").exists()


def test_output_holding_another_run_is_refused(default_run):
    output, _ = default_run
    result = run_job(["--limit", str(ROWS), "--steps", "2", "--rows-per-shard", "2", "--output", str(output)],
                     dict(os.environ, RAY_ADDRESS="127.0.0.1:1"))
    assert result.returncode == 2 and "config key 'run_id'" in result.stderr


def test_yaml_config_with_unknown_key(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("generate:\n  actors: 1\n  batchsize: 2\n")
    result = run_job(["--config", str(config)], dict(os.environ), cwd=REPO)
    assert result.returncode == 2 and "config key 'generate.batchsize': unknown key" in result.stderr


@pytest.mark.parametrize("name", ["local.yaml", "toyworld-s3.yaml", "aether-gpu.yaml"])
def test_shipped_configs_are_valid(name):
    from pipeline.config import build_config

    config = build_config(str(REPO / "jobs" / "configs" / name))
    assert config.generate.actors >= 1 and config.sink.rows_per_shard >= 1
    if name == "aether-gpu.yaml":
        assert config.model.name == "aether" and config.generate.num_gpus == 1


def test_help_loads_no_model_stack_and_names_the_default_accelerator():
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "jobs" / "generate.py"), "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert not {"torch", "ray", "diffusers", "av"} & imported
    assert "(default: hero)" in " ".join(result.stdout.split())


def test_workers_get_the_endpoint_and_calibration_cache_but_never_credentials(monkeypatch):
    from hero.cache.calibration import CACHE_ENV
    from pipeline.run import forwarded_env

    monkeypatch.setenv(CACHE_ENV, "/shared/calibration")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-forward")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://job-set"}}}))
    env = forwarded_env()
    assert env[CACHE_ENV] == "/shared/calibration"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "AWS_ENDPOINT_URL" not in env  # the enclosing Ray job's own setting wins

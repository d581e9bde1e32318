"""The job with manifest and output on s3:// (moto's server on loopback): every kind of bad row
becomes an errors.jsonl entry naming the row and the field while every good row is generated,
object-store 503s and an actor that dies mid-batch cost nothing, and no credential leaks."""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
from conftest import AWS_TEST_ENV, run_job
from PIL import Image

from pipeline import faults
from pipeline.examples import bad_rows, example_rows, write_manifest
from pipeline.loader import rollout_dataset
from pipeline.schema import metadata_path


def test_s3_job_with_bad_rows_transient_errors_and_a_dying_actor(ray_head, s3_server, tmp_path, monkeypatch):
    bucket = s3_server.make_bucket("job-s3")
    options = s3_server.storage_options()
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(image, "PNG")
    fs = fsspec.filesystem("s3", **options)
    fs.pipe_file(f"{bucket}/inputs/start.png", image.getvalue())
    fs.pipe_file(f"{bucket}/inputs/garbage.png", b"this is not a png")

    good = example_rows(2, seed=11, tasks=("prediction",), prefix="s3")
    from_image = dict(good[0], id="s3-from-image", observation={"image": f"{bucket}/inputs/start.png"})
    write_manifest(good + [from_image], f"{bucket}/manifests/part-000.parquet", options)
    bad = bad_rows() + [(json.dumps(dict(good[1], id="bad-undecodable",
                                         observation={"image": f"{bucket}/inputs/garbage.png"})),
                         "observation.image")]
    fs.pipe_file(f"{bucket}/manifests/part-001.jsonl", "".join(line + "\n" for line, _ in bad).encode())

    s3_server.fail("PUT", r"/out/shards/", times=2)
    env = dict(ray_head.env, **s3_server.env, HERO_FAULT_DIR=str(tmp_path / "faults"), HERO_FAULT_ACTOR_EXIT="1")
    result = run_job(["--input", f"{bucket}/manifests/", "--output", f"{bucket}/out", "--steps", "1",
                      "--rows-per-shard", "4"], env)
    injected = s3_server.injected
    s3_server.clear()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    monkeypatch.setenv("HERO_FAULT_DIR", str(tmp_path / "faults"))
    assert faults.taken("actor_exit") == 1 and injected == 2

    expected = [r["id"] for r in good] + ["s3-from-image", "bad-0007-000000"]
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    keys = [s["__key__"] for s in rollout_dataset(f"{bucket}/out")]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))

    errors = [json.loads(line) for line in fs.cat_file(f"{bucket}/out/errors.jsonl").decode().splitlines()]
    wanted = [(field, line) for line, (text, field) in enumerate(bad, start=1) if field is not None]
    got = sorted((e["field"], e["line"]) for e in errors)
    assert got == sorted(wanted)
    assert all(e["reason"] and e["source"].endswith("part-001.jsonl") for e in errors)
    named = {e["id"] for e in errors if e["id"]}
    assert {"bad-mistyped", "bad-frames", "bad-missing-image", "bad-undecodable", "bad-0007-000000"} <= named

    summary = json.loads(fs.cat_file(f"{bucket}/out/summary.json"))
    assert summary["complete"] and summary["rollouts"] == len(expected)
    assert summary["failures"] == len(wanted)
    everything = (result.stdout + result.stderr + json.dumps(summary)
                  + fs.cat_file(f"{bucket}/out/run.json").decode()
                  + json.dumps([s["meta"] for s in rollout_dataset(f"{bucket}/out")]))
    assert AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"] not in everything
    fs.invalidate_cache()
    index = json.loads(fs.cat_file(f"{bucket}/out/index.json"))
    listed = sorted(fs.unstrip_protocol(path) for path in fs.find(f"{bucket}/out/shards"))
    assert sorted(f"{bucket}/out/{url}" for s in index["shardlist"] for url in (s["url"], metadata_path(s["url"]))) == listed

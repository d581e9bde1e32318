"""`ray job submit --working-dir . -- python jobs/generate.py ...` against the session's
`ray start --head` on loopback: the job succeeds and writes its output; a reused submission id
(a schedule slot launched twice) is refused; the same command submitted from another copy of the
checkout (Ray runs each from its own temporary copy) lands in the same run and writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import BIN, REPO

from pipeline.loader import rollout_dataset
from pipeline.sources import default_manifest, read_manifest


def checkout_copy(destination):
    """The project as a fresh checkout would have it (no virtualenv, no caches)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".venv", ".git", ".pytest_cache", "*.egg-info", "runs")
    destination.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "hero", "pipeline", "jobs"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, destination / name)
    return destination


def submit(ray_head, workdir, submission_id, output):
    command = [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard, "--working-dir", ".",
               "--submission-id", submission_id, "--", "python", "jobs/generate.py", "--limit", "1",
               "--steps", "1", "--rows-per-shard", "1", "--output", output]
    return subprocess.run(["nice", "-n", "10", *command], cwd=workdir, env=ray_head.env, capture_output=True,
                          text=True, timeout=900)


def test_ray_job_submit_runs_the_job_and_any_checkout_lands_in_its_run(ray_head, tmp_path):
    if ray_head.dashboard is None:
        pytest.skip("the session's Ray head was started without the dashboard (HERO_TEST_NO_DASHBOARD=1)")
    workdir = checkout_copy(tmp_path / "checkout")
    runs = tmp_path / "runs"
    result = submit(ray_head, workdir, "hero-test-slot-1", f"{runs}/{{run_id}}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower()
    (output,) = runs.iterdir()  # the run id the job derived names its output
    summary = json.loads((output / "summary.json").read_text())
    assert summary["complete"] and summary["rollouts"] == 1
    expected = [e.row.id for e in read_manifest(default_manifest(), limit=1)]
    assert [s["__key__"] for s in rollout_dataset(str(output))] == expected

    again = submit(ray_head, workdir, "hero-test-slot-1", f"{runs}/{{run_id}}")
    assert again.returncode != 0

    before = {str(p.relative_to(output)): p.stat().st_mtime_ns for p in output.rglob("*")}
    elsewhere = checkout_copy(tmp_path / "another-checkout")
    same = submit(ray_head, elsewhere, "hero-test-slot-2", f"{runs}/{{run_id}}")
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    assert "complete and intact: nothing written" in same.stdout
    assert list(runs.iterdir()) == [output]
    assert {str(p.relative_to(output)): p.stat().st_mtime_ns for p in output.rglob("*")} == before

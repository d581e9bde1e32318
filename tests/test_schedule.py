"""Schedule slots: id derivation (unit and property tests) and at-most-once launches on a real Ray.

The Ray test uses the session's ``ray start --head`` on loopback (token authentication, from
conftest.py), launches through the real cron script and ``ray job submit`` CLI, and reads the jobs
back through Ray's Jobs REST API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.scheduled import (
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_USAGE,
    RAY_JOB_CONFIG_ENV,
    SLOT_ID_PATTERN,
    ScheduleError,
    attempt_id,
    current_submission_id,
    finished_attempt_exit,
    parse_slot_id,
    run_id_from_submission_id,
    slot_id,
    slot_time,
    with_run_id,
)
from pipeline.manifest import SAFE_ID

REPO = Path(__file__).resolve().parents[1]
UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def run_schedule_cli(args, env, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "scheduled.py"), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


# --- slot ids -------------------------------------------------------------------------------


def test_slot_id_names_the_utc_minute():
    assert slot_id("nightly", at("2026-11-22T02:03:59Z")) == "hero-nightly-20261122T0203"
    assert slot_id("nightly", at("2026-11-22T03:03:00+01:00")) == "hero-nightly-20261122T0203"


def test_slot_id_floors_to_the_period():
    daily = [slot_id("nightly", at(t), 1440) for t in ("2026-11-22T02:00Z", "2026-11-22T23:59Z")]
    assert daily == ["hero-nightly-20261122T0000"] * 2
    assert slot_id("nightly", at("2026-11-23T00:00Z"), 1440) == "hero-nightly-20261123T0000"
    assert slot_id("hourly", at("2026-11-22T02:59Z"), 60) == "hero-hourly-20261122T0200"


@pytest.mark.parametrize(
    "name", ["Nightly", "night_ly", "night.ly", "-nightly", "nightly-", "a--b", "", "x" * 33]
)
def test_slot_id_rejects_names_that_are_not_dns_labels(name):
    with pytest.raises(ScheduleError, match="name"):
        slot_id(name, at("2026-11-22T02:00Z"))


def test_slot_id_rejects_naive_times_and_empty_periods():
    with pytest.raises(ScheduleError, match="UTC offset"):
        slot_id("nightly", datetime(2026, 11, 22, 2, 0))
    with pytest.raises(ScheduleError, match="period_minutes"):
        slot_id("nightly", at("2026-11-22T02:00Z"), 0)


@settings(max_examples=200, deadline=None)
@given(
    moment=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
    ),
    period=st.sampled_from([1, 5, 15, 60, 360, 1440]),
    name=st.from_regex(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){0,31}", fullmatch=True),
    attempt=st.integers(min_value=0, max_value=99),
)
def test_slot_ids_are_stable_valid_ids(moment, period, name, attempt):
    slot = slot_id(name, moment, period)
    start = slot_time(moment, period)
    assert start <= moment < start + timedelta(minutes=period)
    assert slot_id(name, start, period) == slot == slot_id(name, moment, period)
    submission = attempt_id(slot, attempt)
    # A Kubernetes label value / DNS label, a Ray submission id and a run id that is safe as a path
    # component and as the prefix of a WebDataset key (no dots, underscores or slashes).
    assert len(submission) <= 63
    assert SLOT_ID_PATTERN.fullmatch(submission)
    assert not set(submission) & set("._/ ")
    assert SAFE_ID.fullmatch(submission)  # what jobs/generate.py accepts as --run-id
    assert parse_slot_id(submission) == (slot, attempt)
    assert run_id_from_submission_id(submission, name) == slot


def test_attempt_ids_resume_the_same_run():
    slot = "hero-nightly-20261122T0000"
    assert [attempt_id(slot, n) for n in range(3)] == [slot, f"{slot}-r1", f"{slot}-r2"]
    assert {run_id_from_submission_id(attempt_id(slot, n)) for n in range(3)} == {slot}
    with pytest.raises(ScheduleError, match="slot id"):
        parse_slot_id("hero-nightly-20261322T0000")


@pytest.mark.parametrize(
    "status, exit_code, observed, expected",
    [
        ("SUCCEEDED", 0, True, EXIT_OK),
        ("SUCCEEDED", 0, False, EXIT_OK),  # a complete slot launched again: a no-op
        ("FAILED", 1, True, None),  # incomplete run: the next attempt resumes it
        ("FAILED", None, True, None),  # driver or node lost, no exit status
        ("FAILED", 2, True, EXIT_USAGE),  # bad configuration: retrying cannot help
        ("FAILED", 2, False, None),  # ... but a later launch (config fixed) resumes
        ("STOPPED", None, True, EXIT_STOPPED),  # an operator stopped it: do not fight them
        ("STOPPED", None, False, None),  # launching again is how they ask to resume
    ],
)
def test_finished_attempt_decides_the_slots_next_step(status, exit_code, observed, expected):
    assert finished_attempt_exit(status, exit_code, observed) == expected


# --- RayCronJob ticks ---------------------------------------------------------------------------


def kuberay_submission_ids(cronjob: str, tick: datetime) -> dict[str, str]:
    """What KubeRay calls the Ray job of a RayCronJob tick: RayJob ``<cronjob>-<5 random>`` (1.6)
    or ``<cronjob>-<unix minutes>`` (1.7), submission id ``<rayjob>-<5 random>``."""
    return {"1.6": f"{cronjob}-x7k2q-bcdfg", "1.7": f"{cronjob}-{int(tick.timestamp()) // 60}-bcdfg"}


@pytest.mark.parametrize(
    "submission, name, field",
    [
        ("hero-generate-bcdfg", "nightly", "submission id"),  # a one-off RayJob, not a schedule
        ("raysubmit_abc123", "nightly", "submission id"),  # Ray's random default
        ("hero-nightly-29000000-bcdfg", None, "submission id"),  # a RayCronJob tick: no slot in it
        ("hero-weekly-20261122T0000", "nightly", "submission id"),
    ],
)
def test_submission_ids_that_are_not_slot_ids_name_no_run(submission, name, field):
    with pytest.raises(ScheduleError, match=field):
        run_id_from_submission_id(submission, name)


def test_current_submission_id_reads_the_job_supervisor_environment():
    environ = {RAY_JOB_CONFIG_ENV: json.dumps({"metadata": {"job_submission_id": "abc"}})}
    assert current_submission_id(environ) == "abc"
    with pytest.raises(ScheduleError, match=RAY_JOB_CONFIG_ENV):
        current_submission_id({})
    with pytest.raises(ScheduleError, match="job_submission_id"):
        current_submission_id({RAY_JOB_CONFIG_ENV: json.dumps({"metadata": {}})})


def test_the_slot_alone_chooses_the_run_id():
    assert with_run_id(["python", "job.py"], "r") == ["python", "job.py", "--run-id", "r"]
    for command in (["python", "job.py", "--run-id", "x"], ["python", "job.py", "--run-id=x"], []):
        with pytest.raises(ScheduleError, match="command"):
            with_run_id(command, "r")


def test_cli_exits_2_with_the_field_on_bad_input():
    result = run_schedule_cli(["slot-id", "--name", "Bad_Name"], os.environ.copy())
    assert result.returncode == 2
    assert "name 'Bad_Name'" in result.stderr


@pytest.mark.parametrize("kuberay", ["1.6", "1.7"])
def test_exec_runs_the_job_command_with_the_slot_of_its_launch(kuberay):
    tick = at("2026-11-22T02:00Z")
    submission = kuberay_submission_ids("hero-nightly", tick)[kuberay]
    env = dict(os.environ, **{RAY_JOB_CONFIG_ENV: json.dumps(
        {"metadata": {"job_submission_id": submission}}
    )})
    command = [sys.executable, "-c", "import sys; print('argv', sys.argv[1:])"]
    for launched in ("2026-11-22T02:00Z", "2026-11-22T21:40Z"):  # the tick, and a late retry of it
        result = run_schedule_cli(["exec", "--name", "nightly", "--period-minutes", "1440", "--at", launched,
                                   "--", *command], env)
        assert result.returncode == 0, result.stderr
        assert "argv ['--run-id', 'hero-nightly-20261122T0000']" in result.stdout
        assert f"submission {submission}" in result.stdout
    refused = run_schedule_cli(["exec", "--name", "nightly", "--", *command], os.environ.copy())
    assert refused.returncode == 2
    assert RAY_JOB_CONFIG_ENV in refused.stderr


# --- a real Ray head on loopback (the session's, from conftest.py) -----------------------------


def jobs_api(head, path: str):
    """GET from Ray's Jobs REST API with the cluster's bearer token."""
    request = urllib.request.Request(
        f"{head.dashboard}/api/jobs/{path}",
        headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def jobs_by_submission_id(head, prefix: str) -> dict:
    """The head's jobs whose submission id starts with ``prefix``: id -> (status, entrypoint)."""
    return {
        job["submission_id"]: (job["status"], job["entrypoint"])
        for job in jobs_api(head, "")
        if (job.get("submission_id") or "").startswith(prefix)
    }


def job_logs(head, submission_id: str) -> str:
    return jobs_api(head, f"{submission_id}/logs")["logs"]


STAND_IN_GENERATE = """\
# Stands in for jobs/generate.py: records its arguments, dies on its first run, then succeeds.
import pathlib, sys
sys.path.insert(0, {repo!r})
from jobs.scheduled import current_submission_id, run_id_from_submission_id
print("argv", sys.argv[1:])
print("derived", run_id_from_submission_id(current_submission_id()))
marker = pathlib.Path({marker!r})
if not marker.exists():
    marker.write_text("the first attempt died here")
    sys.exit(17)
"""


def cron_checkout(root: Path, marker: Path) -> Path:
    """A checkout holding the real cron script and a stand-in entrypoint; returns the script."""
    script = root / "cluster" / "cron" / "generate-slot.sh"
    script.parent.mkdir(parents=True)
    shutil.copy2(REPO / "cluster" / "cron" / "generate-slot.sh", script)
    (root / "jobs").mkdir()
    shutil.copy2(REPO / "jobs" / "scheduled.py", root / "jobs" / "scheduled.py")
    (root / "jobs" / "generate.py").write_text(
        STAND_IN_GENERATE.format(repo=str(REPO), marker=str(marker))
    )
    return script


@pytest.mark.timeout(600)  # includes starting the session head on a busy machine
def test_cron_script_launches_a_slot_once_and_resumes_a_failed_attempt(ray_head, tmp_path):
    script = cron_checkout(tmp_path / "checkout", tmp_path / "died-once")
    cron_env = dict(
        ray_head.env, RAY_ADDRESS=ray_head.dashboard, HERO_PYTHON=sys.executable,
        HERO_SCHEDULE_NAME="crontest", HERO_AT="2026-11-22T02:00Z",
        HERO_CONFIG="jobs/configs/nightly.yaml", PYTHONPATH=str(REPO),  # the cron host's pipeline
    )
    slot = "hero-crontest-20261122T0000"

    def launch() -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(script)], env=cron_env, capture_output=True, text=True, timeout=180
        )

    first = launch()
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"slot {slot} -> {ray_head.dashboard}" in first.stdout
    assert f"{slot}: {slot} FAILED (exit 17)" in first.stdout
    jobs = jobs_by_submission_id(ray_head, slot)
    assert {key: status for key, (status, _) in jobs.items()} == {
        slot: "FAILED", f"{slot}-r1": "SUCCEEDED"
    }
    for submission, (_, entrypoint) in jobs.items():
        assert entrypoint == (
            f"python jobs/generate.py --config jobs/configs/nightly.yaml --run-id {slot}"
        )
        logs = job_logs(ray_head, submission)
        assert f"argv ['--config', 'jobs/configs/nightly.yaml', '--run-id', '{slot}']" in logs
        assert f"derived {slot}" in logs  # Ray hands each attempt's driver its submission id
    assert ray_head.env["RAY_AUTH_TOKEN"] not in first.stdout + first.stderr

    again = launch()
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{slot}-r1 SUCCEEDED" in again.stdout
    assert jobs_by_submission_id(ray_head, slot) == jobs  # a complete slot launches nothing

    duplicate = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
         "--address", ray_head.dashboard, "--submission-id", slot, "--no-wait",
         "--", "python", "-c", "print('duplicate')"],
        env=ray_head.env, capture_output=True, text=True, timeout=120,
    )
    assert duplicate.returncode != 0
    assert "already exists" in duplicate.stdout + duplicate.stderr
    assert jobs_by_submission_id(ray_head, slot) == jobs

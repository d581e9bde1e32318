"""Scheduled runs: schedule slots -> run ids and Ray submission ids, so a slot runs once.

A slot is a UTC time floored to the schedule's period. Its id, ``hero-<name>-<YYYYmmddTHHMM>``,
is both the run id of the slot's output (re-running it resumes, or is a no-op once complete) and
the Ray submission id of its first attempt; an attempt that failed is followed by ``<slot>-r1``,
``<slot>-r2``, ..., which resume the same run. Ray rejects a reused submission id, so each attempt
launches at most once.

    python jobs/scheduled.py slot-id --name nightly --period-minutes 1440
    python jobs/scheduled.py submit --name nightly --period-minutes 1440 -- python jobs/generate.py ...
    python jobs/scheduled.py exec --name nightly --period-minutes 1440 -- python jobs/generate.py ...

``submit`` is what cron runs. ``exec`` is the entrypoint of a KubeRay RayCronJob: it runs the job
with the run id of the slot its launch time falls in. The slot never depends on how KubeRay names a
tick's RayJob (``<raycronjob>-<5 random>`` up to 1.6, ``<raycronjob>-<unix minutes>`` from 1.7), so
every retry of a tick resumes the same run on both, as long as the tick and its retries fall in one
period (a daily tick at 02:00 UTC with a deadline under 22 hours).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping, Sequence

SLOT_PREFIX = "hero"
STAMP_FORMAT = "%Y%m%dT%H%M"
MAX_NAME_LENGTH = 32
NAME_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
SLOT_ID_PATTERN = re.compile(
    rf"(?P<slot>{SLOT_PREFIX}-(?P<name>[a-z0-9-]+)-(?P<stamp>\d{{8}}T\d{{4}}))"
    r"(?:-r(?P<attempt>[1-9]\d*))?"
)
SLOT_ID_SHAPE = f"{SLOT_PREFIX}-<name>-<YYYYmmddTHHMM>[-r<n>]"
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
RUN_ID_OPTION = "--run-id"

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3


class ScheduleError(ValueError):
    """A slot, name or submission id that cannot be used; the message names the field."""


def check_name(name: str) -> str:
    """Return ``name`` if it can be part of a slot id (a lowercase DNS label of <= 32 chars)."""
    if not (NAME_PATTERN.fullmatch(name) and len(name) <= MAX_NAME_LENGTH and "--" not in name):
        raise ScheduleError(
            f"name {name!r}: must be 1-{MAX_NAME_LENGTH} lowercase letters, digits or single "
            "'-', starting and ending with a letter or digit"
        )
    return name


def slot_time(at: datetime, period_minutes: int = 1) -> datetime:
    """Floor a timezone-aware time to its slot: a multiple of ``period_minutes`` since the epoch.

    A launch that starts late (cron under load, a retried RayJob) still lands in the same slot
    as long as it starts within the period.
    """
    if at.tzinfo is None or at.utcoffset() is None:
        raise ScheduleError(f"at {at.isoformat()!r}: needs a UTC offset (e.g. 2026-11-22T02:00Z)")
    if period_minutes < 1:
        raise ScheduleError(f"period_minutes {period_minutes}: must be >= 1")
    minutes = int(at.timestamp() // 60)
    return datetime.fromtimestamp((minutes - minutes % period_minutes) * 60, tz=timezone.utc)


def slot_id(name: str, at: datetime, period_minutes: int = 1) -> str:
    """The id ``hero-<name>-<YYYYmmddTHHMM>`` (UTC) of the slot containing ``at``."""
    stamp = slot_time(at, period_minutes).strftime(STAMP_FORMAT)
    return f"{SLOT_PREFIX}-{check_name(name)}-{stamp}"


def attempt_id(slot: str, attempt: int) -> str:
    """The Ray submission id of attempt ``attempt`` (0-based) of ``slot``."""
    if attempt < 0:
        raise ScheduleError(f"attempt {attempt}: must be >= 0")
    return slot if attempt == 0 else f"{slot}-r{attempt}"


def parse_slot_id(text: str) -> tuple[str, int]:
    """Split a slot or attempt id into (slot id, attempt number)."""
    match = SLOT_ID_PATTERN.fullmatch(text)
    if match is None:
        raise ScheduleError(f"slot id {text!r}: expected {SLOT_ID_SHAPE}")
    check_name(match["name"])
    try:
        datetime.strptime(match["stamp"], STAMP_FORMAT)
    except ValueError:
        raise ScheduleError(f"slot id {text!r}: {match['stamp']} is not a date and time") from None
    return match["slot"], int(match["attempt"] or 0)


def run_id_from_submission_id(submission_id: str, name: str | None = None) -> str:
    """The run id of a slot or attempt submission id (``<slot>`` or ``<slot>-r<n>``); anything
    else is an error, so an unscheduled submission never invents a run id."""
    match = SLOT_ID_PATTERN.fullmatch(submission_id)
    if match is None:
        raise ScheduleError(f"submission id {submission_id!r}: not a slot id ({SLOT_ID_SHAPE})")
    if name is not None and match["name"] != name:
        raise ScheduleError(f"submission id {submission_id!r}: belongs to schedule {match['name']!r}, not {name!r}")
    return parse_slot_id(submission_id)[0]


def current_submission_id(environ: Mapping[str, str] = os.environ) -> str:
    """The submission id of the Ray job whose driver this is (set by Ray's job supervisor)."""
    raw = environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        raise ScheduleError(f"{RAY_JOB_CONFIG_ENV}: not set; run this as a Ray job's entrypoint")
    submission_id = json.loads(raw).get("metadata", {}).get("job_submission_id")
    if not submission_id:
        raise ScheduleError(f"{RAY_JOB_CONFIG_ENV}: its metadata has no job_submission_id")
    return submission_id


def with_run_id(command: Sequence[str], run_id: str) -> list[str]:
    """``command`` plus ``--run-id <run_id>``; refuses a command that picks its own run id."""
    if not command:
        raise ScheduleError("command: empty; give the job command after '--'")
    if any(arg == RUN_ID_OPTION or arg.startswith(RUN_ID_OPTION + "=") for arg in command):
        raise ScheduleError(f"command: sets {RUN_ID_OPTION} itself; the schedule slot chooses it")
    return [*command, RUN_ID_OPTION, run_id]


def finished_attempt_exit(status: str, driver_exit_code: int | None, observed: bool) -> int | None:
    """What a finished attempt means for its slot: an exit status, or None to try the next attempt.

    SUCCEEDED ends the slot. FAILED moves on to the next attempt (it resumes the run), except a
    driver that exited with status 2 (bad configuration: a retry would fail the same way). An
    attempt stopped by an operator is not fought. Both hold only for an attempt ``observed`` ending
    in this launch: an old FAILED or STOPPED attempt found by a new launch is resumed, because
    launching again is how an operator asks for that.
    """
    if status == "SUCCEEDED":
        return EXIT_OK
    if observed and status == "STOPPED":
        return EXIT_STOPPED
    if observed and status == "FAILED" and driver_exit_code == EXIT_USAGE:
        return EXIT_USAGE
    return None


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass
class SlotSubmitter:
    """Launches a slot's attempts with ``ray job submit`` until one succeeds or attempts run out.

    Each attempt id is looked up before it is submitted and again after: an attempt that exists
    (launched earlier, or concurrently by another launcher) is followed, never submitted twice.
    """

    address: str | None = None
    working_dir: str | None = None
    max_attempts: int = 3
    wait: bool = True
    poll_seconds: float = 5.0
    submit_tries: int = 3
    log: Callable[[str], None] = field(default=_print)

    def submit(self, slot: str, entrypoint: Sequence[str]) -> int:
        """Drive the slot to completion (or leave it to a running attempt); returns exit status."""
        command = with_run_id(entrypoint, parse_slot_id(slot)[0])
        client = self._client()
        for attempt in range(self.max_attempts):
            submission_id = attempt_id(slot, attempt)
            job = self._job(client, submission_id)
            observed = False
            if job is None:
                job = self._submit_attempt(client, slot, attempt, command)
                observed = self.wait
                if job is None:
                    return EXIT_RUN_FAILED
            if not job.status.is_terminal():
                if not self.wait:
                    self.log(f"[schedule] {slot}: {submission_id} is {job.status}; not waiting")
                    return EXIT_OK
                self.log(f"[schedule] {slot}: {submission_id} is {job.status}; following it")
                job = self._wait_terminal(client, submission_id)
                observed = True
            self.log(f"[schedule] {slot}: {submission_id} {job.status}"
                     + (f" (exit {job.driver_exit_code})" if job.driver_exit_code else ""))
            outcome = finished_attempt_exit(str(job.status), job.driver_exit_code, observed)
            if outcome is not None:
                return outcome
        self.log(f"[schedule] {slot}: no success in {self.max_attempts} attempts; "
                 "raise --max-attempts to resume")
        return EXIT_RUN_FAILED

    def _submit_attempt(self, client, slot: str, attempt: int, command: Sequence[str]):
        """Submit one attempt, repeating the submission while no job appears (a dropped request).

        Repeating is safe: a submission id that did reach the cluster is refused the second time.
        """
        submission_id = attempt_id(slot, attempt)
        for _ in range(self.submit_tries):
            self.log(f"[schedule] {slot}: submitting attempt {attempt} as {submission_id}")
            self._ray_job_submit(submission_id, command)
            job = self._job(client, submission_id)
            if job is not None:
                return job
            time.sleep(self.poll_seconds)
        self.log(f"[schedule] {slot}: ray job submit created no job {submission_id}")
        return None

    def _client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    @staticmethod
    def _job(client, submission_id: str):
        """The job's details, or None when no job has this submission id."""
        for job in client.list_jobs():
            if job.submission_id == submission_id:
                return job
        return None

    def _wait_terminal(self, client, submission_id: str):
        while not client.get_job_status(submission_id).is_terminal():
            time.sleep(self.poll_seconds)
        return client.get_job_info(submission_id)

    def _ray_job_submit(self, submission_id: str, command: Sequence[str]) -> None:
        """Run the ``ray job submit`` CLI; the outcome is read back from the cluster."""
        args = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
                "--submission-id", submission_id]
        if self.address:
            args += ["--address", self.address]
        if self.working_dir:
            args += ["--working-dir", self.working_dir]
        if not self.wait:
            args.append("--no-wait")
        subprocess.run([*args, "--", *command], check=False)


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 time with a UTC offset ('Z' allowed)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time ({error})") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``python jobs/scheduled.py`` command line."""
    parser = argparse.ArgumentParser(
        prog="python jobs/scheduled.py", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add_slot_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--name", required=True, help="schedule name, part of every slot id")
        sub.add_argument(
            "--period-minutes", type=int, default=1,
            help="slot length: launch times are floored to a multiple of it (1440: daily)",
        )

    def add_entrypoint(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "entrypoint", nargs=argparse.REMAINDER,
            help="'--' then the job command, without --run-id (the slot supplies it)",
        )

    slot = commands.add_parser("slot-id", help="print the slot id of a time (default: now)")
    add_slot_options(slot)
    slot.add_argument("--at", type=parse_time, help="ISO 8601 time with offset; default now")

    submit = commands.add_parser("submit", help="launch a slot with ray job submit")
    add_slot_options(submit)
    submit.add_argument("--at", type=parse_time, help="a time in the slot; default now")
    submit.add_argument("--address", help="Ray dashboard address (default: $RAY_ADDRESS)")
    submit.add_argument("--working-dir", help="passed to ray job submit --working-dir")
    submit.add_argument(
        "--max-attempts", type=int, default=3, help="attempts per slot, earlier launches included"
    )
    submit.add_argument("--no-wait", action="store_true", help="return once submitted")
    add_entrypoint(submit)

    execute = commands.add_parser(
        "exec", help="as a Ray job's entrypoint: run the command with the --run-id of the slot "
        "its launch time falls in"
    )
    add_slot_options(execute)
    execute.add_argument("--at", type=parse_time, help="the launch time; default now")
    add_entrypoint(execute)
    return parser


def strip_separator(args: Sequence[str]) -> list[str]:
    """Drop the leading '--' that separates our options from the job command."""
    return list(args[1:] if args and args[0] == "--" else args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python jobs/scheduled.py``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "slot-id":
            at = args.at or datetime.now(timezone.utc)
            print(slot_id(args.name, at, args.period_minutes))
            return EXIT_OK
        if args.command == "exec":
            submission_id = current_submission_id()
            launched = args.at or datetime.now(timezone.utc)
            run_id = slot_id(args.name, launched, args.period_minutes)
            command = with_run_id(strip_separator(args.entrypoint), run_id)
            print(f"[schedule] submission {submission_id}, launched {launched.isoformat()} -> run id {run_id}",
                  flush=True)
            os.execvp(command[0], command)
        slot = slot_id(args.name, args.at or datetime.now(timezone.utc), args.period_minutes)
        submitter = SlotSubmitter(
            address=args.address, working_dir=args.working_dir,
            max_attempts=args.max_attempts, wait=not args.no_wait,
        )
        return submitter.submit(slot, strip_separator(args.entrypoint))
    except ScheduleError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

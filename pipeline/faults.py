"""Fault-injection switches the tests set through environment variables (never on by default).

``HERO_FAULT_<NAME>=N`` makes :func:`inject` return True the first N times it is asked about
``name`` across every process of a run; the count lives in files under ``HERO_FAULT_DIR`` (created
exclusively, so two processes never take the same turn). Switches in use:

- ``ACTOR_EXIT``: a generate actor exits mid-unit (after its first model batch);
- ``CORRUPT_UPLOAD``: a shard is uploaded with damaged bytes (its checksum check must catch it);
- ``AUDIT_ERROR``: a generate actor's full-compute audit run fails;
- crash points, where the process SIGKILLs itself at one moment of the commit protocol:
  ``WORKER_AFTER_SHARD`` (a worker, its shard stored, its marker not written),
  ``WORKER_AFTER_MARKER`` (a worker, its unit committed, the record not yet handed back),
  ``DRIVER_AFTER_COMMIT`` (the driver, right after taking a unit's record),
  ``DRIVER_AFTER_SEGMENT`` (the driver, a log segment written, its markers not yet deleted),
  ``DRIVER_BEFORE_INDEX`` (the driver, errors and summary written, the index not).
"""

from __future__ import annotations

import os
import signal

FORWARDED_PREFIX = "HERO_FAULT_"


def inject(name: str) -> bool:
    """True while the switch ``HERO_FAULT_<NAME>`` still has turns left (each call takes one)."""
    turns = int(os.environ.get(f"{FORWARDED_PREFIX}{name.upper()}", "0") or 0)
    state_dir = os.environ.get(f"{FORWARDED_PREFIX}DIR")
    if turns <= 0 or not state_dir:
        return False
    os.makedirs(state_dir, exist_ok=True)
    for turn in range(turns):
        try:
            fd = os.open(os.path.join(state_dir, f"{name.lower()}.{turn}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        return True
    return False


def crash_point(name: str) -> None:
    """SIGKILL this process here while the switch ``HERO_FAULT_<NAME>`` has turns left."""
    if inject(name):
        os.kill(os.getpid(), signal.SIGKILL)


def taken(name: str) -> int:
    """How many turns of switch ``name`` have been taken so far."""
    state_dir = os.environ.get(f"{FORWARDED_PREFIX}DIR")
    if not state_dir or not os.path.isdir(state_dir):
        return 0
    return sum(1 for f in os.listdir(state_dir) if f.startswith(f"{name.lower()}."))

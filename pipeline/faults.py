"""Fault-injection switches the tests set through environment variables (never on by default).

``HERO_FAULT_<NAME>=N`` makes :func:`inject` return True the first N times it is asked about
``name`` across every process of a run; the count lives in files under ``HERO_FAULT_DIR`` (created
exclusively, so two processes never take the same turn). Switches in use:

- ``ACTOR_EXIT``: a generate actor exits mid-unit (after its first model batch);
- ``DRIVER_KILL``: the driver SIGKILLs itself right after committing a unit (a crash mid-run);
- ``CORRUPT_STAGING``: a staged shard is overwritten with damaged bytes before its checksum check;
- ``AUDIT_ERROR``: a generate actor's full-compute audit run fails.
"""

from __future__ import annotations

import os

FORWARDED_PREFIX = "HERO_FAULT_"


def inject(name: str) -> bool:
    """True while the switch ``HERO_FAULT_<NAME>`` still has turns left (each call takes one)."""
    turns = int(os.environ.get(f"HERO_FAULT_{name.upper()}", "0") or 0)
    state_dir = os.environ.get("HERO_FAULT_DIR")
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


def taken(name: str) -> int:
    """How many turns of switch ``name`` have been taken so far."""
    state_dir = os.environ.get("HERO_FAULT_DIR")
    if not state_dir or not os.path.isdir(state_dir):
        return 0
    return sum(1 for f in os.listdir(state_dir) if f.startswith(f"{name.lower()}."))

"""The lease: at most one driver writes to an output prefix at a time.

Leases are numbered epochs, each one file ``_lease/epoch-<n>.json`` made by a create-only write
(``If-None-Match: *`` on S3, a hard link locally: both fail when the name exists), so of two drivers
racing for epoch n + 1 exactly one wins. A driver may take epoch n + 1 only when epoch n is released,
expired, or held by a process that is gone (same host, pid no longer alive). The holder rewrites its
file with a later expiry every ``ttl / 5`` seconds and, at each renewal and before it finalizes,
checks that no later epoch exists; if one does, it lost the lease (it stalled past its expiry) and
stops. The epoch also orders commit records: of two records of one unit, the later epoch's wins.

Expiry compares clocks of different machines: keep them in sync (NTP) to well within the TTL.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import OutputError
from pipeline.sink.layout import LEASE_DIR, LEASE_NAME, is_temp, lease_path
from pipeline.storage import Store, json_bytes

logger = logging.getLogger(__name__)
RENEWALS_PER_TTL = 5


class LeaseHeld(Exception):
    """Another live driver holds the output's lease; rerunning once it has finished resumes."""


class LeaseLost(Exception):
    """This driver's lease was taken over (it stalled past its expiry); it must stop writing."""


@dataclass
class Lease:
    """This driver's claim on an output prefix (see the module docstring)."""

    store: Store
    run_id: str
    ttl_s: float
    epoch: int = 0
    lost: bool = False
    holder: dict[str, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def acquire(self) -> int:
        """Take the next epoch; raise :class:`LeaseHeld` naming the holder if another driver has it."""
        epochs = self._epochs()
        latest = epochs[-1] if epochs else 0
        if latest:
            current = self._read(latest)
            if current.get("run_id") != self.run_id:
                raise OutputError(self.store.url(lease_path(latest)), f"is the lease of run {current.get('run_id')!r}, "
                                                                     f"not {self.run_id!r}")
            if _live(current):
                raise LeaseHeld(f"output {self.store.url()} is being written by another driver ({describe(current)}); "
                                "rerun once it has finished")
        now = time.time()
        self.holder = {"run_id": self.run_id, "epoch": latest + 1, "session": uuid.uuid4().hex,
                       "host": socket.gethostname(), "pid": os.getpid(), "acquired_at": now,
                       "expires_at": now + self.ttl_s, "released": False}
        if not self.store.create(lease_path(latest + 1), json_bytes(self.holder)):
            raise LeaseHeld(f"output {self.store.url()}: another driver took the lease just now; rerun once it has finished")
        self.epoch = latest + 1
        self.store.delete_many(lease_path(e) for e in epochs if e < latest)
        return self.epoch

    def renew(self) -> None:
        """Extend the expiry; raise :class:`LeaseLost` if a later epoch exists."""
        self.check()
        self.holder["expires_at"] = time.time() + self.ttl_s
        self.store.write_bytes(lease_path(self.epoch), json_bytes(self.holder))

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another driver has taken a later epoch."""
        newer = [e for e in self._epochs() if e > self.epoch]
        if self.lost or newer:
            self.lost = True
            raise LeaseLost(f"output {self.store.url()}: lease epoch {self.epoch} was taken over by epoch "
                            f"{max(newer, default=self.epoch)}; this driver stopped writing")

    def release(self) -> None:
        """Mark the epoch released (the file stays: the next driver numbers its epoch after it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.epoch and not self.lost:
            self.holder["released"] = True
            self.store.write_bytes(lease_path(self.epoch), json_bytes(self.holder))

    def keep_alive(self) -> None:
        """Renew in a background thread until :meth:`release`; a lost lease sets ``lost``."""
        def renew_until_released() -> None:
            while not self._stop.wait(self.ttl_s / RENEWALS_PER_TTL):
                try:
                    self.renew()
                except LeaseLost as exc:
                    logger.error("%s", exc)
                    return
                except Exception as exc:  # a failed renewal is retried at the next tick
                    logger.warning("lease renewal failed: %s: %s", type(exc).__name__, exc)

        self._thread = threading.Thread(target=renew_until_released, name="lease", daemon=True)
        self._thread.start()

    def _epochs(self) -> list[int]:
        names = (LEASE_NAME.fullmatch(name) for name in self.store.listdir(LEASE_DIR) if not is_temp(name))
        return sorted(int(match["epoch"]) for match in names if match)

    def _read(self, epoch: int) -> dict[str, Any]:
        try:
            return json.loads(self.store.read_bytes(lease_path(epoch)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OutputError(self.store.url(lease_path(epoch)), "is not a JSON lease record") from None


def describe(holder: dict[str, Any]) -> str:
    remaining = holder.get("expires_at", 0) - time.time()
    return (f"epoch {holder.get('epoch')}, host {holder.get('host')}, pid {holder.get('pid')}, "
            f"lease expires in {max(0.0, remaining):.0f} s")


def _live(holder: dict[str, Any]) -> bool:
    """Whether the holder may still be writing: not released, not expired, not a dead local process."""
    if holder.get("released") or holder.get("expires_at", 0) <= time.time():
        return False
    return holder.get("host") != socket.gethostname() or _pid_alive(int(holder.get("pid", 0)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0

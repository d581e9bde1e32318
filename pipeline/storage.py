"""An output prefix on any fsspec filesystem: retried operations and commit-safe writes.

Object stores have no rename, so nothing here relies on one except on local disks: small files
are single atomic PUTs (a temp file plus ``os.replace`` locally), and publishing a staged object
is copy-then-delete (a rename locally). Transient errors are retried with exponential backoff;
listings are always refreshed, because s3fs caches them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")
logger = logging.getLogger(__name__)
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                    FileExistsError, ValueError, TypeError, KeyError)
TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs")
PERMANENT_NAMES = ("ParamValidationError", "NoCredentialsError", "PartialCredentialsError")  # botocore's, by name


def is_transient(exc: BaseException) -> bool:
    """Whether an object-store error is worth retrying (network trouble, throttling, 5xx)."""
    if isinstance(exc, PERMANENT_ERRORS) or type(exc).__name__ in PERMANENT_NAMES:
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return type(exc).__module__.split(".")[0] in TRANSIENT_MODULES


def is_local_uri(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


class Store:
    """Relative paths (``shards/x.tar``) under one output URI, with retries and atomic small writes."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None,
                 retries: int = 5, backoff_s: float = 0.5) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.retries = retries
        self.backoff_s = backoff_s
        self.transient_errors = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "storage_options": self.storage_options,
                "retries": self.retries, "backoff_s": self.backoff_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel``; refuses anything that would leave the prefix."""
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"refusing path {rel!r}: outside the output prefix")
        return posixpath.join(self.root, rel)

    def url(self, rel: str = "") -> str:
        """A URL readers can open (an absolute path for local output)."""
        path = self.path(rel) if rel else self.root
        return path if self.local else self.fs.unstrip_protocol(path)

    def retry(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn`` and retry transient errors with exponential backoff and jitter."""
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except Exception as exc:
                if attempt == self.retries or not is_transient(exc):
                    raise
                self.transient_errors += 1
                logger.warning("%s: transient %s, retry %d of %d", what, type(exc).__name__, attempt + 1, self.retries)
                self.fs.invalidate_cache()
                time.sleep(self.backoff_s * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object atomically: readers see the old content or the new, never a part."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        self.retry(f"write {rel}", self.fs.pipe_file, path, data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())

    def read_bytes(self, rel: str) -> bytes:
        return self.retry(f"read {rel}", self.fs.cat_file, self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self.retry(f"stat {rel}", self.fs.exists, path)

    def listdir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (fresh listing, never a cached one); [] if it is absent."""
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        try:
            entries = self.retry(f"list {rel}", lambda: self.fs.ls(path, detail=False, refresh=True))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def upload(self, local_path: str, rel: str) -> None:
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.retry(f"upload {rel}", self.fs.put_file, local_path, path)

    def sha256(self, rel: str) -> str:
        """Checksum of the stored object, read back from storage."""
        def digest() -> str:
            hasher = hashlib.sha256()
            with self.fs.open(self.path(rel), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    hasher.update(chunk)
            return hasher.hexdigest()

        return self.retry(f"checksum {rel}", digest)

    def size(self, rel: str) -> int:
        path = self.path(rel)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return int(self.retry(f"stat {rel}", self.fs.size, path))

    def publish(self, src_rel: str, dst_rel: str) -> None:
        """Move a staged object to its final name: rename locally, copy-then-delete on object stores."""
        src, dst = self.path(src_rel), self.path(dst_rel)
        if self.local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
            return
        self.retry(f"copy {src_rel}", self.fs.copy, src, dst)
        self.delete(src_rel)

    def delete(self, rel: str) -> None:
        try:
            self.retry(f"delete {rel}", self.fs.rm_file, self.path(rel))
        except FileNotFoundError:
            pass

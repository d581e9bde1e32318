"""An output prefix on any fsspec filesystem: retried operations, atomic and create-only writes,
checksummed uploads, fresh listings that never follow links.

Object stores have no rename, so nothing here relies on one except on local disks: small files are
single atomic PUTs (a temp file plus ``os.replace`` locally), create-only writes are conditional
PUTs (``If-None-Match: *`` on S3; ``os.link`` of a finished temp file locally, which fails if the
name exists), and an upload is verified by the store's own checksum of what it received (S3's ETag,
the MD5 of a single-part upload, and ``x-amz-checksum-sha256``) instead of reading it back.
Transient errors are retried with exponential backoff; listings are always refreshed, because
s3fs caches them. Locally, no write or delete goes through a symbolic link inside the prefix.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")
logger = logging.getLogger(__name__)
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                    FileExistsError, ValueError, TypeError, KeyError)
TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs")
PERMANENT_NAMES = ("ParamValidationError", "NoCredentialsError", "PartialCredentialsError")  # botocore's, by name
SINGLE_PUT_LIMIT = 5 * 2**30  # S3's limit for one PUT; shards are always one PUT


def is_transient(exc: BaseException) -> bool:
    """Whether an object-store error is worth retrying (network trouble, throttling, 5xx)."""
    if isinstance(exc, PERMANENT_ERRORS) or type(exc).__name__ in PERMANENT_NAMES:
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return type(exc).__module__.split(".")[0] in TRANSIENT_MODULES


def is_local_uri(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


class ChecksumMismatch(OSError):
    """The store holds different bytes than were sent (its checksum disagrees with ours)."""


@dataclass(frozen=True)
class Entry:
    """One name in a listing: ``kind`` is ``file``, ``dir`` or ``link`` (a symbolic link, never
    followed); ``etag`` is the store's checksum of a file where it keeps one (S3), else None."""

    name: str
    kind: str
    size: int
    mtime: float
    etag: str | None = None


@dataclass(frozen=True)
class Digest:
    """The checksums of a payload, computed once: sha256 (recorded) and MD5 (what S3 reports)."""

    sha256: str
    md5: str
    size: int

    @classmethod
    def of(cls, data: bytes) -> "Digest":
        return cls(hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest(), len(data))


class Store:
    """Relative paths (``shards/x.tar``) under one output URI, with retries and safe writes."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None,
                 retries: int = 5, backoff_s: float = 0.5) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.s3 = "s3" in tuple(self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,))
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

    def retry(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` and retry transient errors with exponential backoff and jitter."""
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if attempt == self.retries or not is_transient(exc):
                    raise
                self.transient_errors += 1
                logger.warning("%s: transient %s, retry %d of %d", what, type(exc).__name__, attempt + 1, self.retries)
                self.fs.invalidate_cache()
                time.sleep(self.backoff_s * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def check_location(self) -> None:
        """Raise before any work if the prefix cannot hold a run: a local path that is a file
        (NotADirectoryError), a bucket that does not exist (FileNotFoundError)."""
        if self.local:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise NotADirectoryError(f"{self.root} is a file, not a folder")
            return
        bucket = self.root.split("/", 1)[0]
        if not self.retry(f"stat {bucket}", self.fs.exists, bucket):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist")

    # --- local safety -----------------------------------------------------------------------

    def _local_target(self, rel: str) -> str:
        """The local path of ``rel`` after checking that no folder between the prefix and it is a
        symbolic link (a write or delete must never land outside the prefix)."""
        path = self.path(rel)
        folder = self.root
        for part in rel.split("/")[:-1]:
            folder = os.path.join(folder, part)
            if os.path.islink(folder):
                raise ValueError(f"refusing {path}: {folder} is a symbolic link")
        return path

    def _local_write(self, rel: str, data: bytes) -> str:
        """Write ``data`` to a fresh temp file beside ``rel`` (fsynced); return the temp path."""
        path = self._local_target(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    # --- writes -----------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object atomically: readers see the old content or the new, never a part."""
        if self.local:
            tmp = self._local_write(rel, data)
            os.replace(tmp, self.path(rel))
            return
        self.retry(f"write {rel}", self.fs.pipe_file, self.path(rel), data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json_bytes(obj))

    def create(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if no object has that name (atomically).

        True when the object now holds ``data`` (this call wrote it, or an earlier attempt of the
        same write did), False when another writer's object is there.
        """
        try:
            self._create(rel, data)
            return True
        except FileExistsError:
            return self.read_bytes(rel) == data

    def _create(self, rel: str, data: bytes) -> dict[str, Any]:
        if self.local:
            tmp = self._local_write(rel, data)
            try:
                os.link(tmp, self.path(rel))
            finally:
                os.unlink(tmp)
            return {}
        if self.s3:
            return self.retry(f"create {rel}", self.fs.pipe_file, self.path(rel), data, mode="create",
                              chunksize=SINGLE_PUT_LIMIT) or {}
        if self.exists(rel):  # a store without conditional writes: best effort
            raise FileExistsError(self.url(rel))
        self.retry(f"write {rel}", self.fs.pipe_file, self.path(rel), data)
        return {}

    def put_verified(self, rel: str, payload: bytes, digest: Digest) -> str | None:
        """Create ``rel`` (create-only) from ``payload`` and check that the store holds exactly the
        bytes ``digest`` describes; return the store's checksum of the object (its ETag on S3).

        The check uses what the store computed on receipt (S3: the single-part ETag is the MD5,
        and ``ChecksumSHA256`` makes S3 itself reject a damaged upload); locally, or on a store
        that reports neither, the object is read back. A mismatch deletes the object and raises
        :class:`ChecksumMismatch`.
        """
        if len(payload) > SINGLE_PUT_LIMIT:
            raise ValueError(f"{rel}: {len(payload)} bytes is more than one PUT can hold; use smaller shards")
        extra = {"ChecksumSHA256": base64.b64encode(bytes.fromhex(digest.sha256)).decode()} if self.s3 else {}
        try:
            response = self._create_checked(rel, payload, extra)
        except FileExistsError:  # an earlier attempt of this very upload got through
            response = {}
        etag = str(response.get("ETag") or self.entry(rel).etag or "").strip('"') or None
        if self.s3 and (etag == digest.md5 or response.get("ChecksumSHA256") == extra["ChecksumSHA256"]):
            return etag
        if self.sha256(rel) == digest.sha256 and self.size(rel) == digest.size:
            return etag
        self.delete(rel)
        raise ChecksumMismatch(f"{self.url(rel)}: stored bytes differ from the {digest.size} bytes sent")

    def _create_checked(self, rel: str, payload: bytes, extra: dict[str, str]) -> dict[str, Any]:
        if self.s3:
            return self.retry(f"upload {rel}", self.fs.pipe_file, self.path(rel), payload, mode="create",
                              chunksize=SINGLE_PUT_LIMIT, **extra) or {}
        return self._create(rel, payload)

    # --- reads ------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        return self.retry(f"read {rel}", self.fs.cat_file, self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_many(self, rels: Iterable[str], workers: int) -> Iterable[tuple[str, bytes]]:
        """``(rel, bytes)`` of every object in ``rels``, fetched ``workers`` at a time."""
        rels = list(rels)
        if len(rels) <= 1 or workers <= 1:
            yield from ((rel, self.read_bytes(rel)) for rel in rels)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read") as pool:
            yield from zip(rels, pool.map(self.read_bytes, rels))

    def open(self, rel: str):
        return self.fs.open(self.path(rel), "rb")

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self.retry(f"stat {rel}", self.fs.exists, path)

    def sha256(self, rel: str) -> str:
        """Checksum of the stored object, read back from storage (for stores that report none)."""
        def digest() -> str:
            hasher = hashlib.sha256()
            with self.fs.open(self.path(rel), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    hasher.update(chunk)
            return hasher.hexdigest()

        return self.retry(f"checksum {rel}", digest)

    def size(self, rel: str) -> int:
        return self.entry(rel).size

    def entry(self, rel: str) -> Entry:
        """The listing entry of one object (a fresh stat)."""
        path = self.path(rel)
        if self.local:
            return _local_entry(os.path.basename(path), os.stat(path, follow_symlinks=False))
        self.fs.invalidate_cache(posixpath.dirname(path))
        return _remote_entry(self.retry(f"stat {rel}", self.fs.info, path))

    def entries(self, rel: str = "") -> list[Entry]:
        """Everything directly under ``rel`` (the prefix itself when empty), sorted by name, from a
        fresh listing; [] when it does not exist. Symbolic links are reported, never followed."""
        path = self.path(rel) if rel else self.root
        if self.local:
            try:
                with os.scandir(path) as found:
                    return sorted((_local_entry(e.name, e.stat(follow_symlinks=False)) for e in found),
                                  key=lambda e: e.name)
            except (FileNotFoundError, NotADirectoryError):
                return []
        self.fs.invalidate_cache(path)
        try:
            listed = self.retry(f"list {rel or '.'}", lambda: self.fs.ls(path, detail=True, refresh=True))
        except FileNotFoundError:
            return []
        entries = [_remote_entry(item) for item in listed if item["name"].rstrip("/") != path]
        return sorted(entries, key=lambda e: e.name)

    def listdir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (fresh listing); [] if it is absent."""
        return [e.name for e in self.entries(rel)]

    # --- deletes ----------------------------------------------------------------------------

    def delete(self, rel: str) -> None:
        self.delete_many([rel])

    def delete_many(self, rels: Iterable[str]) -> None:
        """Delete objects (missing ones are fine): batched on object stores (one request per
        thousand keys on S3); locally never through a symbolic link."""
        rels = list(rels)
        if not rels:
            return
        if self.local:
            for rel in rels:
                try:
                    os.unlink(self._local_target(rel))
                except FileNotFoundError:
                    pass
            return
        paths = [self.path(rel) for rel in rels]
        try:
            self.retry(f"delete {len(paths)} objects", self.fs.rm, paths)
        except FileNotFoundError:
            pass


def json_bytes(obj: Any) -> bytes:
    """The one JSON encoding of every small file a run writes (sorted keys, no NaN)."""
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _local_entry(name: str, stat: os.stat_result) -> Entry:
    import stat as stat_module

    kind = ("link" if stat_module.S_ISLNK(stat.st_mode) else "dir" if stat_module.S_ISDIR(stat.st_mode)
            else "file")
    return Entry(name, kind, int(stat.st_size), float(stat.st_mtime))


def _remote_entry(item: dict[str, Any]) -> Entry:
    modified = item.get("LastModified") or item.get("mtime") or item.get("updated")
    mtime = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0.0)
    etag = str(item["ETag"]).strip('"') if item.get("ETag") else None
    kind = "dir" if item.get("type") == "directory" else "file"
    return Entry(posixpath.basename(item["name"].rstrip("/")), kind, int(item.get("size") or 0), mtime, etag)

"""A unit's shard, both ways: its samples written as one reproducible USTAR file by the worker that
encoded them, stored under a name unique to the attempt and verified by the store's own checksum,
with its metadata table beside it (:func:`pipeline.schema.shard_metadata`); and the sink's reader,
which gives a stored shard's samples back."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline import faults
from pipeline.samples import FIELDS
from pipeline.schema import metadata_path, shard_metadata
from pipeline.sink.layout import shard_path
from pipeline.storage import ChecksumMismatch, Digest, Store

CHECKSUM_ATTEMPTS = 3
Sample = tuple[str, dict[str, bytes]]


class ShardCommitError(RuntimeError):
    """A shard could not be stored intact (the store's checksum never matched); the unit stays
    uncommitted."""


@dataclass(frozen=True)
class StoredShard:
    """Where a unit's shard went and what the store holds: sha256 and size of the bytes, the
    store's checksum (S3 ETag; None locally) and how many uploads were damaged on the way."""

    path: str
    sha256: str
    filesize: int
    etag: str | None
    checksum_failures: int

    @property
    def files(self) -> tuple[str, str]:
        """The shard and its metadata table."""
        return self.path, metadata_path(self.path)


def tar_bytes(samples: list[Sample]) -> bytes:
    """Samples as a byte-for-byte reproducible USTAR file.

    Member names stay in the 100-byte name field (keys are at most 80 characters), which is the
    only field ``wids``' memory-mapped tar reader looks at.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for name in FIELDS:
                data = files[name]
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_shard(store: Store, run_id: str, unit: int, samples: list[Sample]) -> StoredShard:
    """The per-shard write path: store unit ``unit``'s samples as one shard, create-only under a
    name no other attempt uses, checked against the store's checksum (a damaged upload is deleted
    and sent again under a new name), then its metadata table beside it."""
    data = tar_bytes(samples)
    digest = Digest.of(data)
    for failures in range(CHECKSUM_ATTEMPTS):
        rel = shard_path(run_id, unit, uuid.uuid4().hex[:8])
        payload = _damaged(data) if faults.inject("corrupt_upload") else data
        try:
            etag = store.put_verified(rel, payload, digest)
        except ChecksumMismatch:
            continue
        shard = StoredShard(rel, digest.sha256, digest.size, etag, failures)
        store.write_bytes(metadata_path(rel), shard_metadata(samples))
        return shard
    raise ShardCommitError(f"unit {unit}: the stored shard's checksum did not match in {CHECKSUM_ATTEMPTS} uploads")


def _damaged(data: bytes) -> bytes:
    """``data`` with its first 512 bytes zeroed (the fault ``CORRUPT_UPLOAD`` stores this)."""
    return b"\0" * min(len(data), 512) + data[512:]


def read_samples(store: Store, rel: str) -> Iterator[Sample]:
    """The samples of a stored shard, in order: ``(key, {field: bytes})``, read with webdataset's
    own tar iterator (the one the training loaders use)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with store.open(rel) as stream:
        for sample in group_by_keys(tar_file_expander([{"stream": stream, "url": store.url(rel)}])):
            yield sample["__key__"], {name.lstrip("."): value for name, value in sample.items()
                                      if not name.startswith("__")}

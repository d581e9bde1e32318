"""Reading a run's shards back for training: whole clips or fixed-length windows as a streaming
webdataset pipeline (a torch IterableDataset), and random access through ``wids``; all follow
``index.json``, never a glob, and verify every shard against it before using it.

    from pipeline.loader import collate_windows, rollout_windows
    windows = rollout_windows("s3://bucket/rollouts/run-1", length=16, stride=8, shuffle=256)
    loader = torch.utils.data.DataLoader(windows, batch_size=8, collate_fn=collate_windows, num_workers=2)

A clip decodes to torch tensors: ``rgb`` (T, 3, H, W) uint8, ``depth`` (T, 1, H, W) float32,
``k`` (T, 3, 3), ``c2w`` (T, 4, 4), ``commanded_c2w`` (T, 4, 4), ``actions`` (T, 6), plus
``depth_is_metric``, ``meta`` and ``__key__``; ``fields`` picks which arrays are decoded at all.
The conventions (units, frames, what an action is) are in ``<run>/schema.json``
(:mod:`pipeline.schema`); object stores are opened through fsspec (webdataset cannot open
``s3://`` itself).

Verification: each shard is read whole (into a spooled temporary file) and checked against the
index, sha256 and size, then its tar headers are read and its complete samples counted against
``nsamples``, before any of its samples is used. A shard that fails raises :class:`ShardError`
naming it, or with ``on_error="skip"`` is left out and reported (a warning on the
``pipeline.loader`` logger).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from hero.models.base import pose_deltas
from pipeline.samples import ARRAYS, FIELDS, FILES_OF, LEGACY_DEPTH_FIELD, SCHEMA_VERSION, decode_sample
from pipeline.schema import SCHEMA_FILE, metadata_path
from pipeline.sink import INDEX_FILE
from pipeline.storage import is_local_uri

logger = logging.getLogger(__name__)
ON_ERROR = ("raise", "skip")
SPOOL_BYTES = 64 << 20  # shards up to this size are verified in memory, larger ones in a temporary file
WINDOW_ARRAYS = ("rgb", "depth", "k", "c2w", "commanded_c2w", "actions")


class ShardError(RuntimeError):
    """A shard that does not match the run's index (missing, truncated, corrupt, wrong count)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"shard {url}: {reason}")
        self.url = url
        self.reason = reason


def read_index(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's wids index (written last by the run, so every listed shard is complete)."""
    with fsspec.open(_join(output, INDEX_FILE), "rb", **(storage_options or {})) as f:
        return json.load(f)


def read_schema(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The run's ``schema.json`` (fields, units, conventions), or None for runs written before it
    existed; refuses a run in a sample format newer than this reader."""
    try:
        with fsspec.open(_join(output, SCHEMA_FILE), "rb", **(storage_options or {})) as f:
            schema = json.load(f)
    except FileNotFoundError:
        return None
    version = int(schema.get("format_version", 1))
    if version > SCHEMA_VERSION:
        raise ValueError(f"{_join(output, SCHEMA_FILE)}: sample format {version} is newer than this reader "
                         f"(format {SCHEMA_VERSION}); upgrade hero-rollouts")
    return schema


def read_metadata(output: str, storage_options: dict[str, Any] | None = None):
    """Every shard's per-sample metadata (the ``.parquet`` beside each shard) as one pyarrow Table with
    a ``shard`` column, for choosing samples without opening a tar (runs before it: an empty table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for shard in read_index(output, storage_options)["shardlist"]:
        try:
            with fsspec.open(_join(output, metadata_path(shard["url"])), "rb", **(storage_options or {})) as f:
                table = pq.read_table(f)
        except FileNotFoundError:
            continue
        tables.append(table.append_column("shard", pa.array([shard["url"]] * table.num_rows)))
    return pa.concat_tables(tables) if tables else pa.table({})


def shard_urls(output: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Absolute URLs of the indexed shards, in index order."""
    return [_join(output, shard["url"]) for shard in read_index(output, storage_options)["shardlist"]]


def _join(output: str, rel: str) -> str:
    if "://" in rel or rel.startswith("/"):
        return rel
    return posixpath.join(output.rstrip("/"), rel)


def _expected(output: str, storage_options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Index entries by absolute shard URL."""
    return {_join(output, shard["url"]): shard for shard in read_index(output, storage_options)["shardlist"]}


def verify_shard(stream: IO[bytes], url: str, expected: dict[str, Any]) -> None:
    """Check a whole shard (a seekable stream at its start) against its index entry: size and
    sha256 where the index has them, then a readable tar whose complete samples number ``nsamples``.
    Raises :class:`ShardError` naming the shard; leaves the stream at its start."""
    hasher, size = hashlib.sha256(), 0
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        hasher.update(chunk)
        size += len(chunk)
    stream.seek(0)
    if expected.get("filesize") and size != expected["filesize"]:
        raise ShardError(url, f"{size} bytes, the index says {expected['filesize']} (truncated or replaced)")
    if expected.get("sha256") and hasher.hexdigest() != expected["sha256"]:
        raise ShardError(url, f"sha256 {hasher.hexdigest()[:16]}... differs from the index's {expected['sha256'][:16]}...")
    try:
        with tarfile.open(fileobj=stream, mode="r:") as tar:
            names = tar.getnames()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(url, f"not a readable tar ({type(exc).__name__}: {exc})") from None
    finally:
        stream.seek(0)
    members: dict[str, set[str]] = {}
    for name in names:
        key, _, field = name.partition(".")
        members.setdefault(key, set()).add(field)
    incomplete = sorted(key for key, fields in members.items() if not _complete(fields))
    if incomplete:
        raise ShardError(url, f"incomplete samples {incomplete[:3]} (a member is missing)")
    if len(members) != expected["nsamples"]:
        raise ShardError(url, f"{len(members)} samples, the index says {expected['nsamples']}")


def _complete(fields: set[str]) -> bool:
    """Whether a sample has every file of its format (format 1 stored depth as depth.npz)."""
    legacy = (set(FIELDS) - {"depth.mkv"}) | {LEGACY_DEPTH_FIELD}
    return set(FIELDS) <= fields or legacy <= fields


def _verified_shards(sources: Iterable[dict[str, Any]], expected: dict[str, dict[str, Any]],
                     storage_options: dict[str, Any], on_error: str) -> Iterator[dict[str, Any]]:
    """Pipeline stage: open each shard URL through fsspec (local paths, s3://, ...), verify it whole,
    and pass it on as a seekable stream; a bad shard raises or (``skip``) is reported and left out."""
    for source in sources:
        url = source["url"]
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        try:
            try:
                with fsspec.open(url, "rb", **storage_options) as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        spool.write(chunk)
            except FileNotFoundError:
                raise ShardError(url, "missing (listed in the index, not in storage)") from None
            spool.seek(0)
            verify_shard(spool, url, expected[url])
        except ShardError as exc:
            spool.close()
            if on_error == "raise":
                raise
            logger.warning("skipping %s", exc)
            continue
        yield dict(source, stream=spool)
        spool.close()  # the tar expander has read the whole shard by the time it asks for the next


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: {on_error!r} is not one of {ON_ERROR}")


def _wanted_files(fields: Iterable[str]) -> set[str]:
    """Tar members a reader of ``fields`` needs (the rest are never read into memory)."""
    wanted = {"meta.json"} | {FILES_OF[name] for name in fields}
    if "depth.mkv" in wanted:
        wanted.add(LEGACY_DEPTH_FIELD)
    return wanted


def to_tensors(sample: dict[str, Any], fields: Iterable[str] = ARRAYS) -> dict[str, Any]:
    """Raw sample files (bytes or streams, keys with or without a leading dot) to torch tensors."""
    files = {name.lstrip("."): (value.read() if hasattr(value, "read") else value)
             for name, value in sample.items() if not name.startswith("__")}
    decoded = decode_sample(files, fields)
    out: dict[str, Any] = {"__key__": sample["__key__"], "depth_is_metric": decoded["depth_is_metric"],
                           "meta": decoded["meta"]}
    for name in ARRAYS:
        if name in decoded:
            out[name] = torch.from_numpy(np.ascontiguousarray(decoded[name]))
    if "rgb" in out:
        out["rgb"] = out["rgb"].permute(0, 3, 1, 2).contiguous()
    if "depth" in out:
        out["depth"] = out["depth"][:, None]
    return out


def _file_stages(output: str, *, shuffle_shards: bool, seed: int, storage_options: dict[str, Any] | None,
                 split: bool, fields: Iterable[str], on_error: str) -> list[Any]:
    """The shared front of every pipeline: index -> (shuffled) shards -> node/worker split ->
    verified streams -> samples (the files ``fields`` need, as bytes)."""
    _check_on_error(on_error)
    options = storage_options or {}
    expected = _expected(output, options)
    stages: list[Any] = [wds.SimpleShardList(list(expected))]
    if shuffle_shards:
        stages.append(wds.detshuffle(bufsize=max(len(expected), 1), seed=seed))
    if split:
        stages += [wds.split_by_node, wds.split_by_worker]
    wanted = _wanted_files(fields)
    stages += [functools.partial(_verified_shards, expected=expected, storage_options=options, on_error=on_error),
               functools.partial(tar_file_expander, select_files=lambda name: name.partition(".")[2] in wanted),
               group_by_keys]
    return stages


def rollout_files(output: str, *, storage_options: dict[str, Any] | None = None,
                  on_error: str = "raise") -> wds.DataPipeline:
    """Every sample of the run at ``output`` as its raw, verified files (``{"__key__", "rgb.mp4",
    ...: bytes}``), in index order, undivided: for tools that copy files as they are (exports)."""
    return wds.DataPipeline(*_file_stages(output, shuffle_shards=False, seed=0, storage_options=storage_options,
                                          split=False, fields=ARRAYS, on_error=on_error))


def _clip_stages(output: str, *, shuffle_shards: bool, seed: int, storage_options: dict[str, Any] | None,
                 split: bool, fields: Iterable[str], on_error: str) -> list[Any]:
    """Verified samples decoded to tensors of ``fields``."""
    fields = tuple(fields)
    return _file_stages(output, shuffle_shards=shuffle_shards, seed=seed, storage_options=storage_options,
                        split=split, fields=fields, on_error=on_error) + [
        wds.map(functools.partial(to_tensors, fields=fields))]


def rollout_dataset(output: str, *, shuffle: int = 0, seed: int = 0, storage_options: dict[str, Any] | None = None,
                    split: bool = True, fields: Iterable[str] = ARRAYS, on_error: str = "raise") -> wds.DataPipeline:
    """A torch IterableDataset of whole clips from the run at ``output`` (``.schema`` holds its
    schema.json, None for older runs).

    ``shuffle`` > 0 shuffles the shard order (seeded) and clips in a buffer of that size. With
    ``split``, shards are divided across nodes (torch.distributed) and DataLoader workers.
    """
    schema = read_schema(output, storage_options)
    stages = _clip_stages(output, shuffle_shards=bool(shuffle), seed=seed, storage_options=storage_options,
                          split=split, fields=fields, on_error=on_error)
    if shuffle:
        stages.insert(-1, wds.shuffle(shuffle, rng=random.Random(seed)))  # shuffle files, decode after
    dataset = wds.DataPipeline(*stages)
    dataset.schema = schema
    return dataset


def window_starts(frames: int, length: int, stride: int, frame_step: int) -> range:
    """First frames of the windows of a clip: every ``stride`` frames while ``length`` frames
    ``frame_step`` apart fit (none when the clip is shorter than one window)."""
    return range(0, frames - (length - 1) * frame_step, stride)


def clip_windows(clip: dict[str, Any], length: int, stride: int, frame_step: int) -> Iterator[dict[str, Any]]:
    """Cut one decoded clip into windows of ``length`` frames, ``frame_step`` apart.

    Poses are re-expressed relative to the window's first frame (c2w[0] = identity, as for clips);
    ``actions[i]`` is the command from window frame i to i+1 (``frame_step`` clip frames, composed
    from the path the actions came from; zero after the clip's last frame); ``timestamp`` is
    seconds from the clip's start at its ``fps``.
    """
    meta = clip["meta"]
    frames = int(meta["frames"])
    fps = float(meta.get("fps") or 1.0)
    for start in window_starts(frames, length, stride, frame_step):
        frames_of = slice(start, start + (length - 1) * frame_step + 1, frame_step)  # views, not copies
        index = torch.arange(frames_of.start, frames_of.stop, frame_step)
        window: dict[str, Any] = {"__key__": clip["__key__"], "start": start, "frame_index": index,
                                  "timestamp": index.float() / fps, "fps": fps,
                                  "depth_is_metric": clip["depth_is_metric"], "meta": meta}
        for name in ("rgb", "depth", "k"):
            if name in clip:
                window[name] = clip[name][frames_of]
        for name in ("c2w", "commanded_c2w"):
            if name in clip:
                window[name] = _rebase(clip[name][frames_of])
        if "actions" in clip:
            window["actions"] = _window_actions(clip, index, frame_step, frames)
        yield window


def _rebase(c2w: torch.Tensor) -> torch.Tensor:
    """Poses relative to the first one (NaN poses, a path that was never commanded, stay NaN)."""
    return torch.linalg.inv(c2w[0]) @ c2w if torch.isfinite(c2w).all() else c2w


def _window_actions(clip: dict[str, Any], index: torch.Tensor, frame_step: int, frames: int) -> torch.Tensor:
    """Commands between consecutive window frames, from the path the clip's actions came from."""
    commanded = clip.get("commanded_c2w")
    path = commanded if commanded is not None and torch.isfinite(commanded).all() else clip["c2w"]
    after = min(int(index[-1]) + frame_step, frames - 1)
    poses = path[torch.cat([index, torch.tensor([after])])].double().numpy()
    return torch.from_numpy(pose_deltas(poses)[1:])


def rollout_windows(output: str, length: int, *, stride: int | None = None, frame_step: int = 1,
                    shuffle: int = 0, seed: int = 0, storage_options: dict[str, Any] | None = None,
                    split: bool = True, fields: Iterable[str] = WINDOW_ARRAYS,
                    on_error: str = "raise") -> wds.DataPipeline:
    """A torch IterableDataset of fixed-length windows across every clip of the run at ``output``.

    Each clip gives windows of ``length`` frames ``frame_step`` apart, starting every ``stride``
    frames (default ``length``: no overlap); clips too short for one window give none.
    ``shuffle`` > 0 shuffles shards and then windows in a buffer of that many, so a batch mixes
    clips (a buffer of a few clips' worth of windows or more). Poses and actions need the camera:
    asking for ``actions`` decodes ``c2w``/``commanded_c2w`` too. Batch with :func:`collate_windows`.
    """
    if length < 1 or frame_step < 1 or (stride is not None and stride < 1):
        raise ValueError(f"windows: length ({length}), stride ({stride}) and frame_step ({frame_step}) must be >= 1")
    fields = tuple(fields)
    decoded = set(fields) | ({"c2w", "commanded_c2w"} if "actions" in fields else set())
    schema = read_schema(output, storage_options)
    stages = _clip_stages(output, shuffle_shards=bool(shuffle), seed=seed, storage_options=storage_options,
                          split=split, fields=[name for name in ARRAYS if name in decoded], on_error=on_error)
    cut = functools.partial(clip_windows, length=length, stride=stride or length, frame_step=frame_step)
    stages.append(lambda clips: (window for clip in clips for window in cut(clip)))
    stages.append(wds.map(functools.partial(_keep, fields=fields)))
    if shuffle:
        stages.append(wds.shuffle(shuffle, rng=random.Random(seed)))
    dataset = wds.DataPipeline(*stages)
    dataset.schema = schema
    return dataset


def _keep(window: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """Drop arrays decoded only to derive others (poses for actions)."""
    return {name: value for name, value in window.items() if name not in ARRAYS or name in fields}


def collate_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch windows (a DataLoader ``collate_fn``): arrays stacked to (B, L, ...), ``start``, ``fps``
    and ``depth_is_metric`` as tensors, ``__key__`` and ``meta`` as lists."""
    batch: dict[str, Any] = {"__key__": [w["__key__"] for w in windows], "meta": [w["meta"] for w in windows]}
    for name in ("start", "fps", "depth_is_metric"):
        batch[name] = torch.tensor([w[name] for w in windows])
    for name in ("frame_index", "timestamp", *ARRAYS):
        if name in windows[0]:
            shapes = {tuple(w[name].shape) for w in windows}
            if len(shapes) > 1:
                raise ValueError(f"collate_windows: '{name}' has shapes {sorted(shapes)} across the batch; "
                                 "batch clips of one resolution together")
            batch[name] = torch.stack([w[name] for w in windows])
    return batch


class _VerifiedShards:
    """wids' shard cache with verification: a shard is checked against the index when it is first
    copied into the cache; a bad copy is deleted (so a retry fetches it again) and raises."""

    def __init__(self, cache, expected: dict[str, dict[str, Any]]) -> None:
        self.cache = cache
        self.expected = expected
        self.verified: set[str] = set()

    def get_shard(self, url: str):
        if url not in self.verified:
            local = self.cache.localname(url)
            from wids.wids_dl import download_and_open

            try:
                with download_and_open(url, local) as stream:
                    verify_shard(stream, url, self.expected[url])
            except ShardError:
                if os.path.exists(local):
                    os.remove(local)
                raise
            except FileNotFoundError:
                raise ShardError(url, "missing (listed in the index, not in storage)") from None
            self.verified.add(url)
        return self.cache.get_shard(url)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


def random_access(output: str, *, cache_dir: str | None = None, storage_options: dict[str, Any] | None = None,
                  fields: Iterable[str] = ARRAYS, on_error: str = "raise"):
    """A map-style ``wids.ShardListDataset`` of whole clips (``dataset[i]``, ``len(dataset)``).

    wids copies shards into ``cache_dir`` on first use (for object stores through fsspec: wids' own
    ``s3`` handler needs the aws CLI). With ``on_error="raise"`` each shard is verified when first
    used; with ``"skip"`` every shard is fetched and verified up front and the bad ones are left
    out of the dataset (reported), so indices stay dense.
    """
    import wids
    from wids import wids_dl

    _check_on_error(on_error)
    options = storage_options or {}
    if not is_local_uri(output):
        scheme = output.split("://", 1)[0]
        wids_dl.default_cmds[scheme] = lambda remote, local: fsspec.filesystem(scheme, **options).get_file(remote, local)
    base = output.rstrip("/") if not is_local_uri(output) else output.removeprefix("file://").rstrip("/")
    index = read_index(output, options)

    def build(shardlist: list[dict[str, Any]]):
        description = io.BytesIO(json.dumps(dict(index, shardlist=shardlist)).encode())
        dataset = wids.ShardListDataset(description, base=base, cache_dir=cache_dir,
                                        transformations=[functools.partial(to_tensors, fields=tuple(fields))])
        dataset.cache = _VerifiedShards(dataset.cache, {shard["url"]: shard for shard in dataset.shards})
        return dataset

    dataset = build(index["shardlist"])
    if on_error == "skip":
        good = []
        for entry, resolved in zip(index["shardlist"], dataset.shards):
            try:
                dataset.cache.get_shard(resolved["url"])
                good.append(entry)
            except ShardError as exc:
                logger.warning("skipping %s", exc)
        dataset = build(good)
    dataset.schema = read_schema(output, options)
    return dataset

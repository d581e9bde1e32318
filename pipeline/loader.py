"""Reading a run's shards back for training: a streaming webdataset pipeline (a torch
IterableDataset) and random access through ``wids``, both following ``index.json``, never a glob.

    from pipeline.loader import rollout_dataset
    dataset = rollout_dataset("s3://bucket/rollouts/run-1", shuffle=64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)

Each sample decodes to torch tensors: ``rgb`` (T, 3, H, W) uint8, ``depth`` (T, 1, H, W) float32,
``k`` (T, 3, 3), ``c2w`` (T, 4, 4), ``actions`` (T, 6), plus ``depth_is_metric``, ``meta`` and
``__key__``. Object stores are opened through fsspec (webdataset cannot open ``s3://`` itself).
"""

from __future__ import annotations

import io
import json
import posixpath
import random
from typing import Any

import fsspec
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.samples import decode_sample
from pipeline.sink import INDEX_FILE
from pipeline.storage import is_local_uri


def read_index(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's wids index (written last by the run, so every listed shard is complete)."""
    with fsspec.open(_join(output, INDEX_FILE), "rb", **(storage_options or {})) as f:
        return json.load(f)


def shard_urls(output: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Absolute URLs of the indexed shards, in index order."""
    return [_join(output, shard["url"]) for shard in read_index(output, storage_options)["shardlist"]]


def _join(output: str, rel: str) -> str:
    if "://" in rel or rel.startswith("/"):
        return rel
    return posixpath.join(output.rstrip("/"), rel)


def to_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw sample files (bytes or streams, keys with or without a leading dot) to torch tensors."""
    files = {name.lstrip("."): (value.read() if hasattr(value, "read") else value)
             for name, value in sample.items() if not name.startswith("__")}
    decoded = decode_sample(files)
    return {
        "__key__": sample["__key__"],
        "rgb": torch.from_numpy(decoded["rgb"]).permute(0, 3, 1, 2).contiguous(),
        "depth": torch.from_numpy(decoded["depth"])[:, None],
        "depth_is_metric": decoded["depth_is_metric"],
        "k": torch.from_numpy(decoded["k"]),
        "c2w": torch.from_numpy(decoded["c2w"]),
        "actions": torch.from_numpy(decoded["actions"]),
        "meta": decoded["meta"],
    }


def _open_shards(sources, storage_options: dict[str, Any]):
    """Pipeline stage: open each shard URL through fsspec (local paths, s3://, gs://, ...)."""
    for source in sources:
        yield dict(source, stream=fsspec.open(source["url"], "rb", **storage_options).open())


def rollout_dataset(output: str, *, shuffle: int = 0, seed: int = 0, storage_options: dict[str, Any] | None = None,
                    split: bool = True) -> wds.DataPipeline:
    """A torch IterableDataset over the run at ``output``.

    ``shuffle`` > 0 shuffles the shard order (seeded) and samples in a buffer of that size.
    With ``split``, shards are divided across nodes (torch.distributed) and DataLoader workers.
    """
    options = storage_options or {}
    stages: list[Any] = [wds.SimpleShardList(shard_urls(output, options))]
    if shuffle:
        stages.append(wds.detshuffle(bufsize=max(len(stages[0].urls), 1), seed=seed))
    if split:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages += [lambda sources: _open_shards(sources, options), tar_file_expander, group_by_keys]
    if shuffle:
        stages.append(wds.shuffle(shuffle, rng=random.Random(seed)))
    stages.append(wds.map(to_tensors))
    return wds.DataPipeline(*stages)


def random_access(output: str, *, cache_dir: str | None = None,
                  storage_options: dict[str, Any] | None = None):
    """A map-style ``wids.ShardListDataset`` over the run (``dataset[i]``, ``len(dataset)``).

    wids copies shards into ``cache_dir`` on first use; for object stores the copy goes through
    fsspec (wids' own ``s3`` handler needs the aws CLI).
    """
    import wids
    from wids import wids_dl

    options = storage_options or {}
    index = read_index(output, options)
    if not is_local_uri(output):
        scheme = output.split("://", 1)[0]
        wids_dl.default_cmds[scheme] = lambda remote, local: fsspec.filesystem(scheme, **options).get_file(remote, local)
    base = output.rstrip("/") if not is_local_uri(output) else output.removeprefix("file://").rstrip("/")
    return wids.ShardListDataset(io.BytesIO(json.dumps(index).encode()), base=base, cache_dir=cache_dir,
                                 transformations=[to_tensors])

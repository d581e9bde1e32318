"""What a trainer's loader gets: ``python -m bench.loader [--run RUN] --threads 1``.

The rollouts measured are the samples of RUN (a real run's model output, sample format 1 or 2;
e.g. the embedded default job's) or, without ``--run``, ``--clips`` clips of the procedural world
rendered by :mod:`hero.world` (its ground truth: smooth metric depth). For them it measures:

1. depth, format 1 (float16 ``depth.npz``) against format 2 (``depth.mkv``: FFV1 16-bit log
   depth, :func:`pipeline.samples.encode_depth`): bytes, encode and decode milliseconds per sample,
   largest relative error;
2. the bytes of each file of a format-2 sample;
3. the loader on a format-2 run of those rollouts on local disk (two samples a shard):
   ``rollout_windows`` (``--length`` frames, stride half of it, shuffle buffer 64) batched by
   ``collate_windows`` through a torch DataLoader with 0 and 2 workers, with every field and
   without depth: windows/s and shard MB/s (bytes of the shards read per second of the pass).

Writes ``<out>/loader.json`` and ``<out>/loader.md`` (default ``docs/bench``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import command_line
from hero.models.base import Rollout
from hero.world.clips import clip_for_seed
from pipeline.loader import collate_windows, rollout_files, rollout_windows
from pipeline.samples import FIELDS, decode_depth, decode_sample, encode_depth, encode_sample
from pipeline.schema import SCHEMA_FILE, schema_document
from pipeline.sink import write_committed_run
from pipeline.storage import Store

WORKERS = (0, 2)
BATCH = 8


def rollouts_of_run(run: str) -> list[tuple[str, Rollout, dict[str, Any]]]:
    """A run's samples as rollouts (back in :class:`Rollout`'s conventions) with their meta."""
    out = []
    for files in rollout_files(run):
        sample = decode_sample({name: value for name, value in files.items() if not name.startswith("__")})
        deltas = np.concatenate([np.zeros((1, 6), np.float32), sample["actions"][:-1]])
        commanded = sample["commanded_c2w"]
        meta = {key: value for key, value in sample["meta"].items() if key not in ("schema_version", "depth_encoding")}
        out.append((files["__key__"], Rollout(
            rgb=sample["rgb"], depth=sample["depth"], depth_is_metric=sample["depth_is_metric"], k=sample["k"],
            c2w=sample["c2w"], actions=deltas,
            meta={"commanded_c2w": commanded.tolist()} if np.isfinite(commanded).all() else {}), meta))
    return out


def rendered_rollouts(clips: int, frames: int) -> list[tuple[str, Rollout, dict[str, Any]]]:
    """Procedural-world clips (the truth toyworld learns) as rollouts."""
    from hero.models.base import pose_deltas

    out = []
    for seed in range(clips):
        clip, _ = clip_for_seed(1_000_000 + seed, frames)
        rollout = Rollout(rgb=clip.rgb, depth=clip.depth, depth_is_metric=True, k=clip.k.astype(np.float32),
                          c2w=clip.c2w.astype(np.float32), actions=pose_deltas(clip.c2w),
                          meta={"commanded_c2w": clip.c2w.tolist()})
        out.append((f"world-{seed:04d}", rollout, {"id": f"world-{seed:04d}", "task": "prediction", "fps": 12,
                                                    "model": "rendered truth"}))
    return out


def depth_figures(rollouts: list[tuple[str, Rollout, dict[str, Any]]]) -> dict[str, Any]:
    """Format 1 against format 2 depth, per sample: bytes, encode/decode ms, largest relative error."""
    decode_depth(*encode_depth(rollouts[0][1].depth))  # warm-up: the codecs' first use loads them
    rows = []
    for _, rollout, _ in rollouts:
        depth = rollout.depth.astype(np.float32)
        started = time.perf_counter()
        buffer = io.BytesIO()
        np.savez_compressed(buffer, depth=depth.astype(np.float16), metric=np.array(True))
        npz = buffer.getvalue()
        npz_encode = time.perf_counter() - started
        started = time.perf_counter()
        with np.load(io.BytesIO(npz), allow_pickle=False) as loaded:
            old = loaded["depth"].astype(np.float32)
        npz_decode = time.perf_counter() - started
        started = time.perf_counter()
        mkv, encoding = encode_depth(depth)
        mkv_encode = time.perf_counter() - started
        started = time.perf_counter()
        new = decode_depth(mkv, encoding)
        mkv_decode = time.perf_counter() - started
        valid = depth > 0
        rows.append({"frames": int(depth.shape[0]), "npz_bytes": len(npz), "mkv_bytes": len(mkv),
                     "npz_encode_ms": 1e3 * npz_encode, "npz_decode_ms": 1e3 * npz_decode,
                     "mkv_encode_ms": 1e3 * mkv_encode, "mkv_decode_ms": 1e3 * mkv_decode,
                     "npz_max_rel_err": float(np.abs(old[valid] / depth[valid] - 1).max()),
                     "mkv_max_rel_err": float(np.abs(new[valid] / depth[valid] - 1).max())})
    total = {key: float(sum(r[key] for r in rows)) for key in rows[0] if key.endswith(("bytes", "_ms"))}
    frames = sum(r["frames"] for r in rows)
    return {"samples": rows, "frames": frames, "npz_bytes_per_frame": total["npz_bytes"] / frames,
            "mkv_bytes_per_frame": total["mkv_bytes"] / frames, "ratio": total["npz_bytes"] / total["mkv_bytes"],
            "npz_decode_ms_per_frame": total["npz_decode_ms"] / frames,
            "mkv_decode_ms_per_frame": total["mkv_decode_ms"] / frames,
            "mkv_encode_ms_per_frame": total["mkv_encode_ms"] / frames,
            "npz_max_rel_err": max(r["npz_max_rel_err"] for r in rows),
            "mkv_max_rel_err": max(r["mkv_max_rel_err"] for r in rows)}


def write_run(rollouts: list[tuple[str, Rollout, dict[str, Any]]], output: str) -> dict[str, Any]:
    """A format-2 run of the rollouts, two samples a shard; bytes per sample per file."""
    store = Store(output)
    sizes = {field: 0 for field in FIELDS}
    encoded = []
    for key, rollout, meta in rollouts:
        files = encode_sample(rollout, dict(meta, id=key))
        encoded.append((key, files))
        for field in FIELDS:
            sizes[field] += len(files[field])
    write_committed_run(store, "bench-loader", [encoded[first:first + 2] for first in range(0, len(encoded), 2)])
    store.write_json(SCHEMA_FILE, schema_document("toyworld"))
    frames = sum(rollout.frames for _, rollout, _ in rollouts)
    return {"samples": len(rollouts), "frames": frames,
            "bytes_per_sample": {field: size / len(rollouts) for field, size in sizes.items()},
            "bytes_per_frame": sum(sizes.values()) / frames,
            "shard_bytes": sum(os.path.getsize(p) for p in Path(output, "shards").glob("*.tar"))}


def time_windows(output: str, shard_bytes: int, length: int, workers: int, fields: tuple[str, ...],
                 passes: int) -> dict[str, Any]:
    """Windows/s and shard MB/s of ``passes`` full passes through a DataLoader."""
    dataset = rollout_windows(output, length=length, stride=max(1, length // 2), shuffle=64, fields=fields)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, collate_fn=collate_windows, num_workers=workers)
    started = time.perf_counter()
    windows = 0
    for _ in range(passes):
        for batch in loader:
            windows += len(batch["__key__"])
    wall = time.perf_counter() - started
    return {"workers": workers, "fields": list(fields), "passes": passes, "windows": windows, "wall_s": wall,
            "windows_per_s": windows / wall, "shard_mb_per_s": passes * shard_bytes / 1e6 / wall}


def report(result: dict[str, Any]) -> str:
    depth, run = result["depth"], result["run"]
    lines = [
        "# Loader benchmark", "",
        f"Rollouts: {result['source']} ({run['samples']} samples, {run['frames']} frames, "
        f"{result['height']}x{result['width']}). Command: `{result['command']}`; {result['cpus']} CPUs, "
        f"{result['threads']} torch thread(s).", "",
        "## Depth: format 1 (float16 depth.npz) against format 2 (depth.mkv, FFV1 16-bit log depth)", "",
        "| | bytes per frame | decode ms per frame | encode ms per frame | largest relative error |",
        "|---|---|---|---|---|",
        f"| depth.npz (float16) | {depth['npz_bytes_per_frame']:.0f} | {depth['npz_decode_ms_per_frame']:.3f} | | "
        f"{depth['npz_max_rel_err']:.2e} |",
        f"| depth.mkv (log step 0.01) | {depth['mkv_bytes_per_frame']:.0f} | {depth['mkv_decode_ms_per_frame']:.3f} | "
        f"{depth['mkv_encode_ms_per_frame']:.3f} | {depth['mkv_max_rel_err']:.2e} |", "",
        f"depth.mkv is **{depth['ratio']:.1f}x** smaller than depth.npz.", "",
        "## Bytes of a format-2 sample", "",
        "| file | bytes per sample |", "|---|---|",
        *[f"| {field} | {size:.0f} |" for field, size in run["bytes_per_sample"].items()],
        f"| all, per frame | {run['bytes_per_frame']:.0f} |", "",
        f"## Windows through a DataLoader ({result['length']} frames, stride {max(1, result['length'] // 2)}, "
        f"batch {BATCH}, shuffle buffer 64)", "",
        "| workers | fields | windows/s | shard MB/s | windows | wall s |", "|---|---|---|---|---|---|",
        *[f"| {t['workers']} | {', '.join(t['fields'])} | {t['windows_per_s']:.1f} | {t['shard_mb_per_s']:.2f} | "
          f"{t['windows']} | {t['wall_s']:.1f} |" for t in result["loader"]],
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="measure this run's samples (default: rendered procedural-world clips)")
    parser.add_argument("--clips", type=int, default=8, help="rendered clips without --run")
    parser.add_argument("--frames", type=int, default=113, help="frames per rendered clip")
    parser.add_argument("--length", type=int, default=16, help="window length")
    parser.add_argument("--passes", type=int, default=3, help="passes over the run per loader measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default="docs/bench", help="where loader.json and loader.md go")
    parser.add_argument("--name", default="loader", help="file name stem of the results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.run:
        rollouts, source = rollouts_of_run(args.run), f"the samples of run {args.run} (model output)"
    else:
        rollouts = rendered_rollouts(args.clips, args.frames)
        source = f"{args.clips} procedural-world clips of {args.frames} frames (rendered truth)"
    height, width = rollouts[0][1].rgb.shape[1:3]
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        run = write_run(rollouts, tmp)
        everything = ("rgb", "depth", "k", "c2w", "commanded_c2w", "actions")
        loader = [time_windows(tmp, run["shard_bytes"], args.length, workers, fields, args.passes)
                  for fields in (everything, ("rgb", "actions")) for workers in WORKERS]
    result = {"source": source, "height": int(height), "width": int(width), "length": args.length,
              "cpus": os.cpu_count(), "threads": args.threads, "depth": depth_figures(rollouts), "run": run,
              "loader": loader, "command": command_line("bench.loader", argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(report(result))
    print(report(result))
    return result


if __name__ == "__main__":
    main()

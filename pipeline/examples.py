"""Example manifests: random toyworld scenes and camera paths, plus one bad row of every kind.

    python -m pipeline.examples --rows 8 --out manifest.jsonl
    python -m pipeline.examples --rows 100 --out manifest.parquet --tasks prediction
    python -m pipeline.examples --rows 4 --bad --out with-bad-rows.jsonl

The shipped default manifest (``pipeline/data/default.jsonl``) is written by
``python -m pipeline.examples --default --out pipeline/data/default.jsonl``: two long prediction
rollouts of :data:`LONG_FRAMES` frames (chained chunks), then six 17-frame rows: four predictions,
one planning and one reconstruction.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hero.world import Trajectory
from pipeline.sources import NESTED_FIELDS

TASK_MIX = ("prediction", "prediction", "prediction", "prediction", "prediction", "planning", "reconstruction")
LONG_FRAMES = 113


def example_rows(rows: int, seed: int = 0, tasks: tuple[str, ...] = TASK_MIX, frames: int | None = None,
                 prefix: str = "tw") -> list[dict[str, Any]]:
    """``rows`` valid manifest rows over seeded toyworld scenes and random motion-primitive paths."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(rows):
        path = Trajectory.random(rng, frames or 17)
        row: dict[str, Any] = {
            "id": f"{prefix}-{seed:04d}-{index:06d}",
            "task": tasks[index % len(tasks)],
            "observation": {"scene": {"seed": int(rng.integers(0, 2**31)), "objects": int(rng.integers(8, 32))}},
            "trajectory": {"segments": [list(s) for s in path.segments], "speed": round(path.speed, 4),
                           "turn_deg": round(path.turn_deg, 4)},
            "seed": int(rng.integers(0, 2**31)),
        }
        if frames is not None:
            row["frames"] = frames
        out.append(row)
    return out


def bad_rows(prefix: str = "bad") -> list[tuple[str, str | None]]:
    """JSONL lines, one bad row of every kind, each with the field its error must name (None for
    the one valid row, whose id the last line repeats)."""
    good = example_rows(1, seed=7, prefix=prefix)[0]

    def variant(name: str, **changes: Any) -> str:
        return json.dumps({**json.loads(json.dumps(good)), "id": f"{prefix}-{name}", **changes})

    skewed = np.eye(4)
    skewed[0, 1] = 0.5
    far = np.eye(4)
    far[0, 3] = 1e39
    nan_pose = np.eye(4).tolist()
    nan_pose[0][3] = float("nan")
    without_observation = {k: v for k, v in good.items() if k != "observation"}
    return [
        (json.dumps(good), None),
        ('{"id": "' + prefix + '-malformed", "task": "prediction", "observation": {', "row"),
        (json.dumps(dict(without_observation, id=f"{prefix}-missing")), "observation"),
        (variant("mistyped", seed="seven"), "seed"),
        (variant("nan-pose", trajectory={"c2w": [np.eye(4).tolist(), nan_pose]}), "trajectory.c2w[1][0][3]"),
        (variant("inf-speed", trajectory={"segments": [["forward", 4]], "speed": float("inf")}), "trajectory.speed"),
        (variant("non-rigid", trajectory={"c2w": [np.eye(4).tolist(), skewed.tolist()]}), "trajectory.c2w"),
        (variant("far-camera", trajectory={"c2w": [np.eye(4).tolist(), far.tolist()]}), "trajectory.c2w"),
        (variant("short-poses", trajectory={"c2w": [np.eye(4).tolist()] * 3}), "trajectory.c2w"),
        (variant("frames", task="planning", frames=23), "frames"),
        (variant("missing-image", observation={"image": "file:///nonexistent/hero/image.png"}), "observation.image"),
        (variant("escape", id="../../etc/passwd"), "id"),
        (variant("dotted", id="a.b"), "id"),
        (json.dumps(good), "id"),
    ]


def write_manifest(rows: list[dict[str, Any]], uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write rows as JSONL, or as Parquet (nested fields as JSON text) when ``uri`` ends in .parquet."""
    options = storage_options or {}
    if uri.endswith(".parquet"):
        columns = sorted({key for row in rows for key in row})
        table = pa.table({key: [_parquet_value(key, row.get(key)) for row in rows] for key in columns})
        with fsspec.open(uri, "wb", **options) as f:
            pq.write_table(table, f)
        return
    with fsspec.open(uri, "wt", encoding="utf-8", **options) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _parquet_value(key: str, value: Any) -> Any:
    return json.dumps(value) if key in NESTED_FIELDS and value is not None else value


def default_rows() -> list[dict[str, Any]]:
    """The embedded default manifest: long rollouts first (the preview shows them), then short ones."""
    long = example_rows(2, seed=1, tasks=("prediction",), frames=LONG_FRAMES, prefix="long")
    short_tasks = ("prediction",) * 4 + ("planning", "reconstruction")
    return long + example_rows(6, seed=0, tasks=short_tasks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.examples", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="valid rows to write (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--tasks", help="comma-separated tasks to cycle through (default: mostly prediction, "
                        "one planning and one reconstruction row in seven)")
    parser.add_argument("--frames", type=int, help="frames per rollout (default: the model's)")
    parser.add_argument("--default", action="store_true", help="write the embedded default manifest")
    parser.add_argument("--bad", action="store_true", help="append one bad row of every kind (JSONL only)")
    parser.add_argument("--out", required=True, help="output file: .jsonl or .parquet, any fsspec URL")
    args = parser.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t) if args.tasks else TASK_MIX
    rows = default_rows() if args.default else example_rows(args.rows, args.seed, tasks, args.frames)
    if args.bad:
        if args.out.endswith(".parquet"):
            parser.error("--bad writes malformed JSON lines: use a .jsonl output")
        with fsspec.open(args.out, "wt", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            for line, _ in bad_rows():
                f.write(line + "\n")
        return
    write_manifest(rows, args.out)


if __name__ == "__main__":
    main()

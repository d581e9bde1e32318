"""``hero-export``: a run's shards into another ecosystem's dataset format.

    hero-export lerobot RUN_URI DEST      # a LeRobot v3 dataset (local folder or s3:// prefix)

Exit status: 0 written, 2 nothing written (bad run, destination in use, damaged shard).
Object stores take their endpoint and credentials from the environment (``AWS_*``), as the job does.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hero-export", description="Export a hero-rollouts run to another "
                                     "dataset format. Shards are verified against the run's index first.")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    lerobot = formats.add_parser("lerobot", help="a LeRobot v3 dataset (codebase_version v3.0)",
                                 description="Write the run as a LeRobot v3 dataset, one episode per rollout: "
                                             "RGB video, metric depth, intrinsics, predicted and commanded "
                                             "camera poses, actions, task. Load it with "
                                             "LeRobotDataset(repo_id, root=DEST).")
    lerobot.add_argument("run", metavar="RUN_URI", help="the run's output (local path, file://, s3://, ...)")
    lerobot.add_argument("dest", metavar="DEST", help="a new or empty local folder, or an object-store prefix")
    lerobot.add_argument("--skip-damaged", action="store_true",
                         help="leave out shards that fail verification (reported) instead of stopping")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.export.lerobot import ExportError, export_lerobot
    from pipeline.loader import ShardError

    try:
        info = export_lerobot(args.run, args.dest, on_error="skip" if args.skip_damaged else "raise")
    except (ExportError, ShardError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"hero-export: {info['total_episodes']} episodes, {info['total_frames']} frames at {info['fps']} fps "
          f"-> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

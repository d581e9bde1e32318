"""Command line of ``jobs/generate.py``: options, config loading, exit statuses (0 done, 1 incomplete,
2 bad configuration or an unusable output location, found before any work)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.config import (
    DEFAULT_MODEL, DEFAULT_OUTPUT_ROOT, ConfigError, JobConfig, OutputError, build_config, parse_value, resolve,
)
from pipeline.redact import guard_streams, redact_text
from pipeline.sources import InputUnavailable

OVERRIDES = {  # option dest -> config key
    "input": "input", "output": "output", "model": "model.name", "accel": "accel.name", "limit": "limit",
    "actors": "generate.actors", "batch_size": "generate.batch_size", "run_id": "run_id",
    "steps": "generate.steps", "num_gpus": "generate.num_gpus", "rows_per_shard": "sink.rows_per_shard",
    "ray_address": "ray.address", "adopt_foreign": "sink.adopt_foreign",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate.py",
        description="Generate world-model rollouts with Ray and write them as WebDataset shards. With no "
                    "options: a local Ray instance, the manifest shipped in the package, the shipped world "
                    f"model, output under {DEFAULT_OUTPUT_ROOT}/<run-id>. Rerunning the same command resumes.",
        epilog="Exit status: 0 complete, 1 incomplete (rerun to resume; also when another driver is writing "
               "the same output), 2 bad configuration or output location.")
    parser.add_argument("--config", metavar="FILE", help="YAML job config (see jobs/configs/); options below override it")
    parser.add_argument("--input", metavar="URI", help="manifest: a JSONL/Parquet file or a prefix of shards "
                        "(local path, file://, s3://, any fsspec URL); default: the shipped manifest")
    parser.add_argument("--output", metavar="URI", help="output prefix (absolute path or URL; '{run_id}' is "
                        f"replaced); default: {DEFAULT_OUTPUT_ROOT}/{{run_id}}")
    parser.add_argument("--model", metavar="NAME", help=f"world model: tiny, toyworld, aether (default: {DEFAULT_MODEL})")
    parser.add_argument("--accel", metavar="NAME", help="accelerator applied to the transformer: hero (HERO's default "
                        "preset), hero-fast, none (full compute), or a diffusers cache (default: hero)")
    parser.add_argument("--limit", metavar="N", type=int, help="use only the first N manifest rows")
    parser.add_argument("--actors", metavar="N", type=int, help="generate actors (one model each; default 1)")
    parser.add_argument("--batch-size", metavar="N", type=int, help="rollouts per model call (default 1)")
    parser.add_argument("--run-id", metavar="ID", help="run id (letters, digits, '-', '_'); default: derived from "
                        "model, accelerator and a hash of what is generated (the manifest's content and the "
                        "settings that shape samples), so the same command resumes wherever it runs from")
    parser.add_argument("--steps", metavar="N", type=int, help="denoising steps for every row (default: per row/model)")
    parser.add_argument("--num-gpus", metavar="G", type=float, help="GPUs per actor (1 on GPU clusters; default 0)")
    parser.add_argument("--rows-per-shard", metavar="N", type=int, help="manifest rows per shard, the unit of "
                        "commit and resume (default 4)")
    parser.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS, else a new "
                        "local instance)")
    parser.add_argument("--adopt-foreign", action="store_const", const=True, help="write into an output prefix that "
                        "holds files this run did not write (they are never modified, deleted or indexed); "
                        "without it such a prefix is refused")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override any config key, e.g. --set sink.storage_options.anon=false (repeatable)")
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {key: getattr(args, dest) for dest, key in OVERRIDES.items() if getattr(args, dest) is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(key or "--set", f"expected KEY=VALUE, got {item!r}")
        overrides[key] = parse_value(value)
    return overrides


def load(argv: list[str] | None = None) -> JobConfig:
    """Parse the command line into a resolved, validated config (ConfigError on bad values)."""
    args = build_parser().parse_args(argv)
    config = resolve(build_config(args.config, overrides_from(args)))
    check_names(config)
    return config


def check_names(config: JobConfig) -> None:
    """Refuse unknown model and accelerator names (and accelerator options) before any work."""
    from hero.accelerators import ACCELERATORS
    from hero.models import MODELS

    if config.model.name not in MODELS:
        raise ConfigError("model.name", f"unknown model {config.model.name!r}; choose from {sorted(MODELS)}")
    if config.accel.name not in ACCELERATORS:
        raise ConfigError("accel.name", f"unknown accelerator {config.accel.name!r}; choose from {sorted(ACCELERATORS)}")
    try:
        ACCELERATORS[config.accel.name].options(config.accel.name, config.accel.options)
    except ValueError as exc:
        raise ConfigError("accel.options", str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    guard_streams()
    try:
        config = load(argv)
        from pipeline.run import run  # torch, Ray and the models load only once there is work (not for --help)

        return run(config)
    except (ConfigError, OutputError) as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except InputUnavailable as exc:
        print(f"error: {exc}; nothing was planned past it, rerun to resume", file=sys.stderr)
        return 1

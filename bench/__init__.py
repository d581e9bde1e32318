"""Benchmarks: accelerators side by side (:mod:`bench.accel`) and the pipeline's own overhead
(:mod:`bench.pipeline`); results and the exact commands in ``docs/benchmarks.md``."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """How a benchmark was started, as a reader would type it again: ``python -m <module> <args>``
    (``argv`` None: this process's own arguments). Every result page quotes it."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m", module, *(shlex.quote(a) for a in args)])

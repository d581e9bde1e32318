"""The training forward's precision: bfloat16 autocast where the CPU computes it natively, else
float32.

bfloat16 autocast is 1.6x (transformer) to 4x (VAE) faster than float32 on cores with AVX-512
BF16 or AMX, but on plain AVX-512 cores PyTorch emulates it, and the transformer's training step
runs 2.3x slower than in float32 (4.7 s against 2.0 s at batch 16 here). ``"auto"`` times both
on one matrix product at start and takes bfloat16 only when it is clearly faster (by ``MARGIN``,
so that a noisy timing does not flip the choice between restarts); weights and optimiser stay in
float32 either way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, ContextManager

import torch

log = logging.getLogger("toyworld.precision")
PRECISIONS = ("auto", "bfloat16", "float32")
MARGIN = 1.25  # bfloat16 must beat float32 by this factor to be chosen


def training_autocast(precision: str) -> Callable[[], ContextManager]:
    """A factory of the context the training forward runs under (``precision`` from
    :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: {precision!r} is not one of {PRECISIONS}")
    if precision == "auto":
        precision = "bfloat16" if _bfloat16_is_faster() else "float32"
        log.info("training precision: %s (timed on this CPU)", precision)
    if precision == "bfloat16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _bfloat16_is_faster(size: int = 512, repeats: int = 8) -> bool:
    """Whether a bfloat16 matrix product beats a float32 one by ``MARGIN`` on this CPU (best of
    ``repeats`` each)."""
    a = torch.randn(size, size)

    def best(x: torch.Tensor) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    return MARGIN * best(a.bfloat16()) < best(a)

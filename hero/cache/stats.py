"""Per-generation statistics of HERO: what was skipped, FLOPs executed versus full, cache bytes.

FLOPs are counted, not estimated: the first FULL and the first PARTIAL call of every input shape
run under ``torch.utils.flop_counter.FlopCounterMode`` and, since shapes are static and the schedule
is data-independent, every later call of that kind executes the same operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import flop_counter


def count_cpu_attention_flops() -> None:
    """Teach torch's FLOP counter the CPU fused SDPA kernel, which it does not count by itself
    (attention FLOPs would silently read as zero on CPU)."""
    target = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if target in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(target)
    def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


count_cpu_attention_flops()


@dataclass
class GenerationStats:
    """Counters of one generation in one cache context; ``calibration`` marks the full-compute
    generation that ``split="auto"`` records its calibration on."""

    calibration: bool = False
    full_steps: int = 0
    partial_steps: int = 0
    block_tokens_total: int = 0
    block_tokens_computed: int = 0
    flops_executed: int | None = 0
    flops_full: int | None = 0
    forecast_order: int | None = None  # the deep forecast's order (None: nothing forecast yet)

    def record(self, full: bool, tokens_total: int, tokens_computed: int,
               flops: int | None, flops_full: int | None) -> None:
        self.full_steps += int(full)
        self.partial_steps += int(not full)
        self.block_tokens_total += tokens_total
        self.block_tokens_computed += tokens_computed
        self.flops_executed = None if flops is None or self.flops_executed is None \
            else self.flops_executed + flops
        self.flops_full = None if flops_full is None or self.flops_full is None \
            else self.flops_full + flops_full


def summarize(per_context: dict[str, tuple[GenerationStats, int]]) -> dict[str, Any]:
    """JSON-safe totals over cache contexts, plus each context's own numbers.

    ``per_context`` maps a context name to its stats and the bytes its caches hold.
    """
    contexts = {name: _describe(stats, nbytes) for name, (stats, nbytes) in per_context.items()}
    total = GenerationStats()
    for stats, _ in per_context.values():
        total.calibration = total.calibration or stats.calibration
        total.full_steps += stats.full_steps
        total.partial_steps += stats.partial_steps
        total.block_tokens_total += stats.block_tokens_total
        total.block_tokens_computed += stats.block_tokens_computed
        total.flops_executed = _add(total.flops_executed, stats.flops_executed)
        total.flops_full = _add(total.flops_full, stats.flops_full)
        orders = [order for order in (total.forecast_order, stats.forecast_order) if order]
        total.forecast_order = min(orders, default=None)
    summary = _describe(total, sum(nbytes for _, nbytes in per_context.values()))
    summary["contexts"] = contexts
    return summary


def _describe(stats: GenerationStats, nbytes: int) -> dict[str, Any]:
    skipped = 0.0
    if stats.block_tokens_total:
        skipped = 1.0 - stats.block_tokens_computed / stats.block_tokens_total
    ratio = None
    if stats.flops_executed is not None and stats.flops_full:
        ratio = stats.flops_executed / stats.flops_full
    return {
        "calibration_run": stats.calibration,
        "full_steps": stats.full_steps,
        "partial_steps": stats.partial_steps,
        "skipped_block_token_fraction": skipped,
        "flops_executed": stats.flops_executed,
        "flops_full": stats.flops_full,
        "flops_ratio": ratio,
        "cache_bytes": int(nbytes),
        "forecast_order": stats.forecast_order,
    }


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b

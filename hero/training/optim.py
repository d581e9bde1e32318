"""The learning-rate schedule both training stages share."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, warmup: int, total: int, final_fraction: float) -> float:
    """Linear warm-up to ``peak``, then a cosine fall to ``final_fraction * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))

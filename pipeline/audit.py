"""Quality audit: what acceleration cost on *this* run's data.

With ``audit.fraction`` > 0 the generate actors re-generate a deterministic sample of their rows
at full compute (the accelerator taken off, same request and seed) and score the accelerated
rollout against it (:mod:`hero.metrics`: RGB PSNR, depth AbsRel, camera pose error). The figures
go into the sample's ``meta.json`` (``audit``) and its shard's metadata table, and
:func:`audit_summary` aggregates them per accelerator for ``summary.json``.

Selection hashes the row id with the audit seed, so the same rows are audited on every run and
resume, whichever actor gets them, and about ``fraction`` of the rows are chosen.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from hero import metrics
from hero.models.base import Rollout

DRIFT_FIGURES = ("psnr_db", "depth_abs_rel", "rot_err_deg", "trans_err")


def is_audited(row_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether row ``row_id`` is in the audited sample: a uniform hash of (seed, id) below ``fraction``."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def drift(accelerated: Rollout, full: Rollout) -> dict[str, float | int | None]:
    """How far an accelerated rollout is from the full-compute one, as clip means over frames:
    RGB PSNR (dB; frames identical to full count in ``identical_frames``), depth AbsRel against the
    full depth, camera rotation (degrees) and translation error. None where nothing is finite."""
    psnr = metrics.psnr(accelerated.rgb, full.rgb)
    figures = {
        "psnr_db": psnr,
        "depth_abs_rel": metrics.abs_rel(accelerated.depth, full.depth),
        "rot_err_deg": metrics.rotation_error_deg(accelerated.c2w, full.c2w),
        "trans_err": metrics.translation_error(accelerated.c2w, full.c2w),
    }
    out: dict[str, float | int | None] = {name: _finite(metrics.summarize(values)["mean"])
                                          for name, values in figures.items()}
    out["identical_frames"] = int(np.sum(np.isinf(psnr)))
    return out


def _finite(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def audit_summary(audits: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s ``audit`` from the audited samples' ``meta["audit"]`` records: per
    accelerator, how many were audited, how many of those audits failed (their full-compute run
    raised; the sample itself is kept), and the distribution (mean, std, median, min, max) of each
    drift figure over the others."""
    by_accelerator: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for audit in audits:
        by_accelerator[audit["accelerator"]].append(audit)
    return {name: {"audited": len(audits), "failed": sum("error" in audit for audit in audits),
                   **{figure: _json_stats(metrics.summarize([a[figure] if a.get(figure) is not None else math.nan
                                                             for a in audits]))
                      for figure in DRIFT_FIGURES}}
            for name, audits in sorted(by_accelerator.items())}


def _json_stats(stats: dict[str, float | int]) -> dict[str, float | int | None]:
    return {key: _finite(value) if isinstance(value, float) else value for key, value in stats.items()}

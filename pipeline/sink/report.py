"""What a run reports once its units are committed: the wids shard index (written last), the error
list (computed once, for errors.jsonl and the summary's counts), summary.json and the preview."""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from types import SimpleNamespace
from typing import Any

from pipeline.audit import audit_summary
from pipeline.plan import PlanCounts
from pipeline.redact import redact
from pipeline.samples import decode_sample
from pipeline.sink.layout import PREVIEW_FILES
from pipeline.sink.log import STAGE_SECONDS, CommitState
from pipeline.sink.shards import read_samples
from pipeline.storage import Store

INDEX_KIND = "wids-shard-index-v1"
logger = logging.getLogger(__name__)


def build_index(run_id: str, state: CommitState) -> dict[str, Any]:
    """A wids dataset description of the committed shards, in unit order; shard URLs are relative
    to the index, so outputs can move. Each shard carries its sha256 and sample count."""
    shards = [{"url": u.shard, "nsamples": u.nsamples, "filesize": u.filesize, "sha256": u.sha256}
              for _, u in sorted(state.units.items()) if u.shard]
    return {"__kind__": INDEX_KIND, "wids_version": 1, "name": run_id, "shardlist": shards}


def collect_errors(state: CommitState, run_errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every failure the dataset carries: the committed units' row errors in unit order, then this
    run's own (manifest files skipped or not fully read, units that could not commit)."""
    return [error for unit in sorted(state.errors) for error in state.errors[unit]] + run_errors


def dataset_totals(state: CommitState) -> dict[str, Any]:
    """What the committed units hold, summed from their records (every generating run's work),
    with the accelerator's drift on the audited samples (:func:`pipeline.audit.audit_summary`)."""
    units = state.units.values()
    return {"rollouts": sum(u.nsamples for u in units), "frames": int(sum(u.stats.get("frames", 0) for u in units)),
            "shards": sum(1 for u in units if u.shard), "bytes": sum(u.filesize for u in units),
            "checksum_failures": int(sum(u.stats.get("checksum_failures", 0) for u in units)),
            "seconds": {stage: sum(u.stats.get(stage, 0.0) for u in units) for stage in STAGE_SECONDS},
            "audit": audit_summary(audit for u in units for audit in u.stats.get("audits", []))}


def build_summary(identity: dict[str, Any], plan: PlanCounts, state: CommitState, errors: list[dict[str, Any]],
                  failed: list[dict[str, Any]], run_error: str | None, this_run: dict[str, Any],
                  runs: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: what the dataset holds, what failed and why, this run's figures and those of
    every run that generated part of it (``runs``, oldest first); credentials masked, as it is
    printed and stored."""
    wall = max(this_run["wall_s"], 1e-9)
    this_run = dict(this_run, rollouts_per_min=60 * this_run["rollouts"] / wall, frames_per_s=this_run["frames"] / wall)
    return redact({
        **identity, **dataset_totals(state),
        "complete": plan.done and plan.units == len(state.units) and not failed and run_error is None,
        "manifest_rows": plan.rows,
        "units": {"total": plan.units, "committed": len(state.units), "failed_to_commit": len(failed)},
        "failures": len(errors), "failures_by_stage": dict(Counter(e.get("stage") for e in errors)),
        "failures_by_field": dict(Counter(e.get("field") for e in errors)),
        "run_error": run_error, "this_run": this_run,
        "runs": runs + [this_run] if this_run["units_committed"] else runs,
    })


def write_preview(store: Store, state: CommitState) -> str | None:
    """preview.png (contact sheet of RGB and depth) and preview.gif of the first committed sample,
    read back through the sink's reader; None (and a warning) if there is none or it fails."""
    from hero.preview import write_preview as render_preview

    first = next((u.shard for _, u in sorted(state.units.items()) if u.shard), None)
    if first is None:
        return None
    try:
        key, files = next(read_samples(store, first))
        sample = decode_sample(files)
        with tempfile.TemporaryDirectory(prefix="hero-preview-") as tmp:
            written = render_preview(SimpleNamespace(rgb=sample["rgb"], depth=sample["depth"]), tmp, key)
            for name, path in zip(PREVIEW_FILES, written):
                store.write_bytes(name, path.read_bytes())
    except Exception as exc:  # a preview is a convenience: never fail a finished run over it
        logger.warning("no preview: %s: %s", type(exc).__name__, exc)
        return None
    return store.url(PREVIEW_FILES[0])

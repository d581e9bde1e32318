"""Generate stage (an actor pool): each actor owns a world model and its accelerator and turns
batches of prepared rows into rollouts; a failing batch is retried row by row, and every rollout
is checked (:func:`hero.models.base.check_rollout`) before it may travel on to be stored."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from hero.models.base import Rollout, RolloutRequest, check_rollout
from hero.rollout import generate_any_length
from pipeline import faults
from pipeline.audit import drift, is_audited
from pipeline.manifest import ManifestRow
from pipeline.stages.rows import FIELD_IN_MESSAGE, ROW_COLUMNS, columns, error_json, pack, rows, unpack


class RolloutMetrics:
    """Ray metrics of the generate actors (on each node's metrics endpoint, tagged model/accel)."""

    def __init__(self, model: str, accel: str) -> None:
        from ray.util import metrics

        tags = {"model": model, "accel": accel}
        keys = tuple(tags)
        self.rollouts = metrics.Counter("hero_rollouts", "rollouts generated", tag_keys=keys)
        self.frames = metrics.Counter("hero_frames", "frames generated", tag_keys=keys)
        self.failures = metrics.Counter("hero_rollout_failures", "rows the model failed on", tag_keys=keys)
        self.seconds = metrics.Histogram("hero_rollout_seconds", "generation seconds per rollout",
                                         boundaries=[1, 5, 15, 30, 60, 120, 300, 900], tag_keys=keys)
        self.skipped = metrics.Gauge("hero_cache_skipped_fraction",
                                     "fraction of block-token computations the accelerator skipped", tag_keys=keys)
        for metric in (self.rollouts, self.frames, self.failures, self.seconds, self.skipped):
            metric.set_default_tags(tags)

    def record(self, rollouts: list[Rollout], failures: int, seconds: float, stats: dict[str, Any]) -> None:
        if rollouts:
            self.rollouts.inc(len(rollouts))
            self.frames.inc(sum(r.frames for r in rollouts))
            self.seconds.observe(seconds)
        if failures:
            self.failures.inc(failures)
        if isinstance(stats.get("skipped_block_token_fraction"), (int, float)):
            self.skipped.set(float(stats["skipped_block_token_fraction"]))


class GenerateRollouts:
    """Generate stage (an actor pool): each actor loads the world model and applies the accelerator
    once, in ``__init__``, then turns batches of prepared rows into rollouts."""

    def __init__(self, model: str, model_options: dict[str, Any], accel: str, accel_options: dict[str, Any],
                 steps: int | None, audit: dict[str, Any] | None = None) -> None:
        started = time.time()
        from hero.accelerators import apply_accelerator
        from hero.models import load_model

        options = dict(model_options)
        if _has_cuda():
            options.setdefault("device", "cuda")
        self.model = load_model(model, **options)
        self.accel_name = accel
        self.accel_options = accel_options
        self.accelerator = apply_accelerator(self.model.transformer, accel, **accel_options)
        self.steps = steps
        self.audit = audit or {}
        self.fps = getattr(getattr(self.model, "spec", None), "fps", None)
        self.metrics = RolloutMetrics(model, accel)
        ready = time.time()
        self.startup = {"init_s": ready - started, "ready_at": ready}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [dict(item, rollout=b"") for item in rows(batch)]
        pending = [item for item in items if not item["error"]]
        self._generate(pending)
        if pending and faults.inject("actor_exit"):
            os._exit(1)
        return columns(items, ROW_COLUMNS + ("rollout",))

    def _generate(self, items: list[dict[str, Any]]) -> None:
        if not items:
            return
        requests = [self._request(item) for item in items]
        started = time.perf_counter()
        try:
            rollouts = self._run(requests)
        except Exception:
            rollouts = [self._generate_one(request, item) for request, item in zip(requests, items)]
        seconds = (time.perf_counter() - started) / len(items)
        rollouts = [_checked(r, request, item) for r, request, item in zip(rollouts, requests, items)]
        stats = self._accel_stats()
        done = [r for r in rollouts if r is not None]
        self.metrics.record(done, len(items) - len(done), seconds, stats)
        audits = self._audit(items, requests, rollouts)
        for index, (item, rollout) in enumerate(zip(items, rollouts)):
            if rollout is None:
                continue
            meta = json.loads(item["meta"] or "{}")
            timings = dict(rollout.meta.get("timings", {}), **meta.get("timings", {}), generate_s=seconds)
            meta = dict(rollout.meta, timings=timings, actor=self.startup,
                        accelerator={"name": self.accel_name, "options": self.accel_options, "stats": stats})
            meta.setdefault("fps", self.fps)
            if index in audits:
                meta["audit"] = audits[index]
            item["rollout"] = pack({"rgb": rollout.rgb, "depth": rollout.depth, "k": rollout.k, "c2w": rollout.c2w,
                                    "actions": rollout.actions, "depth_is_metric": np.array(rollout.depth_is_metric)})
            item["meta"] = json.dumps(meta, default=_jsonable)

    def _audit(self, items: list[dict[str, Any]], requests: list[RolloutRequest],
               rollouts: list[Rollout | None]) -> dict[int, dict[str, Any]]:
        """Re-generate the audited rows (``pipeline.audit``) with the accelerator off; their drift by row index."""
        chosen = [i for i, rollout in enumerate(rollouts) if rollout is not None
                  and is_audited(items[i]["id"], self.audit.get("fraction", 0.0), self.audit.get("seed", 0))]
        if not chosen:
            return {}
        from hero.accelerators import apply_accelerator

        started = time.perf_counter()
        self.accelerator.remove()
        try:
            if faults.inject("audit_error"):
                raise RuntimeError("injected audit failure")
            full = self._run([requests[i] for i in chosen])
        except Exception as exc:  # a failed audit costs no sample: the failure is recorded instead
            return {i: {"accelerator": self.accel_name, "error": f"{type(exc).__name__}: {exc}"} for i in chosen}
        finally:
            self.accelerator = apply_accelerator(self.model.transformer, self.accel_name, **self.accel_options)
        seconds = (time.perf_counter() - started) / len(chosen)
        return {i: dict(drift(rollouts[i], rollout), accelerator=self.accel_name, full_generate_s=seconds)
                for i, rollout in zip(chosen, full)}

    def _run(self, requests: list[RolloutRequest]) -> list[Rollout]:
        """Generate; requests longer than the model's clips are chained (``hero.rollout``)."""
        return generate_any_length(self.model, requests)

    def _generate_one(self, request: RolloutRequest, item: dict[str, Any]) -> Rollout | None:
        """Retry one request alone so a bad row fails by itself, not its whole batch."""
        try:
            return self._run([request])[0]
        except Exception as exc:
            message = str(exc)
            match = FIELD_IN_MESSAGE.match(message)
            field, reason = (match.group(1), message[match.end():]) if match else ("model", f"{type(exc).__name__}: {message}")
            item["error"] = error_json(item["id"], field, reason, "generate")
            return None

    def _request(self, item: dict[str, Any]) -> RolloutRequest:
        row = ManifestRow.model_validate_json(item["row"])
        arrays = unpack(item["inputs"])
        return RolloutRequest(
            id=row.id, task=row.task, frames=int(arrays["c2w"].shape[0]), image=arrays.get("image"),
            goal=arrays.get("goal"), video=arrays.get("video"), c2w=arrays["c2w"], k=arrays["k"],
            steps=self.steps or row.steps, guidance=row.guidance, seed=row.seed)

    def _accel_stats(self) -> Any:
        return self.accelerator.stats()


def _checked(rollout: Rollout | None, request: RolloutRequest, item: dict[str, Any]) -> Rollout | None:
    """The rollout if it may be stored; else None, with the item's error naming the field at fault."""
    if rollout is None:
        return None
    try:
        check_rollout(rollout, request.frames)
    except ValueError as exc:
        field, _, reason = str(exc).partition(": ")
        item["error"] = error_json(item["id"], field, reason, "validate")
        return None
    return rollout


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)

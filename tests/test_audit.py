"""The quality audit: a deterministic sample of rows re-generated at full compute by the generate
stage's own actor (a real tiny model, HERO applied), the accelerator's drift in each audited
sample's meta, the shard metadata table and the run summary's per-accelerator figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hero.models import model_spec
from pipeline.audit import audit_summary, is_audited
from pipeline.config import ConfigError, build_config
from pipeline.manifest import ManifestRow
from pipeline.stages.generate import GenerateRollouts
from pipeline.stages.prep import prepare_batch
from pipeline.stages.rows import columns, rows

ROW = {"id": "audit-0", "task": "prediction", "observation": {"scene": {"seed": 3, "objects": 4}},
       "trajectory": {"segments": [["forward", 16]]}, "frames": 17, "steps": 4, "seed": 5}


def test_selection_is_deterministic_and_close_to_the_fraction():
    ids = [f"row-{i:05d}" for i in range(4000)]
    chosen = [i for i in ids if is_audited(i, 0.1, seed=7)]
    assert chosen == [i for i in ids if is_audited(i, 0.1, seed=7)]
    assert 0.08 < len(chosen) / len(ids) < 0.12
    assert chosen != [i for i in ids if is_audited(i, 0.1, seed=8)]
    assert not any(is_audited(i, 0.0) for i in ids) and all(is_audited(i, 1.0) for i in ids)


def test_audit_fraction_is_validated():
    assert build_config(overrides={"audit.fraction": 0.01}).audit.fraction == 0.01
    with pytest.raises(ConfigError, match="audit.fraction"):
        build_config(overrides={"audit.fraction": 1.5})


def generate(accel: str, fraction: float, generations: int = 1) -> dict:
    """One row through prep and a generate actor (tiny random model) in this process,
    ``generations`` times; the last one's meta."""
    spec = model_spec("tiny")
    item = {"unit": 0, "position": 0, "id": ROW["id"], "row": ManifestRow.model_validate(ROW).model_dump_json(),
            "error": ""}
    prepared = prepare_batch(columns([item], ("unit", "position", "id", "row", "error")), spec=spec, storage_options={})
    actor = GenerateRollouts("tiny", {}, accel, {}, steps=None, audit={"fraction": fraction, "seed": 0})
    for _ in range(generations):
        [out] = rows(actor(prepared))
        assert not out["error"], out["error"]
    return json.loads(out["meta"])


@pytest.fixture(scope="module")
def audited_hero():
    """The actor's second generation: its first of this shape is HERO's calibration (full compute)."""
    return generate("hero", 1.0, generations=2)


def test_a_sample_generated_while_hero_calibrates_is_audited_as_full_compute(tmp_path, monkeypatch):
    monkeypatch.setenv("HERO_CALIBRATION_DIR", str(tmp_path))  # nothing calibrated yet
    meta = generate("hero", 1.0)
    assert meta["accelerator"]["stats"]["calibration_run"] is True
    assert meta["audit"]["psnr_db"] is None and meta["audit"]["identical_frames"] == 17


def test_an_audited_sample_records_the_accelerators_drift(audited_hero):
    audit = audited_hero["audit"]
    assert audit["accelerator"] == "hero" and audit["full_generate_s"] > 0
    assert audit["psnr_db"] is not None and np.isfinite(audit["psnr_db"])  # accelerated != full compute
    assert audit["identical_frames"] < 17 and audit["depth_abs_rel"] >= 0
    assert audited_hero["accelerator"]["stats"]["partial_steps"] > 0  # stats are the accelerated run's
    assert audited_hero["fps"] == 12


def test_full_compute_against_itself_shows_no_drift():
    audit = generate("none", 1.0)["audit"]
    assert audit["psnr_db"] is None and audit["identical_frames"] == 17
    assert audit["depth_abs_rel"] == 0 and audit["trans_err"] == 0 and audit["rot_err_deg"] < 0.05  # arccos of float32


def test_rows_outside_the_sample_are_not_audited():
    assert "audit" not in generate("hero", 0.0)


def test_summary_aggregates_drift_per_accelerator(audited_hero):
    second = dict(audited_hero, audit=dict(audited_hero["audit"], psnr_db=10.0))
    metas = [audited_hero, second, {"id": "not-audited"}]
    summary = audit_summary(meta["audit"] for meta in metas if "audit" in meta)
    assert set(summary) == {"hero"} and summary["hero"]["audited"] == 2 and summary["hero"]["failed"] == 0
    assert summary["hero"]["psnr_db"]["min"] == 10.0
    assert summary["hero"]["psnr_db"]["max"] == pytest.approx(audited_hero["audit"]["psnr_db"])
    json.dumps(summary, allow_nan=False)


def test_a_failed_audit_keeps_the_sample_and_is_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("HERO_FAULT_AUDIT_ERROR", "1")
    monkeypatch.setenv("HERO_FAULT_DIR", str(tmp_path))
    meta = generate("hero", 1.0)
    assert meta["audit"] == {"accelerator": "hero", "error": "RuntimeError: injected audit failure"}
    summary = audit_summary([meta["audit"]])["hero"]
    assert summary["audited"] == 1 and summary["failed"] == 1 and summary["psnr_db"]["count"] == 0

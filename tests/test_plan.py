"""Planning as the manifest streams: units come out before the manifest is read to its end,
duplicate ids fail on every later occurrence, committed units are skipped or, if the manifest
changed under them, refused; the run id follows the manifest's content, not its path."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from pipeline.config import build_config, resolve
from pipeline.examples import example_rows, write_manifest
from pipeline.plan import PlanCounts, PlanMismatch, manifest_digest, plan_units, units_to_do
from pipeline.sources import default_manifest, read_manifest


def manifest(path, rows):
    write_manifest(rows, str(path))
    return str(path)


def test_units_stream_out_before_the_manifest_is_read_to_its_end(tmp_path):
    source = manifest(tmp_path / "m.jsonl", example_rows(10, seed=1))

    def entries_then_failure():
        for entry in read_manifest(source):
            if entry.position == 5:
                raise RuntimeError("the rest of the manifest is not needed yet")
            yield entry

    units = plan_units(entries_then_failure(), rows_per_shard=2)
    assert [next(units).number, next(units).number] == [0, 1]
    with pytest.raises(RuntimeError):
        next(units)  # unit 2 stays open until its last row is read


def test_a_repeated_id_fails_every_occurrence_after_the_first(tmp_path):
    rows = example_rows(3, seed=2)
    source = manifest(tmp_path / "m.jsonl", rows + [rows[0], rows[2]])
    units = list(plan_units(read_manifest(source), rows_per_shard=2))
    errors = [e for unit in units for e in unit.errors]
    assert [(e.id, e.field, e.line) for e in errors] == [(rows[0]["id"], "id", 4), (rows[2]["id"], "id", 5)]
    assert "first at" in errors[0].reason and len(units[0].valid) == 2


def test_committed_units_are_skipped_and_counted(tmp_path):
    source = manifest(tmp_path / "m.jsonl", example_rows(5, seed=3))
    units = list(plan_units(read_manifest(source), rows_per_shard=2))
    committed = {1: SimpleNamespace(rows_digest=units[1].digest())}
    counts = PlanCounts()
    todo = [u.number for u in units_to_do(iter(units), committed, counts)]
    assert todo == [0, 2] and (counts.rows, counts.units, counts.committed, counts.todo, counts.done) == (5, 3, 1, 2, True)


def test_a_manifest_that_changed_under_a_committed_unit_is_refused(tmp_path):
    rows = example_rows(4, seed=4)
    units = list(plan_units(read_manifest(manifest(tmp_path / "a.jsonl", rows)), rows_per_shard=2))
    edited = rows[:2] + [dict(rows[2], seed=rows[2]["seed"] + 1), rows[3]]
    edited_units = plan_units(read_manifest(manifest(tmp_path / "b.jsonl", edited)), rows_per_shard=2)
    with pytest.raises(PlanMismatch, match="unit 1 was committed from different manifest rows"):
        list(units_to_do(edited_units, {1: SimpleNamespace(rows_digest=units[1].digest())}, PlanCounts()))
    shorter = plan_units(read_manifest(manifest(tmp_path / "c.jsonl", rows[:2])), rows_per_shard=2)
    with pytest.raises(PlanMismatch, match="unit 1 is committed but the manifest"):
        list(units_to_do(shorter, {1: SimpleNamespace(rows_digest=units[1].digest())}, PlanCounts()))


def test_the_manifest_digest_follows_content_not_location(tmp_path):
    rows = example_rows(3, seed=5)
    first, second = tmp_path / "checkout-a", tmp_path / "checkout-b"
    for root in (first, second):
        (root / "manifests").mkdir(parents=True)
        manifest(root / "manifests" / "part-0.jsonl", rows[:2])
        manifest(root / "manifests" / "part-1.jsonl", rows[2:])
    assert manifest_digest(str(first / "manifests")) == manifest_digest(str(second / "manifests"))
    shutil.move(second / "manifests" / "part-1.jsonl", second / "manifests" / "part-2.jsonl")
    assert manifest_digest(str(first / "manifests")) != manifest_digest(str(second / "manifests"))
    single = manifest(tmp_path / "elsewhere.jsonl", rows[:2])
    assert manifest_digest(single) == manifest_digest(str(first / "manifests" / "part-0.jsonl"))


def test_the_default_run_id_is_the_same_for_a_copy_of_the_shipped_manifest(tmp_path):
    copy = tmp_path / "another-checkout" / "default.jsonl"
    copy.parent.mkdir()
    shutil.copy(default_manifest(), copy)
    shipped = resolve(build_config(overrides={"output": str(tmp_path / "a")}))
    copied = resolve(build_config(overrides={"input": str(copy), "output": str(tmp_path / "b")}))
    assert shipped.run_id == copied.run_id
    assert resolve(build_config(overrides={"input": str(copy), "limit": 3})).run_id != shipped.run_id

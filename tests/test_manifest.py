"""Manifest rows: schema validation (each kind of bad input names its field), a property test over
arbitrary rows, and reading JSONL / Parquet manifests from files, prefixes and s3://."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.examples import bad_rows, example_rows, write_manifest
from pipeline.manifest import SAFE_ID, ManifestRow, RowError, parse_line, validate_row
from pipeline.plan import plan_units
from pipeline.sources import InputError, default_manifest, manifest_files, read_manifest


def test_example_rows_are_valid_and_poses_are_rigid():
    for row in example_rows(6, seed=3):
        parsed = validate_row(row)
        assert isinstance(parsed, ManifestRow), parsed
        poses = parsed.trajectory.poses(17)
        assert poses.shape == (17, 4, 4)
        np.testing.assert_allclose(poses[0], np.eye(4))


BAD = [(line, field) for line, field in bad_rows()[1:-1]]  # the pair sharing an id is checked below
FOUND_IN_PREP = ("bad-frames", "bad-missing-image", "bad-short-poses")  # prep knows the model, reads URIs


@pytest.mark.parametrize("line,field", BAD, ids=[f for _, f in BAD])
def test_bad_row_names_its_field(line, field):
    result = parse_line(line, source="m.jsonl", line=7)
    if any(f'"id": "{row_id}"' in line for row_id in FOUND_IN_PREP):
        assert isinstance(result, ManifestRow)
        return
    assert isinstance(result, RowError), result
    assert result.field == field
    assert result.line == 7 and result.source == "m.jsonl"
    assert result.reason


def test_error_names_row_id_when_readable():
    error = parse_line(json.dumps({"id": "abc-1", "task": "prediction"}), source="m", line=1)
    assert error.id == "abc-1" and error.field == "observation"
    malformed = parse_line('{"id": "abc-2", "task": ', source="m", line=2)
    assert malformed.id == "abc-2" and malformed.field == "row"


SCENE, IMAGE, VIDEO = {"scene": {"seed": 1}}, {"image": "s3://b/x.png"}, {"video": "s3://b/x.mp4"}
PATH = {"segments": [["forward", 4]]}


@pytest.mark.parametrize("task,observation,given,field", [
    ("prediction", IMAGE, {}, "trajectory"),
    ("prediction", SCENE, {}, "trajectory"),
    ("planning", IMAGE, {"trajectory": PATH}, "goal"),
    ("planning", SCENE, {}, "goal"),
    ("reconstruction", IMAGE, {"trajectory": PATH}, "observation"),
    ("reconstruction", SCENE, {}, "observation"),
])
def test_a_row_without_an_input_its_task_needs_names_where_it_belongs(task, observation, given, field):
    result = validate_row({"id": "r", "task": task, "observation": observation, **given})
    assert isinstance(result, RowError) and result.field == field and f"task {task!r} needs" in result.reason


@pytest.mark.parametrize("task,observation,given", [
    ("prediction", VIDEO, {"trajectory": PATH}),  # a video gives its first frame as the image
    ("planning", VIDEO, {"goal": {"image": "s3://b/g.png"}}),
    ("planning", SCENE, {"trajectory": PATH}),
    ("reconstruction", SCENE, {"trajectory": PATH}),
    ("reconstruction", VIDEO, {}),
])
def test_rows_giving_what_their_task_needs_are_valid(task, observation, given):
    assert isinstance(validate_row({"id": "r", "task": task, "observation": observation, **given}), ManifestRow)


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "a.b", "", ".hidden", "x" * 81, "a\nb", "a b", "é"])
def test_ids_that_could_escape_or_break_keys_are_refused(bad_id):
    row = dict(example_rows(1)[0], id=bad_id)
    result = validate_row(row)
    assert isinstance(result, RowError) and result.field == "id"


def test_duplicate_ids_fail_after_the_first(tmp_path):
    rows = example_rows(3)
    path = tmp_path / "m.jsonl"
    write_manifest(rows + [rows[1]], str(path))
    units = list(plan_units(read_manifest(str(path)), rows_per_shard=2))
    errors = [e for u in units for e in u.errors]
    assert [(e.id, e.field, e.line) for e in errors] == [(rows[1]["id"], "id", 4)]
    assert [e.row.id for u in units for e in u.valid] == [r["id"] for r in rows]


# ------------------------------------------------------------------ property test over manifest rows
json_scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["id", "task", "observation", "trajectory", "goal", "frames", "steps", "guidance", "seed", "fov_deg"]


@st.composite
def mutated_rows(draw):
    """A valid row with some fields replaced by arbitrary JSON, deleted, or added."""
    row = dict(example_rows(1, seed=draw(st.integers(0, 50)))[0])
    for name in draw(st.lists(st.sampled_from(FIELDS + ["extra"]), max_size=3)):
        action = draw(st.sampled_from(["replace", "delete"]))
        if action == "delete":
            row.pop(name, None)
        else:
            row[name] = draw(json_values)
    return row


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_rows())
def test_any_row_validates_or_names_a_field(row):
    text = json.dumps(row)  # NaN/Infinity tokens included, as real JSONL can carry them
    result = parse_line(text, source="m", line=1)
    if isinstance(result, RowError):
        top = result.field.split(".")[0].split("[")[0]
        assert top in FIELDS + ["extra", "row"], result
        assert result.reason
        if result.id is not None:
            assert SAFE_ID.fullmatch(result.id)
    else:
        assert SAFE_ID.fullmatch(result.id)
        assert result.task in ("prediction", "planning", "reconstruction")
        if result.trajectory is not None:
            poses = result.trajectory.poses(result.frames or 17)
            assert np.isfinite(poses).all()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data):
    result = parse_line(data.decode("utf-8", errors="replace"), source="m", line=1)
    assert isinstance(result, (RowError, ManifestRow))


# --------------------------------------------------------------------------------------- sources
def test_shipped_default_manifest_is_valid():
    entries = list(read_manifest(default_manifest()))
    assert len(entries) >= 4
    assert all(e.row is not None for e in entries)
    assert {e.row.task for e in entries} == {"prediction", "planning", "reconstruction"}


def test_jsonl_and_parquet_read_the_same_rows(tmp_path):
    rows = example_rows(5, seed=1)
    write_manifest(rows, str(tmp_path / "m.jsonl"))
    write_manifest(rows, str(tmp_path / "m.parquet"))
    as_jsonl = [e.row for e in read_manifest(str(tmp_path / "m.jsonl"))]
    as_parquet = [e.row for e in read_manifest(f"file://{tmp_path}/m.parquet")]
    assert as_jsonl == as_parquet and len(as_jsonl) == 5


def test_prefix_of_shards_reads_in_name_order_with_limit(tmp_path):
    rows = example_rows(6, seed=2)
    write_manifest(rows[3:], str(tmp_path / "part-001.jsonl"))
    write_manifest(rows[:3], str(tmp_path / "part-000.parquet"))
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert [p.rsplit("/", 1)[1] for p in manifest_files(str(tmp_path)).files] == ["part-000.parquet", "part-001.jsonl"]
    ids = [e.row.id for e in read_manifest(str(tmp_path) + "/", limit=5)]
    assert ids == [r["id"] for r in rows[:5]]
    assert [e.position for e in read_manifest(str(tmp_path / "part-"))] == list(range(6))


def test_missing_manifest_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no manifest"):
        list(read_manifest(str(tmp_path / "nothing-here")))


def test_manifest_on_s3(s3_server):
    bucket = s3_server.make_bucket("manifests-test")
    rows = example_rows(4, seed=5)
    options = s3_server.storage_options()
    write_manifest(rows[:2], f"{bucket}/in/a.jsonl", options)
    write_manifest(rows[2:], f"{bucket}/in/b.parquet", options)
    entries = list(read_manifest(f"{bucket}/in/", options))
    assert [e.row.id for e in entries] == [r["id"] for r in rows]
    assert entries[0].source.startswith("s3://")

"""Where a run's files live under its output prefix, and how a run tells its own files from others.

    run.json                               the run record: layout, run id, what is generated
    shards/<run id>-000003-1f2e3d4c.tar    unit 3's shard; the token is unique to one write attempt
    shards/<run id>-000003-1f2e3d4c.parquet  its metadata table (pipeline.schema), written beside it
    _commits/unit-00000003.e000002.json    unit 3's commit marker, lease epoch 2 (worker, create-only)
    _commits/log-e000002-000000.jsonl      markers compacted by the driver of epoch 2 (create-only)
    _lease/epoch-000002.json               the lease of epoch 2: which driver may write, until when
    index.json, summary.json, errors.jsonl, preview.png, preview.gif, schema.json

A run owns exactly these names: shard names carry its run id, and everything else lives under
``run.json``, which names the run. Anything else under the prefix is foreign: the run refuses the
prefix (exit status 2, naming the path) unless told to adopt it, and never modifies, deletes or
indexes a foreign file. Names of the wrong kind (a folder where a file should be) and symbolic links
where the run writes are refused in every case: a run never writes or deletes through a link.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from pipeline.config import OutputError
from pipeline.schema import SCHEMA_FILE, metadata_path
from pipeline.storage import Entry, Store

LAYOUT = "hero-rollouts/output-2"
RUN_FILE = "run.json"
INDEX_FILE = "index.json"
SUMMARY_FILE = "summary.json"
ERRORS_FILE = "errors.jsonl"
PREVIEW_FILES = ("preview.png", "preview.gif")
SHARDS_DIR = "shards"
COMMITS_DIR = "_commits"
LEASE_DIR = "_lease"
SHARD_SUFFIX = ".tar"
SIDE_SUFFIX = posixpath.splitext(metadata_path("shard.tar"))[1]  # a shard's metadata table
TOP_FILES = (RUN_FILE, INDEX_FILE, SUMMARY_FILE, ERRORS_FILE, SCHEMA_FILE, *PREVIEW_FILES)
TOP_DIRS = (SHARDS_DIR, COMMITS_DIR, LEASE_DIR)
TEMP_SUFFIX = r"(?:\.tmp-[0-9a-f]{32})?"  # a local atomic write in flight (pipeline.storage)
TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{32}$")
MARKER_NAME = re.compile(rf"unit-(?P<unit>\d{{8,}})\.e(?P<epoch>\d{{6,}})\.json{TEMP_SUFFIX}")
SEGMENT_NAME = re.compile(rf"log-e(?P<epoch>\d{{6,}})-(?P<seq>\d{{6,}})\.jsonl{TEMP_SUFFIX}")
LEASE_NAME = re.compile(rf"epoch-(?P<epoch>\d{{6,}})\.json{TEMP_SUFFIX}")


def shard_path(run_id: str, unit: int, token: str) -> str:
    return f"{SHARDS_DIR}/{run_id}-{unit:06d}-{token}{SHARD_SUFFIX}"


def marker_path(unit: int, epoch: int) -> str:
    return f"{COMMITS_DIR}/unit-{unit:08d}.e{epoch:06d}.json"


def segment_path(epoch: int, seq: int) -> str:
    return f"{COMMITS_DIR}/log-e{epoch:06d}-{seq:06d}.jsonl"


def lease_path(epoch: int) -> str:
    return f"{LEASE_DIR}/epoch-{epoch:06d}.json"


def shard_name_pattern(run_id: str) -> re.Pattern[str]:
    """This run's files in ``shards/``: shards and their side files (``stem`` names the attempt)."""
    suffixes = "|".join(re.escape(suffix) for suffix in (SHARD_SUFFIX, SIDE_SUFFIX))
    return re.compile(rf"(?P<stem>{re.escape(run_id)}-(?P<unit>\d{{6,}})-(?P<token>[0-9a-f]{{8}}))"
                      rf"(?:{suffixes}){TEMP_SUFFIX}")


def is_temp(name: str) -> bool:
    """Whether ``name`` is a local write that never finished (a temp file beside its target)."""
    return TEMP_NAME.search(name) is not None


@dataclass
class Inventory:
    """What the output prefix holds: this run's files by kind (``temps``: local writes of log and
    lease files that never finished), and every foreign path."""

    top: dict[str, Entry] = field(default_factory=dict)
    shards: dict[str, Entry] = field(default_factory=dict)
    markers: list[str] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    temps: dict[str, Entry] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return name in self.top

    def latest_epoch(self) -> int:
        """The newest lease epoch the listing shows (0 before the first driver)."""
        return max((int(LEASE_NAME.fullmatch(rel.rsplit("/", 1)[-1])["epoch"]) for rel in self.leases), default=0)


def take_inventory(store: Store, run_id: str) -> Inventory:
    """List the prefix (top level, ``shards/``, ``_commits/``, ``_lease/``) and sort every entry
    into this run's files or foreign ones; raise :class:`OutputError` for an entry of the wrong
    kind or a symbolic link where the run writes."""
    found = Inventory(top={e.name: e for e in _listing(store, "")})
    for name, entry in found.top.items():
        expected = "dir" if name in TOP_DIRS else "file" if name in TOP_FILES else None
        if expected is None:
            found.foreign.append(name)
        elif entry.kind == "link":
            raise OutputError(store.url(name), "is a symbolic link; a run never writes through links")
        elif entry.kind != expected:
            raise OutputError(store.url(name), f"is a {_kind(entry.kind)} where a {_kind(expected)} should be")
    if RUN_FILE not in found.top:  # nothing but a lease is ours before the run record exists
        found.foreign += [name for name in found.top if name != LEASE_DIR and name not in found.foreign]
    shard_name = shard_name_pattern(run_id)
    for entry in _listing(store, SHARDS_DIR) if SHARDS_DIR in found.top else []:
        rel = f"{SHARDS_DIR}/{entry.name}"
        if entry.kind == "file" and shard_name.fullmatch(entry.name):
            found.shards[entry.name] = entry
        else:
            found.foreign.append(rel)
    for folder, kinds in ((COMMITS_DIR, ((MARKER_NAME, found.markers), (SEGMENT_NAME, found.segments))),
                          (LEASE_DIR, ((LEASE_NAME, found.leases),))):
        for entry in _listing(store, folder) if folder in found.top else []:
            rel = f"{folder}/{entry.name}"
            bucket = next((names for pattern, names in kinds if pattern.fullmatch(entry.name)), None)
            if entry.kind != "file" or bucket is None:
                found.foreign.append(rel)
            elif is_temp(entry.name):
                found.temps[rel] = entry
            else:
                bucket.append(rel)
    return found


def _listing(store: Store, rel: str) -> list[Entry]:
    try:
        return store.entries(rel)
    except PermissionError as exc:
        raise OutputError(store.url(rel), f"cannot be listed: {exc.strerror or exc}") from None


def _kind(kind: str) -> str:
    return {"dir": "folder", "file": "file", "link": "symbolic link"}[kind]

"""Planning a run: manifest entries grouped into units (the unit of commit and resume).

Unit ``u`` holds the rows at positions ``[u * rows_per_shard, (u + 1) * rows_per_shard)`` of the
manifest, counting bad rows too, so unit membership (and every shard name) is the same on every
run of the same manifest. A committed unit's marker records its rows; a rerun whose manifest
disagrees with a marker is refused instead of mixing two manifests in one dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.manifest import RowError, row_digest
from pipeline.sources import ManifestEntry


@dataclass
class Unit:
    """One future shard: its number, its manifest entries (valid or not) and their fingerprints."""

    number: int
    entries: list[ManifestEntry] = field(default_factory=list)

    @property
    def valid(self) -> list[ManifestEntry]:
        return [e for e in self.entries if e.row is not None]

    @property
    def errors(self) -> list[RowError]:
        return [e.error for e in self.entries if e.error is not None]

    def rows(self) -> list[dict[str, Any]]:
        """Who is in this unit, as stored in its marker."""
        return [{"position": e.position, "id": e.row.id if e.row else (e.error.id if e.error else None),
                 "digest": row_digest(e.row) if e.row else None} for e in self.entries]


def plan_units(entries: list[ManifestEntry], rows_per_shard: int) -> list[Unit]:
    """Group entries into units; a repeated id is an error on every occurrence after the first."""
    first_seen: dict[str, ManifestEntry] = {}
    units: dict[int, Unit] = {}
    for entry in entries:
        if entry.row is not None:
            earlier = first_seen.setdefault(entry.row.id, entry)
            if earlier is not entry:
                entry.error = RowError(entry.row.id, "id", f"duplicate id (first at {earlier.source} line {earlier.line})",
                                       source=entry.source, line=entry.line)
                entry.row = None
        number = entry.position // rows_per_shard
        units.setdefault(number, Unit(number)).entries.append(entry)
    return [units[n] for n in sorted(units)]


def mismatched_unit(units: list[Unit], committed: dict[int, dict[str, Any]]) -> str | None:
    """Describe the first committed unit whose rows differ from this manifest's, or None."""
    planned = {unit.number: unit for unit in units}
    for number, marker in sorted(committed.items()):
        unit = planned.get(number)
        if unit is None:
            return f"unit {number} is committed but the manifest (with this limit) has no such unit"
        if marker.get("rows") != unit.rows():
            return f"unit {number} was committed from different manifest rows"
    return None

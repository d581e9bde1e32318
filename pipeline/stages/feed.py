"""The read stage: units planned on the driver stream into Ray Data while the manifest is still read.

The driver's planner puts blocks of planned unit rows into a :class:`UnitFeed` actor; it is bounded,
so the planner waits while the pipeline is busy and the driver's memory stays flat in the manifest's
size. The read tasks of :class:`PlannedUnits` pull the blocks out until the feed is closed. The feed
also counts the generate actors that have loaded their model, for the driver's progress line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

CLOSED = None  # what a read task gets once the feed is closed and empty


class UnitFeed:
    """A bounded queue of blocks between the driver's planner and the read tasks (a Ray actor)."""

    def __init__(self, capacity: int) -> None:
        self.queue: asyncio.Queue = asyncio.Queue(capacity)
        self.put_blocks = 0
        self.taken = 0
        self.actors_ready = 0

    async def put(self, block: pa.Table) -> None:
        """Queue a block; waits while the feed is full."""
        await self.queue.put(block)
        self.put_blocks += 1

    async def get(self) -> pa.Table | None:
        """The next block, or :data:`CLOSED` (left in place for every other reader)."""
        block = await self.queue.get()
        if block is CLOSED:
            self.queue.put_nowait(CLOSED)
        else:
            self.taken += 1
        return block

    async def close(self) -> None:
        await self.queue.put(CLOSED)

    def actor_ready(self) -> None:
        self.actors_ready += 1

    def stats(self) -> dict[str, int]:
        return {"blocks_put": self.put_blocks, "blocks_taken": self.taken, "actors_ready": self.actors_ready}


def start_feed(capacity: int) -> Any:
    """A new feed actor (no CPU reserved: it only passes small blocks along)."""
    import ray

    return ray.remote(num_cpus=0)(UnitFeed).remote(capacity)


class PlannedUnits(Datasource):
    """A datasource of ``readers`` read tasks, each pulling blocks from the feed until it closes."""

    def __init__(self, feed: Any, readers: int) -> None:
        super().__init__()
        self.feed = feed
        self.readers = readers

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        feed = self.feed
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(lambda: _pull(feed), metadata) for _ in range(self.readers)]


def _pull(feed: Any) -> Iterator[pa.Table]:
    import ray

    while (block := ray.get(feed.get.remote())) is not CLOSED:
        yield block

"""The Ray Data stages and the plan that chains them:

    read (PlannedUnits: units streamed from the driver's planner)
      -> prep (prepare_units, Ray tasks)
      -> generate (GenerateUnits, an actor pool; each actor owns a world model and its accelerator)
      -> encode and write (encode_and_write, Ray tasks: each unit's shard written and committed there)

A dataset row is one unit of manifest rows (:mod:`pipeline.stages.units`); inside a unit, rows use
the per-row wire format of :mod:`pipeline.stages.rows`.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import JobConfig
    from pipeline.sink import ShardWriter

MAX_READERS = 4
READER_CPUS = 0.1  # read tasks mostly wait for the planner
PREP_TASKS_PER_ACTOR = 2
ONE_UNIT_PER_BLOCK = 1  # target block size in bytes: every block is handed on at once and holds one unit


def units_per_call(config: "JobConfig") -> int:
    """Units per generate call, so that a model call gets ``generate.batch_size`` rows."""
    return max(1, math.ceil(config.generate.batch_size / config.sink.rows_per_shard))


def readers(config: "JobConfig") -> int:
    return min(config.generate.actors, MAX_READERS)


def build_dataset(config: "JobConfig", feed: Any, writer: "ShardWriter"):
    """The Ray Data plan of a run: the planned units from ``feed`` through prep, generate and
    encode-and-write; the dataset's rows are the units' commit outcomes.

    Every block holds one unit, so a lost task or actor redoes one unit's work. Prep runs on a
    task pool of ``PREP_TASKS_PER_ACTOR`` tasks per actor: it keeps the actors fed without crowding
    them out, and Ray Data fuses a task stage into the actor stage after it only when the task
    pool's size is unset or equal to the actor pool's, so prep never runs inside the actors.
    """
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from hero.models import model_spec
    from pipeline.stages.encode import encode_and_write
    from pipeline.stages.feed import PlannedUnits
    from pipeline.stages.units import GenerateUnits, prepare_units

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    context.target_max_block_size = ONE_UNIT_PER_BLOCK
    gen = config.generate
    sources = readers(config)
    return (
        ray.data.read_datasource(PlannedUnits(feed, sources), override_num_blocks=sources, num_cpus=READER_CPUS)
        .map_batches(prepare_units, batch_size=1, num_cpus=config.ray.prep_num_cpus,
                     compute=TaskPoolStrategy(size=PREP_TASKS_PER_ACTOR * gen.actors),
                     fn_kwargs={"spec": model_spec(config.model.name, **config.model.options),
                                "storage_options": config.sink.storage_options})
        .map_batches(GenerateUnits, batch_size=units_per_call(config), compute=ActorPoolStrategy(size=gen.actors),
                     num_gpus=gen.num_gpus, num_cpus=gen.num_cpus,
                     fn_constructor_kwargs={"feed": feed, "rows_per_call": gen.batch_size,
                                            "model": config.model.name, "model_options": config.model.options,
                                            "accel": config.accel.name, "accel_options": config.accel.options,
                                            "steps": gen.steps, "audit": config.audit.model_dump()})
        .map_batches(encode_and_write, batch_size=1, num_cpus=config.ray.encode_num_cpus,
                     fn_kwargs={"writer": writer, "model": config.model.name})
    )

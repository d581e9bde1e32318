"""World-model backends behind one interface (:class:`~hero.models.base.WorldModel`), by name."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from hero.models.base import TASKS, Rollout, RolloutRequest, WorldModel

if TYPE_CHECKING:
    from hero.models.cogvideox_world import ModelSpec


def _tiny(**options) -> WorldModel:
    from hero.models.toyworld import load_tiny
    return load_tiny(**options)


def _toyworld(**options) -> WorldModel:
    from hero.models.toyworld import load_toyworld
    return load_toyworld(**options)


def _aether(**options) -> WorldModel:
    from hero.models.aether import load_aether
    return load_aether(**options)


MODELS: dict[str, Callable[..., WorldModel]] = {"tiny": _tiny, "toyworld": _toyworld, "aether": _aether}


def model_spec(name: str, **options) -> ModelSpec:
    """The spec (resolution, frame counts, defaults) of model ``name`` without loading any weights.

    Drivers use it to plan and validate work; only actors pay for the weights.
    """
    if name == "tiny":
        from hero.models.toyworld.model import TINY_SPEC
        return TINY_SPEC
    if name == "toyworld":
        from hero.models.toyworld.model import WEIGHTS_DIR, toyworld_spec
        return toyworld_spec(options.get("weights", WEIGHTS_DIR))
    if name == "aether":
        from hero.models.aether import AETHER_SPEC
        sizes = {key: int(options[key]) for key in ("height", "width") if key in options}
        return dataclasses.replace(AETHER_SPEC, **sizes)
    raise ValueError(f"model: unknown {name!r}; choose from {sorted(MODELS)}")


def load_model(name: str, **options) -> WorldModel:
    """Build the world model registered as ``name`` ("tiny", "toyworld", "aether")."""
    if name not in MODELS:
        raise ValueError(f"model: unknown {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](**options)


__all__ = ["MODELS", "TASKS", "Rollout", "RolloutRequest", "WorldModel", "load_model", "model_spec"]

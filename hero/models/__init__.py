"""World-model backends behind one interface (:class:`~hero.models.base.WorldModel`), by name."""

from __future__ import annotations

import dataclasses
from typing import Callable

from hero.models.base import TASKS, ModelSpec, Rollout, RolloutRequest, WorldModel


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    """A world model by name: how to build it, and how to read its spec without any weights."""

    load: Callable[..., WorldModel]
    spec: Callable[..., ModelSpec]


def _load_tiny(**options) -> WorldModel:
    from hero.models.toyworld import load_tiny
    return load_tiny(**options)


def _tiny_spec(**options) -> ModelSpec:
    from hero.models.toyworld.model import TINY_SPEC
    return TINY_SPEC


def _load_toyworld(**options) -> WorldModel:
    from hero.models.toyworld import load_toyworld
    return load_toyworld(**options)


def _toyworld_spec(**options) -> ModelSpec:
    from hero.models.toyworld.model import WEIGHTS_DIR, toyworld_spec
    return toyworld_spec(options.get("weights", WEIGHTS_DIR))


def _load_aether(**options) -> WorldModel:
    from hero.models.aether import load_aether
    return load_aether(**options)


def _aether_spec(**options) -> ModelSpec:
    from hero.models.aether import AETHER_SPEC
    sizes = {key: int(options[key]) for key in ("height", "width") if key in options}
    return dataclasses.replace(AETHER_SPEC, **sizes)


MODELS: dict[str, RegisteredModel] = {
    "tiny": RegisteredModel(_load_tiny, _tiny_spec),
    "toyworld": RegisteredModel(_load_toyworld, _toyworld_spec),
    "aether": RegisteredModel(_load_aether, _aether_spec),
}


def _registered(name: str) -> RegisteredModel:
    if name not in MODELS:
        raise ValueError(f"model: unknown {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


def model_spec(name: str, **options) -> ModelSpec:
    """The spec (resolution, frame counts, defaults) of model ``name`` without loading any weights.

    Drivers use it to plan and validate work; only actors pay for the weights.
    """
    return _registered(name).spec(**options)


def load_model(name: str, **options) -> WorldModel:
    """Build the world model registered as ``name`` ("tiny", "toyworld", "aether")."""
    return _registered(name).load(**options)


__all__ = ["MODELS", "TASKS", "ModelSpec", "RegisteredModel", "Rollout", "RolloutRequest", "WorldModel", "load_model", "model_spec"]

"""World-model backends behind one interface (:class:`~hero.models.base.WorldModel`), by name."""

from __future__ import annotations

from typing import Callable

from hero.models.base import TASKS, Rollout, RolloutRequest, WorldModel


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


def load_model(name: str, **options) -> WorldModel:
    """Build the world model registered as ``name`` ("tiny", "toyworld", "aether")."""
    if name not in MODELS:
        raise ValueError(f"model: unknown {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](**options)


__all__ = ["MODELS", "TASKS", "Rollout", "RolloutRequest", "WorldModel", "load_model"]

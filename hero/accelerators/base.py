"""The accelerator types: what ``apply_accelerator`` returns, and what a registry entry holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from hero.cache.hooks import transformer_of


class Accelerator:
    """An accelerator applied to one transformer: statistics, per-generation reset, removal.

    ``model`` is the transformer or what holds it (a diffusers pipeline or a world model, whose
    scheduler HERO reads the step count from). The base class is the model as it is
    (``--accel none``).
    """

    def __init__(self, name: str, model: nn.Module | Any, options: dict[str, Any]) -> None:
        self.name = name
        self.model = model
        self.transformer = transformer_of(model)[0]
        self.options = options

    def stats(self) -> dict[str, Any]:
        """JSON-safe description and statistics of the latest generation."""
        return {"accelerator": self.name, "options": json_safe(self.options), **self._stats()}

    def _stats(self) -> dict[str, Any]:
        return {}

    def reset(self) -> None:
        """Forget per-generation state (also done automatically when a new generation starts)."""
        registry = self.transformer.__dict__.get("_diffusers_hook")
        if registry is not None:
            registry.reset_stateful_hooks()

    def remove(self) -> None:
        """Take the accelerator off; the transformer computes as before."""


class HookAccelerator(Accelerator):
    """A method installed by an ``apply``/``remove`` function pair with a statistics function,
    each taking the model: HERO and the FORA/ToCa baselines."""

    def __init__(self, name: str, model: nn.Module | Any, options: dict[str, Any],
                 apply: Callable[[nn.Module | Any, dict[str, Any]], None],
                 remove: Callable[[nn.Module | Any], None],
                 stats: Callable[[nn.Module | Any], dict[str, Any]]) -> None:
        super().__init__(name, model, options)
        self._remove, self._stats_of = remove, stats
        apply(model, options)

    def _stats(self) -> dict[str, Any]:
        return self._stats_of(self.model)

    def remove(self) -> None:
        self._remove(self.model)


Factory = Callable[[str, nn.Module, dict[str, Any]], Accelerator]


@dataclass(frozen=True)
class AcceleratorSpec:
    """A registry entry: what it is, its preset options, how to apply it, and which other
    options it accepts."""

    description: str
    defaults: dict[str, Any]
    apply: Factory
    option_names: tuple[str, ...] = field(default=())

    def options(self, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """The preset's options with ``overrides``; unknown option names are refused."""
        allowed = set(self.defaults) | set(self.option_names)
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(f"accelerator {name!r} has no option(s) {unknown}; it takes "
                             f"{sorted(allowed)}")
        return {**self.defaults, **overrides}


def json_safe(value: Any) -> Any:
    """Options as JSON: containers walked, scalars kept, anything else by its ``repr``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)

"""Forecasting what the deep stack adds, from the FULL steps, in timestep (or step) positions.

A :class:`LinearForecast` keeps tensors as they were at the last FULL step ``a`` and their slope
since the one before, ``b``: ``f(s) = f(a) + (s - a) (f(a) - f(b)) / (a - b)``. Positions are the
sampler's timesteps, so a non-uniform schedule is extrapolated along the curve it samples; for
equally spaced steps this is ``f(t+1) = 2 f(t) - f(t-1)``. With one FULL step seen the tensors are
held (with a one-step warm-up, the presets' choice, the first forecast after the warm-up holds
and the next extrapolates over a whole interval, instead of extrapolating the slope of the two
fastest-changing steps).

What is forecast is HERO's ``deep_forecast``: the deep stack's whole residual (one tensor), or
every deep block's sub-layer outputs before their gates (the gates are then those of the step being
forecast, computed from its timestep embedding: a block's gates move with the timestep in ways a
straight line through two FULL steps misses). Everything stays on the device (positions are
0-dim tensors): forecasting costs no sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LinearForecast:
    """Tensors (B, N, C) at the last FULL step, their slopes per unit of position, and the sum of
    their forecasts at any position, each scaled by a gate."""

    def __init__(self) -> None:
        self.position: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []
        self.slopes: list[torch.Tensor] | None = None

    def push(self, position: torch.Tensor, values: Sequence[torch.Tensor]) -> None:
        """Record a FULL step's tensors at ``position`` (a 0-dim tensor)."""
        position = position.float()
        if self.position is not None:
            gap = (position - self.position).to(values[0].dtype)
            self.slopes = [(new - old) / gap for new, old in zip(values, self.values)]
        self.position, self.values = position, list(values)

    def add_to_(self, out: torch.Tensor, position: torch.Tensor,
                gates: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """``out += sum_i gate_i * forecast_i(position)`` in place (a gate of None is one)."""
        if self.position is None:
            raise RuntimeError("no FULL step has been recorded yet; the schedule must start FULL")
        gates = gates if gates is not None else [None] * len(self.values)
        elapsed = (position.float() - self.position).to(out.dtype)
        for i, (value, gate) in enumerate(zip(self.values, gates)):
            scale = torch.ones((), dtype=out.dtype, device=out.device) if gate is None else gate
            out.addcmul_(scale, value)
            if self.slopes is not None:
                out.addcmul_(scale * elapsed, self.slopes[i])
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in [*self.values, *(self.slopes or [])])

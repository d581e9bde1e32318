"""Forecasting what the deep stack adds, from the FULL steps, in timestep (or step) positions.

A :class:`PolynomialForecast` of order ``n`` keeps, for each tensor, the Newton divided
differences through its last ``n + 1`` FULL steps ``a_0 > a_1 > ... > a_n`` and evaluates the
interpolating polynomial anywhere::

    f(s) = f[a_0] + f[a_0, a_1] (s - a_0) + f[a_0, a_1, a_2] (s - a_0)(s - a_1) + ...

Order 1 is the straight line through the last two FULL steps (for equally spaced steps
``f(t+1) = 2 f(t) - f(t-1)``); order 2 the parabola through the last three. Positions are the
sampler's timesteps, so a non-uniform schedule is extrapolated along the curve it samples. With
fewer FULL steps seen than the order needs, the forecast uses the order they allow: one FULL step
is held (with a one-step warm-up, the presets' choice, the first forecast after the warm-up holds
and the next extrapolates over a whole interval, instead of extrapolating the slope of the two
fastest-changing steps), two give the line.

What is forecast is HERO's ``deep_forecast``: the deep stack's whole residual (one tensor), or
every deep block's sub-layer outputs before their gates (the gates are then those of the step being
forecast, computed from its timestep embedding: a block's gates move with the timestep in ways a
polynomial through the FULL steps misses). Everything stays on the device (positions are 0-dim
tensors): forecasting costs no sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PolynomialForecast:
    """Tensors (B, N, C) seen on FULL steps, as divided differences up to ``order``, and the sum
    of their forecasts at any position, each scaled by a gate."""

    def __init__(self, order: int = 1) -> None:
        if order < 1:
            raise ValueError(f"forecast order must be >= 1, got {order}")
        self.order = order
        self.positions: list[torch.Tensor] = []  # newest first, at most order + 1
        self.differences: list[list[torch.Tensor]] = []  # [j][i]: f[a_0..a_j] of tensor i

    def push(self, position: torch.Tensor, values: Sequence[torch.Tensor]) -> None:
        """Record a FULL step's tensors at ``position`` (a 0-dim tensor)."""
        position = position.float()
        differences = [list(values)]
        for j, older in enumerate(self.differences[:self.order], start=1):
            gap = (position - self.positions[j - 1]).to(values[0].dtype)
            differences.append([(new - old) / gap for new, old in zip(differences[-1], older)])
        self.positions = [position, *self.positions][:self.order + 1]
        self.differences = differences

    def add_to_(self, out: torch.Tensor, position: torch.Tensor,
                gates: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """``out += sum_i gate_i * forecast_i(position)`` in place (a gate of None is one)."""
        if not self.positions:
            raise RuntimeError("no FULL step has been recorded yet; the schedule must start FULL")
        position = position.float()
        weights, weight = [], torch.ones((), dtype=out.dtype, device=out.device)
        for j in range(len(self.differences)):  # Newton basis: prod_{m<j} (s - a_m)
            weights.append(weight)
            weight = weight * (position - self.positions[j]).to(out.dtype)
        gates = gates if gates is not None else [None] * len(self.differences[0])
        for i, gate in enumerate(gates):
            for weight, difference in zip(weights, self.differences):
                out.addcmul_(weight if gate is None else gate * weight, difference[i])
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for level in self.differences for t in level)

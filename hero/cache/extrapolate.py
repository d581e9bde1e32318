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
    """The forecasts of ``slots`` tensors (B, N, C) seen together on every FULL step, as divided
    differences up to ``order``, and the gated sum of those forecasts at any position.

    All slots live in one table (B, C, slots * (order + 1), N), a row per slot and level: a
    PARTIAL step's whole forecast, ``sum_i gate_i * sum_j w_j f_ij``, is then one batched
    matrix-vector product that reads every cached tensor once, instead of a pass over ``out`` per
    tensor and level (the sum is memory bound: it is most of what a PARTIAL step costs beyond its
    shallow blocks). A FULL step updates the differences in place: the newest value takes the row
    of the level that drops out, and each older row becomes the next level's difference, so which
    row holds which level rotates (``rows[j]``, the same for every slot).
    """

    def __init__(self, order: int = 1, slots: int = 1) -> None:
        if order < 1:
            raise ValueError(f"forecast order must be >= 1, got {order}")
        self.order, self.slots, self.levels = order, slots, order + 1
        self.positions: list[torch.Tensor] = []  # newest first, at most order + 1
        self.rows = list(range(self.levels))  # rows[j]: the row of level j within a slot
        self.table: torch.Tensor | None = None  # (B, C, slots * levels, N), zero where unseen

    def start(self, position: torch.Tensor) -> None:
        """A FULL step at ``position`` (a 0-dim tensor) begins; its tensors follow by ``push``."""
        free = self.rows[min(len(self.positions), self.order)]  # unused, or the oldest level's
        self.rows = [free, *(row for row in self.rows if row != free)]
        self.positions = [position.float(), *self.positions][:self.levels]

    def push(self, values: Sequence[torch.Tensor], slot: int = 0) -> None:
        """Record this FULL step's ``values`` in slots ``slot``, ``slot + 1``, ..."""
        if not self.positions:
            raise RuntimeError("start(position) must open the FULL step before push")
        for index, value in enumerate(values, start=slot):
            self._push_one(index, value)

    def _push_one(self, slot: int, value: torch.Tensor) -> None:
        if self.table is None:
            batch, tokens, width = value.shape
            self.table = value.new_zeros(batch, width, self.slots * self.levels, tokens)
        base = slot * self.levels
        newer = self.table[:, :, base + self.rows[0]]
        newer.copy_(value.transpose(1, 2))
        for j in range(1, len(self.positions)):  # the row of old level j-1 becomes new level j
            row = self.table[:, :, base + self.rows[j]]
            gap = (self.positions[j] - self.positions[0]).to(value.dtype)
            row.sub_(newer).div_(gap)  # (new f[a_0..a_j-1] - old f[a_1..a_j]) / (a_0 - a_j)
            newer = row

    def weights(self, position: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Each row's weight in a slot at ``position``: the Newton basis ``prod_{m<j} (s - a_m)``
        of the level it holds, zero for levels not seen yet."""
        position = position.float()
        basis = [torch.zeros((), device=position.device)] * self.levels
        weight = torch.ones((), device=position.device)
        for row, seen_at in zip(self.rows, self.positions):
            basis[row] = weight
            weight = weight * (position - seen_at)
        return torch.stack(basis).to(dtype)

    def add_to_(self, out: torch.Tensor, position: torch.Tensor,
                gates: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """``out += sum_i gate_i * forecast_i(position)`` in place. A gate is (B, 1, C) per sample,
        (B, N, C) per token, or None (one); per-token gates take a pass each."""
        if self.table is None:
            raise RuntimeError("no FULL step has been recorded yet; the schedule must start FULL")
        table, dtype = self.table, self.table.dtype
        batch, width, _, tokens = table.shape
        weights = self.weights(position, dtype)
        gates = list(gates) if gates is not None else [None] * self.slots
        per_token = [i for i, gate in enumerate(gates) if gate is not None and gate.shape[1] != 1]
        ones = torch.ones(batch, width, dtype=dtype, device=table.device)
        scales = torch.stack([ones if gate is None else
                              torch.zeros_like(ones) if i in per_token else gate[:, 0].to(dtype)
                              for i, gate in enumerate(gates)], dim=-1)  # (B, C, slots)
        coefficients = (scales[..., None] * weights).flatten(-2)[:, :, None]  # (B, C, 1, K)
        out.add_(torch.matmul(coefficients, table)[:, :, 0].transpose(1, 2))
        for i in per_token:
            rows = table[:, :, i * self.levels:(i + 1) * self.levels]
            out.addcmul_(gates[i], torch.matmul(weights, rows).transpose(1, 2))
        return out

    @property
    def nbytes(self) -> int:
        return 0 if self.table is None else self.table.nbytes

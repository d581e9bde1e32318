"""Forecasting the deep stack's residual from the FULL steps, in timestep (or step) positions.

With ``a`` the last FULL step's position and ``b`` the one before, the linear forecast is
``D(s) = D(a) + (s - a) (D(a) - D(b)) / (a - b)``. Positions are the sampler's timesteps, so a
non-uniform schedule is extrapolated along the curve it samples; for equally spaced steps this is
``f(t+1) = 2 f(t) - f(t-1)``. With one FULL step seen the residual is held (with a one-step
warm-up, the presets' choice, the first forecast after the warm-up holds and the next extrapolates
over a whole interval, instead of extrapolating the slope of the two fastest-changing steps).
Everything stays on the device (positions are 0-dim tensors): forecasting costs no sync.
"""

from __future__ import annotations

import torch



class ResidualHistory:
    """A residual (B, N, C) at the last FULL steps, with their positions, and its forecast."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._out: torch.Tensor | None = None

    def push(self, position: torch.Tensor, residual: torch.Tensor) -> None:
        """Record a FULL step's residual at ``position`` (a 0-dim tensor)."""
        self.entries = [*self.entries[-1:], (position.float(), residual)]

    def predict(self, position: torch.Tensor) -> torch.Tensor:
        """The forecast at ``position``, in the residuals' dtype, in a buffer reused per call."""
        if not self.entries:
            raise RuntimeError("no FULL step has been recorded yet; the schedule must start FULL")
        a, d_a = self.entries[-1]
        if len(self.entries) == 1:
            return d_a
        b, d_b = self.entries[-2]
        weight = (position.float() - a) / (a - b)
        if self._out is None or self._out.shape != d_a.shape:
            self._out = torch.empty_like(d_a)
        return torch.sub(d_a, d_b, out=self._out).mul_(weight.to(d_a.dtype)).add_(d_a)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        buffers = [t for _, t in self.entries] + ([self._out] if self._out is not None else [])
        return sum(t.nbytes for t in buffers)

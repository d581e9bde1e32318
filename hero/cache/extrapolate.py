"""Forecasting the deep stack's residual from the FULL steps, in timestep (or step) positions.

With ``a`` the last FULL step's position and ``b`` the one before, the linear forecast is
``D(s) = D(a) + g (s - a) (D(a) - D(b)) / (a - b)``, ``g`` a damping factor per batch row. Positions
are the sampler's timesteps, so a non-uniform schedule is extrapolated along the curve it samples;
for equally spaced steps this is ``f(t+1) = 2 f(t) - f(t-1)``. With one FULL step seen the residual
is held. Everything stays on the device (positions are 0-dim tensors): forecasting costs no sync.

``g`` is 1 for ``"linear"``. ``"fitted"`` keeps a third FULL step and sets ``g`` to the factor that
would have forecast the latest FULL step best from the two before it (least squares per row,
clamped to [0, 1]): the correction shrinks the slope where the trajectory bends, and before three
FULL steps exist (the first forecast after warm-up, made from the fastest-changing steps) ``g`` is
one half.
"""

from __future__ import annotations

import torch

FORECASTS = ("linear", "fitted")
FIRST_FIT_DAMPING = 0.5


class ResidualHistory:
    """A residual (B, N, C) at the last FULL steps, with their positions, and its forecast."""

    def __init__(self, forecast: str = "linear") -> None:
        self.forecast = forecast
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.damping: torch.Tensor | None = None
        self._out: torch.Tensor | None = None

    def push(self, position: torch.Tensor, residual: torch.Tensor) -> None:
        """Record a FULL step's residual at ``position`` (a 0-dim tensor)."""
        keep = 2 if self.forecast == "fitted" else 1
        self.entries = [*self.entries[-keep:], (position.float(), residual)]
        if self.forecast == "fitted":
            self.damping = self._fitted_damping()

    def _fitted_damping(self) -> torch.Tensor | None:
        """Per-row factor that best maps the forecast from the two FULL steps before the latest
        onto the latest: ``<D(a) - D(b), w (D(b) - D(c))> / |w (D(b) - D(c))|^2``."""
        if len(self.entries) < 3:
            return None
        (c, d_c), (b, d_b), (a, d_a) = self.entries
        step = ((a - b) / (b - c)) * (d_b.float() - d_c.float())
        target = d_a.float() - d_b.float()
        fit = (target * step).flatten(1).sum(1) / step.square().flatten(1).sum(1).clamp_min(1e-12)
        return fit.clamp(0.0, 1.0)

    def predict(self, position: torch.Tensor) -> torch.Tensor:
        """The forecast at ``position``, in the residuals' dtype, in a buffer reused per call."""
        if not self.entries:
            raise RuntimeError("no FULL step has been recorded yet; the schedule must start FULL")
        a, d_a = self.entries[-1]
        if len(self.entries) == 1:
            return d_a
        b, d_b = self.entries[-2]
        weight = (position.float() - a) / (a - b)
        if self.forecast == "fitted":
            damping = self.damping if self.damping is not None else \
                torch.full((d_a.shape[0],), FIRST_FIT_DAMPING, device=d_a.device)
            weight = weight * damping.view(-1, *([1] * (d_a.ndim - 1)))
        if self._out is None or self._out.shape != d_a.shape:
            self._out = torch.empty_like(d_a)
        return torch.sub(d_a, d_b, out=self._out).mul_(weight.to(d_a.dtype)).add_(d_a)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        buffers = [t for _, t in self.entries] + ([self._out] if self._out is not None else [])
        return sum(t.nbytes for t in buffers)

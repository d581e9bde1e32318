"""Linear extrapolation of the deep stack's residual from the last two FULL steps.

With ``a`` the last FULL step and ``b`` the one before,
``D(s) = D(a) + (s - a) (D(a) - D(b)) / (a - b)``; for equally spaced steps this is
``f(t+1) = 2 f(t) - f(t-1)``. With only one FULL step seen the
residual is held (zeroth order).
"""

from __future__ import annotations

import torch

Residuals = tuple[torch.Tensor, ...]


def extrapolate_linear(position: float, a: float, d_a: Residuals, b: float, d_b: Residuals
                       ) -> Residuals:
    """Residuals at ``position`` on the line through ``(b, d_b)`` and ``(a, d_a)`` (in float32)."""
    weight = (position - a) / (a - b)
    return tuple((x.float() + weight * (x.float() - y.float())).to(x.dtype)
                 for x, y in zip(d_a, d_b, strict=True))


class ResidualHistory:
    """The deep stack's residuals (video, and condition tokens where blocks return them) at the
    last two FULL steps, with their step positions."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, Residuals]] = []

    def push(self, position: float, residuals: Residuals) -> None:
        self.entries = [*self.entries[-1:], (float(position), residuals)]

    def predict(self, position: float) -> Residuals:
        if not self.entries:
            raise RuntimeError("no FULL step has been recorded yet; the schedule must start FULL")
        a, d_a = self.entries[-1]
        if len(self.entries) == 1:
            return d_a
        b, d_b = self.entries[0]
        return extrapolate_linear(position, a, d_a, b, d_b)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, residuals in self.entries for t in residuals)

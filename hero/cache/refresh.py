"""Patch-wise token refresh: which video tokens the shallow blocks recompute on a PARTIAL step.

*Patch-wise sampling*: the T×H×W token grid is cut into patches and every patch gives the same
number of tokens, so refreshed tokens cover the frame evenly. *Frequency-aware tracking*: each
token carries how many steps ago it was last computed; within a patch the stalest tokens win,
ties broken by a deterministic key that rotates with the step (after a FULL step every token is
equally fresh, so successive PARTIAL steps cover a patch round-robin). Scoring tokens by their
measured rate of change instead (fast tokens refreshed more often) was tried twice and made no
measurable difference (``docs/hero.md``). No attention map is read, and the number of refreshed
tokens is a function of the grid alone, so every PARTIAL step has the same shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_TIE_SCALE = 1e-3  # tie-break bonus in [0, 1e-3): below one step of staleness


@dataclass(frozen=True)
class PatchLayout:
    """The token indices of every patch of a grid, and which top-k slots hold real tokens.

    ``members`` is (patches, patch volume) with ``num_tokens`` as padding where a patch runs over
    the grid's edge; ``valid_slots`` indexes the flattened (patches, per_patch) selection and keeps
    the slots that can only hold real tokens; ``tie_key`` gives each token a distinct rank inside
    its patch (staggered across patches) for deterministic tie breaks.
    """

    grid: tuple[int, int, int]
    per_patch: int
    members: torch.Tensor
    valid_slots: torch.Tensor
    tie_key: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_volume(self) -> int:
        return int(self.members.shape[1])

    @property
    def num_refreshed(self) -> int:
        return int(self.valid_slots.numel())


def build_layout(grid: tuple[int, int, int], patch_size: tuple[int, int, int], per_patch: int,
                 device: torch.device | str = "cpu") -> PatchLayout:
    """Cut a (T, H, W) token grid (tokens ordered t, h, w) into ``patch_size`` patches."""
    t, h, w = grid
    pt, ph, pw = (min(p, g) for p, g in zip(patch_size, grid))
    nt, nh, nw = -(-t // pt), -(-h // ph), -(-w // pw)
    num_tokens = t * h * w
    tt, hh, ww = torch.meshgrid(torch.arange(nt * pt), torch.arange(nh * ph), torch.arange(nw * pw),
                                indexing="ij")
    inside = (tt < t) & (hh < h) & (ww < w)
    token = torch.where(inside, (tt * h + hh) * w + ww, torch.full_like(tt, num_tokens))
    members = token.reshape(nt, pt, nh, ph, nw, pw).permute(0, 2, 4, 1, 3, 5)
    members = members.reshape(-1, pt * ph * pw)
    real_per_patch = (members < num_tokens).sum(dim=1)
    per_patch = min(per_patch, pt * ph * pw)
    slots = torch.arange(per_patch).expand(members.shape[0], per_patch)
    valid_slots = torch.nonzero((slots < real_per_patch[:, None]).flatten()).flatten()
    volume = members.shape[1]
    rank = (torch.arange(volume)[None, :] + torch.arange(members.shape[0])[:, None]) % volume
    tie_key = torch.zeros(num_tokens + 1, dtype=torch.long)
    tie_key[members.flatten()] = rank.flatten()
    return PatchLayout(grid=(t, h, w), per_patch=per_patch, members=members.to(device),
                       valid_slots=valid_slots.to(device), tie_key=tie_key[:num_tokens].to(device))


class RefreshTracker:
    """Per batch row and token: steps since it was last computed."""

    def __init__(self, layout: PatchLayout, batch_size: int, device: torch.device | str) -> None:
        self.layout = layout
        self.staleness = torch.zeros(batch_size, layout.num_tokens, device=device)
        self.partial_steps = 0

    def select(self) -> torch.Tensor:
        """The sorted (batch, refreshed) indices of the tokens to recompute on this PARTIAL step."""
        layout = self.layout
        volume = layout.patch_volume
        tie = (volume - 1 - (layout.tie_key + self.partial_steps) % volume).float() / volume
        score = self.staleness + _TIE_SCALE * tie
        padded = torch.cat([score, score.new_full((score.shape[0], 1), float("-inf"))], dim=1)
        in_patch = padded[:, layout.members].topk(layout.per_patch, dim=-1).indices
        chosen = layout.members.expand(score.shape[0], -1, -1).gather(-1, in_patch)
        chosen = chosen.flatten(1).index_select(1, layout.valid_slots)
        return chosen.sort(dim=1).values

    def advance(self, refreshed: torch.Tensor | None) -> None:
        """End a step: every token ages a step, the ``refreshed`` ones (None: all) restart at 0."""
        if refreshed is None:
            self.staleness.zero_()
            return
        self.staleness.add_(1.0).scatter_(1, refreshed, 0.0)
        self.partial_steps += 1

    @property
    def nbytes(self) -> int:
        return self.staleness.nbytes

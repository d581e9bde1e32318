"""ToCa / DuCa-style token-wise feature caching (Zou et al., 2024/2025), as diffusers hooks.

FULL steps (same schedule rule as FORA and HERO) run every block and cache each block's per-token
output residual. On the steps in between, every block recomputes only a fraction ``refresh_ratio``
of the video tokens and the rest take their cached residual. Which tokens is the method:

- **ToCa** (``score="attention"``) ranks tokens by how much attention the others pay them (the
  column sums of the softmax attention map, from a fixed sample of ``score_queries`` queries, taken
  on FULL steps from the block's own query/key projections), plus a bonus for how long a token has
  been cached (``staleness_weight``) and a bonus for the top token of every ``spatial_cell`` so the
  refreshed tokens spread over the frame. Fused attention kernels never expose attention maps, so
  ToCa pays for this score with an extra softmax on every FULL step of every block.
- **DuCa** (``score="random"``, ``reuse_every=2``) picks tokens at random (seeded) and alternates
  token-refresh steps with steps that reuse every block's cached residual outright.

Refreshed tokens run through the block with keys/values from all current tokens (the exact
attention for their queries, via HERO's block adapters), and their residuals replace the cached
ones. Unlike HERO, every block is refreshed and no block is ever extrapolated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from hero.baselines.common import (FULL, PARTIAL, REUSE, Baseline, ContextStates, StepState,
                                   is_full_step)
from hero.cache.adapters import BlockAdapter, BlockInputs, Selection, reuse_residuals

SCORES = ("attention", "random")


@dataclass
class TocaConfig:
    """Token-wise caching: schedule, refresh fraction and the score that picks refreshed tokens.

    Step ``s`` of ``S`` is FULL when ``s < warmup_steps``, ``s >= S - final_full_steps`` or
    ``(s - warmup_steps) % interval == interval - 1``. The other steps refresh
    ``round(refresh_ratio * N)`` video tokens per block, except that with ``reuse_every = r > 0``
    the ``j``-th step after a FULL step (``j = (s - warmup_steps) % interval``) with
    ``j % r == r - 1`` reuses every cached residual (DuCa's aggressive step). A token's score is
    ``attention_weight * importance`` (``score="attention"``; uniform noise for ``"random"``)
    ``+ staleness_weight * steps since it was computed`` ``+ spatial_weight`` if it is the top
    token of its ``spatial_cell`` (t, h, w tokens). ``interval=1`` recomputes everything.
    """

    interval: int = 3
    warmup_steps: int = 1
    final_full_steps: int = 0
    refresh_ratio: float = 0.25
    score: str = "attention"
    attention_weight: float = 1.0
    staleness_weight: float = 0.5
    spatial_weight: float = 1.0
    spatial_cell: tuple[int, int, int] = (1, 4, 4)
    score_queries: int = 64
    reuse_every: int = 0
    seed: int = 0
    num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        self.spatial_cell = tuple(int(c) for c in self.spatial_cell)
        for name, low in (("interval", 1), ("warmup_steps", 1), ("final_full_steps", 0),
                          ("score_queries", 1), ("reuse_every", 0)):
            if int(getattr(self, name)) < low:
                raise ValueError(f"TocaConfig.{name}={getattr(self, name)!r} must be >= {low}")
        if not 0.0 < self.refresh_ratio <= 1.0:
            raise ValueError(f"TocaConfig.refresh_ratio={self.refresh_ratio!r} must be in (0, 1]")
        if self.score not in SCORES:
            raise ValueError(f"TocaConfig.score={self.score!r} must be one of {SCORES}")
        if len(self.spatial_cell) != 3 or min(self.spatial_cell) < 1:
            raise ValueError(f"TocaConfig.spatial_cell={self.spatial_cell!r} must be three "
                             "positive ints (t, h, w)")
        for name in ("attention_weight", "staleness_weight", "spatial_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TocaConfig.{name}={getattr(self, name)!r} must be >= 0")

    def mode(self, step: int, num_steps: int | None) -> str:
        if is_full_step(step, num_steps, self.warmup_steps, self.interval, self.final_full_steps):
            return FULL
        position = (step - self.warmup_steps) % self.interval
        if self.reuse_every and position % self.reuse_every == self.reuse_every - 1:
            return REUSE
        return PARTIAL

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["spatial_cell"] = list(self.spatial_cell)
        return out


TOCA_PRESETS: dict[str, dict[str, Any]] = {
    # ToCa: attention + cache-frequency + spatial score, a quarter of the tokens refreshed
    "toca": dict(interval=3, refresh_ratio=0.25, score="attention"),
    # DuCa: random tokens, token-refresh and full-reuse steps alternating between FULL steps
    "duca": dict(interval=3, refresh_ratio=0.25, score="random", staleness_weight=0.0,
                 spatial_weight=0.0, reuse_every=2),
}


class BlockCache:
    """One block's cached residuals, per-token staleness and attention importance (per batch row)."""

    def __init__(self, hidden: torch.Tensor, encoder: torch.Tensor | None,
                 importance: torch.Tensor | None) -> None:
        self.hidden = hidden
        self.encoder = encoder
        self.importance = importance
        self.staleness = torch.zeros(hidden.shape[:2], device=hidden.device)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.hidden, self.encoder, self.importance, self.staleness)
                if t is not None]


class TocaState(StepState):
    """Per context: every block's :class:`BlockCache` and the random generator of DuCa's picks."""

    def clear_caches(self) -> None:
        self.blocks: dict[int, BlockCache] = {}
        self.generator: torch.Generator | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for cache in self.blocks.values() for t in cache.tensors()]


class TocaBlockHook(ModelHook):
    """One block: cache on FULL steps, refresh the best-scored tokens on PARTIAL, reuse on REUSE."""

    def __init__(self, state_manager: ContextStates, adapter: BlockAdapter, config: TocaConfig,
                 index: int) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.adapter = adapter
        self.config = config
        self.index = index
        self.cells: dict[tuple, torch.Tensor] = {}

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: TocaState = self.state_manager.get_state()
        inputs = self.adapter.bind(args, kwargs)
        cache = state.blocks.get(self.index)
        batch, tokens = inputs.hidden.shape[:2]
        if state.mode == FULL or cache is None:
            state.count(batch * tokens, batch * tokens)
            return self._full(module, state, inputs, args, kwargs)
        if state.mode == REUSE:
            state.count(batch * tokens, 0)
            cache.staleness.add_(1.0)
            encoder = None if cache.encoder is None else inputs.encoder + cache.encoder
            return self.adapter.pack_output(inputs.hidden + cache.hidden, encoder)
        index = self._select(state, cache)
        state.count(batch * tokens, batch * index.shape[1])
        return self._partial(module, cache, inputs, index)

    def _full(self, module: nn.Module, state: TocaState, inputs: BlockInputs, args: tuple,
              kwargs: dict[str, Any]) -> Any:
        importance = None
        if self.config.score == "attention":
            output, importance = self._forward_with_importance(module, inputs, args, kwargs)
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
        hidden, encoder = self.adapter.split_output(output)
        state.blocks[self.index] = BlockCache(
            hidden - inputs.hidden, None if encoder is None else encoder - inputs.encoder,
            importance)
        return output

    def _forward_with_importance(self, module: nn.Module, inputs: BlockInputs, args: tuple,
                                 kwargs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """The block's own forward, catching its query/key projections to score the tokens."""
        if self.adapter.name != "cogvideox":
            raise ValueError(f'TocaConfig.score="attention" supports CogVideoX blocks, not '
                             f'{self.adapter.name!r}; use score="random"')
        attn = module.attn1
        caught: dict[str, torch.Tensor] = {}
        handles = [attn.to_q.register_forward_hook(lambda _m, _a, out: caught.setdefault("q", out)),
                   attn.to_k.register_forward_hook(lambda _m, _a, out: caught.setdefault("k", out))]
        try:
            output = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        text = inputs.encoder.shape[1]
        importance = attention_importance(attn, caught["q"], caught["k"], text, inputs.rope,
                                          self.config.score_queries)
        return output, importance

    def _select(self, state: TocaState, cache: BlockCache) -> torch.Tensor:
        """The sorted (batch, refreshed) indices of the tokens this block recomputes now."""
        config = self.config
        batch, tokens = cache.staleness.shape
        if config.score == "attention":
            score = config.attention_weight * cache.importance
        else:
            if state.generator is None:
                state.generator = torch.Generator(cache.staleness.device).manual_seed(config.seed)
            score = torch.rand(batch, tokens, generator=state.generator,
                               device=cache.staleness.device)
        score = score + config.staleness_weight * cache.staleness
        if config.spatial_weight > 0:
            score = score + config.spatial_weight * self._cell_top(score, state.grid)
        count = max(1, round(config.refresh_ratio * tokens))
        return score.topk(count, dim=1).indices.sort(dim=1).values

    def _cell_top(self, score: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """1.0 where a token has the highest score of its spatial cell, else 0.0."""
        cells = self.cells.get(grid)
        if cells is None:
            cells = self.cells[grid] = cell_ids(grid, self.config.spatial_cell).to(score.device)
        cells = cells.expand(score.shape[0], -1)
        top = score.new_full((score.shape[0], int(cells.max()) + 1), float("-inf"))
        top = top.scatter_reduce(1, cells, score, reduce="amax")
        return (score >= top.gather(1, cells)).to(score.dtype)

    def _partial(self, module: nn.Module, cache: BlockCache, inputs: BlockInputs,
                 index: torch.Tensor) -> Any:
        """Tokens ``index`` through the block (keys/values from every token); the rest reuse."""
        selection = Selection(index)
        part = self.adapter.partial_forward(module, inputs, selection, None, "sdpa")
        hidden = reuse_residuals(inputs.hidden, cache.hidden, selection, part)
        if part.encoder is not None:
            cache.encoder = part.encoder - inputs.encoder
        cache.staleness.add_(1.0).scatter_(1, index, 0.0)
        return self.adapter.pack_output(hidden, part.encoder)


def attention_importance(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, text: int,
                         rope: tuple[torch.Tensor, torch.Tensor] | None, queries: int
                         ) -> torch.Tensor:
    """How much attention each video token receives (B, N), mean 1 per row.

    ``query``/``key`` are a CogVideoX attention's projections (B, text + N, C) before head norm and
    rotary embedding; ``queries`` video queries, evenly spaced, stand for all of them.
    """
    heads = attn.heads
    tokens = key.shape[1] - text
    pick = torch.linspace(0, tokens - 1, min(queries, tokens), device=key.device).round().long()
    q = query[:, text + pick].float().unflatten(2, (heads, -1)).transpose(1, 2)
    k = key.float().unflatten(2, (heads, -1)).transpose(1, 2)
    if attn.norm_q is not None:
        q = _norm(attn.norm_q, q)
    if attn.norm_k is not None:
        k = _norm(attn.norm_k, k)
    if rope is not None:
        cos, sin = (r.float() for r in rope)
        q = apply_rotary_emb(q, (cos[pick], sin[pick]))
        k = torch.cat([k[:, :, :text], apply_rotary_emb(k[:, :, text:], (cos, sin))], dim=2)
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    importance = probs[..., text:].sum(dim=(1, 2))
    return importance / importance.mean(dim=1, keepdim=True).clamp_min(1e-12)


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A head norm applied in its own parameters' dtype, result in float32."""
    weight = next(norm.parameters(), None)
    return norm(x if weight is None else x.to(weight.dtype)).float()


def cell_ids(grid: tuple[int, int, int], cell: tuple[int, int, int]) -> torch.Tensor:
    """The spatial cell of every token of a (T, H, W) grid (tokens ordered t, h, w): (1, T*H*W)."""
    t, h, w = grid
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    ct, ch, cw = cell
    per_h, per_w = -(-h // ch), -(-w // cw)
    ids = ((tt // ct) * per_h + hh // ch) * per_w + ww // cw
    return ids.reshape(1, -1)


TOCA = Baseline("ToCa", "toca_root", "toca_block", TocaState, TocaBlockHook)


def apply_toca(transformer: nn.Module, config: TocaConfig | None = None) -> None:
    """Accelerate ``transformer`` with ToCa/DuCa; calls must then run under ``cache_context``."""
    TOCA.apply(transformer, config or TocaConfig())


def remove_toca(transformer: nn.Module) -> None:
    """Remove ToCa's hooks and state; the model's own ``forward`` methods are back as they were."""
    TOCA.remove(transformer)


def toca_stats(transformer: nn.Module) -> dict[str, Any]:
    """Skipped block-token fraction and cache bytes of the latest generation, per context and total."""
    return TOCA.stats(transformer)

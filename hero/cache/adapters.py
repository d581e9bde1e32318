"""Model knowledge HERO needs, per diffusers video-transformer family, in a small registry.

An adapter says which module list holds the blocks, how a block's arguments map to video tokens,
condition tokens, timestep embedding and rotary embedding, where the T×H×W token grid comes from,
how a rotary embedding is sliced for a token subset, and how one block runs on a subset of video
tokens (queries = refreshed video tokens plus the condition tokens the block updates; keys/values =
all video tokens) so that the result can be scattered back.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hero.cache.attention import attention

KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass
class BlockInputs:
    """One block call: video tokens (B, N, C), condition tokens, timestep and rotary embeddings."""

    hidden: torch.Tensor
    encoder: torch.Tensor | None
    temb: torch.Tensor
    rope: Any


@dataclass
class PartialOutput:
    """A block run on refreshed tokens: their outputs (B, n, C) and residuals (outputs minus
    inputs), the condition tokens' outputs (when the block returns them), and the keys/values its
    attention read (every token's: what ``cached_kv`` mode keeps for the next step)."""

    hidden: torch.Tensor
    residual: torch.Tensor
    encoder: torch.Tensor | None
    key_value: KeyValue


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row numbers of the tokens ``index`` (B, n) in ``x`` (B, N, ...) seen as (B * N, ...)."""
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * x.shape[1]
    return (index + offsets).flatten()


def gather_tokens(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Tokens ``index`` (B, n) of ``x`` (B, N, ...), as (B, n, ...); ``None``: ``x`` itself.

    Whole rows are copied (``index_select``), several times faster on CPU than an element-wise
    ``gather`` with an expanded index.
    """
    if index is None:
        return x
    rows = x.reshape(-1, *x.shape[2:]).index_select(0, _rows(x, index))
    return rows.unflatten(0, tuple(index.shape))


def select_positions(table: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Per-position rows (N, ...) of a table shared by the batch (a rotary embedding) for the
    tokens ``index`` (B, n): (B, n, ...); ``None``: the whole table as (1, N, ...)."""
    if index is None:
        return table[None]
    return table.index_select(0, index.flatten()).unflatten(0, tuple(index.shape))


def write_tokens_(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` (B, n, ...) over the tokens ``index`` (B, n) of ``x`` in place (``x``
    must be viewable as (B * N, ...); a copy would lose the write, so others are refused)."""
    x.view(-1, *x.shape[2:]).index_copy_(0, _rows(x, index), values.reshape(-1, *x.shape[2:]))
    return x


def reuse_residuals(x: torch.Tensor, residual: torch.Tensor, index: torch.Tensor,
                    part: PartialOutput) -> torch.Tensor:
    """A block's output when only tokens ``index`` were computed (``part``) and the others reuse
    their cached ``residual``, which is brought up to date in place."""
    write_tokens_(residual, index, part.residual)
    return write_tokens_(x + residual, index, part.hidden)


class BlockAdapter:
    """Base: argument binding and output packing shared by every family."""

    name: str = ""
    model_class_name: str = ""
    block_list: str = ""
    returns_encoder: bool = False
    block_params: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return any(cls.__name__ == self.model_class_name for cls in type(model).__mro__)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, self.block_list)

    def token_grid(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[int, int, int]:
        """The (T, H, W) grid of video tokens of a model call with bound ``inputs``."""
        raise NotImplementedError

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> BlockInputs:
        values = {**dict(zip(self.block_params, args)), **kwargs}
        return self._inputs(values)

    def _inputs(self, values: dict[str, Any]) -> BlockInputs:
        raise NotImplementedError

    def split_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.returns_encoder:
            return output[0], output[1]
        return output, None

    def pack_output(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        return (hidden, encoder) if self.returns_encoder else hidden

    def partial_forward(self, block: nn.Module, inputs: BlockInputs, index: torch.Tensor | None,
                        key_value: KeyValue | None, backend: str) -> PartialOutput:
        """Run ``block`` for the video tokens ``index`` (B, n; None: all of them). ``key_value``
        None: keys/values from all tokens of the input; otherwise the cached keys/values, whose
        refreshed tokens (and condition tokens) are overwritten in place and then attended."""
        raise NotImplementedError


def bind_model_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model's forward arguments by name (positional ones included)."""
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    return {**dict(zip(names, args)), **kwargs}


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """CogVideoX/Flux rotary embedding on (B, S, H, D), pairs (2i, 2i+1); cos/sin broadcastable."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class CogVideoXAdapter(BlockAdapter):
    """``CogVideoXTransformer3DModel`` (CogVideoX, Aether): text tokens are concatenated in front of
    the video tokens inside attention and feed-forward, and every block returns both streams."""

    name = "cogvideox"
    model_class_name = "CogVideoXTransformer3DModel"
    block_list = "transformer_blocks"
    returns_encoder = True
    block_params = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb",
                    "attention_kwargs")

    def token_grid(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[int, int, int]:
        _, frames, _, height, width = inputs["hidden_states"].shape
        p, p_t = model.config.patch_size, model.config.patch_size_t
        return (frames if p_t is None else -(-frames // p_t), height // p, width // p)

    def _inputs(self, values: dict[str, Any]) -> BlockInputs:
        return BlockInputs(values["hidden_states"], values["encoder_hidden_states"], values["temb"],
                           values.get("image_rotary_emb"))

    def partial_forward(self, block: nn.Module, inputs: BlockInputs, index: torch.Tensor | None,
                        key_value: KeyValue | None, backend: str) -> PartialOutput:
        x, enc, temb = inputs.hidden, inputs.encoder, inputs.temb
        text, attn = enc.shape[1], block.attn1
        x_in = x_sub = gather_tokens(x, index)
        if key_value is None:
            norm_all, norm_enc, gate, enc_gate = block.norm1(x, enc, temb)
            kv_tokens = torch.cat([norm_enc, norm_all], dim=1)
            q_tokens = kv_tokens if index is None else \
                torch.cat([norm_enc, gather_tokens(norm_all, index)], dim=1)
        else:
            norm_sub, norm_enc, gate, enc_gate = block.norm1(x_sub, enc, temb)
            q_tokens = kv_tokens = torch.cat([norm_enc, norm_sub], dim=1)
        query = _heads(attn.to_q(q_tokens), attn.heads)
        key = _heads(attn.to_k(kv_tokens), attn.heads)
        value = _heads(attn.to_v(kv_tokens), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if inputs.rope is not None:
            cos, sin = inputs.rope
            cos_sub, sin_sub = (select_positions(t, index)[:, :, None] for t in (cos, sin))
            _rotate_video_(query, text, cos_sub, sin_sub)
            _rotate_video_(key, text, *((cos[None, :, None], sin[None, :, None])
                                        if key_value is None else (cos_sub, sin_sub)))
        if key_value is not None:
            key, value = (_refresh_cache_(cache, text, index, new)
                          for cache, new in zip(key_value, (key, value)))
        out = attention(query, key, value, backend).flatten(2).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        x_sub = x_sub + gate * out[:, text:]
        enc = enc + enc_gate * out[:, :text]
        norm_sub, norm_enc, gate_ff, enc_gate_ff = block.norm2(x_sub, enc, temb)
        ff = block.ff(torch.cat([norm_enc, norm_sub], dim=1))
        x_sub = x_sub + gate_ff * ff[:, text:]
        enc = enc + enc_gate_ff * ff[:, :text]
        return PartialOutput(x_sub, x_sub - x_in, enc, (key, value))


def _rotate_video_(x: torch.Tensor, text: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the video part (after ``text`` condition tokens) of (B, S, H, D) in place."""
    x[:, text:] = _rotate_interleaved(x[:, text:], cos, sin)


def _refresh_cache_(cache: torch.Tensor, text: int, index: torch.Tensor,
                    new: torch.Tensor) -> torch.Tensor:
    """A cached (B, text + N, H, D) key or value with the condition tokens and the video tokens
    ``index`` overwritten, in place, by ``new`` (B, text + n, H, D)."""
    cache[:, :text] = new[:, :text]
    return write_tokens_(cache, index + text, new[:, text:])


def _wan_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (B, S, H, D) with (.., S, 1, D) cos/sin (repeat-interleaved)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class WanAdapter(BlockAdapter):
    """``WanTransformer3DModel`` (Wan 2.1/2.2): video tokens only in the blocks (text enters by
    cross-attention), per-sample or per-token modulation, rotary embedding (1, N, 1, D)."""

    name = "wan"
    model_class_name = "WanTransformer3DModel"
    block_list = "blocks"
    returns_encoder = False
    block_params = ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")

    def token_grid(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[int, int, int]:
        _, _, frames, height, width = inputs["hidden_states"].shape
        p_t, p_h, p_w = model.config.patch_size
        return (frames // p_t, height // p_h, width // p_w)

    def _inputs(self, values: dict[str, Any]) -> BlockInputs:
        return BlockInputs(values["hidden_states"], values["encoder_hidden_states"], values["temb"],
                           values.get("rotary_emb"))

    @staticmethod
    def _modulation(block: nn.Module, temb: torch.Tensor, index: torch.Tensor | None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The six shift/scale/gate terms for all tokens and for the refreshed ones."""
        if temb.ndim == 4:
            table = block.scale_shift_table.unsqueeze(0) + temb.float()
            terms = [t.squeeze(2) for t in table.chunk(6, dim=2)]
            return terms, [gather_tokens(t, index) for t in terms]
        terms = list((block.scale_shift_table + temb.float()).chunk(6, dim=1))
        return terms, terms

    def partial_forward(self, block: nn.Module, inputs: BlockInputs, index: torch.Tensor | None,
                        key_value: KeyValue | None, backend: str) -> PartialOutput:
        x = inputs.hidden
        attn = block.attn1
        if getattr(attn, "fused_projections", False):
            raise ValueError("HERO's Wan adapter needs unfused attention projections; call "
                             "transformer.unfuse_qkv_projections() first")
        full, sub = self._modulation(block, inputs.temb, index)
        shift, scale, gate, c_shift, c_scale, c_gate = sub
        x_in = x_sub = gather_tokens(x, index)
        if key_value is None:
            norm_all = (block.norm1(x.float()) * (1 + full[1]) + full[0]).type_as(x)
            norm_sub, kv_tokens = gather_tokens(norm_all, index), norm_all
        else:
            norm_sub = kv_tokens = (block.norm1(x_sub.float()) * (1 + scale) + shift).type_as(x)
        query = _heads(attn.norm_q(attn.to_q(norm_sub)), attn.heads)
        key = _heads(attn.norm_k(attn.to_k(kv_tokens)), attn.heads)
        value = _heads(attn.to_v(kv_tokens), attn.heads)
        if inputs.rope is not None:
            cos, sin = inputs.rope
            cos_sub, sin_sub = (select_positions(t[0], index) for t in (cos, sin))
            query = _wan_rotate(query, cos_sub, sin_sub)
            key = _wan_rotate(key, *((cos, sin) if key_value is None else (cos_sub, sin_sub)))
        if key_value is not None:
            key, value = (write_tokens_(cache, index, new) for cache, new in zip(key_value, (key, value)))
        out = attention(query, key, value, backend).flatten(2).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        x_sub = (x_sub.float() + out * gate).type_as(x)
        norm_sub = block.norm2(x_sub.float()).type_as(x)
        x_sub = x_sub + block.attn2(norm_sub, inputs.encoder, None, None)
        norm_sub = (block.norm3(x_sub.float()) * (1 + c_scale) + c_shift).type_as(x)
        ff = block.ffn(norm_sub)
        x_sub = (x_sub.float() + ff.float() * c_gate).type_as(x)
        return PartialOutput(x_sub, x_sub - x_in, None, (key, value))


ADAPTERS: dict[str, BlockAdapter] = {a.name: a for a in (CogVideoXAdapter(), WanAdapter())}


def register_adapter(adapter: BlockAdapter) -> None:
    """Teach HERO a new transformer family."""
    ADAPTERS[adapter.name] = adapter


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The adapter that knows ``model``'s class (subclasses included)."""
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    raise ValueError(f"HERO has no block adapter for {type(model).__name__}; known families: "
                     f"{sorted(a.model_class_name for a in ADAPTERS.values())} "
                     "(add one with hero.cache.adapters.register_adapter)")


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
import torch.nn.functional as F
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
    inputs), the condition tokens' outputs (when the block returns them), the keys/values its
    attention read (every token's: what ``cached_kv`` mode keeps for the next step), and its
    sub-layers' outputs before their gates (the residual is their sum, each times its gate from
    :meth:`BlockAdapter.feature_gates`)."""

    hidden: torch.Tensor
    residual: torch.Tensor
    encoder: torch.Tensor | None
    key_value: KeyValue
    features: list[torch.Tensor]


class Selection:
    """The video tokens a PARTIAL step recomputes, and what every shallow block needs of them,
    computed once per step: ``index`` (B, n), sorted per row, and memoised derivatives (the rows
    of those tokens in a (B * length, ...) view, the rotary embedding's rows)."""

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index
        self._memo: dict[Any, Any] = {}

    def memo(self, key: Any, compute: Any) -> Any:
        """``compute()``, once per step and key."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def rows(self, length: int, offset: int = 0) -> torch.Tensor:
        """Flat row numbers of the tokens in a (B, length, ...) tensor seen as (B * length, ...),
        the video tokens starting at ``offset`` (after condition tokens)."""
        def compute() -> torch.Tensor:
            index = self.index
            starts = torch.arange(index.shape[0], device=index.device)[:, None] * length
            return (index + starts + offset).flatten()
        return self.memo(("rows", length, offset), compute)


def gather_tokens(x: torch.Tensor, selection: Selection | None) -> torch.Tensor:
    """The selected tokens of ``x`` (B, length, ...) as (B, n, ...); ``None``: ``x`` itself.

    Whole rows are copied (``index_select``), several times faster on CPU than an element-wise
    ``gather`` with an expanded index.
    """
    if selection is None:
        return x
    rows = x.reshape(-1, *x.shape[2:]).index_select(0, selection.rows(x.shape[1]))
    return rows.unflatten(0, tuple(selection.index.shape))


def select_positions(table: torch.Tensor, selection: Selection | None) -> torch.Tensor:
    """Per-position rows (N, ...) of a table shared by the batch (a rotary embedding) for the
    selected tokens: (B, n, ...); ``None``: the whole table as (1, N, ...)."""
    if selection is None:
        return table[None]
    index = selection.index
    return table.index_select(0, index.flatten()).unflatten(0, tuple(index.shape))


def write_tokens_(x: torch.Tensor, selection: Selection, values: torch.Tensor, offset: int = 0
                  ) -> torch.Tensor:
    """Write ``values`` (B, n, ...) over the selected tokens of ``x`` in place (``x`` must be
    viewable as (B * length, ...); a copy would lose the write, so others are refused)."""
    rows = selection.rows(x.shape[1], offset)
    x.view(-1, *x.shape[2:]).index_copy_(0, rows, values.reshape(-1, *x.shape[2:]))
    return x


def reuse_residuals(x: torch.Tensor, residual: torch.Tensor, selection: Selection,
                    part: PartialOutput, forecast: torch.Tensor | None = None) -> torch.Tensor:
    """A block's output when only the selected tokens were computed (``part``) and the others
    take ``forecast`` (default: their cached ``residual``); the cache is brought up to date in
    place."""
    write_tokens_(residual, selection, part.residual)
    return write_tokens_(x + (residual if forecast is None else forecast), selection, part.hidden)


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

    def prepare(self, selection: Selection, inputs: BlockInputs) -> None:
        """Compute once per step, outside HERO's (compilable) block functions, the selection's
        derivatives they read: the tokens' rows, and the rotary embedding's."""
        selection.rows(inputs.hidden.shape[1])
        if inputs.rope is not None:
            _rope_rows(self.rope_tables(inputs.rope), selection)

    def rope_tables(self, rope: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding's cos/sin as per-position tables (N, D)."""
        return rope

    def split_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.returns_encoder:
            return output[0], output[1]
        return output, None

    def pack_output(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        return (hidden, encoder) if self.returns_encoder else hidden

    def partial_forward(self, block: nn.Module, inputs: BlockInputs, selection: Selection | None,
                        key_value: KeyValue | None, backend: str) -> PartialOutput:
        """Run ``block`` for the selected video tokens (None: all of them). ``key_value`` None:
        keys/values from all tokens of the input, condition tokens recomputed with them;
        otherwise the cached keys/values, whose refreshed tokens are overwritten in place and then
        attended, and the condition tokens pass through (their cached keys/values attended)."""
        raise NotImplementedError

    def feature_gates(self, block: nn.Module, temb: torch.Tensor) -> list[torch.Tensor | None]:
        """The gates ``block`` applies, at the timestep embedded in ``temb``, to the video tokens'
        sub-layer outputs (``PartialOutput.features``, in order; None: ungated)."""
        raise NotImplementedError

    def gate_rows(self, block: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
        """``block``'s feature gates as rows (weight, bias) of a linear map of ``silu(temb)``, where
        the family's gates are that (HERO then computes every deep block's gates in one matmul);
        None where they are not."""
        return None


def bind_model_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model's forward arguments by name (positional ones included)."""
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    return {**dict(zip(names, args)), **kwargs}


def call_timestep(inputs: dict[str, Any]) -> torch.Tensor | None:
    """A model call's timestep as a 0-dim float32 tensor on its device (no sync): the largest
    element, since per-token timesteps (Wan 2.2) hold 0 for an already clean first frame."""
    timestep = inputs.get("timestep")
    if timestep is None:
        return None
    if not isinstance(timestep, torch.Tensor):
        return torch.tensor(float(timestep))
    return timestep.detach().float().max()


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

    def prepare(self, selection: Selection, inputs: BlockInputs) -> None:
        super().prepare(selection, inputs)
        text = inputs.encoder.shape[1]
        selection.rows(text + inputs.hidden.shape[1], text)

    def token_grid(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[int, int, int]:
        _, frames, _, height, width = inputs["hidden_states"].shape
        p, p_t = model.config.patch_size, model.config.patch_size_t
        return (frames if p_t is None else -(-frames // p_t), height // p, width // p)

    def _inputs(self, values: dict[str, Any]) -> BlockInputs:
        return BlockInputs(values["hidden_states"], values["encoder_hidden_states"], values["temb"],
                           values.get("image_rotary_emb"))

    def partial_forward(self, block: nn.Module, inputs: BlockInputs, selection: Selection | None,
                        key_value: KeyValue | None, backend: str) -> PartialOutput:
        x, enc, temb = inputs.hidden, inputs.encoder, inputs.temb
        text, attn = enc.shape[1], block.attn1
        x_in = x_sub = gather_tokens(x, selection)
        if key_value is None:
            norm_all, norm_enc, gate, enc_gate = block.norm1(x, enc, temb)
            kv_tokens = torch.cat([norm_enc, norm_all], dim=1)
            q_tokens = kv_tokens if selection is None else \
                torch.cat([norm_enc, gather_tokens(norm_all, selection)], dim=1)
            q_text = text
        else:  # condition tokens pass through: their cached keys/values are attended
            norm_sub, norm_enc, gate, enc_gate = block.norm1(x_sub, enc[:, :0], temb)
            q_tokens = kv_tokens = norm_sub
            q_text = 0
        query = _heads(attn.to_q(q_tokens), attn.heads)
        key = _heads(attn.to_k(kv_tokens), attn.heads)
        value = _heads(attn.to_v(kv_tokens), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if inputs.rope is not None:
            cos, sin = inputs.rope
            cos_sub, sin_sub = _rope_rows(inputs.rope, selection)
            _rotate_video_(query, q_text, cos_sub, sin_sub)
            _rotate_video_(key, q_text, *((cos[None, :, None], sin[None, :, None])
                                          if key_value is None else (cos_sub, sin_sub)))
        if key_value is not None:  # cached (B, text + N, H, D): the refreshed video rows rewritten
            key, value = (write_tokens_(cache, selection, new, offset=text)
                          for cache, new in zip(key_value, (key, value)))
        out = attention(query, key, value, backend).flatten(2).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        x_sub = x_sub + gate * out[:, q_text:]
        enc_out = enc[:, :q_text] + enc_gate * out[:, :q_text]
        norm_sub, norm_enc, gate_ff, enc_gate_ff = block.norm2(x_sub, enc_out, temb)
        ff = block.ff(torch.cat([norm_enc, norm_sub], dim=1))
        x_sub = x_sub + gate_ff * ff[:, q_text:]
        enc_out = enc_out + enc_gate_ff * ff[:, :q_text]
        return PartialOutput(x_sub, x_sub - x_in, enc_out if q_text else enc, (key, value),
                             [out[:, q_text:], ff[:, q_text:]])

    def feature_gates(self, block: nn.Module, temb: torch.Tensor) -> list[torch.Tensor | None]:
        return [F.linear(F.silu(temb), weight, bias)[:, None, :]
                for weight, bias in self.gate_rows(block)]

    def gate_rows(self, block: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [_layer_norm_zero_gate_rows(norm) for norm in (block.norm1, block.norm2)]


def _layer_norm_zero_gate_rows(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows of a ``CogVideoXLayerNormZero``'s modulation linear (of ``silu(temb)``) that give
    its video gate: the third of its six chunks (a sixth of the linear)."""
    width = norm.linear.out_features // 6
    rows = slice(2 * width, 3 * width)
    return norm.linear.weight[rows], None if norm.linear.bias is None else norm.linear.bias[rows]


def _rope_rows(rope: tuple[torch.Tensor, torch.Tensor], selection: Selection | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary cos/sin rows (B, n, 1, D) of the selected tokens, once per step."""
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(select_positions(t, selection)[:, :, None] for t in rope)
    return compute() if selection is None else selection.memo("rope", compute)


def _rotate_video_(x: torch.Tensor, text: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the video part (after ``text`` condition tokens) of (B, S, H, D) in place."""
    x[:, text:] = _rotate_interleaved(x[:, text:], cos, sin)


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

    def rope_tables(self, rope: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t[0, :, 0] for t in rope)

    def token_grid(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[int, int, int]:
        _, _, frames, height, width = inputs["hidden_states"].shape
        p_t, p_h, p_w = model.config.patch_size
        return (frames // p_t, height // p_h, width // p_w)

    def _inputs(self, values: dict[str, Any]) -> BlockInputs:
        return BlockInputs(values["hidden_states"], values["encoder_hidden_states"], values["temb"],
                           values.get("rotary_emb"))

    @staticmethod
    def _modulation(block: nn.Module, temb: torch.Tensor, selection: Selection | None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The six shift/scale/gate terms for all tokens and for the refreshed ones."""
        if temb.ndim == 4:
            table = block.scale_shift_table.unsqueeze(0) + temb.float()
            terms = [t.squeeze(2) for t in table.chunk(6, dim=2)]
            return terms, [gather_tokens(t, selection) for t in terms]
        terms = list((block.scale_shift_table + temb.float()).chunk(6, dim=1))
        return terms, terms

    def partial_forward(self, block: nn.Module, inputs: BlockInputs, selection: Selection | None,
                        key_value: KeyValue | None, backend: str) -> PartialOutput:
        x = inputs.hidden
        attn = block.attn1
        if getattr(attn, "fused_projections", False):
            raise ValueError("HERO's Wan adapter needs unfused attention projections; call "
                             "transformer.unfuse_qkv_projections() first")
        full, sub = self._modulation(block, inputs.temb, selection)
        shift, scale, gate, c_shift, c_scale, c_gate = sub
        x_in = x_sub = gather_tokens(x, selection)
        if key_value is None:
            norm_all = (block.norm1(x.float()) * (1 + full[1]) + full[0]).type_as(x)
            norm_sub, kv_tokens = gather_tokens(norm_all, selection), norm_all
        else:
            norm_sub = kv_tokens = (block.norm1(x_sub.float()) * (1 + scale) + shift).type_as(x)
        query = _heads(attn.norm_q(attn.to_q(norm_sub)), attn.heads)
        key = _heads(attn.norm_k(attn.to_k(kv_tokens)), attn.heads)
        value = _heads(attn.to_v(kv_tokens), attn.heads)
        if inputs.rope is not None:
            cos, sin = inputs.rope
            cos_sub, sin_sub = _rope_rows(self.rope_tables(inputs.rope), selection)
            query = _wan_rotate(query, cos_sub, sin_sub)
            key = _wan_rotate(key, *((cos, sin) if key_value is None else (cos_sub, sin_sub)))
        if key_value is not None:
            key, value = (write_tokens_(cache, selection, new)
                          for cache, new in zip(key_value, (key, value)))
        out = attention(query, key, value, backend).flatten(2).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        x_sub = (x_sub.float() + out * gate).type_as(x)
        norm_sub = block.norm2(x_sub.float()).type_as(x)
        cross = block.attn2(norm_sub, inputs.encoder, None, None)
        x_sub = x_sub + cross
        norm_sub = (block.norm3(x_sub.float()) * (1 + c_scale) + c_shift).type_as(x)
        ff = block.ffn(norm_sub)
        x_sub = (x_sub.float() + ff.float() * c_gate).type_as(x)
        return PartialOutput(x_sub, x_sub - x_in, None, (key, value), [out, cross, ff])

    def feature_gates(self, block: nn.Module, temb: torch.Tensor) -> list[torch.Tensor | None]:
        terms, _ = self._modulation(block, temb, None)
        return [terms[2], None, terms[5]]


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


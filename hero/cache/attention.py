"""The fused attention kernels HERO's partial blocks call: torch SDPA or FlashAttention.

Refreshed tokens attend like any others (no attention map is read), so any fused kernel works.
Tensors are laid out (batch, sequence, heads, head_dim), FlashAttention's native layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str = "sdpa"
              ) -> torch.Tensor:
    """Softmax attention of ``query`` over ``key``/``value``; (B, S, H, D) in and out."""
    if backend == "flash":
        return _flash_attention(query, key, value)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                         value.transpose(1, 2))
    return out.transpose(1, 2)


def _flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError('HeroConfig.attention_backend="flash" needs CUDA tensors in float16 or '
                         f'bfloat16, got {query.dtype} on {query.device}; use "sdpa" instead')
    return flash_attn_func(query, key, value)

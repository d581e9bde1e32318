"""Tiny random diffusers video transformers and a minimal sampling loop, for tests and measurements.

The loop is a plain Euler update over evenly spaced timesteps; every transformer call runs under
``cache_context`` the way the project's world models call it, with classifier-free guidance either
batched in one call (context ``"cond_uncond"``) or as two calls (``"cond"`` and ``"uncond"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from torch import nn

CFG_MODES = ("none", "batched", "separate")


@dataclass
class TinyVideoModel:
    """A transformer with fixed latent shape (frames, channels, height, width) and text length."""

    transformer: nn.Module
    family: str
    frames: int
    channels: int
    height: int
    width: int
    text_tokens: int
    text_dim: int
    clean_frames: int | None = None  # Wan 2.2's per-token timesteps: these first latent frames at 0

    def timestep(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep argument: one per sample, or (``clean_frames`` set, Wan
        only) one per token, 0 on the clean leading frames as Wan 2.2's ``expand_timesteps``."""
        if self.clean_frames is None:
            return timestep.expand(latents.shape[0])
        _, p_h, p_w = self.transformer.config.patch_size
        frames, height, width = latents.shape[2], latents.shape[3] // p_h, latents.shape[4] // p_w
        per_frame = torch.full((frames,), float(timestep))
        per_frame[:self.clean_frames] = 0.0
        return per_frame.repeat_interleave(height * width).expand(latents.shape[0], -1)

    def latents(self, batch: int, seed: int = 0, frames: int | None = None,
                height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Noise latents in the family's layout: (B, F, C, H, W) CogVideoX, (B, C, F, H, W) Wan."""
        frames, height, width = frames or self.frames, height or self.height, width or self.width
        generator = torch.Generator().manual_seed(seed)
        shape = (batch, frames, self.channels, height, width) if self.family == "cogvideox" \
            else (batch, self.channels, frames, height, width)
        return torch.randn(shape, generator=generator)

    def text(self, batch: int, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.text_tokens, self.text_dim, generator=generator)

    def __call__(self, latents: torch.Tensor, text: torch.Tensor, step: int, num_steps: int,
                 context: str = "cond") -> torch.Tensor:
        """One denoiser call at ``step`` of ``num_steps``, under ``cache_context(context, ...)``."""
        timestep = torch.tensor(float(999 * (1 - step / num_steps)))
        kwargs = dict(hidden_states=latents, encoder_hidden_states=text,
                      timestep=self.timestep(latents, timestep), return_dict=False)
        if self.family == "cogvideox":
            kwargs["image_rotary_emb"] = self.rotary(latents)
        with self.transformer.cache_context(context, step_index=step, num_inference_steps=num_steps,
                                            timestep=timestep):
            return self.transformer(**kwargs)[0]

    def rotary(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CogVideoX's 3-D rotary embedding for the latents' token grid."""
        p = self.transformer.config.patch_size
        frames, height, width = latents.shape[1], latents.shape[3] // p, latents.shape[4] // p
        head_dim = self.transformer.config.attention_head_dim
        return get_3d_rotary_pos_embed(head_dim, ((0, 0), (height, width)), (height, width), frames)


def tiny_cogvideox(num_layers: int = 4, heads: int = 2, head_dim: int = 16, frames: int = 2,
                   height: int = 8, width: int = 8, text_tokens: int = 4, channels: int = 4,
                   seed: int = 0) -> TinyVideoModel:
    """A random ``CogVideoXTransformer3DModel`` with rotary embeddings (Aether's layout)."""
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
        out_channels=channels, time_embed_dim=16, text_embed_dim=16, num_layers=num_layers,
        sample_width=width, sample_height=height, sample_frames=(frames - 1) * 4 + 1, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=text_tokens,
        use_rotary_positional_embeddings=True).eval()
    return TinyVideoModel(transformer, "cogvideox", frames, channels, height, width, text_tokens,
                          16)


def tiny_wan(num_layers: int = 4, heads: int = 2, head_dim: int = 12, frames: int = 2,
             height: int = 8, width: int = 8, text_tokens: int = 5, channels: int = 4,
             seed: int = 0, clean_frames: int | None = None) -> TinyVideoModel:
    """A random ``WanTransformer3DModel`` (text by cross-attention); ``clean_frames`` gives it
    Wan 2.2's per-token timesteps."""
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=channels, out_channels=channels, text_dim=16, freq_dim=16,
        ffn_dim=4 * heads * head_dim, num_layers=num_layers, rope_max_seq_len=32).eval()
    return TinyVideoModel(transformer, "wan", frames, channels, height, width, text_tokens, 16,
                          clean_frames)


@torch.no_grad()
def sample(model: TinyVideoModel, num_steps: int, batch: int = 1, cfg: str = "none",
           guidance: float = 3.0, seed: int = 0, latents: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Euler sampling; returns the final latents and every step's (guided) prediction."""
    if cfg not in CFG_MODES:
        raise ValueError(f"cfg={cfg!r} is not one of {CFG_MODES}")
    x = model.latents(batch, seed) if latents is None else latents
    cond, uncond = model.text(x.shape[0], seed + 1), model.text(x.shape[0], seed + 2)
    predictions = []
    for step in range(num_steps):
        if cfg == "batched":
            both = model(torch.cat([x, x]), torch.cat([uncond, cond]), step, num_steps,
                         "cond_uncond")
            pred_uncond, pred = both.chunk(2)
        else:
            pred = model(x, cond, step, num_steps, "cond")
            pred_uncond = model(x, uncond, step, num_steps, "uncond") if cfg == "separate" else None
        if pred_uncond is not None:
            pred = pred_uncond + guidance * (pred - pred_uncond)
        predictions.append(pred)
        x = x - pred / num_steps
    return x, predictions

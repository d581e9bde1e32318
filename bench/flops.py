"""Counted FLOPs of HERO's presets against full compute at AetherV1's real transformer shape:
``python -m bench.flops [--steps 50] [--frames 11] [--splits 1,14]``.

The model is built on the meta device (no memory, no compute), so Aether's full shape (42 blocks,
width 3072, 14 850 video + 226 text tokens at 41 frames of 480x720, CFG batch of 2) costs only
Python time. Shapes are static and the static schedule is data-independent, so the first FULL and
PARTIAL calls are counted with torch's FLOP counter and combined with the schedule's step counts.
The presets' ``split="auto"`` needs Aether's weights, which are not here: every preset is counted
at each of ``splits`` (1: what the probe picks on a flat forecast-error profile; 14: the paper's
third of the blocks).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel
from torch.utils.flop_counter import FlopCounterMode

from hero.cache.config import PRESETS, HeroConfig
from hero.cache.hooks import apply_hero, hero_stats, remove_hero
from hero.cache.schedule import StepMode, schedule

AETHER_TRANSFORMER = dict(num_attention_heads=48, attention_head_dim=64, in_channels=96,
                          out_channels=56, time_embed_dim=512, text_embed_dim=4096, num_layers=42,
                          sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
                          temporal_compression_ratio=4, max_text_seq_length=226,
                          use_rotary_positional_embeddings=True)


def flop_ratios(num_steps: int = 50, latent_frames: int = 11, batch: int = 2,
                presets: tuple[str, ...] = tuple(PRESETS), splits: tuple[int, ...] = (1, 14)
                ) -> dict[str, dict[str, Any]]:
    """Counted FLOPs of each preset at each split versus full sampling, at Aether's transformer
    shape (41 frames at 480x720 -> 11 latent frames of 60x90; CFG rows batched)."""
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**AETHER_TRANSFORMER).to(torch.bfloat16)
    height, width = AETHER_TRANSFORMER["sample_height"], AETHER_TRANSFORMER["sample_width"]
    tokens = latent_frames * (height // 2) * (width // 2)
    latents = torch.empty(batch, latent_frames, 96, height, width, device="meta",
                          dtype=torch.bfloat16)
    text = torch.empty(batch, 226, 4096, device="meta", dtype=torch.bfloat16)
    rotary = (torch.empty(tokens, 64, device="meta"), torch.empty(tokens, 64, device="meta"))
    results = {}
    for preset, split in ((preset, split) for preset in presets for split in splits):
        config = HeroConfig.preset(preset, split=split)
        modes = schedule(num_steps, config)
        # run until a PARTIAL step after forecast_order + 1 FULL steps: every cache (each order
        # of the forecast too) is then held
        fulls = [i for i, mode in enumerate(modes) if mode is StepMode.FULL]
        last = modes.index(StepMode.PARTIAL, fulls[min(config.forecast_order, len(fulls) - 2)])
        apply_hero(model, config)
        try:
            counted = {}
            with torch.no_grad():
                for step in range(last + 1):
                    with FlopCounterMode(display=False) as counter, \
                            model.cache_context("cond_uncond", step_index=step,
                                                num_inference_steps=num_steps):
                        model(hidden_states=latents, encoder_hidden_states=text,
                              timestep=torch.full((batch,), 999.0 - step, device="meta"),
                              image_rotary_emb=rotary, return_dict=False)
                    counted[modes[step]] = counter.get_total_flops()
            cache_bytes = hero_stats(model)["cache_bytes"]
        finally:
            remove_hero(model)
        full, partial = counted[StepMode.FULL], counted[StepMode.PARTIAL]
        n_full, n_partial = modes.count(StepMode.FULL), modes.count(StepMode.PARTIAL)
        ratio = (n_full * full + n_partial * partial) / (num_steps * full)
        results[f"{preset}, k={split}"] = {
            "flops_ratio": ratio, "partial_call_ratio": partial / full, "full_steps": n_full,
            "partial_steps": n_partial, "cache_gib": cache_bytes / 2**30}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--frames", type=int, default=11, help="latent frames (11: 41 frames)")
    parser.add_argument("--splits", default="1,14", help="shallow blocks to count each preset at")
    args = parser.parse_args()
    splits = tuple(int(k) for k in args.splits.split(","))
    print(json.dumps(flop_ratios(num_steps=args.steps, latent_frames=args.frames, splits=splits),
                     indent=1))


if __name__ == "__main__":
    main()

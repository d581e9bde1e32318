"""Measure HERO per preset: counted FLOP ratio at Aether's shape, and wall-clock ratio and PSNR
against full sampling on a tiny CPU configuration or on a project world model.

    python -m hero.cache.measure flops                 # Aether shape, meta device, 50 steps
    python -m hero.cache.measure tiny --steps 30       # tiny random CogVideoX, CPU
    python -m hero.cache.measure model --model tiny    # rollouts of a hero.models world model

FLOPs: the model is built on the meta device (no memory, no compute), so Aether's full shape
(42 blocks, width 3072, 14 850 video + 226 text tokens, CFG batch of 2) costs only Python time.
Shapes are static and the schedule is data-independent, so the first FULL and PARTIAL calls are
counted with torch's FLOP counter and combined with the schedule's step counts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import numpy as np
import torch
from diffusers import CogVideoXTransformer3DModel
from torch.utils.flop_counter import FlopCounterMode

from hero.cache.config import PRESETS, HeroConfig
from hero.cache.hooks import apply_hero, remove_hero
from hero.cache.schedule import StepMode, schedule
from hero.cache.stats import hero_stats
from hero.cache.tiny import sample, tiny_cogvideox

AETHER_TRANSFORMER = dict(num_attention_heads=48, attention_head_dim=64, in_channels=96,
                          out_channels=56, time_embed_dim=512, text_embed_dim=4096, num_layers=42,
                          sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
                          temporal_compression_ratio=4, max_text_seq_length=226,
                          use_rotary_positional_embeddings=True)


def flop_ratios(num_steps: int = 50, latent_frames: int = 11, batch: int = 2,
                presets: tuple[str, ...] = tuple(PRESETS)) -> dict[str, dict[str, Any]]:
    """Counted FLOPs of each preset versus full sampling, at Aether's transformer shape (41 frames
    at 480x720 -> 11 latent frames of 60x90; CFG rows batched)."""
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**AETHER_TRANSFORMER).to(torch.bfloat16)
    height, width = AETHER_TRANSFORMER["sample_height"], AETHER_TRANSFORMER["sample_width"]
    tokens = latent_frames * (height // 2) * (width // 2)
    latents = torch.empty(batch, latent_frames, 96, height, width, device="meta",
                          dtype=torch.bfloat16)
    text = torch.empty(batch, 226, 4096, device="meta", dtype=torch.bfloat16)
    rotary = (torch.empty(tokens, 64, device="meta"), torch.empty(tokens, 64, device="meta"))
    results = {}
    for preset in presets:
        config = HeroConfig.preset(preset)
        modes = schedule(num_steps, config)
        first_partial = modes.index(StepMode.PARTIAL)
        apply_hero(model, config)
        try:
            counted = {}
            with torch.no_grad():
                for step in range(first_partial + 1):
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
        results[preset] = {"flops_ratio": ratio, "partial_call_ratio": partial / full,
                           "full_steps": n_full, "partial_steps": n_partial,
                           "cache_gib": cache_bytes / 2**30}
    return results


def psnr(reference: np.ndarray, other: np.ndarray, peak: float | None = None) -> float:
    """PSNR of ``other`` against ``reference``; ``peak`` defaults to the reference's range."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    peak = float(reference.max() - reference.min()) if peak is None else peak
    mse = float(np.mean((reference - other) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def _timed(function: Any, repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


VARIANTS: dict[str, HeroConfig] = {
    **{name: HeroConfig.preset(name) for name in PRESETS},
    "default+recompute_kv": HeroConfig.preset("default", kv_mode="recompute_kv"),
    "default+rate": HeroConfig.preset("default", rate_weight=1.0),
}


def tiny_quality(num_steps: int = 30, repeats: int = 3, num_layers: int = 12,
                 variants: dict[str, HeroConfig] | None = None) -> dict[str, dict[str, Any]]:
    """Wall-clock ratio and latent PSNR versus full sampling on a toyworld-sized random CogVideoX
    (12 blocks, width 128, 5x6x8 video tokens), batched CFG, one CPU thread. ``variants`` maps a
    label to a config (default: the presets plus the ``recompute_kv`` and rate-tracking options)."""
    model = tiny_cogvideox(num_layers=num_layers, heads=4, head_dim=32, frames=5, height=12,
                           width=16, text_tokens=8, channels=16)
    start = model.latents(1)

    def run() -> torch.Tensor:
        return sample(model, num_steps, cfg="batched", latents=start)[0]

    full_time, reference = _timed(run, repeats)
    results = {"none": {"seconds": full_time}}
    for label, config in (variants or VARIANTS).items():
        apply_hero(model.transformer, config)
        try:
            seconds, latents = _timed(run, repeats)
            stats = hero_stats(model.transformer)
        finally:
            remove_hero(model.transformer)
        results[label] = {"seconds": seconds, "wall_clock_ratio": seconds / full_time,
                          "flops_ratio": stats["flops_ratio"],
                          "psnr_db": psnr(reference.numpy(), latents.numpy()),
                          "update_relative_error": float((latents - reference).norm()
                                                         / (reference - start).norm())}
    return results


def model_quality(name: str = "tiny", steps: int | None = None, frames: int = 17,
                  accelerators: tuple[str, ...] = ("hero", "hero-fast", "hero-quality"),
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """Wall-clock ratio and RGB PSNR of accelerated rollouts of a ``hero.models`` world model
    against its unaccelerated rollouts (same request, same seed)."""
    from hero.accelerators import apply_accelerator
    from hero.models import RolloutRequest, load_model

    world = load_model(name)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (world.height, world.width, 3), dtype=np.uint8)
    c2w = np.repeat(np.eye(4, dtype=np.float32)[None], frames, axis=0)
    c2w[:, 2, 3] = np.linspace(0, 1, frames)

    def request() -> list[RolloutRequest]:
        return [RolloutRequest(id="m", task="prediction", frames=frames, image=image, c2w=c2w,
                               steps=steps, seed=seed)]

    full_time, reference = _timed(lambda: world.generate(request())[0], 1)
    results = {"none": {"seconds": full_time}}
    for accel in accelerators:
        accelerator = apply_accelerator(world.transformer, accel)
        try:
            seconds, rollout = _timed(lambda: world.generate(request())[0], 1)
            stats = accelerator.stats()
        finally:
            accelerator.remove()
        results[accel] = {"seconds": seconds, "wall_clock_ratio": seconds / full_time,
                          "flops_ratio": stats.get("flops_ratio"),
                          "rgb_psnr_db": psnr(reference.rgb, rollout.rgb, peak=255.0),
                          "depth_psnr_db": psnr(reference.depth, rollout.depth)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("flops", "tiny", "model"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "flops":
        result = flop_ratios(num_steps=args.steps or 50)
    elif args.what == "tiny":
        result = tiny_quality(num_steps=args.steps or 30, repeats=args.repeats)
    else:
        result = model_quality(args.model, steps=args.steps)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

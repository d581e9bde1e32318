"""Where a HERO step's time goes: ``python -m bench.blocks [--batch 1] [--no-compile]``.

Calls block 0 of the Aether-shaped transformer directly on random inputs, in interleaved rounds
(median per call; one thread, steady allocator): diffusers' own forward; HERO's block function
over every token (what shallow blocks run on FULL steps, keeping keys/values); HERO's partial
block (a quarter of the video tokens refreshed against cached keys/values); both HERO functions
again through ``torch.compile`` (inductor, static shapes; compiled before timing); the
timestep-modulation linears alone (their weights are read whatever the token count); and the
block calls again on 4 video and 2 text tokens, whose time is the per-call cost that does not
shrink with tokens. Then whole transformer calls with HERO's default preset applied: a FULL step
and a PARTIAL step, beside an unaccelerated call, so the PARTIAL step's time (its shallow blocks,
the forecasts, the bookkeeping, the layers around the blocks) stands beside its counted work.
Writes ``<out>/blocks_batch<B>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench import command_line
from bench.measure import count_flops, steady_cpu_allocator
from bench.report import json_safe, number_text
from bench.workloads import AetherShape, aether_shaped_workload
from hero.cache.adapters import BlockInputs, Selection, adapter_for
from hero.cache.config import HeroConfig
from hero.cache.hooks import KERNELS, apply_hero
from hero.cache.refresh import RefreshTracker, build_layout
from hero.models.cogvideox_world import rotary_embedding

TINY_GRID = (1, 2, 2)  # 4 video tokens


def block_calls(shape: AetherShape, config: HeroConfig | None = None, compiled: bool = True
                ) -> dict[str, tuple[Callable[[], Any], bool]]:
    """Each timed call by name, and whether it runs at full size (FLOPs counted)."""
    config = config or HeroConfig.preset("default")
    transformer = aether_shaped_workload(shape).model.transformer
    block, adapter = transformer.transformer_blocks[0], adapter_for(transformer)
    patch = transformer.config.patch_size
    grid = (shape.latent_frames, shape.latent_height // patch, shape.latent_width // patch)
    full = _block_inputs(transformer, grid, shape.text_tokens, 2 * shape.batch)
    tiny = _block_inputs(transformer, TINY_GRID, 2, 2 * shape.batch)
    keyed, partial = KERNELS["_keyed_full_block"], KERNELS["_partial_block"]
    backend = config.attention_backend

    def partial_call(inputs: BlockInputs, grid: tuple[int, int, int], kernel: Any = partial
                     ) -> Callable[[], Any]:
        layout = build_layout(grid, config.patch_size, config.tokens_per_patch)
        selection = Selection(RefreshTracker(layout, inputs.hidden.shape[0], "cpu").select())
        adapter.prepare(selection, inputs)
        with torch.no_grad():
            _, _, residual, key_value = keyed(adapter, block, inputs, backend)
        return lambda: kernel(adapter, block, inputs, selection, residual, key_value, None,
                              backend)

    def modulation() -> Any:
        condition = F.silu(full.temb)
        return block.norm1.linear(condition), block.norm2.linear(condition)

    calls = {
        "diffusers forward": (lambda: block(full.hidden, full.encoder, full.temb, full.rope), True),
        "HERO block, every token (FULL step)": (
            lambda: keyed(adapter, block, full, backend), True),
        "HERO partial block (PARTIAL step)": (partial_call(full, grid), True),
    }
    if compiled:
        keyed_compiled, partial_compiled = (torch.compile(kernel, dynamic=False)
                                            for kernel in (keyed, partial))
        calls["HERO block, every token, compiled"] = (
            lambda: keyed_compiled(adapter, block, full, backend), True)
        calls["HERO partial block, compiled"] = (partial_call(full, grid, partial_compiled), True)
    calls.update({
        "timestep-modulation linears": (modulation, True),
        "diffusers forward, 4 tokens": (
            lambda: block(tiny.hidden, tiny.encoder, tiny.temb, tiny.rope), False),
        "HERO block, every token, 4 tokens": (lambda: keyed(adapter, block, tiny, backend), False),
        "HERO partial block, 4 tokens": (partial_call(tiny, TINY_GRID), False),
    })
    calls.update(step_calls(transformer, shape, config))
    return calls


STEP_CALLS = ("transformer call, no HERO", "transformer call, HERO FULL step",
              "transformer call, HERO PARTIAL step")
# One shallow block, so that the PARTIAL step timed runs HERO's partial block, whose cost this page
# is about (split="auto" takes none on a flat forecast-error profile, as on these random weights).
STEP_SPLIT = 1


def step_calls(transformer: torch.nn.Module, shape: AetherShape, hero: HeroConfig
               ) -> dict[str, tuple[Callable[[], Any], bool]]:
    """Whole transformer calls on random inputs of the Aether-shaped sampling loop: unaccelerated,
    and with HERO (``hero``, ``STEP_SPLIT`` shallow blocks) on a FULL and on a PARTIAL step.
    HERO's schedule is stretched (a step count and interval far beyond the rounds) so that every
    timed call is of one kind."""
    config = transformer.config
    rows, frames = 2 * shape.batch, shape.latent_frames
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(rows, frames, config.in_channels, shape.latent_height,
                                  shape.latent_width, generator=generator),
        encoder_hidden_states=torch.randn(rows, shape.text_tokens, config.text_embed_dim,
                                          generator=generator),
        image_rotary_emb=rotary_embedding(config.attention_head_dim,
                                          shape.latent_height // config.patch_size,
                                          shape.latent_width // config.patch_size, frames),
        return_dict=False)
    steps = 1 << 30

    def call(module: torch.nn.Module, step: int) -> Any:
        with module.cache_context("cond_uncond", step_index=step, num_inference_steps=steps):
            return module(timestep=torch.full((rows,), 999.0 - step % 999), **inputs)

    def hero_from(step_config: HeroConfig, first: int) -> Callable[[], Any]:
        hooked = copy.deepcopy(transformer)
        apply_hero(hooked, step_config)
        with torch.no_grad():
            for step in range(first):
                call(hooked, step)
        counter = itertools.count(first)
        return lambda: call(hooked, next(counter))

    stretched = dict(split=STEP_SPLIT, count_flops=False, final_full_steps=0)
    return {
        STEP_CALLS[0]: (lambda: call(transformer, 0), True),
        STEP_CALLS[1]: (hero_from(dataclasses.replace(hero, interval=1, **stretched), 1), True),
        STEP_CALLS[2]: (hero_from(dataclasses.replace(hero, interval=steps, **stretched),
                                  hero.warmup_steps + 2), True),
    }


def _block_inputs(transformer: torch.nn.Module, grid: tuple[int, int, int], text: int, rows: int
                  ) -> BlockInputs:
    """Random block inputs for a T x H x W token grid: video, text, timestep embedding, rotary."""
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    generator = torch.Generator().manual_seed(0)
    frames, grid_h, grid_w = grid
    return BlockInputs(torch.randn(rows, frames * grid_h * grid_w, width, generator=generator),
                       torch.randn(rows, text, width, generator=generator),
                       torch.randn(rows, config.time_embed_dim, generator=generator),
                       rotary_embedding(config.attention_head_dim, grid_h, grid_w, frames))


def measure(shape: AetherShape, rounds: int, compiled: bool = True) -> dict[str, Any]:
    """Median milliseconds of every call over ``rounds`` interleaved rounds, and counted FLOPs
    (compiled calls are compiled by their first, untimed, call)."""
    calls = block_calls(shape, compiled=compiled)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    flops: dict[str, int | None] = {}
    with torch.no_grad():
        for name, (call, full_size) in calls.items():
            call()
            flops[name] = count_flops(call)[1] if full_size and "compiled" not in name else None
        for _ in range(rounds):
            for name, (call, _) in calls.items():
                started = time.perf_counter()
                call()
                seconds[name].append(time.perf_counter() - started)
    ms = {name: statistics.median(times) * 1e3 for name, times in seconds.items()}
    reference = "diffusers forward"
    rows = {}
    for name in calls:
        base = STEP_CALLS[0] if name in STEP_CALLS else reference
        rows[name] = {"ms": ms[name], "time_share": ms[name] / ms[base], "flops": flops[name],
                      "flop_share": None if flops[name] is None else flops[name] / flops[base],
                      "relative_to": base}
    return {"shape": shape.describe(), "rounds": rounds, "calls": rows}


def markdown(result: dict[str, Any], command: str) -> str:
    shape = result["shape"]
    lines = [f"Block 0 of the Aether-shaped transformer ({shape['heads']} x {shape['head_dim']} wide, "
             f"{shape['video_tokens']} video + {shape['text_tokens']} text tokens, "
             f"{2 * shape['batch']} rows), median of {result['rounds']} interleaved calls: "
             f"`{command}`", "",
             "| call | ms | time vs reference | FLOPs vs reference | reference |",
             "|---|---|---|---|---|"]
    for name, row in result["calls"].items():
        lines.append(f"| {name} | {number_text(row['ms'], 3)} | {number_text(row['time_share'], 3)} "
                     f"| {number_text(row['flop_share'], 3)} | {row['relative_to']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=AetherShape.batch,
                        help="requests per sampling (rows = 2 x batch with guidance)")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder of the results")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled calls")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steady_cpu_allocator()
    result = measure(AetherShape(batch=args.batch), args.rounds, compiled=not args.no_compile)
    command = command_line("bench.blocks")
    stem = f"blocks_batch{args.batch}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()

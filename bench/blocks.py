"""Where a HERO step's time goes, one block at a time: ``python -m bench.blocks [--batch 1]``.

Calls block 0 of the Aether-shaped transformer directly on random inputs, in interleaved rounds
(median per call; one thread, steady allocator): diffusers' own forward; HERO's block function
over every token (what shallow blocks run on FULL steps, keeping keys/values); HERO's partial
block (a quarter of the video tokens refreshed against cached keys/values, the default preset);
the timestep-modulation linears alone (their weights are read whatever the token count); and the
three block calls again on 4 video and 2 text tokens, whose time is the per-call cost that does
not shrink with tokens. Each full-size call's FLOPs are counted, so a partial block's share of the
time stands beside its share of the work. Writes ``<out>/blocks_batch<B>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench.measure import count_flops, steady_cpu_allocator
from bench.report import json_safe, number_text
from bench.workloads import AetherShape, aether_shaped_workload
from hero.cache.adapters import BlockInputs, Selection, adapter_for
from hero.cache.config import HeroConfig
from hero.cache.hooks import KERNELS
from hero.cache.refresh import RefreshTracker, build_layout
from hero.models.cogvideox_world import rotary_embedding

TINY_GRID = (1, 2, 2)  # 4 video tokens


def block_calls(shape: AetherShape, config: HeroConfig | None = None
                ) -> dict[str, tuple[Callable[[], Any], bool]]:
    """Each timed call by name, and whether it runs at full size (FLOPs counted)."""
    config = config or HeroConfig()
    transformer = aether_shaped_workload(shape).model.transformer
    block, adapter = transformer.transformer_blocks[0], adapter_for(transformer)
    patch = transformer.config.patch_size
    grid = (shape.latent_frames, shape.latent_height // patch, shape.latent_width // patch)
    full = _block_inputs(transformer, grid, shape.text_tokens, 2 * shape.batch)
    tiny = _block_inputs(transformer, TINY_GRID, 2, 2 * shape.batch)
    keyed, partial = KERNELS["_keyed_full_block"], KERNELS["_partial_block"]
    backend = config.attention_backend

    def partial_call(inputs: BlockInputs, grid: tuple[int, int, int]) -> Callable[[], Any]:
        layout = build_layout(grid, config.patch_size, config.tokens_per_patch)
        selection = Selection(RefreshTracker(layout, inputs.hidden.shape[0], "cpu").select())
        adapter.prepare(selection, inputs)
        with torch.no_grad():
            _, _, residual, key_value = keyed(adapter, block, inputs, backend)
        return lambda: partial(adapter, block, inputs, selection, residual, key_value, None,
                               backend, config.refreshes_condition)

    def modulation() -> Any:
        condition = F.silu(full.temb)
        return block.norm1.linear(condition), block.norm2.linear(condition)

    return {
        "diffusers forward": (lambda: block(full.hidden, full.encoder, full.temb, full.rope), True),
        "HERO block, every token (FULL step)": (
            lambda: keyed(adapter, block, full, backend), True),
        "HERO partial block (PARTIAL step)": (partial_call(full, grid), True),
        "timestep-modulation linears": (modulation, True),
        "diffusers forward, 4 tokens": (
            lambda: block(tiny.hidden, tiny.encoder, tiny.temb, tiny.rope), False),
        "HERO block, every token, 4 tokens": (lambda: keyed(adapter, block, tiny, backend), False),
        "HERO partial block, 4 tokens": (partial_call(tiny, TINY_GRID), False),
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


def measure(shape: AetherShape, rounds: int) -> dict[str, Any]:
    """Median milliseconds of every call over ``rounds`` interleaved rounds, and counted FLOPs."""
    calls = block_calls(shape)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    flops: dict[str, int | None] = {}
    with torch.no_grad():
        for name, (call, full_size) in calls.items():
            flops[name] = count_flops(call)[1] if full_size else None
        for _ in range(rounds):
            for name, (call, _) in calls.items():
                started = time.perf_counter()
                call()
                seconds[name].append(time.perf_counter() - started)
    ms = {name: statistics.median(times) * 1e3 for name, times in seconds.items()}
    reference = "diffusers forward"
    rows = {name: {"ms": ms[name], "time_share": ms[name] / ms[reference], "flops": flops[name],
                   "flop_share": None if flops[name] is None else flops[name] / flops[reference]}
            for name in calls}
    return {"shape": shape.describe(), "rounds": rounds, "calls": rows}


def markdown(result: dict[str, Any], command: str) -> str:
    shape = result["shape"]
    lines = [f"Block 0 of the Aether-shaped transformer ({shape['heads']} x {shape['head_dim']} wide, "
             f"{shape['video_tokens']} video + {shape['text_tokens']} text tokens, "
             f"{2 * shape['batch']} rows), median of {result['rounds']} interleaved calls: "
             f"`{command}`", "",
             "| call | ms | time vs diffusers forward | FLOPs vs diffusers forward |",
             "|---|---|---|---|"]
    for name, row in result["calls"].items():
        lines.append(f"| {name} | {number_text(row['ms'], 3)} | {number_text(row['time_share'], 3)} "
                     f"| {number_text(row['flop_share'], 3)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=AetherShape.batch,
                        help="requests per sampling (rows = 2 x batch with guidance)")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder of the results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steady_cpu_allocator()
    result = measure(AetherShape(batch=args.batch), args.rounds)
    command = f"python -m bench.blocks --batch {args.batch} --rounds {args.rounds}"
    stem = f"blocks_batch{args.batch}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()

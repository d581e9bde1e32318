"""HERO's hooks on tiny random diffusers video transformers (CogVideoX/Aether layout and Wan)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from hero.cache import (HeroConfig, StepMode, apply_hero, hero_stats, remove_hero, reset_hero,
                        schedule)
from hero.cache.adapters import adapter_for
from hero.cache.hooks import root_hook
from bench.tiny_transformers import TinyVideoModel, tiny_cogvideox, tiny_wan

FAMILIES = {"cogvideox": tiny_cogvideox, "wan": tiny_wan}



def drifting_latents(model: TinyVideoModel, num_steps: int, batch: int = 1, seed: int = 0
                     ) -> list[torch.Tensor]:
    """Inputs that change from step to step independently of the outputs."""
    start, end = model.latents(batch, seed), model.latents(batch, seed + 10)
    return [start + (end - start) * (s / num_steps) ** 2 for s in range(num_steps)]


@torch.no_grad()
def run(model: TinyVideoModel, inputs: list[torch.Tensor], text: torch.Tensor,
        context: str = "cond") -> list[torch.Tensor]:
    return [model(x, text, step, len(inputs), context) for step, x in enumerate(inputs)]


def hero_run(model: TinyVideoModel, inputs: list[torch.Tensor], text: torch.Tensor,
             config: HeroConfig) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """A run with HERO applied: its outputs and HERO's stats."""
    apply_hero(model.transformer, config)
    try:
        return run(model, inputs, text), hero_stats(model.transformer)
    finally:
        remove_hero(model.transformer)


def counted_run(model: TinyVideoModel, inputs: list[torch.Tensor], text: torch.Tensor,
                config: HeroConfig) -> tuple[int, dict[str, Any]]:
    """A run with HERO applied: the FLOPs torch's counter saw around it, and HERO's own stats."""
    apply_hero(model.transformer, config)
    try:
        with FlopCounterMode(display=False) as counter:
            run(model, inputs, text)
        return counter.get_total_flops(), hero_stats(model.transformer)
    finally:
        remove_hero(model.transformer)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model = FAMILIES[request.param]()
    inputs = drifting_latents(model, 6)
    text = model.text(1)
    return model, inputs, text, run(model, inputs, text)


def test_all_full_schedule_is_bit_identical(family):
    model, inputs, text, reference = family
    apply_hero(model.transformer, HeroConfig(interval=1))
    try:
        outputs = run(model, inputs, text)
        stats = hero_stats(model.transformer)
    finally:
        remove_hero(model.transformer)
    assert stats["partial_steps"] == 0 and stats["full_steps"] == len(inputs)
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference))


@pytest.mark.parametrize("kv_mode", ["recompute_kv", "cached_kv"])
def test_refreshing_every_token_matches_full(family, kv_mode):
    """Exact where every key/value is recomputed; CogVideoX's condition tokens keep the last FULL
    step's keys/values under ``cached_kv``, so there the output is close, not equal."""
    model, inputs, text, reference = family
    num_layers = len(root_free_blocks(model))
    apply_hero(model.transformer, HeroConfig(rho=1.0, split=num_layers, kv_mode=kv_mode))
    try:
        outputs = run(model, inputs, text)
        stats = hero_stats(model.transformer)
    finally:
        remove_hero(model.transformer)
    assert stats["partial_steps"] == schedule(len(inputs), HeroConfig()).count(StepMode.PARTIAL)
    exact = kv_mode == "recompute_kv" or stats["model_family"] == "wan"
    for a, b in zip(outputs, reference):
        torch.testing.assert_close(a, b, rtol=1e-5 if exact else 0.05, atol=1e-5 if exact else 0.05)
    assert exact or not torch.allclose(outputs[2], reference[2], atol=1e-5)


def test_partial_steps_approximate_and_full_steps_stay_exact(family):
    model, inputs, text, reference = family
    apply_hero(model.transformer, HeroConfig())
    try:
        outputs = run(model, inputs, text)
    finally:
        remove_hero(model.transformer)
    modes = schedule(len(inputs), HeroConfig())
    for mode, a, b in zip(modes, outputs, reference):
        if mode is StepMode.PARTIAL:
            assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(outputs[0], reference[0]) and torch.equal(outputs[1], reference[1])


def test_cached_kv_reuses_stale_keys():
    model = tiny_cogvideox(num_layers=2)
    inputs, text = drifting_latents(model, 4), model.text(1)
    outputs = {}
    for kv_mode in ("recompute_kv", "cached_kv"):
        config = HeroConfig(split=len(root_free_blocks(model)), kv_mode=kv_mode)
        apply_hero(model.transformer, config)
        try:
            outputs[kv_mode] = run(model, inputs, text)
        finally:
            remove_hero(model.transformer)
    torch.testing.assert_close(outputs["recompute_kv"][1], outputs["cached_kv"][1])
    assert not torch.allclose(outputs["recompute_kv"][2], outputs["cached_kv"][2], atol=1e-6)


def root_free_blocks(model: TinyVideoModel) -> nn.ModuleList:
    return getattr(model.transformer, "transformer_blocks", None) or model.transformer.blocks


class AffineBlock(nn.Module):
    """A stand-in CogVideoX block whose output is affine in its input (no timestep dependence)."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.video = nn.Linear(dim, dim)
        self.text = nn.Linear(dim, dim)
        with torch.no_grad():
            for layer in (self.video, self.text):
                layer.weight.copy_(torch.randn(dim, dim, generator=generator) * 0.1)
                layer.bias.copy_(torch.randn(dim, generator=generator) * 0.1)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                attention_kwargs=None):
        return (hidden_states + self.video(hidden_states),
                encoder_hidden_states + self.text(encoder_hidden_states))


@pytest.mark.parametrize("power,exact", [(1, True), (2, False)])
def test_extrapolation_is_exact_when_the_deep_residual_is_linear_in_the_step(power, exact):
    model = tiny_cogvideox(num_layers=3)
    dim = model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim
    model.transformer.transformer_blocks = nn.ModuleList(AffineBlock(dim, s) for s in range(3))
    start, direction = model.latents(1, 0), model.latents(1, 1)
    inputs = [start + direction * (step / 10) ** power for step in range(10)]
    config = HeroConfig(split=0, warmup_steps=2, interval=3, final_full_steps=1)
    assert schedule(10, config).count(StepMode.PARTIAL) == 5
    error = partial_step_error(model, inputs, model.text(1), config)
    assert (error < 1e-5) is exact, error


def partial_step_error(model: TinyVideoModel, inputs: list[torch.Tensor], text: torch.Tensor,
                       config: HeroConfig) -> float:
    """The largest difference HERO makes to the model's output on its PARTIAL steps."""
    reference = run(model, inputs, text)
    apply_hero(model.transformer, config)
    try:
        outputs = run(model, inputs, text)
    finally:
        remove_hero(model.transformer)
    modes = schedule(len(inputs), config)
    return max(float((a - b).abs().max()) for mode, a, b in zip(modes, outputs, reference)
               if mode is StepMode.PARTIAL)


def test_cfg_contexts_keep_separate_caches(family):
    model, inputs, text, _ = family
    other_text = model.text(1, seed=7)
    apply_hero(model.transformer, HeroConfig())
    try:
        alone = run(model, inputs, text, "cond")
        reset_hero(model.transformer)
        interleaved = []
        with torch.no_grad():
            for step, x in enumerate(inputs):
                interleaved.append(model(x, text, step, len(inputs), "cond"))
                model(x, other_text, step, len(inputs), "uncond")
        stats = hero_stats(model.transformer)
    finally:
        remove_hero(model.transformer)
    assert set(stats["contexts"]) == {"cond", "uncond"}
    assert all(torch.equal(a, b) for a, b in zip(alone, interleaved))


def test_batch_rows_do_not_leak():
    model = tiny_cogvideox()
    config = HeroConfig(shallow_forecast="linear")
    first = drifting_latents(model, 6, 1, seed=0)
    partners = [drifting_latents(model, 6, 1, seed=s) for s in (3, 4)]
    text = model.text(1).expand(2, -1, -1)
    results = []
    for partner in partners:
        apply_hero(model.transformer, config)
        try:
            results.append(run(model, [torch.cat([a, b]) for a, b in zip(first, partner)], text))
        finally:
            remove_hero(model.transformer)
    for a, b in zip(*results):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(results[0][4][1], results[1][4][1])


def test_new_shapes_and_step_counts_never_reuse_stale_state():
    model = tiny_cogvideox()
    text = model.text(1)
    apply_hero(model.transformer, HeroConfig())
    try:
        with torch.no_grad():
            for step in range(4):
                model(model.latents(1, step), text, step, 10)
            changes = [dict(height=12), dict(batch=2), dict(num_steps=12)]
            for change in changes:
                batch = change.get("batch", 1)
                x = model.latents(batch, 9, height=change.get("height"))
                num_steps = change.get("num_steps", 10)
                assert schedule(num_steps, HeroConfig())[4] is StepMode.PARTIAL
                hooked = model(x, text.expand(batch, -1, -1), 4, num_steps)
                stats = hero_stats(model.transformer)
                assert (stats["full_steps"], stats["partial_steps"]) == (1, 0), change
                remove_hero(model.transformer)
                assert torch.equal(hooked, model(x, text.expand(batch, -1, -1), 4, num_steps))
                apply_hero(model.transformer, HeroConfig())
                for step in range(4):
                    model(model.latents(1, step), text, step, 10)
    finally:
        remove_hero(model.transformer)


def test_step_zero_and_reset_start_a_new_generation():
    model = tiny_cogvideox()
    text = model.text(1)
    inputs = drifting_latents(model, 6)
    apply_hero(model.transformer, HeroConfig())
    try:
        run(model, inputs, text)
        run(model, inputs, text)
        stats = hero_stats(model.transformer)
        assert (stats["full_steps"], stats["partial_steps"]) == (4, 2)
        with torch.no_grad():
            for step in range(2):
                model(inputs[step], text, step, 6)
            reset_hero(model.transformer)
            after_reset = model(inputs[2], text, 2, 6)
        assert hero_stats(model.transformer)["contexts"]["cond"]["full_steps"] == 1
    finally:
        remove_hero(model.transformer)
    with torch.no_grad():
        assert torch.equal(after_reset, model(inputs[2], text, 2, 6))


def test_remove_hero_restores_the_original_model(family):
    model, inputs, text, reference = family
    transformer = model.transformer
    apply_hero(transformer, HeroConfig())
    with pytest.raises(ValueError, match="already applied"):
        apply_hero(transformer, HeroConfig())
    run(model, inputs, text)
    remove_hero(transformer)
    remove_hero(transformer)
    assert root_hook(transformer) is None
    for module in [transformer, *root_free_blocks(model)]:
        assert "forward" not in module.__dict__
    assert not any(hasattr(block, "_diffusers_hook") for block in root_free_blocks(model))
    assert all(torch.equal(a, b) for a, b in zip(run(model, inputs, text), reference))


def test_calls_need_a_cache_context_with_a_step_count():
    model = tiny_cogvideox(num_layers=2)
    apply_hero(model.transformer, HeroConfig())
    try:
        x, text = model.latents(1), model.text(1)
        kwargs = dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([999.0]),
                      image_rotary_emb=model.rotary(x))
        with pytest.raises(ValueError, match="No cache context"):
            model.transformer(**kwargs)
        with pytest.raises(ValueError, match="num_inference_steps"):
            with model.transformer.cache_context("cond"):
                model.transformer(**kwargs)
    finally:
        remove_hero(model.transformer)


def test_step_counting_without_step_index_in_the_context():
    model = tiny_cogvideox(num_layers=2)
    x, text = model.latents(1), model.text(1)
    kwargs = dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([999.0]),
                  image_rotary_emb=model.rotary(x))
    apply_hero(model.transformer, HeroConfig(num_inference_steps=5))
    try:
        with torch.no_grad():
            for _ in range(7):
                with model.transformer.cache_context("cond_uncond"):
                    model.transformer(**kwargs)
        stats = hero_stats(model.transformer)
    finally:
        remove_hero(model.transformer)
    assert (stats["full_steps"], stats["partial_steps"]) == (2, 0)


@pytest.mark.parametrize("split,bound", [(14, 0.40), (1, 0.32), (0, 0.31)])
def test_default_preset_executes_under_half_of_full_flops_at_42_blocks(split, bound):
    """Aether's proportions (42 blocks; tokens/width ~ 5; text ~ 1.3% of tokens; 4x feed-forward),
    narrow and short, with the paper's third of the blocks shallow, one shallow block, and none
    (what the probe picks on a flat forecast-error profile). Shapes are static and the schedule
    data-independent, so the FLOPs of a 50-step sampling are those of its FULL and PARTIAL calls
    times their counts: both kinds are counted here with torch's FLOP counter on real calls."""
    model = tiny_cogvideox(num_layers=42, heads=2, head_dim=16, frames=2, height=16, width=20,
                           text_tokens=2, channels=8)
    text = model.text(1)
    x = model.latents(1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, text, 0, 50)
    unhooked = counter.get_total_flops()
    config = HeroConfig.preset("default", split=split)
    modes = schedule(50, config)
    assert modes[:5] == [StepMode.FULL] + [StepMode.PARTIAL] * 3 + [StepMode.FULL]
    apply_hero(model.transformer, config)
    try:
        per_step = []
        with torch.no_grad():
            for step in range(5):
                with FlopCounterMode(display=False) as counter:
                    model(model.latents(1, step), text, step, 50)
                per_step.append(counter.get_total_flops())
        stats = hero_stats(model.transformer)
    finally:
        remove_hero(model.transformer)
    full, partial = per_step[0], per_step[1]
    assert per_step[2] == per_step[3] == partial and per_step[4] == full == unhooked
    executed = modes.count(StepMode.FULL) * full + modes.count(StepMode.PARTIAL) * partial
    ratio = executed / (50 * full)
    assert 0.25 < ratio <= bound, ratio
    assert stats["flops_ratio"] == pytest.approx((2 * full + 3 * partial) / (5 * full))
    json.dumps(stats)


def test_every_call_of_a_kind_executes_the_same_flops():
    """What the 42-block test relies on: a whole run's counted FLOPs equal per-kind counts times
    the schedule's counts (static shapes, data-independent schedule)."""
    model = tiny_cogvideox(num_layers=3)
    inputs, text = drifting_latents(model, 9), model.text(1)
    counted, stats = counted_run(model, inputs, text, HeroConfig(shallow_forecast="linear"))
    assert counted == stats["flops_executed"]
    assert stats["flops_ratio"] < 1.0


def test_compiled_hero_does_not_recompile_per_step():
    model = tiny_cogvideox(num_layers=2)
    inputs, text = drifting_latents(model, 6), model.text(1)
    config = HeroConfig(warmup_steps=1, compile=True, compile_backend="eager")
    eager_config = HeroConfig(warmup_steps=1)
    apply_hero(model.transformer, eager_config)
    try:
        eager = run(model, inputs, text)
    finally:
        remove_hero(model.transformer)
    torch._dynamo.reset()
    apply_hero(model.transformer, config)
    try:
        graphs = []
        with torch.no_grad():
            for step, x in enumerate(inputs):
                compiled = model(x, text, step, len(inputs))
                torch.testing.assert_close(compiled, eager[step], rtol=1e-5, atol=1e-5)
                graphs.append(counters["stats"]["unique_graphs"])
        run(model, inputs, text)
        run(model, inputs, text, "uncond")
        after = counters["stats"]["unique_graphs"]
    finally:
        remove_hero(model.transformer)
        torch._dynamo.reset()
    assert graphs[3] > 0
    assert graphs[3] == graphs[-1] == after, graphs


@pytest.mark.parametrize("positions,exact", [("timestep", True), ("step", False)])
def test_extrapolation_follows_a_non_uniform_schedule_in_timestep_positions(positions, exact):
    """Deep residual linear in the timestep, timesteps spaced unevenly (as flow-matching samplers
    space them): exact in timestep positions, not in step positions."""
    model = tiny_cogvideox(num_layers=3)
    dim = model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim
    model.transformer.transformer_blocks = nn.ModuleList(AffineBlock(dim, s) for s in range(3))
    start, direction = model.latents(1, 0), model.latents(1, 1)
    timesteps = [999.0 * (1 - (step / 10) ** 2) for step in range(10)]
    text = model.text(1)

    def call(step: int) -> torch.Tensor:
        x = start + direction * timesteps[step] / 999
        with torch.no_grad(), model.transformer.cache_context("cond", step_index=step,
                                                              num_inference_steps=10):
            return model.transformer(hidden_states=x, encoder_hidden_states=text,
                                     timestep=torch.tensor([timesteps[step]]),
                                     image_rotary_emb=model.rotary(x), return_dict=False)[0]

    reference = [call(step) for step in range(10)]
    config = HeroConfig(split=0, warmup_steps=2, interval=3, final_full_steps=1,
                        positions=positions)
    apply_hero(model.transformer, config)
    try:
        outputs = [call(step) for step in range(10)]
    finally:
        remove_hero(model.transformer)
    modes = schedule(10, config)
    error = max(float((a - b).abs().max()) for mode, a, b in zip(modes, outputs, reference)
                if mode is StepMode.PARTIAL)
    assert (error < 1e-4) is exact, error


def block_call(model: TinyVideoModel, latents: torch.Tensor, text: torch.Tensor
               ) -> tuple[nn.Module, Any]:
    """The first block of ``model`` and its inputs (``BlockInputs``) in a call on ``latents``."""
    block, seen = root_free_blocks(model)[0], {}
    handle = block.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    try:
        run(model, [latents], text)
    finally:
        handle.remove()
    return block, adapter_for(model.transformer).bind(seen["args"], seen["kwargs"])


def test_sub_layer_features_times_their_gates_are_the_block_residual(family):
    model, inputs, text, _ = family
    block, block_inputs = block_call(model, inputs[0], text)
    adapter = adapter_for(model.transformer)
    with torch.no_grad():
        part = adapter.partial_forward(block, block_inputs, None, None, "sdpa")
        gates = adapter.feature_gates(block, block_inputs.temb)
        gated = sum(f.float() if g is None else g.float() * f.float()
                    for f, g in zip(part.features, gates))
    assert len(part.features) == len(gates) >= 2
    torch.testing.assert_close(gated, part.residual.float(), rtol=1e-4, atol=1e-5)


def test_every_deep_blocks_gates_at_once_are_each_blocks_own(family):
    model, inputs, text, _ = family
    _, block_inputs = block_call(model, inputs[0], text)
    adapter = adapter_for(model.transformer)
    blocks = adapter.blocks(model.transformer)
    apply_hero(model.transformer, HeroConfig(split=1))
    try:
        with torch.no_grad():
            at_once = root_hook(model.transformer).runtime.deep_gates(1, block_inputs.temb)
            each = [gate for block in blocks[1:]
                    for gate in adapter.feature_gates(block, block_inputs.temb)]
    finally:
        remove_hero(model.transformer)
    assert len(at_once) == len(each) >= 2 * (len(blocks) - 1)
    for stacked, own in zip(at_once, each):
        assert (stacked is None) == (own is None)
        if own is not None:
            torch.testing.assert_close(stacked, own)


@pytest.mark.parametrize("deep_forecast,exact", [("features", True), ("residual", False)])
def test_feature_forecasts_take_the_gates_of_the_step_they_forecast(deep_forecast, exact):
    """One block whose feed-forward output does not change while its gate moves with the
    timestep (no attention output, no shift/scale modulation, the same input at every step):
    forecasting the output before its gate is exact, forecasting the gated residual is not."""
    model = tiny_cogvideox(num_layers=1)
    block = model.transformer.transformer_blocks[0]
    with torch.no_grad():
        block.attn1.to_out[0].weight.zero_()
        block.attn1.to_out[0].bias.zero_()
        for norm in (block.norm1, block.norm2):
            width = norm.linear.out_features // 6
            norm.linear.weight[:2 * width].zero_()
            norm.linear.bias[:2 * width].zero_()
    config = HeroConfig(split=0, warmup_steps=2, interval=3, final_full_steps=1,
                        deep_forecast=deep_forecast)
    error = partial_step_error(model, [model.latents(1, 0)] * 10, model.text(1), config)
    assert (error < 1e-5) is exact, error


def test_each_forecast_order_keeps_one_more_tensor_per_feature_and_changes_the_forecast():
    model = tiny_cogvideox(num_layers=2)
    inputs, text = drifting_latents(model, 12), model.text(1)
    outputs, cache = {}, {}
    for order in (1, 2, 3):
        outputs[order], stats = hero_run(model, inputs, text, HeroConfig(
            split=0, warmup_steps=1, interval=2, deep_forecast="features", forecast_order=order))
        cache[order] = stats["cache_bytes"]
    per_order = cache[2] - cache[1]
    assert per_order > 0 and cache[3] - cache[2] == per_order
    assert cache[1] >= 2 * per_order, "order 1 holds a value and a slope per feature"
    late_partial = 9  # FULL steps 0, 2, 4, 6, 8: every order has its points
    assert not torch.equal(outputs[1][late_partial], outputs[2][late_partial])
    assert not torch.equal(outputs[2][late_partial], outputs[3][late_partial])


def test_a_memory_bound_lowers_the_forecast_order_to_what_fits(caplog):
    model = tiny_cogvideox(num_layers=2)
    inputs, text = drifting_latents(model, 12), model.text(1)

    def generate(order: int, max_cache_gib: float | None = None) -> tuple[list, dict[str, Any]]:
        return hero_run(model, inputs, text, HeroConfig(
            split=0, warmup_steps=1, interval=2, deep_forecast="features", forecast_order=order,
            max_cache_gib=max_cache_gib))

    first, first_stats = generate(1)
    _, third_stats = generate(3)
    level_bytes = (third_stats["cache_bytes"] - first_stats["cache_bytes"]) / 2
    bounded, bounded_stats = generate(3, max_cache_gib=2.5 * level_bytes / 2**30)  # 2 of 4 levels
    assert (first_stats["forecast_order"], third_stats["forecast_order"]) == (1, 3)
    assert bounded_stats["forecast_order"] == 1
    assert bounded_stats["cache_bytes"] == first_stats["cache_bytes"]
    assert all(torch.equal(a, b) for a, b in zip(first, bounded))
    assert "forecasts at order 1" in caplog.text
    with pytest.raises(ValueError, match="max_cache_gib"):
        HeroConfig(max_cache_gib=0)


def test_without_a_set_bound_the_forecast_order_fits_the_devices_free_memory():
    config, level = HeroConfig(forecast_order=3), 2**20
    assert config.affordable_order(level, free_bytes=None) == 3  # off CUDA: no bound
    assert config.affordable_order(level, free_bytes=3 * level) == 2
    assert config.affordable_order(level, free_bytes=level // 2) == 1  # never below a line
    assert HeroConfig(forecast_order=3, max_cache_gib=1.0).affordable_order(level, free_bytes=level) == 3


def test_verified_schedule_promotes_the_step_after_a_drifting_partial_step():
    model = tiny_cogvideox(num_layers=3)
    inputs, text = drifting_latents(model, 12), model.text(1)
    counts = {}
    for threshold in (None, 1e9, 1e-9):
        counted, stats = counted_run(
            model, inputs, text, HeroConfig(interval=4, split=1, verify_threshold=threshold))
        assert counted == stats["flops_executed"], "shapes stay static"
        counts[threshold] = (stats["full_steps"], stats["partial_steps"])
    static = schedule(12, HeroConfig(interval=4))
    static_counts = (static.count(StepMode.FULL), static.count(StepMode.PARTIAL))
    assert counts[None] == counts[1e9] == static_counts
    # every forecast misses by more than 1e-9: each PARTIAL step is followed by a FULL one
    assert counts[1e-9] == (7, 5), counts  # F F P F P F P F P F P F


def test_auto_split_on_a_generation_too_short_to_probe_takes_the_cheapest_split(tmp_path):
    """Fewer than three steps cannot show how well a block is forecast: HERO runs with no shallow
    block (choose_split's answer for a profile that does not separate), one when it verifies its
    schedule, and caches nothing."""
    model = tiny_cogvideox(num_layers=4)
    inputs, text = drifting_latents(model, 2), model.text(1)
    for verify_threshold, shallow in ((None, 0), (0.5, 1)):
        apply_hero(model.transformer, HeroConfig(split="auto", calibration_dir=str(tmp_path),
                                                 verify_threshold=verify_threshold))
        try:
            run(model, inputs, text)
            stats = hero_stats(model.transformer)
        finally:
            remove_hero(model.transformer)
        assert stats["split"] == shallow and not stats["calibration_run"]
    assert list(tmp_path.glob("*.json")) == []


def test_a_cached_calibration_is_cut_by_the_current_rule(tmp_path):
    """A calibration cached under an earlier rule (here: split 3 of a flat profile) is re-cut from
    its profile; a file named by ``calibration_path`` keeps its split."""
    model = tiny_cogvideox(num_layers=4)
    inputs, text = drifting_latents(model, 6), model.text(1)
    apply_hero(model.transformer, HeroConfig(split="auto", calibration_dir=str(tmp_path)))
    try:
        run(model, inputs, text)
    finally:
        remove_hero(model.transformer)
    (cached,) = tmp_path.glob("*.json")
    record = json.loads(cached.read_text())
    cached.write_text(json.dumps({**record, "split": 3, "profile": [0.05] * 4}))
    splits = {}
    for name, config in (("cached", HeroConfig(split="auto", calibration_dir=str(tmp_path))),
                         ("named", HeroConfig(split="auto", calibration_path=str(cached)))):
        apply_hero(model.transformer, config)
        try:
            run(model, inputs, text)
            splits[name] = hero_stats(model.transformer)["split"]
        finally:
            remove_hero(model.transformer)
    assert splits == {"cached": 0, "named": 3}


def test_auto_split_calibrates_on_the_first_generation_and_is_cached(tmp_path):
    model = tiny_cogvideox(num_layers=4)
    inputs, text = drifting_latents(model, 6), model.text(1)
    reference = run(model, inputs, text)
    config = HeroConfig(split="auto", calibration_dir=str(tmp_path))
    apply_hero(model.transformer, config)
    try:
        calibrating = run(model, inputs, text)
        first = hero_stats(model.transformer)
        run(model, inputs, text)
        second = hero_stats(model.transformer)
    finally:
        remove_hero(model.transformer)
    assert all(torch.equal(a, b) for a, b in zip(calibrating, reference)), "calibration is full"
    assert (first["full_steps"], first["partial_steps"]) == (6, 0)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and "grid2x4x4_text4_steps6" in files[0].name
    split = json.loads(files[0].read_text())["split"]
    assert first["calibration_run"] and first["split"] == second["split"] == split
    assert not second["calibration_run"] and second["partial_steps"] == 2
    apply_hero(model.transformer, config)  # a new application reads the cached calibration
    try:
        run(model, inputs, text)
        assert hero_stats(model.transformer)["partial_steps"] == 2
        run(model, drifting_latents(model, 8), text)  # another shape: calibrated anew
        assert hero_stats(model.transformer)["partial_steps"] == 0
    finally:
        remove_hero(model.transformer)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_wan22_per_token_timesteps_gate_each_token_by_its_own_timestep():
    """Wan 2.2 (``expand_timesteps``) modulates every token by its own timestep, the clean first
    frame's at 0, so HERO's deep forecast takes per-token gates. With every token at the sample's
    timestep it gives the per-sample path's outputs; with a clean first frame it stays as close to
    full compute as the per-sample path does, and the clean frame's tokens, whose gates stay put,
    are forecast at least as well as the noisy frames' (one gate for every token misses them)."""
    config = HeroConfig(split=1, warmup_steps=1, interval=2, forecast_order=2, deep_forecast="features")

    def hero_and_full(clean_frames: int | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model = tiny_wan(frames=3, clean_frames=clean_frames)
        inputs, text = drifting_latents(model, 8), model.text(1)
        hero, stats = hero_run(model, inputs, text, config)
        assert stats["partial_steps"] == 3
        return hero, run(model, inputs, text)

    def error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
        return max(float((a - b).norm() / b.norm()) for a, b in zip(outputs, reference))

    def frame_errors(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
        """Relative error on the first latent frame and on the others ((B, C, F, H, W) layout)."""
        miss = output - reference
        return (float(miss[:, :, :1].norm() / reference[:, :, :1].norm()),
                float(miss[:, :, 1:].norm() / reference[:, :, 1:].norm()))

    per_sample, full = hero_and_full(None)
    uniform, _ = hero_and_full(0)
    clean_first, clean_full = hero_and_full(1)
    for a, b in zip(uniform, per_sample):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert 0 < error(clean_first, clean_full) < 1.5 * error(per_sample, full)
    partial = [frame_errors(a, b) for a, b in zip(clean_first, clean_full) if not torch.equal(a, b)]
    assert len(partial) == 3 and all(clean <= noisy for clean, noisy in partial)

"""HERO's parts one by one: config, schedule, refresh, extrapolation, attention, probe."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from hero.cache import (HeroConfig, StepMode, apply_hero, choose_split, hero_stats, remove_hero,
                        run_probe, schedule)
from hero.cache.attention import attention
from hero.cache.extrapolate import PolynomialForecast
from hero.cache.refresh import RefreshTracker, build_layout
from bench.tiny_transformers import sample, tiny_cogvideox



@pytest.mark.parametrize("field,value,message", [
    ("rho", 0.3, "whole number"), ("rho", 0.0, "rho"), ("warmup_steps", 0, "warmup_steps"),
    ("interval", 0, "interval"), ("split", "deep", "split"),
    ("verify_threshold", 0.0, "verify_threshold"),
    ("positions", "sigma", "positions"), ("shallow_forecast", "cubic", "shallow_forecast"),
    ("kv_mode", "reuse", "kv_mode"), ("attention_backend", "xformers", "attention_backend"),
    ("patch_size", (1, 0, 2), "patch_size"),
])
def test_config_rejects_bad_fields_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        HeroConfig(**{field: value})


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                    reason="flash-attn is installed")
def test_flash_backend_needs_flash_attn():
    with pytest.raises(ValueError, match="flash-attn"):
        HeroConfig(attention_backend="flash")


def test_presets_are_valid_and_ordered_by_cost():
    fractions = {}
    for name in ("turbo", "fast", "default", "quality"):
        config = HeroConfig.preset(name)
        assert config.preset_name == name
        json.dumps(config.to_dict())
        modes = schedule(50, config)
        fractions[name] = modes.count(StepMode.PARTIAL) / 50 * (1 - config.rho)
    assert fractions["turbo"] > fractions["fast"] > fractions["default"] > fractions["quality"] > 0
    assert HeroConfig.preset("default", rho=0.5).rho == 0.5
    with pytest.raises(ValueError, match="unknown HERO preset"):
        HeroConfig.preset("warp")


def test_schedule_is_warmup_alternation_and_tail():
    modes = schedule(50, HeroConfig())
    assert modes[:4] == [StepMode.FULL, StepMode.FULL, StepMode.PARTIAL, StepMode.FULL]
    assert modes[-2:] == [StepMode.PARTIAL, StepMode.FULL]
    assert modes.count(StepMode.FULL) == 26
    assert all(not (a is b is StepMode.PARTIAL) for a, b in zip(modes, modes[1:]))
    fast = schedule(12, HeroConfig(interval=3, final_full_steps=2))
    assert [m.value[0] for m in fast] == list("ffppfppfppff")
    assert set(schedule(9, HeroConfig(interval=1))) == {StepMode.FULL}


def test_split_rules():
    assert HeroConfig().resolve_split(42) == 14
    assert HeroConfig(split=5).resolve_split(42) == 5
    with pytest.raises(ValueError, match="outside"):
        HeroConfig(split=50).resolve_split(42)


def test_patch_sampling_takes_the_same_count_from_every_patch_and_rotates():
    layout = build_layout((2, 4, 6), (1, 2, 2), 1)
    patch_of = torch.empty(layout.num_tokens, dtype=torch.long)
    for patch, members in enumerate(layout.members.tolist()):
        for token in members:
            patch_of[token] = patch
    tracker = RefreshTracker(layout, batch_size=2, device="cpu")
    seen = torch.zeros(2, layout.num_tokens)
    for _ in range(4):
        index = tracker.select()
        assert index.shape == (2, 12)
        for row in index:
            assert sorted(patch_of[row].tolist()) == list(range(12))
        seen.scatter_add_(1, index, torch.ones_like(index, dtype=seen.dtype))
        tracker.advance(index)
    assert torch.equal(seen, torch.ones_like(seen)), "four one-in-four steps cover every token once"


def test_stalest_tokens_win():
    layout = build_layout((1, 2, 2), (1, 2, 2), 1)
    tracker = RefreshTracker(layout, batch_size=2, device="cpu")
    tracker.staleness[0] = torch.tensor([0.0, 3.0, 1.0, 2.0])
    tracker.staleness[1] = torch.tensor([0.0, 0.0, 4.0, 0.0])
    assert tracker.select().tolist() == [[1], [2]]


def test_uneven_grids_keep_a_static_refresh_count():
    layout = build_layout((3, 3, 5), (2, 2, 2), 2)
    real = (layout.members < layout.num_tokens).sum(dim=1)
    expected = int(torch.clamp(real, max=2).sum())
    tracker = RefreshTracker(layout, batch_size=1, device="cpu")
    for _ in range(3):
        index = tracker.select()
        assert index.shape == (1, expected) == (1, layout.num_refreshed)
        assert int(index.max()) < layout.num_tokens
        assert index.unique().numel() == expected
        tracker.advance(index)
    twin = RefreshTracker(layout, batch_size=1, device="cpu")
    assert torch.equal(twin.select(), RefreshTracker(layout, 1, "cpu").select())


def record(forecast: PolynomialForecast, position: float, values: list[torch.Tensor]) -> None:
    """A FULL step at ``position`` that saw ``values``."""
    forecast.start(torch.tensor(position))
    forecast.push(values)


def forecast_at(forecast: PolynomialForecast, position: float, like: torch.Tensor) -> torch.Tensor:
    """The (ungated) forecast at ``position``, as a new tensor shaped like ``like``."""
    return forecast.add_to_(torch.zeros_like(like), torch.tensor(position))


def test_linear_extrapolation_with_uneven_positions():
    def line(s: float) -> torch.Tensor:
        return torch.full((2, 3, 4), 1.0 + 0.5 * s)

    def predict(position: float) -> torch.Tensor:
        return forecast_at(forecast, position, line(0.0))

    forecast = PolynomialForecast()
    with pytest.raises(RuntimeError, match="FULL"):
        predict(1.0)
    record(forecast, 0.0, [line(0.0)])
    assert torch.equal(predict(3.0), line(0.0)), "one FULL step: hold"
    for position in (1.0, 4.0):
        record(forecast, position, [line(position)])
    torch.testing.assert_close(predict(7.0), line(7.0))
    torch.testing.assert_close(predict(-2.0), line(-2.0))


def test_second_order_forecast_is_exact_on_a_parabola_and_starts_lower():
    def parabola(s: float) -> torch.Tensor:
        return torch.full((1, 2, 3), 2.0 - 0.5 * s + 0.25 * s * s)

    def predict(position: float) -> torch.Tensor:
        return forecast_at(forecast, position, parabola(0.0))

    forecast = PolynomialForecast(order=2)
    record(forecast, 0.0, [parabola(0.0)])
    assert torch.equal(predict(5.0), parabola(0.0)), "one FULL step: hold"
    record(forecast, 1.0, [parabola(1.0)])
    line = parabola(1.0) + 4.0 * (parabola(1.0) - parabola(0.0))
    torch.testing.assert_close(predict(5.0), line, msg="two FULL steps: the line")
    for position in (3.0, 7.0):  # uneven gaps; the oldest point drops out
        record(forecast, position, [parabola(position)])
    torch.testing.assert_close(predict(9.0), parabola(9.0))
    assert forecast.nbytes == 3 * parabola(0.0).nbytes, "three tensors kept, no more"


def test_gated_forecasts_add_each_term_times_its_gate():
    forecast = PolynomialForecast(slots=3)
    a, b, c = (torch.randn(2, 3, 4) for _ in range(3))
    record(forecast, 0.0, [a, b, c])
    forecast.start(torch.tensor(2.0))  # slots pushed apart, as the deep blocks do
    forecast.push([a + 2, b - 4])
    forecast.push([c + 1], slot=2)
    per_sample, per_token = torch.randn(2, 1, 4), torch.randn(2, 3, 4)
    out = forecast.add_to_(torch.ones(2, 3, 4), torch.tensor(3.0), [per_sample, None, per_token])
    torch.testing.assert_close(out, 1 + per_sample * (a + 3) + (b - 6) + per_token * (c + 1.5))


def test_sdpa_attention_matches_torch_layout():
    q, k, v = (torch.randn(2, n, 3, 8) for n in (5, 9, 9))
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(attention(q, k, v, "sdpa"), expected)


def test_choose_split_cuts_badly_forecast_shallow_from_well_forecast_deep():
    assert choose_split([1.0, 0.9, 0.8, 0.1, 0.12, 0.09]) == 3
    assert choose_split([0.1, 0.1, 1.0, 1.0]) == 0, "deep not forecast better: no refresh"
    assert choose_split([0.1, 0.1, 1.0, 1.0], min_shallow=1) == 1
    flat = [0.052, 0.035, 0.048, 0.048, 0.049, 0.046, 0.044, 0.044, 0.044, 0.042, 0.037, 0.04]
    assert choose_split(flat) == 0, "a flat profile (the trained toyworld's) has no real cut"
    assert choose_split([5.0, 0.01, 0.01, 0.01], min_shallow=2) == 2


def test_probe_writes_a_plot_and_a_calibration_hero_loads(tmp_path):
    model = tiny_cogvideox(num_layers=4)
    result = run_probe(model.transformer, lambda: sample(model, 5), tmp_path / "probe")
    assert not hasattr(model.transformer.transformer_blocks[0], "_diffusers_hook")
    png = (tmp_path / "probe" / "coupling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    calibration = json.loads((tmp_path / "probe" / "calibration.json").read_text())
    assert calibration["num_layers"] == 4 and calibration["num_steps"] == 5
    assert len(calibration["per_step"][0]) == 3  # a forecast from two steps: steps 2, 3, 4
    assert len(calibration["change"]) == 4
    assert all(math.isfinite(v) and v > 0 for v in calibration["profile"])
    assert calibration["split"] == result["split"] == choose_split(calibration["profile"])
    config = HeroConfig(split="auto", calibration_path=result["calibration_path"])
    apply_hero(model.transformer, config)
    try:
        sample(model, 5)
        assert hero_stats(model.transformer)["split"] == calibration["split"]
    finally:
        remove_hero(model.transformer)
    with pytest.raises(ValueError, match="4 blocks"):
        apply_hero(tiny_cogvideox(num_layers=2).transformer, config)

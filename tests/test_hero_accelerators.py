"""The ``--accel`` registry: every accelerator applies, samples under cache_context, and removes."""

from __future__ import annotations

import json

import pytest
import torch

from hero.accelerators import ACCELERATORS, apply_accelerator
from bench.tiny_transformers import sample, tiny_cogvideox

STEPS = 8
BUILT_IN = ("none", "hero", "hero-fast", "hero-quality", "hero-turbo", "pab", "pab-fast",
            "fastercache", "fbc", "fbc-fast", "taylorseer", "taylorseer-fast", "magcache")


@pytest.fixture(scope="module")
def model_and_reference():
    model = tiny_cogvideox(num_layers=3)
    return model, sample(model, STEPS, cfg="batched")[0]


def no_hooks_left(transformer: torch.nn.Module) -> bool:
    for module in transformer.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if (registry is not None and registry.hooks) or "forward" in module.__dict__:
            return False
    return getattr(transformer, "_cache_config", None) is None


def test_registry_lists_hero_and_the_diffusers_caches():
    assert set(BUILT_IN) <= set(ACCELERATORS)
    assert all(ACCELERATORS[name].description for name in BUILT_IN)


@pytest.mark.parametrize("name", BUILT_IN)
def test_accelerator_applies_samples_and_removes(name, model_and_reference, tmp_path):
    model, reference = model_and_reference
    options = {"calibration_path": str(tmp_path / "mag.json")} if name == "magcache" else {}
    accelerator = apply_accelerator(model.transformer, name, **options)
    try:
        first = sample(model, STEPS, cfg="batched")[0]
        second = sample(model, STEPS, cfg="batched")[0]
        third = sample(model, STEPS, cfg="batched")[0]
        stats = accelerator.stats()
    finally:
        accelerator.remove()
    assert json.loads(json.dumps(stats))["accelerator"] == name
    assert torch.isfinite(second).all()
    assert torch.equal(second, third), "state is reset between generations"
    if name.startswith("hero"):
        assert stats["flops_ratio"] < 1.0 and stats["partial_steps"] > 0
    if name in ("none", "fbc", "fbc-fast"):
        assert "calls" in stats or name == "none"
    if name == "magcache":
        assert torch.equal(first, reference), "the calibration run skips nothing"
        assert not stats["calibrating"] and len(stats["mag_ratios"]) == STEPS
        assert json.loads((tmp_path / "mag.json").read_text())["mag_ratios"] == stats["mag_ratios"]
    elif name != "none" and not name.startswith("fbc"):
        assert not torch.equal(second, reference)
    if "calls" in stats:
        assert stats["calls"] == STEPS
    assert no_hooks_left(model.transformer)
    assert torch.equal(sample(model, STEPS, cfg="batched")[0], reference)


@pytest.mark.parametrize("name", ["hero", "pab", "fastercache", "taylorseer"])
def test_accelerators_with_separate_cfg_calls(name, model_and_reference):
    model, _ = model_and_reference
    reference = sample(model, STEPS, cfg="separate")[0]
    accelerator = apply_accelerator(model.transformer, name)
    try:
        accelerated = sample(model, STEPS, cfg="separate")[0]
    finally:
        accelerator.remove()
    assert torch.isfinite(accelerated).all()
    assert not torch.equal(accelerated, reference)
    assert torch.equal(sample(model, STEPS, cfg="separate")[0], reference)


def test_taylorseer_computes_its_last_step_in_full(model_and_reference):
    """One warm-up step, every third step after it (steps 0, 2, 5 of 8), and the last one unless
    ``final_full_steps=0``."""
    model, _ = model_and_reference
    last_computed = {}
    for final in (0, 1):
        accelerator = apply_accelerator(model.transformer, "taylorseer", final_full_steps=final)
        try:
            sample(model, STEPS, cfg="batched")
            last_computed[final] = {
                state.last_update_step for hook in accelerator._hooks_with("disable_cache_after_step")
                for state in hook.state_manager._state_cache.values()}
        finally:
            accelerator.remove()
    assert last_computed == {0: {5}, 1: {STEPS - 1}}


def test_magcache_reads_a_saved_calibration(model_and_reference, tmp_path):
    model, reference = model_and_reference
    path = tmp_path / "mag.json"
    path.write_text(json.dumps({"mag_ratios": [1.0] + [0.999] * (STEPS - 1)}))
    accelerator = apply_accelerator(model.transformer, "magcache", calibration_path=str(path),
                                    retention_ratio=0.0, threshold=0.5)
    try:
        accelerated = sample(model, STEPS, cfg="batched")[0]
        assert not accelerator.stats()["calibrating"]
    finally:
        accelerator.remove()
    assert not torch.equal(accelerated, reference)


def test_unknown_names_and_options_are_refused(model_and_reference):
    model, _ = model_and_reference
    with pytest.raises(ValueError, match="unknown accelerator 'teacache'"):
        apply_accelerator(model.transformer, "teacache")
    with pytest.raises(ValueError, match="no option"):
        apply_accelerator(model.transformer, "fbc", treshold=0.1)
    accelerator = apply_accelerator(model.transformer, "hero", rho=0.5, interval=3)
    try:
        assert accelerator.stats()["config"]["rho"] == 0.5
    finally:
        accelerator.remove()

"""FORA and ToCa/DuCa hooks (hero.baselines) on a tiny random CogVideoX transformer.

Every call runs under ``cache_context`` exactly as the world models' sampling loop does; outputs
are compared with the unhooked model, bit for bit where nothing is reused.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from hero.baselines import (TOCA_PRESETS, ForaConfig, TocaConfig, apply_fora, apply_toca,
                            fora_stats, remove_fora, remove_toca, toca_stats)
from hero.baselines.toca import attention_importance, cell_ids
from hero.models.cogvideox_world import rotary_embedding

FRAMES, HEIGHT, WIDTH, TEXT = 2, 8, 8, 3  # latent grid -> 2 x 4 x 4 = 32 video tokens
STEPS = 6


@pytest.fixture(scope="module")
def model() -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=6, out_channels=4,
        time_embed_dim=16, text_embed_dim=12, num_layers=3, sample_width=WIDTH,
        sample_height=HEIGHT, sample_frames=(FRAMES - 1) * 4 + 1, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False).eval()


def inputs(batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, FRAMES, 6, HEIGHT, WIDTH, generator=generator),
            torch.randn(batch, TEXT, 12, generator=generator))


ROPE = rotary_embedding(16, HEIGHT // 2, WIDTH // 2, FRAMES)


@torch.no_grad()
def call(model, x, text, step: int, name: str = "cond", steps: int = STEPS) -> torch.Tensor:
    """One denoising call, the way the sampling loop makes it (the input drifts with the step)."""
    timestep = torch.full((x.shape[0],), 900 - 150 * step)
    with model.cache_context(name, step_index=step, num_inference_steps=steps, timestep=timestep):
        return model(hidden_states=x * (1 - 0.1 * step), encoder_hidden_states=text,
                     timestep=timestep, image_rotary_emb=ROPE, return_dict=False)[0]


def trajectory(model, x, text, name: str = "cond", steps: int = STEPS) -> list[torch.Tensor]:
    return [call(model, x, text, s, name, steps) for s in range(steps)]


APPLIERS = [(apply_fora, remove_fora, ForaConfig), (apply_toca, remove_toca, TocaConfig)]


def full_and_hooked(model, apply, remove, config) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same trajectory at full compute and with the cache applied (removed afterwards)."""
    x, text = inputs()
    reference = trajectory(model, x, text)
    apply(model, config)
    try:
        return reference, trajectory(model, x, text)
    finally:
        remove(model)


@pytest.mark.parametrize("apply, remove, config", APPLIERS)
def test_all_recompute_configs_are_bit_identical(model, apply, remove, config):
    reference, hooked = full_and_hooked(model, apply, remove, config(interval=1))
    assert all(torch.equal(a, b) for a, b in zip(reference, hooked))


def test_toca_refreshing_every_token_matches_full_compute(model):
    x, text = inputs()
    reference = trajectory(model, x, text)
    apply_toca(model, TocaConfig(interval=3, refresh_ratio=1.0))
    try:
        hooked = trajectory(model, x, text)
        stats = toca_stats(model)
    finally:
        remove_toca(model)
    assert stats["skipped_block_token_fraction"] == 0.0
    for a, b in zip(reference, hooked):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("apply, remove, config", APPLIERS)
def test_reuse_changes_output_and_remove_restores_forward(model, apply, remove, config):
    reference, hooked = full_and_hooked(model, apply, remove, config(interval=2))
    assert torch.equal(hooked[0], reference[0])  # step 0 runs everything
    assert not torch.equal(hooked[1], reference[1])  # step 1 reuses caches
    assert "forward" not in model.__dict__
    assert all("forward" not in block.__dict__ for block in model.transformer_blocks)
    assert all(not hasattr(block, "_diffusers_hook") for block in model.transformer_blocks)
    assert all(torch.equal(a, b) for a, b in zip(reference, trajectory(model, *inputs())))


def test_fora_reuse_step_adds_each_blocks_cached_residual(model):
    """On a reused step every block returns its input plus its residual from the last FULL step."""
    x, text = inputs()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [block.register_forward_hook(
        lambda _m, _args, kwargs, out: seen.append((kwargs["hidden_states"], out[0])),
        with_kwargs=True) for block in model.transformer_blocks]
    apply_fora(model, ForaConfig(interval=2))
    try:
        call(model, x, text, 0)
        full = [out - inp for inp, out in seen]
        seen.clear()
        call(model, x, text, 1)
        reused = [out - inp for inp, out in seen]
        stats = fora_stats(model)
    finally:
        remove_fora(model)
        for handle in handles:
            handle.remove()
    assert len(reused) == len(full) == 3
    for before, now in zip(full, reused):
        torch.testing.assert_close(now, before, rtol=1e-5, atol=1e-5)
    assert stats["skipped_block_token_fraction"] == pytest.approx(0.5)
    assert stats["cache_bytes"] == sum(r.nbytes for r in full) + 3 * 1 * TEXT * 32 * 4


def test_contexts_keep_separate_state(model):
    x, text = inputs(seed=1)
    other_x, other_text = inputs(seed=2)
    for apply, remove, config in APPLIERS:
        apply(model, config(interval=3))
        try:
            alone = trajectory(model, x, text, "cond")
            interleaved = []
            for step in range(STEPS):
                interleaved.append(call(model, x, text, step, "cond"))
                call(model, other_x, other_text, step, "uncond")
        finally:
            remove(model)
        assert all(torch.equal(a, b) for a, b in zip(alone, interleaved)), apply.__name__


@pytest.mark.parametrize("apply, remove, config", APPLIERS)
def test_new_generation_and_new_shapes_start_afresh(model, apply, remove, config):
    x, text = inputs()
    apply(model, config(interval=3))
    try:
        first = trajectory(model, x, text)
        second = trajectory(model, x, text)  # step 0 again: a new generation
        big_x, big_text = inputs(batch=2, seed=3)
        mixed = [call(model, x, text, 0), call(model, x, text, 1), call(model, big_x, big_text, 2)]
        fresh_big = call(model, big_x, big_text, 0)
    finally:
        remove(model)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    reference_big = call(model, big_x, big_text, 2)
    assert torch.equal(mixed[2], reference_big)  # a new batch size never reuses stale tensors
    assert fresh_big.shape == reference_big.shape


def test_toca_schedule_and_refresh_counts(model):
    x, text = inputs(batch=2)
    duca = TocaConfig(**TOCA_PRESETS["duca"])
    assert [duca.mode(s, 9) for s in range(7)] == ["full", "partial", "reuse", "full", "partial",
                                                  "reuse", "full"]
    apply_toca(model, TocaConfig(interval=3, refresh_ratio=0.25))
    try:
        trajectory(model, x, text, steps=3)
        stats = toca_stats(model)
    finally:
        remove_toca(model)
    # step 0 FULL; steps 1 and 2 refresh round(0.25 * 32) = 8 of the 32 tokens in every block
    assert stats["skipped_block_token_fraction"] == pytest.approx(2 * (32 - 8) / (3 * 32))


def test_attention_importance_is_the_column_mass_of_attention(model):
    attn = model.transformer_blocks[0].attn1
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, TEXT + 32, 32, generator=generator)
    with torch.no_grad():
        query, key = attn.to_q(hidden), attn.to_k(hidden)
        importance = attention_importance(attn, query, key, TEXT, None, queries=32)
        q = attn.norm_q(query.unflatten(2, (2, -1)).transpose(1, 2))
        k = attn.norm_k(key.unflatten(2, (2, -1)).transpose(1, 2))
        probs = torch.softmax(q[:, :, TEXT:] @ k.transpose(-1, -2) / 4.0, dim=-1)
    expected = probs[..., TEXT:].sum(dim=(1, 2))
    torch.testing.assert_close(importance, expected / expected.mean(), rtol=1e-4, atol=1e-5)


def test_cell_ids_tile_the_grid():
    ids = cell_ids((2, 4, 6), (1, 2, 4)).reshape(2, 4, 6)
    assert ids[0, 0, 0] == ids[0, 1, 3] == 0 and ids[0, 0, 4] == 1 and ids[0, 2, 0] == 2
    assert ids[1, 0, 0] == 4 and int(ids.max()) == 7


@pytest.mark.parametrize("field, value", [("interval", 0), ("refresh_ratio", 0.0), ("score", "x"),
                                          ("spatial_cell", (1, 0, 2)), ("staleness_weight", -1.0)])
def test_toca_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"TocaConfig.{field}="):
        TocaConfig(**{field: value})


def test_fora_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ForaConfig.warmup_steps="):
        ForaConfig(warmup_steps=0)


def test_applying_twice_is_refused(model):
    apply_fora(model)
    try:
        with pytest.raises(ValueError, match="already applied"):
            apply_fora(model)
    finally:
        remove_fora(model)

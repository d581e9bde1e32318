"""The Aether backend on a tiny random checkpoint of the same architecture, laid out like the hub.

``<tmp>/aether/transformer`` stands for AetherWorldModel/AetherV1 and ``<tmp>/base/{vae,scheduler,
text_encoder,tokenizer}`` for THUDM/CogVideoX-5b-I2V (its scheduler saved, as on the hub, as a
CogVideoXDDIMScheduler config). Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                       CogVideoXTransformer3DModel)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from safetensors.torch import load_file, save_file

from hero import geometry
from hero.models import RolloutRequest, WorldModel, load_model
from hero.models.aether import (AETHER_SPEC, PROMPT_KEY, center_crop_resize, check_components,
                                default_prompt_cache, encode_empty_prompt, load_aether,
                                read_prompt_cache)
from hero.models.aether import main as aether_main
from hero.models.base import pose_deltas
from hero.models.cogvideox_world import fold_raymap, guidance_at, unfold_raymap

HEIGHT, WIDTH = 64, 96  # Aether's 2:3 aspect, latent 8 x 12, 4 x 6 tokens per latent frame
TEXT_LENGTH, TEXT_DIM = 8, 32


def save_tiny_aether(root: Path) -> tuple[Path, Path]:
    """A tiny random AetherV1 + CogVideoX-5b-I2V pair under ``root``: (repo dir, base dir)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    repo, base = root / "aether", root / "base"
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=96, out_channels=56,
        time_embed_dim=32, text_embed_dim=TEXT_DIM, num_layers=4, sample_height=HEIGHT // 8,
        sample_width=WIDTH // 8, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LENGTH, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,  # as CogVideoX-5b-I2V: fixes the resolution
    ).save_pretrained(repo / "transformer")
    AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=16, layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4, sample_height=2 * HEIGHT,
        sample_width=2 * WIDTH,  # tiles are half the sample size: no tiling at 64 x 96
    ).save_pretrained(base / "vae")
    CogVideoXDDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=1.0,
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
    ).save_pretrained(base / "scheduler")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁a", -3.0), ("▁b", -3.0)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(base / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=4)).save_pretrained(base / "text_encoder")
    return repo, base


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_aether(tmp_path_factory.mktemp("tiny_aether"))


def load_tiny(tiny, cache: Path, dtype: str = "float32", **options):
    repo, base = tiny
    return load_model("aether", path_or_repo=str(repo), base=str(base), device="cpu", dtype=dtype,
                      prompt_cache=cache, height=HEIGHT, width=WIDTH, **options)


@pytest.fixture(scope="module")
def model(tiny, tmp_path_factory):
    return load_tiny(tiny, tmp_path_factory.mktemp("cache") / "empty.safetensors")


def forward_path(frames: int, step: float = 0.05) -> np.ndarray:
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    c2w[:, 2, 3] = step * np.arange(frames)
    return c2w


def requests(frames: int = 17) -> list[RolloutRequest]:
    """One request per task, observations at sizes other than the model's (they get fitted)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    goal = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    video = rng.integers(0, 256, (frames + 3, 72, 96, 3), dtype=np.uint8)
    return [RolloutRequest(id="rec", task="reconstruction", frames=frames, video=video, seed=1),
            RolloutRequest(id="pred", task="prediction", frames=frames, image=image,
                           c2w=forward_path(frames), seed=2),
            RolloutRequest(id="plan", task="planning", frames=frames, image=image, goal=goal,
                           seed=3, extra={"fps": 24})]


def check_rollout(rollout, frames: int = 17) -> None:
    assert rollout.rgb.shape == (frames, HEIGHT, WIDTH, 3) and rollout.rgb.dtype == np.uint8
    assert rollout.depth.shape == (frames, HEIGHT, WIDTH) and rollout.depth.dtype == np.float32
    assert np.isfinite(rollout.depth).all() and rollout.depth.min() > 0
    assert rollout.depth.max() <= AETHER_SPEC.far
    assert rollout.depth_is_metric is False
    assert rollout.k.shape == (frames, 3, 3) and np.isfinite(rollout.k).all()
    assert (rollout.k[:, 0, 0] > 0).all() and (rollout.k[:, 1, 1] > 0).all()
    assert rollout.c2w.shape == (frames, 4, 4) and geometry.is_rigid(rollout.c2w)
    np.testing.assert_allclose(rollout.c2w[0], np.eye(4), atol=1e-5)
    assert rollout.actions.shape == (frames, 6) and not rollout.actions[0].any()


# ------------------------------------------------------------------------------------ loading
def test_load_reads_the_hub_layout_with_aethers_settings(model, tiny):
    assert isinstance(model, WorldModel)
    assert isinstance(model.scheduler, CogVideoXDPMScheduler)  # from the base's DDIM config
    assert isinstance(model.transformer, CogVideoXTransformer3DModel)
    assert (model.name, model.revision) == ("aether", str(tiny[0]))
    assert (model.height, model.width) == (HEIGHT, WIDTH)
    assert (AETHER_SPEC.height, AETHER_SPEC.width) == (480, 720)
    assert model.frame_options == (17, 25, 33, 41)
    assert {t: model.default_steps(t) for t in ("reconstruction", "prediction", "planning")} == \
        {"reconstruction": 4, "prediction": 50, "planning": 50}
    assert model.spec.default_guidance == {"reconstruction": 1.0, "prediction": 3.0,
                                           "planning": 3.0}
    assert model.spec.dynamic_guidance == {"reconstruction": False, "prediction": True,
                                           "planning": True}
    assert model.spec.fps_options == (8, 10, 12, 15, 24) and model.spec.metric_dmax is None
    assert model.prompt_embeds.shape == (1, TEXT_LENGTH, TEXT_DIM)


def test_check_components_refuses_what_aether_cannot_serve(model):
    check_components(model.transformer, model.vae, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="learned positional embeddings"):
        check_components(model.transformer, model.vae, 2 * HEIGHT, 2 * WIDTH)
    with pytest.raises(ValueError, match="multiples of 16"):
        check_components(model.transformer, model.vae, HEIGHT + 8, WIDTH)
    wrong = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16,
                                        in_channels=32, out_channels=16, time_embed_dim=32,
                                        text_embed_dim=TEXT_DIM, num_layers=1)
    with pytest.raises(ValueError, match="transformer: in/out channels 32/16"):
        check_components(wrong, model.vae, HEIGHT, WIDTH)


# --------------------------------------------------------------------------------- generation
def test_all_three_tasks_run_end_to_end(model):
    batch = requests()
    rollouts = model.generate(batch)
    assert [r.meta["task"] for r in rollouts] == ["reconstruction", "prediction", "planning"]
    for rollout in rollouts:
        check_rollout(rollout)
    rec, pred, plan = rollouts
    assert (rec.meta["steps"], rec.meta["guidance"]) == (4, 1.0)
    assert (pred.meta["steps"], pred.meta["guidance"]) == (50, 3.0)
    assert (plan.meta["steps"], plan.meta["guidance"], plan.meta["fps"]) == (50, 3.0, 24)
    assert pred.meta["fps"] == 12 and pred.meta["model"] == "aether"
    np.testing.assert_allclose(pred.actions, pose_deltas(forward_path(17)), atol=1e-6)
    np.testing.assert_allclose(pred.meta["commanded_c2w"], forward_path(17), atol=1e-12)


def test_all_three_tasks_run_with_hero(tiny, tmp_path):
    hero = pytest.importorskip("hero.cache")
    model = load_tiny(tiny, tmp_path / "empty.safetensors")
    hero.apply_hero(model.transformer, hero.HeroConfig())
    for request in requests():
        check_rollout(model.generate([request])[0])
        stats = hero.hero_stats(model.transformer)
        assert stats["full_steps"] > 0 and stats["partial_steps"] > 0, (request.task, stats)


def test_hero_with_every_step_full_changes_nothing(tiny, tmp_path):
    hero = pytest.importorskip("hero.cache")
    model = load_tiny(tiny, tmp_path / "empty.safetensors")
    condition = torch.randn(1, 5, 40, HEIGHT // 8, WIDTH // 8,
                            generator=torch.Generator().manual_seed(0))
    plain = model.denoise(condition, "prediction", 6, 3.0, [7])
    hero.apply_hero(model.transformer, hero.HeroConfig(interval=1))
    all_full = model.denoise(condition, "prediction", 6, 3.0, [7])
    hero.remove_hero(model.transformer)
    hero.apply_hero(model.transformer, hero.HeroConfig())
    partial = model.denoise(condition, "prediction", 6, 3.0, [7])
    torch.testing.assert_close(all_full, plain, atol=1e-4, rtol=1e-4)
    assert (partial - plain).abs().max() > 1e-3


def test_the_seed_fixes_the_dpm_sample(model):
    condition = torch.randn(2, 5, 40, HEIGHT // 8, WIDTH // 8,
                            generator=torch.Generator().manual_seed(1))
    first = model.denoise(condition, "planning", 4, 3.0, [5, 6])
    again = model.denoise(condition, "planning", 4, 3.0, [5, 6])
    other = model.denoise(condition, "planning", 4, 3.0, [5, 9])
    assert torch.equal(first, again)
    assert torch.equal(first[0], other[0]) and not torch.allclose(first[1], other[1])


def test_bfloat16_reconstruction(tiny, tmp_path):
    model = load_tiny(tiny, tmp_path / "empty.safetensors", dtype="bfloat16")
    assert model.transformer.dtype == torch.bfloat16 and model.vae.dtype == torch.bfloat16
    assert model.prompt_embeds.dtype == torch.bfloat16
    check_rollout(model.generate(requests()[:1])[0])


@pytest.mark.parametrize("change, field", [
    (dict(frames=18), "frames"), (dict(extra={"fps": 7}), "extra.fps"),
    (dict(c2w=forward_path(9)), "c2w"), (dict(k=geometry.intrinsics(80, 100, 60.0, 5)), "k"),
])
def test_requests_outside_aethers_constraints_are_refused(model, change, field):
    request = requests()[1]
    for name, value in change.items():
        setattr(request, name, value)
    with pytest.raises(ValueError, match=f"^{field}:"):
        model.generate([request])


def test_a_short_video_or_non_rigid_path_is_refused(model):
    rec, pred, _ = requests()
    rec.video = rec.video[:10]
    with pytest.raises(ValueError, match="^video:"):
        model.generate([rec])
    pred.c2w = pred.c2w.copy()
    pred.c2w[3, :3, :3] *= 1.5
    with pytest.raises(ValueError, match="not rigid"):
        model.generate([pred])


def test_a_batch_mixing_rows_with_and_without_a_camera_path_keeps_each_rows_condition():
    """Prediction with and without c2w in one call: every row comes out as it does alone (the
    batch key keeps them apart), and the path really conditions the row that has one."""
    model = load_model("tiny")
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (model.height, model.width, 3), dtype=np.uint8)
    turning = forward_path(17, step=0.3)
    for t in range(17):
        turning[t, :3, :3] = geometry.rotation_y(0.05 * t)
    with_path = RolloutRequest(id="path", frames=17, image=image, c2w=turning, steps=2, seed=1)
    without = RolloutRequest(id="free", frames=17, image=image, steps=2, seed=2)
    batched = model.generate([with_path, without])
    alone = [model.generate([request])[0] for request in (with_path, without)]
    for mixed, single in zip(batched, alone):
        for name in ("rgb", "depth", "c2w", "actions"):
            np.testing.assert_allclose(getattr(mixed, name), getattr(single, name), atol=1e-5)
    np.testing.assert_allclose(batched[0].actions, pose_deltas(turning), atol=1e-6)
    uncommanded = model.generate([dataclasses.replace(with_path, c2w=None)])[0]
    assert np.abs(uncommanded.rgb.astype(int) - alone[0].rgb).max() > 20


# ------------------------------------------------------------------------------------- inputs
def blob(height: int, width: int, u: float, v: float, sigma: float = 2.5) -> np.ndarray:
    """A grey Gaussian blob centred on the continuous pixel coordinate (u, v)."""
    x, y = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    image = 255 * np.exp(-((x - u) ** 2 + (y - v) ** 2) / (2 * sigma ** 2))
    return np.repeat(image[..., None], 3, axis=-1).round().astype(np.uint8)


def centroid(image: np.ndarray) -> np.ndarray:
    weight = image[..., 0].astype(np.float64)
    x, y = np.meshgrid(np.arange(image.shape[1]) + 0.5, np.arange(image.shape[0]) + 0.5)
    return np.array([(weight * x).sum(), (weight * y).sum()]) / weight.sum()


@pytest.mark.parametrize("source", [(90, 160), (120, 100), (32, 48)])
def test_center_crop_resize_keeps_k_consistent_with_the_pixels(source):
    src_h, src_w = source
    k = np.array([[0.8 * src_w, 0, 0.52 * src_w], [0, 0.8 * src_w, 0.47 * src_h], [0, 0, 1]])
    point = np.array([0.05, -0.03, 1.0])  # a 3-D point near the optical axis, in camera frame
    u, v, _ = k @ point
    image, k_fit = center_crop_resize(blob(src_h, src_w, u, v), 480, 720, k[None])
    assert image.shape == (480, 720, 3) and image.dtype == np.uint8
    expected = (k_fit[0] @ point)[:2]
    np.testing.assert_allclose(centroid(image), expected, atol=0.5 * 720 / min(src_w, 1.5 * src_h))


def test_center_crop_resize_is_exact_at_the_models_size_and_handles_video():
    video = np.random.default_rng(0).integers(0, 256, (5, HEIGHT, WIDTH, 3), dtype=np.uint8)
    same, k = center_crop_resize(video, HEIGHT, WIDTH)
    assert same is video and k is None
    fitted, _ = center_crop_resize(video, 480, 720)
    assert fitted.shape == (5, 480, 720, 3)


def test_fit_request_rebases_the_path_and_fits_k(model):
    request = requests()[1]
    start = np.eye(4)
    start[:3, :3] = geometry.rotation_y(0.3)
    start[:3, 3] = [1.0, 2.0, 3.0]
    request.c2w = start[None] @ forward_path(20)
    request.k = geometry.intrinsics(80, 100, 60.0, 20)
    fitted = model.fit_request(request)
    np.testing.assert_allclose(fitted.c2w, forward_path(17), atol=1e-12)
    assert fitted.image.shape == (HEIGHT, WIDTH, 3) and fitted.k.shape == (17, 3, 3)
    _, expected = center_crop_resize(request.image, HEIGHT, WIDTH, request.k[:17])
    np.testing.assert_allclose(fitted.k, expected)


# ------------------------------------------------------------------------------- prompt cache
def test_prompt_cache_is_written_once_then_used_without_t5(tiny, tmp_path, monkeypatch):
    repo, base = tiny
    monkeypatch.setenv("HERO_CACHE_DIR", str(tmp_path / "hero_cache"))
    cache = default_prompt_cache(base, TEXT_LENGTH)
    assert cache.is_relative_to(tmp_path / "hero_cache") and not cache.exists()
    first = load_model("aether", path_or_repo=str(repo), base=str(base), device="cpu",
                       dtype="float32", height=HEIGHT, width=WIDTH)
    assert cache.exists()
    torch.testing.assert_close(load_file(str(cache))[PROMPT_KEY],
                               encode_empty_prompt(base, TEXT_LENGTH))
    no_t5 = tmp_path / "base_without_t5"
    shutil.copytree(base, no_t5, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    second = load_aether(repo, base=no_t5, device="cpu", dtype="float32", prompt_cache=cache,
                         height=HEIGHT, width=WIDTH)
    assert torch.equal(second.prompt_embeds, first.prompt_embeds)
    assert not (no_t5 / "text_encoder").exists() and not (no_t5 / "tokenizer").exists()
    with pytest.raises((OSError, ValueError)):  # without the cache the stripped base needs T5
        load_aether(repo, base=no_t5, device="cpu", dtype="float32",
                    prompt_cache=tmp_path / "missing.safetensors", height=HEIGHT, width=WIDTH)


def test_the_command_line_writes_the_prompt_cache(tiny, tmp_path, capsys):
    repo, base = tiny
    cache = tmp_path / "shared" / "empty.safetensors"
    aether_main(["--weights", str(repo), "--base", str(base), "--prompt-cache", str(cache),
                 "--device", "cpu"])
    printed = capsys.readouterr().out
    assert f"{cache}: empty-prompt embedding (1, {TEXT_LENGTH}, {TEXT_DIM})" in printed
    torch.testing.assert_close(read_prompt_cache(cache, TEXT_LENGTH, TEXT_DIM),
                               encode_empty_prompt(base, TEXT_LENGTH))
    assert not list(cache.parent.glob("*.partial"))


def test_a_prompt_cache_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({PROMPT_KEY: torch.zeros(1, 4, TEXT_DIM)}, str(path))
    with pytest.raises(ValueError, match="prompt_cache: .*wrong.safetensors"):
        read_prompt_cache(path, TEXT_LENGTH, TEXT_DIM)


# --------------------------------------------------------------------------- rotary, guidance
def test_fps_rescales_only_the_temporal_rotary_positions(model):
    lat, head_dim = 5, model.transformer.config.attention_head_dim
    base_cos, base_sin = model._rotary(lat, 12)
    reference = get_3d_rotary_pos_embed(head_dim, ((0, 0), (4, 6)), (4, 6), lat)
    assert torch.equal(base_cos, reference[0]) and torch.equal(base_sin, reference[1])
    fast_cos, _ = model._rotary(lat, 24)
    per_frame = lambda x: x.reshape(lat, 4 * 6, head_dim)
    dim_t = head_dim // 4
    torch.testing.assert_close(per_frame(fast_cos)[2], per_frame(base_cos)[1])  # half the pace
    torch.testing.assert_close(per_frame(fast_cos)[..., dim_t:], per_frame(base_cos)[..., dim_t:])
    assert not torch.allclose(per_frame(fast_cos)[1, :, :dim_t], per_frame(base_cos)[1, :, :dim_t])


def test_guidance_ramps():
    assert guidance_at(3.0, 500, 1000, dynamic=False, ramp="pipeline", steps=50) == 3.0
    assert guidance_at(3.0, 999, 1000, dynamic=True) == pytest.approx(1.0, abs=1e-12)
    assert guidance_at(3.0, 0, 1000, dynamic=True) == pytest.approx(4.0)
    # the pipelines' formula at the last of 50 trailing DPM timesteps: 0.62 ** 5 = 0.0916
    expected = 1.0 + 3.0 * (1.0 - math.cos(math.pi * 0.0916132832)) / 2.0
    assert guidance_at(3.0, 19, 1000, True, "pipeline", 50) == pytest.approx(expected)
    assert 1.0 <= guidance_at(3.0, 979, 1000, True, "pipeline", 50) <= 4.0
    with pytest.raises(ValueError, match="guidance_ramp"):
        guidance_at(3.0, 10, 1000, True, "cosine", 50)


# ------------------------------------------------------------------------- raymaps <-> poses
def random_rigid_path(rng: np.random.Generator, frames: int) -> np.ndarray:
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    for t in range(1, frames):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        c2w[t, :3, :3] = q if np.linalg.det(q) > 0 else -q
        c2w[t, :3, 3] = rng.normal(scale=0.5, size=3)
    return c2w


@pytest.mark.parametrize("frames", AETHER_SPEC.frame_options)
def test_raymap_pose_round_trip_through_the_folded_latent_layout(frames):
    rng = np.random.default_rng(frames)
    c2w = random_rigid_path(rng, frames)
    k = geometry.intrinsics(480, 720, float(rng.uniform(40, 90)), frames)
    k_latent = geometry.scale_intrinsics(k, 1 / 8)
    raymap = torch.from_numpy(geometry.poses_to_raymap(c2w, k_latent, 60, 90))[None]
    folded = fold_raymap(raymap, 4)
    latent_frames = (frames - 1) // 4 + 1
    assert folded.shape == (1, latent_frames, 24, 60, 90)
    padded = torch.cat([raymap[:, : (-frames) % 4], raymap], dim=1)  # Aether pads leading frames
    for run in range(4):  # run j of the padded clip fills channels [6j, 6j + 6)
        assert torch.equal(folded[0, :, 6 * run:6 * run + 6],
                           padded[0, run * latent_frames:(run + 1) * latent_frames])
    unfolded = unfold_raymap(folded, frames, 4)
    assert torch.equal(unfolded, raymap)
    c2w_back, k_back = geometry.raymap_to_poses(unfolded[0].numpy())
    np.testing.assert_allclose(c2w_back, c2w, atol=1e-4)
    np.testing.assert_allclose(geometry.scale_intrinsics(k_back, 8), k, rtol=1e-4, atol=1e-3)

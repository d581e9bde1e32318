"""HERO on stock diffusers pipelines with tiny random parts (a tiny T5/UMT5 and tokenizer built
offline): one line, no step count, the same counted FLOP ratio as the project's own sampler at the
same shape, and the last generation's statistics readable after the pipeline's end-of-call reset.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXDDIMScheduler,
                       CogVideoXImageToVideoPipeline, CogVideoXPipeline,
                       CogVideoXTransformer3DModel, FlowMatchEulerDiscreteScheduler, WanPipeline,
                       WanTransformer3DModel)
from PIL import Image

from hero.accelerators import apply_accelerator
from hero.cache import HeroConfig, apply_hero, hero_stats, remove_hero
from hero.models.cogvideox_world import CogVideoXWorldModel, ModelSpec

TEXT_DIM, LATENT = 32, 4
HEIGHT = WIDTH = 32
FRAMES = 9  # 3 latent frames of 16 x 16 latents: 192 video tokens per row


@pytest.fixture(scope="module")
def text_parts(tmp_path_factory):
    """A tiny random T5 encoder and its tokenizer, saved and loaded offline."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = tmp_path_factory.mktemp("t5")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁a", -3.0), ("▁b", -3.0)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=8, d_ff=64,
                                      num_layers=1, num_heads=4)).eval()
    return T5Tokenizer.from_pretrained(folder), encoder


def cogvideox_vae() -> AutoencoderKLCogVideoX:
    torch.manual_seed(0)
    return AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2,
        block_out_channels=(8, 8), latent_channels=LATENT, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4, sample_height=2 * HEIGHT, sample_width=2 * WIDTH).eval()


def cogvideox_transformer(in_channels: int, num_layers: int = 42, heads: int = 2
                          ) -> CogVideoXTransformer3DModel:
    """Narrow, and as deep as Aether; the stock pipelines pad prompts to 226 text tokens."""
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=16, in_channels=in_channels,
        out_channels=LATENT, time_embed_dim=16, text_embed_dim=TEXT_DIM, num_layers=num_layers,
        sample_width=WIDTH // 2, sample_height=HEIGHT // 2, sample_frames=FRAMES, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226,
        use_rotary_positional_embeddings=True).eval()


def sampler_ratio(pipe, condition_channels: int, steps: int, config: HeroConfig) -> float:
    """HERO's counted FLOP ratio on the project's own sampler (CogVideoXWorldModel.denoise) with the
    pipeline's transformer at the pipeline's shape: 226 text tokens, batched guidance."""
    spec = ModelSpec(name="same-shape", revision="test", height=HEIGHT, width=WIDTH,
                     frame_options=(FRAMES,))
    world = CogVideoXWorldModel(pipe.vae, pipe.transformer, CogVideoXDDIMScheduler(),
                                torch.randn(1, 226, TEXT_DIM), spec)
    latent_frames = (FRAMES - 1) // 4 + 1
    condition = torch.zeros(1, latent_frames, condition_channels, HEIGHT // 2, WIDTH // 2)
    apply_hero(world, config)
    try:
        world.denoise(condition, "prediction", steps, 6.0, [0])
        return hero_stats(world)["flops_ratio"]
    finally:
        remove_hero(world)


def run_pipeline(pipe, steps: int, **inputs):
    with torch.no_grad():
        return pipe(prompt="a b", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                    num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **inputs).frames


def test_text_to_video_pipeline_matches_the_projects_sampler(text_parts):
    tokenizer, encoder = text_parts
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=cogvideox_vae(),
                             transformer=cogvideox_transformer(LATENT),
                             scheduler=CogVideoXDDIMScheduler())
    apply_hero(pipe, HeroConfig())  # no step count: the pipeline's scheduler knows it
    try:
        first = run_pipeline(pipe, 50)
        stats = hero_stats(pipe)  # the pipeline reset the hooks at its end
        second = run_pipeline(pipe, 50)
    finally:
        remove_hero(pipe)
    assert (stats["full_steps"], stats["partial_steps"]) == (26, 24)
    assert torch.equal(first, second), "every call starts a fresh generation"
    ours = sampler_ratio(pipe, 0, 50, HeroConfig())
    assert abs(stats["flops_ratio"] - ours) < 0.02, (stats["flops_ratio"], ours)
    # 192 video tokens against 226 text tokens: partial shallow blocks skip the text tokens
    assert stats["flops_ratio"] < 0.56


def test_image_to_video_pipeline_matches_the_projects_sampler(text_parts):
    tokenizer, encoder = text_parts
    pipe = CogVideoXImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=cogvideox_vae(),
        transformer=cogvideox_transformer(2 * LATENT, num_layers=12),
        scheduler=CogVideoXDDIMScheduler())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3),
                                                              dtype=np.uint8))
    reference = run_pipeline(pipe, 20, image=image)
    accelerator = apply_accelerator(pipe, "hero")  # the default preset: split="auto"
    try:
        calibrating = run_pipeline(pipe, 20, image=image)
        calibration = accelerator.stats()
        accelerated = run_pipeline(pipe, 20, image=image)
        stats = accelerator.stats()
    finally:
        accelerator.remove()
    assert calibration["calibration_run"] and torch.equal(calibrating, reference)
    assert stats["partial_steps"] > 0 and stats["flops_ratio"] < 0.6
    assert not torch.equal(accelerated, reference) and torch.isfinite(accelerated).all()
    assert torch.equal(run_pipeline(pipe, 20, image=image), reference), "removed cleanly"
    ours = sampler_ratio(pipe, LATENT, 20, HeroConfig.preset("default", split=stats["split"]))
    assert abs(stats["flops_ratio"] - ours) < 0.02, (stats["flops_ratio"], ours)


def test_wan_pipeline_with_separate_guidance_calls(text_parts):
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer, _ = text_parts
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=tokenizer.vocab_size, d_model=TEXT_DIM,
                                          d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=LATENT, dim_mult=[1, 1], num_res_blocks=1,
                           temperal_downsample=[True]).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=LATENT,
        out_channels=LATENT, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=96, num_layers=6,
        rope_max_seq_len=32).eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    apply_hero(pipe, HeroConfig(split=2))
    try:
        with torch.no_grad():
            latents = pipe(prompt="a b", negative_prompt="b", height=HEIGHT, width=WIDTH,
                           num_frames=5, num_inference_steps=12, output_type="latent",
                           generator=torch.Generator().manual_seed(0)).frames
        stats = hero_stats(pipe)
    finally:
        remove_hero(pipe)
    assert set(stats["contexts"]) == {"cond", "uncond"} and torch.isfinite(latents).all()
    assert stats["contexts"]["cond"]["partial_steps"] == 5 and stats["flops_ratio"] < 0.8

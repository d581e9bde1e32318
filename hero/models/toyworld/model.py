"""toyworld's architecture, its tiny random sibling, and loading the shipped weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from safetensors.torch import load_file

from hero import world
from hero.models.base import ModelSpec
from hero.models.cogvideox_world import CogVideoXWorldModel

WEIGHTS_DIR = Path(__file__).parent / "weights"

TOYWORLD_SPEC = ModelSpec(
    name="toyworld", revision="untrained", height=world.HEIGHT, width=world.WIDTH,
    frame_options=(world.CLIP_FRAMES,), fov_x_deg=world.FOV_X_DEG, fps=12, metric_dmax=2.0, far=world.FAR,
    default_steps={"prediction": 30, "planning": 30, "reconstruction": 4},
)

VAE_CONFIG = dict(
    down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
    block_out_channels=(32, 64, 64), latent_channels=16, layers_per_block=1, norm_num_groups=8,
    temporal_compression_ratio=4, sample_height=48, sample_width=64,
)

# 256 features per token (8 heads x 32): wider than the 56 x 2 x 2 = 224 latent values each token
# is projected back to, so the output map is not rank-limited and v-prediction can express noise.
TRANSFORMER_CONFIG = dict(
    num_attention_heads=8, attention_head_dim=32, in_channels=96, out_channels=56,
    time_embed_dim=64, text_embed_dim=32, num_layers=10, sample_width=16, sample_height=12,
    sample_frames=17, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8,
    use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
)

# v-prediction with zero terminal SNR and trailing timesteps, as CogVideoX and Aether.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=1.0,
    timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
)


def build_components(num_layers: int = TRANSFORMER_CONFIG["num_layers"],
                     heads: int = TRANSFORMER_CONFIG["num_attention_heads"],
                     vae_channels: tuple[int, ...] = VAE_CONFIG["block_out_channels"], seed: int = 0
                     ) -> tuple[AutoencoderKLCogVideoX, CogVideoXTransformer3DModel,
                                CogVideoXDDIMScheduler, torch.Tensor]:
    """Randomly initialised toyworld components (seeded): VAE, transformer, scheduler, prompt."""
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(**{**VAE_CONFIG, "block_out_channels": vae_channels})
    transformer = CogVideoXTransformer3DModel(
        **{**TRANSFORMER_CONFIG, "num_layers": num_layers, "num_attention_heads": heads})
    prompt = torch.randn(1, TRANSFORMER_CONFIG["max_text_seq_length"],
                         TRANSFORMER_CONFIG["text_embed_dim"],
                         generator=torch.Generator().manual_seed(seed))
    return vae, transformer, CogVideoXDDIMScheduler(**SCHEDULER_CONFIG), prompt


TINY_SPEC = dataclasses.replace(TOYWORLD_SPEC, name="tiny", revision="random-seed0",
                                default_steps={"prediction": 4, "planning": 4, "reconstruction": 2})


def load_tiny(device: str = "cpu", **_: object) -> CogVideoXWorldModel:
    """A tiny random toyworld-shaped model (4 blocks, narrow VAE): for tests of everything but quality."""
    vae, transformer, scheduler, prompt = build_components(num_layers=4, heads=2, vae_channels=(8, 16, 16))
    return CogVideoXWorldModel(vae, transformer, scheduler, prompt, TINY_SPEC, device=device)


def load_toyworld(weights: str | Path = WEIGHTS_DIR, device: str = "cpu", **_: object
                  ) -> CogVideoXWorldModel:
    """The trained toyworld, loaded offline from ``weights`` (defaults to the shipped copy)."""
    weights = Path(weights)
    if not (weights / "transformer").is_dir():
        raise FileNotFoundError(f"no toyworld weights under {weights}; train them with "
                                "`python -m hero.training.toyworld`")
    vae = AutoencoderKLCogVideoX.from_pretrained(weights / "vae", torch_dtype=torch.float32,
                                                low_cpu_mem_usage=False)
    transformer = CogVideoXTransformer3DModel.from_pretrained(weights / "transformer",
                                                              torch_dtype=torch.float32,
                                                              low_cpu_mem_usage=False)
    scheduler = CogVideoXDDIMScheduler.from_pretrained(weights / "scheduler")
    prompt = load_file(weights / "prompt_embeds.safetensors")["prompt_embeds"]
    return CogVideoXWorldModel(vae, transformer, scheduler, prompt, toyworld_spec(weights), device=device)


def toyworld_spec(weights: str | Path = WEIGHTS_DIR) -> ModelSpec:
    """toyworld's spec with the revision and latent standardisation of the weights in ``weights``
    (read from model.json only; weights exported before standardisation have none)."""
    info = json.loads((Path(weights) / "model.json").read_text())
    stats = {name: tuple(info[name]) for name in ("latent_mean", "latent_std") if info.get(name) is not None}
    return dataclasses.replace(TOYWORLD_SPEC, revision=info["revision"], **stats)

"""What the accelerator benchmark runs: a world model, its requests, and the sampling loop on them.

Two workloads. **toyworld** (quality and speed): the trained shipped model (or ``tiny`` while no
weights exist) on held-out scenes, with the rendered truth to score against. **aether-shaped**
(speed only): Aether's transformer (CogVideoX, 96 -> 56 channels, rotary embeddings, text tokens in
front of the video tokens) with random weights at a size this machine can run, sampling random
condition latents: speed does not depend on weight values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

from hero.models import load_model
from hero.models.base import Rollout, RolloutRequest
from hero.models.cogvideox_world import CogVideoXWorldModel, ModelSpec
from hero.evaluation import EvalConfig, heldout_request
from hero.models.toyworld.model import SCHEDULER_CONFIG, VAE_CONFIG, WEIGHTS_DIR
from hero.world import Clip, clip_for_seed

TASK = "prediction"


@dataclass
class AetherShape:
    """An Aether-shaped transformer scaled to a CPU.

    AetherV1 has 42 blocks of 48 heads x 64, 226 text tokens and 5 x 30 x 45 = 6750 video tokens
    for 17 frames at 480 x 720, and samples 50 steps with batched classifier-free guidance; its
    attention FLOPs are about ``N / 6C`` = 0.37 of its linear FLOPs. The defaults keep that balance
    (0.36), the guidance batching and the step count, at a size two CPU cores sample in well under
    a minute. Two requests per sampling (four rows with guidance), as a generation actor batches
    them: at Aether's size a block's per-call costs (weight reads of the timestep modulation,
    op dispatch) are a negligible part of its work, and one request at this size would leave them
    at about a sixth of a HERO partial block (``python -m bench.blocks``; ``docs/benchmarks.md``,
    "What moves the wall-clock ratio on this CPU").
    """

    layers: int = 24
    heads: int = 3
    head_dim: int = 64
    latent_frames: int = 5
    latent_height: int = 16
    latent_width: int = 20
    text_tokens: int = 16
    steps: int = 50
    guidance: float = 3.0
    batch: int = 2
    seed: int = 0

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * (self.latent_height // 2) * (self.latent_width // 2)

    @property
    def attention_to_linear(self) -> float:
        """Attention FLOPs over linear FLOPs per block: (4 N^2 C) / (24 N C^2)."""
        tokens = self.video_tokens + self.text_tokens
        return tokens / (6 * self.heads * self.head_dim)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "video_tokens": self.video_tokens,
                "attention_to_linear_flops": self.attention_to_linear}


@dataclass
class Workload:
    """A model and the exact sampling loop every method runs: same condition, seeds and steps.

    ``requests``/``truths`` (toyworld only) are what quality is scored on through ``generate``.
    """

    name: str
    model: CogVideoXWorldModel
    condition: torch.Tensor
    seeds: list[int]
    steps: int
    guidance: float
    requests: list[RolloutRequest] = field(default_factory=list)
    truths: list[Clip] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def sample(self, steps: int | None = None) -> torch.Tensor:
        """The sampling loop alone (no VAE): clean latents."""
        return self.model.denoise(self.condition, TASK, steps or self.steps, self.guidance,
                                  self.seeds)

    def generate(self, steps: int | None = None) -> list[Rollout]:
        """Full rollouts (decoded RGB and depth) of the quality requests."""
        requests = [_with_steps(r, steps or self.steps) for r in self.requests]
        return self.model.generate(requests)


def toyworld_workload(scenes: int, steps: int | None = None, guidance: float | None = None,
                      model_name: str | None = None, device: str = "cpu", weights: str | None = None
                      ) -> Workload:
    """Held-out toyworld scenes; ``model_name`` None takes "toyworld" when its weights exist (or
    ``weights`` names an exported folder, e.g. a training run's before it ships)."""
    if model_name is None:
        model_name = "toyworld" if weights or (WEIGHTS_DIR / "transformer").is_dir() else "tiny"
    model = load_model(model_name, device=device, weights=weights or WEIGHTS_DIR)
    config = EvalConfig(scenes=scenes, steps=steps, guidance=guidance)
    clips = [clip_for_seed(seed)[0] for seed in config.seeds()]
    requests = [heldout_request(seed, clip, config, i)
                for i, (seed, clip) in enumerate(zip(config.seeds(), clips))]
    steps = steps or model.default_steps(TASK)
    guidance = guidance if guidance is not None else model.spec.default_guidance[TASK]
    requests = [_with_steps(r, steps, guidance) for r in requests]
    transformer = model.transformer.config
    info = {"model": model.name, "revision": model.revision, "scenes": scenes,
            "seeds": config.seeds(), "layers": transformer.num_layers,
            "heads": transformer.num_attention_heads, "head_dim": transformer.attention_head_dim,
            "trained": model_name == "toyworld"}
    return Workload(name="toyworld", model=model, condition=prediction_condition(model, requests),
                    seeds=[r.seed for r in requests], steps=steps, guidance=guidance,
                    requests=requests, truths=clips, info=info)


def aether_shaped_workload(shape: AetherShape, device: str = "cpu") -> Workload:
    """The random-weight Aether-shaped transformer sampling random condition latents."""
    torch.manual_seed(shape.seed)
    temporal, spatial = VAE_CONFIG["temporal_compression_ratio"], 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
    frames = (shape.latent_frames - 1) * temporal + 1
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=shape.heads, attention_head_dim=shape.head_dim, in_channels=96,
        out_channels=56, time_embed_dim=512, text_embed_dim=64, num_layers=shape.layers,
        sample_width=shape.latent_width, sample_height=shape.latent_height, sample_frames=frames,
        patch_size=2, temporal_compression_ratio=temporal, max_text_seq_length=shape.text_tokens,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)
    spec = ModelSpec(name="aether-shaped", revision=f"random-seed{shape.seed}",
                     height=shape.latent_height * spatial, width=shape.latent_width * spatial,
                     frame_options=(frames,))
    prompt = torch.randn(1, shape.text_tokens, 64, generator=torch.Generator().manual_seed(shape.seed))
    model = CogVideoXWorldModel(AutoencoderKLCogVideoX(**VAE_CONFIG), transformer,
                                CogVideoXDDIMScheduler(**SCHEDULER_CONFIG), prompt, spec,
                                device=device)
    condition = torch.randn(shape.batch, shape.latent_frames, 40, shape.latent_height,
                            shape.latent_width, generator=torch.Generator().manual_seed(shape.seed))
    return Workload(name="aether-shaped", model=model, condition=condition,
                    seeds=[shape.seed + i for i in range(shape.batch)], steps=shape.steps,
                    guidance=shape.guidance, info=shape.describe())


def prediction_condition(model: CogVideoXWorldModel, requests: list[RolloutRequest]) -> torch.Tensor:
    """Condition latents of prediction requests (first image + camera path), as ``generate`` builds them."""
    return model.sampling_inputs(requests, TASK, requests[0].frames, camera=True)[0]


def _with_steps(request: RolloutRequest, steps: int, guidance: float | None = None) -> RolloutRequest:
    values = {**request.__dict__, "steps": steps}
    if guidance is not None:
        values["guidance"] = guidance
    return RolloutRequest(**values)

"""AetherV1 behind the :class:`~hero.models.base.WorldModel` interface (DESIGN §4).

The transformer is AetherV1 (``<path_or_repo>/transformer``), the VAE and scheduler come from
CogVideoX-5b-I2V (the ``base``), and the sampler is :mod:`hero.models.cogvideox_world`'s, the one
toyworld runs too. Aether's text input is a fixed empty-prompt T5 embedding: it is computed once
with the base's T5 and cached to a safetensors file, so actors never load T5 after the first time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
from safetensors.torch import load_file, save_file

from hero import geometry
from hero.models.base import OBSERVED_AT, TASKS, ModelSpec, Rollout, RolloutRequest
from hero.models.cogvideox_world import RGB_CHANNELS, CogVideoXWorldModel

AETHER_REPO = "AetherWorldModel/AetherV1"
COGVIDEOX_BASE = "THUDM/CogVideoX-5b-I2V"
TRANSFORMER_CHANNELS = (96, 56)  # in: 56 noisy + 16 image + 24 action raymap; out: 16 + 16 + 24
PROMPT_KEY = "prompt_embeds"

AETHER_SPEC = ModelSpec(
    name="aether", revision=AETHER_REPO, height=480, width=720, frame_options=(17, 25, 33, 41),
    fov_x_deg=60.0, fps=12, fps_options=(8, 10, 12, 15, 24), metric_dmax=None, far=1000.0,
    default_steps={"prediction": 50, "planning": 50, "reconstruction": 4},
    default_guidance={"prediction": 3.0, "planning": 3.0, "reconstruction": 1.0},
    dynamic_guidance={"prediction": True, "planning": True, "reconstruction": False},
    guidance_ramp="pipeline",
)
"""Aether's published inference settings. ``far=1000`` caps relative depth where the decoded
disparity falls below 1e-3 of the clip's maximum, as Aether's own post-processing does."""


# ------------------------------------------------------------------------------- input fitting
def center_crop_resize(frames: np.ndarray, height: int, width: int, k: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """Fit uint8 frames (H, W, 3) or (T, H, W, 3) to ``height`` x ``width`` the way Aether does.

    The centre is cropped to the target aspect ratio, then resized (bilinear, antialiased).
    Intrinsics ``k`` (..., 3, 3) given at the input resolution follow: the crop shifts the
    principal point, the resize scales focal lengths and principal point per axis.
    """
    frames = np.asarray(frames)
    src_h, src_w = frames.shape[-3:-1]
    if (src_h, src_w) == (height, width):
        return frames, k
    crop_h, crop_w = (src_h, round(src_h * width / height))
    if crop_w > src_w:
        crop_h, crop_w = round(src_w * height / width), src_w
    top, left = (src_h - crop_h) // 2, (src_w - crop_w) // 2
    cropped = frames[..., top:top + crop_h, left:left + crop_w, :]
    batch = torch.from_numpy(np.ascontiguousarray(cropped.reshape(-1, crop_h, crop_w, 3)))
    resized = F.interpolate(batch.permute(0, 3, 1, 2).float(), size=(height, width),
                            mode="bilinear", antialias=True, align_corners=False)
    out = resized.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    out = out.reshape(*frames.shape[:-3], height, width, 3)
    if k is None:
        return out, None
    k = np.array(k, dtype=np.float64, copy=True)
    k[..., 0, 2] -= left
    k[..., 1, 2] -= top
    k[..., 0, :] *= width / crop_w
    k[..., 1, :] *= height / crop_h
    return out, k


class AetherWorldModel(CogVideoXWorldModel):
    """The shared CogVideoX world-model sampler plus Aether's input constraints."""

    def generate(self, requests: list[RolloutRequest]) -> list[Rollout]:
        """Fit every request to Aether's constraints (:meth:`fit_request`), then sample."""
        return super().generate([self.fit_request(r) for r in requests])

    def fit_request(self, request: RolloutRequest) -> RolloutRequest:
        """Check lengths, centre-crop and resize the task's observations (:data:`TASKS`) to the
        model's resolution (K follows the first: the video, or the image) and re-base the camera
        path on frame 0."""
        self._check(request)
        frames = request.frames
        for name in ("video", "c2w", "k"):
            value = getattr(request, name)
            if value is not None and len(value) < frames:
                raise ValueError(f"{name}: request {request.id!r} asks for {frames} frames but "
                                 f"{name} has only {len(value)}")
        changes: dict = {"k": None if request.k is None else np.asarray(request.k)[:frames]}
        if request.c2w is not None:
            c2w = np.asarray(request.c2w, dtype=np.float64)[:frames]
            if not geometry.is_rigid(c2w):
                raise ValueError(f"c2w: request {request.id!r} has a pose that is not rigid")
            changes["c2w"] = geometry.relative_to(c2w, 0)
        observed = TASKS[request.task].observations
        for name in observed:
            value = getattr(request, name)
            first = name == observed[0]
            value = value[:frames] if OBSERVED_AT[name] == "all" else value
            changes[name], fitted_k = center_crop_resize(value, self.height, self.width,
                                                         changes["k"] if first else None)
            if first:
                changes["k"] = fitted_k
        return dataclasses.replace(request, **changes)


# ------------------------------------------------------------------------ empty-prompt embedding
def default_prompt_cache(base: str | Path, length: int) -> Path:
    """Where the empty-prompt embedding of ``base`` is cached unless told otherwise:
    ``$HERO_CACHE_DIR`` (default ``~/.cache/hero``) / ``prompt_embeds`` / one file per base."""
    root = Path(os.environ.get("HERO_CACHE_DIR", Path.home() / ".cache" / "hero"))
    source = str(base) if not Path(base).exists() else str(Path(base).resolve())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", source.strip("/"))[-60:]
    digest = hashlib.sha1(source.encode()).hexdigest()[:8]
    return root / "prompt_embeds" / f"{slug}-{digest}-len{length}.safetensors"


@torch.no_grad()
def encode_empty_prompt(base: str | Path, length: int, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, ``length``, d) T5 embedding of "" with the base's tokenizer and text encoder.

    As in CogVideoX's pipelines: padded to ``length`` tokens, encoded without an attention mask.
    """
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")
    encoder = T5EncoderModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype)
    encoder = encoder.to(device).eval()
    ids = tokenizer("", padding="max_length", max_length=length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    embeds = encoder(ids.to(device))[0].float().cpu()
    del encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return embeds


def read_prompt_cache(path: str | Path, length: int, dim: int) -> torch.Tensor:
    """The cached embedding, checked against the transformer's text length and width."""
    embeds = load_file(str(path))[PROMPT_KEY]
    if tuple(embeds.shape) != (1, length, dim):
        raise ValueError(f"prompt_cache: {path} holds an embedding of shape {tuple(embeds.shape)}, "
                         f"the transformer needs (1, {length}, {dim}); delete it to recompute")
    return embeds


def empty_prompt_embedding(base: str | Path, length: int, dim: int, cache: str | Path,
                           device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The empty-prompt embedding from ``cache``; computed with T5 and written there only when the
    file does not exist yet (written atomically, so concurrent actors never read half a file)."""
    cache = Path(cache)
    if cache.exists():
        return read_prompt_cache(cache, length, dim)
    embeds = encode_empty_prompt(base, length, device, dtype)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f".{cache.name}.{os.getpid()}.partial")
    save_file({PROMPT_KEY: embeds.contiguous()}, str(partial),
              metadata={"base": str(base), "length": str(length), "prompt": ""})
    os.replace(partial, cache)
    return read_prompt_cache(cache, length, dim)


# ---------------------------------------------------------------------------------- loading
def check_components(transformer: CogVideoXTransformer3DModel, vae: AutoencoderKLCogVideoX,
                     height: int, width: int) -> None:
    """Refuse checkpoints and resolutions the Aether code path cannot serve, naming the field."""
    config = transformer.config
    if (config.in_channels, config.out_channels) != TRANSFORMER_CHANNELS:
        raise ValueError(f"transformer: in/out channels {config.in_channels}/"
                         f"{config.out_channels}, Aether's latent packing needs "
                         f"{TRANSFORMER_CHANNELS[0]}/{TRANSFORMER_CHANNELS[1]}")
    if config.patch_size_t is not None:
        raise ValueError("transformer: patch_size_t is set (a CogVideoX 1.5 checkpoint); Aether is "
                         "post-trained from CogVideoX 1.0 (CogVideoX-5b-I2V)")
    if vae.config.latent_channels != RGB_CHANNELS or getattr(vae.config, "invert_scale_latents",
                                                                 False):
        raise ValueError("vae: Aether needs CogVideoX-5b-I2V's VAE (16 latent channels, "
                         "latents multiplied by scaling_factor)")
    spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    step = spatial * config.patch_size
    if height % step or width % step:
        raise ValueError(f"height/width: {height}x{width} must be multiples of {step}")
    learned = (config.sample_height * spatial, config.sample_width * spatial)
    if config.use_learned_positional_embeddings and (height, width) != learned:
        raise ValueError(f"height/width: this transformer has learned positional embeddings for "
                         f"{learned[0]}x{learned[1]} only, got {height}x{width}")


def _dtype(value: torch.dtype | str) -> torch.dtype:
    dtype = getattr(torch, value) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: {value!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
    return dtype


def load_aether(path_or_repo: str | Path = AETHER_REPO, base: str | Path = COGVIDEOX_BASE,
                device: str | torch.device | None = None, dtype: torch.dtype | str = torch.bfloat16,
                prompt_cache: str | Path | None = None, height: int = AETHER_SPEC.height,
                width: int = AETHER_SPEC.width, vae_tiling: bool = True,
                revision: str | None = None,
                text_encoder_dtype: torch.dtype | str = torch.float32) -> AetherWorldModel:
    """AetherV1 as a world model; ``path_or_repo`` and ``base`` are local dirs or hub ids.

    The transformer comes from ``path_or_repo/transformer``, VAE and DPM scheduler from ``base``.
    ``prompt_cache`` is the safetensors file of the empty-prompt embedding (default:
    :func:`default_prompt_cache`); when it exists T5 is never loaded. ``height``/``width`` stay at
    Aether's 480x720 except for tiny test checkpoints; ``vae_tiling`` bounds decoder memory.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(dtype)
    transformer = CogVideoXTransformer3DModel.from_pretrained(
        path_or_repo, subfolder="transformer", torch_dtype=dtype)
    vae = AutoencoderKLCogVideoX.from_pretrained(base, subfolder="vae", torch_dtype=dtype)
    check_components(transformer, vae, height, width)
    scheduler = CogVideoXDPMScheduler.from_pretrained(base, subfolder="scheduler")
    length, dim = transformer.config.max_text_seq_length, transformer.config.text_embed_dim
    prompt = empty_prompt_embedding(base, length, dim,
                                    prompt_cache or default_prompt_cache(base, length),
                                    device, _dtype(text_encoder_dtype))
    if vae_tiling:
        vae.enable_tiling()
    vae.enable_slicing()
    spec = dataclasses.replace(AETHER_SPEC, height=height, width=width,
                               revision=revision or str(path_or_repo))
    return AetherWorldModel(vae, transformer, scheduler, prompt, spec, device=device, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    """``python -m hero.models.aether --prompt-cache FILE``: write the empty-prompt cache once (the
    only step that loads T5), e.g. onto shared storage before a job starts its actors."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--weights", default=AETHER_REPO, help="AetherV1 dir or hub id")
    parser.add_argument("--base", default=COGVIDEOX_BASE, help="CogVideoX-5b-I2V dir or hub id")
    parser.add_argument("--prompt-cache", type=Path, default=None,
                        help="output safetensors file (default: default_prompt_cache(base))")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    config = CogVideoXTransformer3DModel.load_config(args.weights, subfolder="transformer")
    length, dim = config["max_text_seq_length"], config["text_embed_dim"]
    cache = args.prompt_cache or default_prompt_cache(args.base, length)
    embeds = empty_prompt_embedding(args.base, length, dim, cache, args.device)
    print(f"{cache}: empty-prompt embedding {tuple(embeds.shape)}")


if __name__ == "__main__":
    main()

"""Stages 3 and 4: encode every clip once, then train toyworld's transformer with v-prediction.

The objective is the sampler's own: v-prediction under the zero-terminal-SNR DDIM schedule that
ships with the weights (CogVideoX's and Aether's), MSE over the 56 latent channels, the 24 raymap
channels weighted ``camera_weight`` times (1 by default: with the latents standardised every
channel has unit variance, so equal weights give each channel an equal say; 4x gave the camera
75% of the loss and starved the image channels). Tasks are mixed per row
(prediction, planning, reconstruction) as the sampler builds them, the condition is dropped
``cfg_dropout`` of the time for classifier-free guidance, and an EMA copy is kept for export. The
forward runs under bfloat16 autocast where the CPU computes it natively (1.6x faster than float32
on AVX-512 BF16 cores; :mod:`hero.training.precision`) and, with ``compile``, through
``torch.compile`` (a further 1.15-1.3x there); weights, optimiser and EMA stay in float32.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hero.models import base
from hero.models.cogvideox_world import (
    RGB_CHANNELS,
    CogVideoXWorldModel,
    build_condition,
    unconditional,
)
from hero.models.toyworld.model import build_components
from hero.training import monitor
from hero.training.checkpoints import CsvLog, load_checkpoint, save_checkpoint
from hero.training.data import disparity_unit, load_clips, to_unit
from hero.training.optim import lr_at
from hero.training.precision import training_autocast

if TYPE_CHECKING:
    from hero.training.toyworld import TrainConfig

log = logging.getLogger("toyworld.dit")
TASKS = tuple(base.TASKS)  # the order of TrainConfig.task_mix


@torch.no_grad()
def encode_latents(cfg: "TrainConfig", model: CogVideoXWorldModel, out: Path, batch: int = 16) -> None:
    """Encode every rendered clip once with the trained VAE, exactly as the sampler encodes its
    inputs: RGB, disparity, the first and the last frame alone, and the folded raymaps. The VAE's
    scaling factor is set so the latents have unit standard deviation overall and, with
    ``cfg.standardise_latents``, the model's spec standardises every channel on its own
    (:func:`latent_statistics`); both are written into the file's metadata."""
    if out.exists():
        return
    clips = load_clips(cfg.workdir / "clips")
    count, dmax = monitor.rendered_clips(cfg.workdir), float(model.spec.metric_dmax)
    encode = lambda rows: {
        "rgb": model.encode_video(to_unit(clips["rgb"][rows])),
        "disparity": model.encode_video(disparity_unit(clips["depth"][rows], dmax), "disparity"),
        "first": model.encode_video(to_unit(clips["rgb"][rows, :1])),
        "last": model.encode_video(to_unit(clips["rgb"][rows, -1:])),
        "camera": model.encode_camera(torch.stack([model.raymap(c, k, dmax) for c, k in
                                                   zip(clips["c2w"][rows], clips["k"][rows])]))}
    model.vae.register_to_config(scaling_factor=1.0)
    model.spec = dataclasses.replace(model.spec, latent_mean=None, latent_std=None)
    probe = encode(slice(0, 32))
    scale = float(1.0 / torch.cat([probe["rgb"], probe["disparity"]]).std())
    model.vae.register_to_config(scaling_factor=scale)
    if cfg.standardise_latents:
        scaled = {name: latents * (1.0 if name == "camera" else scale) for name, latents in probe.items()}
        model.spec = dataclasses.replace(model.spec, **latent_statistics(scaled))
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in probe}
    for start in tqdm(range(0, count, batch), desc="encode latents"):
        for name, latents in encode(slice(start, min(start + batch, count))).items():
            parts[name].append(latents)
    tensors = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
    save_file(tensors, str(out), metadata=latents_metadata(model))


def latent_statistics(latents: dict[str, torch.Tensor], floor: float = 1e-2) -> dict[str, tuple[float, ...]]:
    """Per-channel mean and std of the packed latents (RGB, disparity, camera: 56 channels) over
    (clips, frames, positions), for :class:`ModelSpec`'s standardisation. The std is floored at
    ``floor`` so that channels which never vary (a raymap component the world holds fixed) stay
    finite; they standardise to a constant the transformer learns at once."""
    packed = torch.cat([latents["rgb"], latents["disparity"], latents["camera"]], dim=2)
    channels = packed.transpose(0, 2).reshape(packed.shape[2], -1).double()
    return {"latent_mean": tuple(channels.mean(dim=1).tolist()),
            "latent_std": tuple(channels.std(dim=1).clamp_min(floor).tolist())}


def latents_metadata(model: CogVideoXWorldModel) -> dict[str, str]:
    """What a latents file needs to be read back: the VAE scaling factor and the standardisation."""
    meta = {"scaling_factor": str(model.vae.config.scaling_factor)}
    if model.spec.latent_mean is not None:
        meta |= {"latent_mean": json.dumps(model.spec.latent_mean), "latent_std": json.dumps(model.spec.latent_std)}
    return meta


def apply_latents_metadata(model: CogVideoXWorldModel, meta: dict[str, str]) -> None:
    """Give ``model`` the scaling factor and standardisation its latents were encoded with."""
    model.vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    stats = {name: tuple(json.loads(meta[name])) for name in ("latent_mean", "latent_std") if name in meta}
    model.spec = dataclasses.replace(model.spec, latent_mean=stats.get("latent_mean"),
                                     latent_std=stats.get("latent_std"))


def training_batch(latents: dict[str, torch.Tensor], rng: np.random.Generator, cfg: "TrainConfig"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixed-task batch: clean latents (B, T', 56, h, w) and their condition latents."""
    idx = torch.from_numpy(rng.integers(0, latents["rgb"].shape[0], cfg.dit_batch))
    x0 = torch.cat([latents["rgb"][idx], latents["disparity"][idx], latents["camera"][idx]], dim=2)
    tasks = rng.choice(len(TASKS), size=cfg.dit_batch, p=cfg.task_mix)
    drops = rng.random(cfg.dit_batch) < cfg.cfg_dropout
    conditions = []
    for row, task, drop in zip(idx, tasks, drops):
        task = TASKS[task]
        one = lambda name: latents[name][row: row + 1]
        camera = one("camera") if task == "prediction" else None
        cond = build_condition(task, one("first"), one("last"), one("rgb"), camera, (1, *x0.shape[1:]))
        if task != "reconstruction" and drop:
            cond = unconditional(task, cond)
        conditions.append(cond)
    return x0, torch.cat(conditions)


def channel_weights(camera_weight: float, channels: int) -> torch.Tensor:
    """Per-latent-channel loss weights: RGB and disparity 1, raymap channels ``camera_weight``."""
    weights = torch.ones(channels)
    weights[2 * RGB_CHANNELS:] = camera_weight
    return weights


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MSE over (B, T, C, h, w) with per-channel weights, normalised to the unweighted scale."""
    per_channel = (pred - target).pow(2).mean(dim=(0, 1, 3, 4))
    return (per_channel * weights).sum() / weights.sum()


def train_transformer(cfg: "TrainConfig", model: CogVideoXWorldModel, latents_file: Path) -> None:
    """Train ``model.transformer`` to ``cfg.dit_steps``; leaves the debiased EMA in its place."""
    ckpt = cfg.workdir / "dit.safetensors"
    if cfg.dit_init is not None:
        check_init_latents(cfg.dit_init, model)
    transformer = model.transformer = initial_transformer(cfg).train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.dit_lr, betas=(0.9, 0.99),
                                  weight_decay=0.01)
    rng, noise = np.random.default_rng(cfg.seed + 1), torch.Generator().manual_seed(cfg.seed + 1)
    step = load_checkpoint(ckpt, {"transformer": transformer, "ema": ema}, optimizer, rng, noise)
    if step >= cfg.dit_steps:
        model.transformer = debiased_ema(ema, cfg, step)
        return
    latents = load_file(str(latents_file))
    losses = CsvLog(cfg.workdir / "dit_loss.csv", ("loss", "lr"), step)
    validator = monitor.DitMonitor(cfg, model, step)
    scheduler = model.scheduler
    rotary = model._rotary(latents["rgb"].shape[1])
    text = model.prompt_embeds.expand(cfg.dit_batch, -1, -1)
    weights = channel_weights(cfg.camera_weight, model.transformer.config.out_channels)
    forward = torch.compile(transformer, dynamic=False) if cfg.compile else transformer
    autocast = training_autocast(cfg.precision)
    bar = tqdm(range(step, cfg.dit_steps), desc="transformer", initial=step, total=cfg.dit_steps)
    for step in bar:
        lr = lr_at(step, cfg.dit_lr, cfg.dit_warmup, cfg.dit_steps, cfg.final_lr_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, condition = training_batch(latents, rng, cfg)
        eps = torch.randn(x0.shape, generator=noise)
        t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, cfg.dit_batch))
        noisy = scheduler.add_noise(x0, eps, t)
        with autocast():
            pred = forward(hidden_states=torch.cat([noisy, condition], dim=2), encoder_hidden_states=text,
                           timestep=t, image_rotary_emb=rotary, return_dict=False)[0]
        loss = weighted_mse(pred.float(), scheduler.get_velocity(x0, eps, t), weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1.0 - cfg.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % 20 == 0:
            losses.write(done, loss=loss.item(), lr=lr)
        if done % cfg.checkpoint_every == 0 or done == cfg.dit_steps:
            save_checkpoint(ckpt, done, {"transformer": transformer, "ema": ema}, optimizer, rng, noise)
        if done % cfg.monitor_every == 0 or done == cfg.dit_steps:
            validator.validate(done, debiased_ema(ema, cfg, done), transformer)
    model.transformer = debiased_ema(ema, cfg, cfg.dit_steps)


def initial_transformer(cfg: "TrainConfig") -> torch.nn.Module:
    """What training starts from and the EMA's first value: the seeded random initialisation or,
    with ``cfg.dit_init``, an exported toyworld's transformer (a finished run continued)."""
    transformer = build_components(seed=cfg.seed)[1]
    if cfg.dit_init is not None:
        weights = load_file(str(cfg.dit_init / "transformer" / "diffusion_pytorch_model.safetensors"))
        transformer.load_state_dict(weights)  # fp16 export, copied into the float32 parameters
    return transformer


def init_revision(export: Path | None) -> str | None:
    """The revision of the export a continued run started from (None: from the seed)."""
    return None if export is None else _export_info(export)["revision"]


def init_steps(export: Path | None) -> int:
    """The transformer steps already in the export a continued run started from."""
    return 0 if export is None else int(_export_info(export)["transformer_steps"])


def check_init_latents(export: Path, model: CogVideoXWorldModel, rtol: float = 1e-3) -> None:
    """Refuse to continue a transformer on latents other than those it learnt: the export's VAE
    scaling factor and standardisation must match this run's encoded latents."""
    info = _export_info(export)
    vae_config = json.loads((Path(export) / "vae" / "config.json").read_text())
    pairs = {"scaling_factor": (vae_config["scaling_factor"], model.vae.config.scaling_factor),
             **{name: (info.get(name), getattr(model.spec, name)) for name in ("latent_mean", "latent_std")}}
    for name, (theirs, ours) in pairs.items():
        if (theirs is None) != (ours is None) or (ours is not None and not np.allclose(
                theirs, ours, rtol=rtol, atol=rtol)):
            raise ValueError(f"--dit-init {export}: its {name} differs from this run's latents "
                             "(encoded by another VAE or with other statistics); a transformer "
                             "continues only on the latents it was trained on")


def _export_info(export: Path) -> dict:
    path = Path(export) / "model.json"
    if not path.exists():
        raise FileNotFoundError(f"--dit-init: no exported toyworld (model.json) under {export}")
    return json.loads(path.read_text())


def debiased_ema(ema: torch.nn.Module, cfg: "TrainConfig", steps: int) -> torch.nn.Module:
    """Remove the initial weights' decay**steps from a constant-decay EMA.

    The EMA starts as a copy of the initial weights (seeded, or a continued run's export, so
    reproducible); like Adam's bias correction, (ema - d^n init) / (1 - d^n) is the average of the
    trained weights alone.
    """
    init = initial_transformer(cfg)
    left = cfg.ema_decay ** steps
    debiased = copy.deepcopy(ema)
    with torch.no_grad():
        for out, start in zip(debiased.parameters(), init.parameters()):
            out.sub_(start, alpha=left).div_(1.0 - left)
    return debiased.eval()

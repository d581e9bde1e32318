"""Stage 2: train toyworld's VAE on RGB and Aether-encoded disparity, single frames then windows.

The first ``vae_image_steps`` steps train on single frames (the causal VAE encodes a clip's first
frame alone, so this is its own first-frame path, and the spatial filters see nine times as many
scenes per second as on 9-frame windows: at 500 steps on windows alone the held-out RGB was still
20 dB and off-colour); the rest train on 9-frame windows, which teach the temporal compression.
Loss: L1 + MSE on the reconstruction plus a tiny KL (the latents only need to stay smooth enough
for diffusion). Each batch is half RGB, half disparity, randomly mirrored; the forward runs
under bfloat16 autocast where the CPU computes it natively (4x the matrix throughput of float32
on AVX-512 BF16 cores; :mod:`hero.training.precision`), the weights and the optimiser stay in
float32. The learning rate warms up, then falls on a cosine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hero.models.cogvideox_world import CogVideoXWorldModel
from hero.training import monitor
from hero.training.checkpoints import CsvLog, load_checkpoint, save_checkpoint
from hero.training.data import disparity_unit, load_clips, to_unit
from hero.training.optim import lr_at
from hero.training.precision import training_autocast

if TYPE_CHECKING:
    from hero.training.toyworld import TrainConfig

log = logging.getLogger("toyworld.vae")


def vae_batch(clips: dict[str, np.ndarray], rng: np.random.Generator, batch: int, window: int,
              available: int, dmax: float) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1]: half RGB, half disparity windows of ``window`` frames from the
    first ``available`` clips, each from its own clip and start, mirrored left-right with
    probability 1/2."""
    idx = rng.integers(0, available, batch)
    starts = rng.integers(0, clips["rgb"].shape[1] - window + 1, batch)
    half = batch // 2
    take = lambda name, rows: np.stack([clips[name][i, s: s + window] for i, s in rows])
    x = torch.cat([to_unit(take("rgb", zip(idx[:half], starts[:half]))),
                   disparity_unit(take("depth", zip(idx[half:], starts[half:])), dmax)])
    flip = torch.from_numpy(rng.random(batch) < 0.5)
    x[flip] = x[flip].flip(-1)
    return x.permute(0, 2, 1, 3, 4).contiguous()


def train_vae(cfg: "TrainConfig", model: CogVideoXWorldModel) -> None:
    """Train ``model.vae`` to ``cfg.vae_steps``, checkpointing and validating as it goes."""
    vae = model.vae
    ckpt = cfg.workdir / "vae.safetensors"
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng, noise = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    step = load_checkpoint(ckpt, {"vae": vae}, optimizer, rng, noise)
    if step >= cfg.vae_steps:
        return
    clips = load_clips(cfg.workdir / "clips")
    available = monitor.rendered_clips(cfg.workdir)
    losses = CsvLog(cfg.workdir / "vae_loss.csv", ("loss", "lr"), step)
    validator = monitor.VaeMonitor(cfg, model, step)
    dmax = float(model.spec.metric_dmax)
    vae.train()
    autocast = training_autocast(cfg.precision)
    bar = tqdm(range(step, cfg.vae_steps), desc="vae", initial=step, total=cfg.vae_steps)
    for step in bar:
        lr = lr_at(step, cfg.vae_lr, cfg.vae_warmup, cfg.vae_steps, cfg.final_lr_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = step < cfg.vae_image_steps
        x = vae_batch(clips, rng, cfg.vae_image_batch if images else cfg.vae_batch,
                      1 if images else cfg.vae_window, available, dmax)
        with autocast():
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=noise)).sample.float()
        kl = posterior.kl().float().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % 20 == 0:
            losses.write(done, loss=loss.item(), lr=lr)
        if done % cfg.checkpoint_every == 0 or done == cfg.vae_steps:
            save_checkpoint(ckpt, done, {"vae": vae}, optimizer, rng, noise)
        if done % cfg.monitor_every == 0 or done == cfg.vae_steps:
            available = monitor.rendered_clips(cfg.workdir)
            validator.validate(done)
            vae.train()
    vae.eval()


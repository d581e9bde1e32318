"""Train toyworld from scratch on the procedural world: ``python -m hero.training.toyworld``.

Four stages, each resumable from its checkpoint in ``--workdir`` (kill it any time and re-run the
same command): render clips -> train the VAE -> encode latents -> train the transformer; then the
EMA weights are exported (fp16 safetensors) into the package. Training scenes use seeds below
:data:`HELDOUT_SEED_BASE`; evaluation uses seeds from it up, never seen in training.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hero import geometry
from hero.models.cogvideox_world import (
    RGB_CHANNELS,
    CogVideoXWorldModel,
    build_condition,
    fold_raymap,
    unconditional,
)
from hero.models.toyworld.model import TOYWORLD_SPEC, WEIGHTS_DIR, build_components
from hero.world import clip_for_seed

FRAMES = TOYWORLD_SPEC.frame_options[0]
log = logging.getLogger("toyworld.train")


@dataclass
class TrainConfig:
    """The training recipe; every field is a command-line flag of the same name."""

    workdir: Path = Path("runs/toyworld")
    export_to: Path = WEIGHTS_DIR
    clips: int = 4000
    vae_steps: int = 1400
    vae_batch: int = 4
    vae_window: int = 9  # 1 + 4n frames with n even: the causal VAE decodes odd latent counts exactly
    vae_lr: float = 5e-4
    dit_steps: int = 8000
    dit_batch: int = 16
    dit_lr: float = 3e-4
    dit_warmup: int = 200
    dit_decay_from: int = 3000  # the learning rate falls on a cosine from here to zero at dit_steps
    x0_from: int = 4400  # v-prediction before this step, clean-latent (x0) prediction from it on
    camera_weight: float = 10.0  # from camera_weight_from on, the raymap channels weigh this much more
    camera_weight_from: int = 6000
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    task_mix: tuple[float, float, float] = (0.6, 0.2, 0.2)  # prediction, planning, reconstruction
    checkpoint_every: int = 200
    threads: int = 2
    seed: int = 0
    stages: tuple[str, ...] = field(default=("render", "vae", "encode", "dit", "export"))


# ------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, step: int, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer) -> None:
    """Write modules and Adam state to one safetensors file, atomically (no pickles)."""
    tensors = {f"{name}/{key}": value.detach().contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim/{index}/{key}"] = torch.as_tensor(value).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the step to continue from (0 if none)."""
    if not path.exists():
        return 0
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return _checkpoint_step(path)


class LossLog:
    """Append-only CSV of (step, loss, lr, seconds) that survives restarts."""

    def __init__(self, path: Path, resume_from: int = 0) -> None:
        self.path = path
        self.started = time.time()
        if path.exists():
            rows = path.read_text().splitlines()
            kept = rows[:1] + [r for r in rows[1:] if int(r.split(",")[0]) <= resume_from]
            path.write_text("".join(r + "\n" for r in kept))

    def write(self, step: int, loss: float, lr: float) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "loss", "lr", "seconds"])
            writer.writerow([step, f"{loss:.6f}", f"{lr:.2e}", f"{time.time() - self.started:.1f}"])


# ------------------------------------------------------------------------------------ stages
def render_stage(cfg: TrainConfig) -> None:
    """Render ``cfg.clips`` training clips to .npy arrays (skipped when already there)."""
    out = cfg.workdir / "clips"
    if (out / "done").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    h, w = TOYWORLD_SPEC.height, TOYWORLD_SPEC.width
    rgb = np.zeros((cfg.clips, FRAMES, h, w, 3), np.uint8)
    depth = np.zeros((cfg.clips, FRAMES, h, w), np.float16)
    c2w = np.zeros((cfg.clips, FRAMES, 4, 4), np.float32)
    k = np.zeros((cfg.clips, FRAMES, 3, 3), np.float32)
    for i in tqdm(range(cfg.clips), desc="render clips"):
        clip, _ = clip_for_seed(i)
        rgb[i], depth[i], c2w[i], k[i] = clip.rgb, clip.depth, clip.c2w, clip.k
    for name, array in {"rgb": rgb, "depth": depth, "c2w": c2w, "k": k}.items():
        np.save(out / f"{name}.npy", array)
    (out / "done").touch()


def load_clips(cfg: TrainConfig) -> dict[str, np.ndarray]:
    return {name: np.load(cfg.workdir / "clips" / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in ("rgb", "depth", "c2w", "k")}


def to_unit(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).float().div(127.5).sub(1)
    return x.movedim(-1, -3)


def disparity_unit(depth: np.ndarray) -> torch.Tensor:
    """Metric depth (..., H, W) -> Aether's disparity image (..., 3, H, W) in [-1, 1]."""
    disp = geometry.depth_to_disparity(depth.astype(np.float32), TOYWORLD_SPEC.metric_dmax)
    return torch.from_numpy(disp * 2 - 1).float().unsqueeze(-3).expand(*disp.shape[:-2], 3, *disp.shape[-2:])


def vae_stage(cfg: TrainConfig, vae: torch.nn.Module) -> None:
    """Train the VAE on short windows of RGB and disparity clips (L1 + MSE + tiny KL)."""
    ckpt = cfg.workdir / "vae.safetensors"
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = load_checkpoint(ckpt, {"vae": vae}, optimizer)
    if step >= cfg.vae_steps:
        return
    clips, rng = load_clips(cfg), np.random.default_rng(cfg.seed + step)
    losses = LossLog(cfg.workdir / "vae_loss.csv", step)
    vae.train()
    bar = tqdm(range(step, cfg.vae_steps), desc="vae", initial=step, total=cfg.vae_steps)
    for step in bar:
        idx = rng.integers(0, len(clips["rgb"]), cfg.vae_batch)
        start = rng.integers(0, FRAMES - cfg.vae_window + 1)
        window = slice(start, start + cfg.vae_window)
        half = cfg.vae_batch // 2
        x = torch.cat([to_unit(np.stack([clips["rgb"][i][window] for i in idx[:half]])),
                       disparity_unit(np.stack([clips["depth"][i][window] for i in idx[half:]]))])
        x = x.permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 20 == 0:
            losses.write(step + 1, loss.item(), cfg.vae_lr)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            save_checkpoint(ckpt, step + 1, {"vae": vae}, optimizer)
    vae.eval()


def encode_stage(cfg: TrainConfig, model: CogVideoXWorldModel) -> None:
    """Encode every clip once with the trained VAE, exactly as the sampler encodes its inputs."""
    out = cfg.workdir / "latents.safetensors"
    if out.exists():
        return
    clips = load_clips(cfg)
    sample = torch.cat([model.encode_video(to_unit(clips["rgb"][:32])),
                        model.encode_video(disparity_unit(clips["depth"][:32]))])
    model.vae.register_to_config(scaling_factor=float(1.0 / (sample / model._vae_scale()).std()))
    parts: dict[str, list[torch.Tensor]] = {"rgb": [], "disparity": [], "first": [], "last": [], "camera": []}
    for start in tqdm(range(0, cfg.clips, 16), desc="encode latents"):
        batch = slice(start, min(start + 16, cfg.clips))
        parts["rgb"].append(model.encode_video(to_unit(clips["rgb"][batch])))
        parts["disparity"].append(model.encode_video(disparity_unit(clips["depth"][batch])))
        parts["first"].append(model.encode_video(to_unit(clips["rgb"][batch, :1])))
        parts["last"].append(model.encode_video(to_unit(clips["rgb"][batch, -1:])))
        rays = torch.stack([model.raymap(c, k, TOYWORLD_SPEC.metric_dmax)
                            for c, k in zip(clips["c2w"][batch], clips["k"][batch])])
        parts["camera"].append(fold_raymap(rays, model.temporal))
    tensors = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
    save_file(tensors, str(out), metadata={"scaling_factor": str(model.vae.config.scaling_factor)})


def training_batch(latents: dict[str, torch.Tensor], rng: np.random.Generator, cfg: TrainConfig
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixed-task batch: clean latents (B, T', 56, h, w) and their condition latents."""
    idx = torch.from_numpy(rng.integers(0, latents["rgb"].shape[0], cfg.dit_batch))
    x0 = torch.cat([latents["rgb"][idx], latents["disparity"][idx], latents["camera"][idx]], dim=2)
    conditions = []
    for row, task in zip(idx, rng.choice(["prediction", "planning", "reconstruction"],
                                        size=cfg.dit_batch, p=cfg.task_mix)):
        one = lambda name: latents[name][row: row + 1]
        camera = one("camera") if task == "prediction" else None
        cond = build_condition(task, one("first"), one("last"), one("rgb"), camera, (1, *x0.shape[1:]))
        if task != "reconstruction" and rng.random() < cfg.cfg_dropout:
            cond = unconditional(task, cond)
        conditions.append(cond)
    return x0, torch.cat(conditions)


def dit_stage(cfg: TrainConfig, model: CogVideoXWorldModel) -> None:
    """Train the transformer on mixed tasks, v-prediction then x0-prediction (see ``x0_from``);
    keeps an EMA copy for export."""
    ckpt = cfg.workdir / "dit.safetensors"
    transformer = model.transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.dit_lr, weight_decay=0.01)
    step = load_checkpoint(ckpt, {"transformer": transformer, "ema": ema}, optimizer)
    if step >= cfg.dit_steps:
        model.transformer = debiased_ema(ema, cfg, step)
        return
    latents = load_file(str(cfg.workdir / "latents.safetensors"))
    rng = np.random.default_rng(cfg.seed + 1 + step)
    losses = LossLog(cfg.workdir / "dit_loss.csv", step)
    scheduler = model.scheduler
    rotary = model._rotary(latents["rgb"].shape[1])
    text = model.prompt_embeds.expand(cfg.dit_batch, -1, -1)
    bar = tqdm(range(step, cfg.dit_steps), desc="transformer", initial=step, total=cfg.dit_steps)
    for step in bar:
        lr = dit_lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, condition = training_batch(latents, rng, cfg)
        noise = torch.randn_like(x0)
        t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, cfg.dit_batch))
        noisy = scheduler.add_noise(x0, noise, t)
        target = x0 if step >= cfg.x0_from else scheduler.get_velocity(x0, noise, t)
        pred = transformer(hidden_states=torch.cat([noisy, condition], dim=2), encoder_hidden_states=text,
                           timestep=t, image_rotary_emb=rotary, return_dict=False)[0]
        loss = weighted_mse(pred, target, channel_weights(cfg, step, target.shape[2]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1.0 - cfg.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 20 == 0:
            losses.write(step + 1, loss.item(), lr)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.dit_steps:
            save_checkpoint(ckpt, step + 1, {"transformer": transformer, "ema": ema}, optimizer)
    model.transformer = debiased_ema(ema, cfg, step + 1)


def channel_weights(cfg: TrainConfig, step: int, channels: int) -> torch.Tensor:
    """Per-latent-channel loss weights: the raymap channels (after RGB and disparity) count
    ``camera_weight`` times from ``camera_weight_from`` on, so the small camera signal is copied
    through the narrow transformer instead of being traded for image detail."""
    weights = torch.ones(channels)
    if step >= cfg.camera_weight_from:
        weights[2 * RGB_CHANNELS:] = cfg.camera_weight
    return weights


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MSE over (B, T, C, h, w) with per-channel weights, normalised to the unweighted scale."""
    per_channel = (pred - target).pow(2).mean(dim=(0, 1, 3, 4))
    return (per_channel * weights).sum() / weights.sum()


def dit_lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, then a cosine fall to zero over the last steps (sharpens low-noise denoising)."""
    warm = min(1.0, (step + 1) / cfg.dit_warmup)
    if step < cfg.dit_decay_from:
        return cfg.dit_lr * warm
    progress = (step - cfg.dit_decay_from) / max(1, cfg.dit_steps - cfg.dit_decay_from)
    return cfg.dit_lr * warm * 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))


def debiased_ema(ema: torch.nn.Module, cfg: TrainConfig, steps: int) -> torch.nn.Module:
    """Remove the random initialisation's weight decay**steps from a constant-decay EMA.

    The EMA starts as a copy of the (seeded, so reproducible) initial weights; like Adam's bias
    correction, (ema - d^n init) / (1 - d^n) is the average of the trained weights alone.
    """
    init = build_components(seed=cfg.seed)[1]
    left = cfg.ema_decay ** steps
    debiased = copy.deepcopy(ema)
    with torch.no_grad():
        for out, start in zip(debiased.parameters(), init.parameters()):
            out.sub_(start, alpha=left).div_(1.0 - left)
    return debiased.eval()


def export_stage(cfg: TrainConfig, model: CogVideoXWorldModel) -> None:
    """Save fp16 safetensors of the VAE and EMA transformer, the scheduler and prompt, into the package."""
    out = cfg.export_to
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model.vae).half().save_pretrained(out / "vae")
    copy.deepcopy(model.transformer).half().save_pretrained(out / "transformer")
    model.scheduler.save_pretrained(out / "scheduler")
    save_file({"prompt_embeds": model.prompt_embeds.contiguous()}, str(out / "prompt_embeds.safetensors"))
    digest = hashlib.sha256((out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes())
    steps = _checkpoint_step(cfg.workdir / "dit.safetensors")
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
              if k != "export_to"}  # a path on the machine that trained, not part of the recipe
    (out / "model.json").write_text(json.dumps(
        {"revision": digest.hexdigest()[:12], "transformer_steps": steps,
         "vae_steps": _checkpoint_step(cfg.workdir / "vae.safetensors"), "recipe": recipe}, indent=2))
    log.info("exported toyworld weights to %s", out)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _checkpoint_step(path: Path) -> int:
    return int(_metadata(path)["step"])


def _load_module(path: Path, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Load one module's weights out of a training checkpoint (e.g. the EMA transformer)."""
    prefix = f"{name}/"
    module.load_state_dict({k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)})
    return module.eval()


def train(cfg: TrainConfig) -> None:
    """Run the requested stages in order, each resuming from its checkpoint."""
    torch.set_num_threads(cfg.threads)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    vae, transformer, scheduler, prompt = build_components(seed=cfg.seed)
    model = CogVideoXWorldModel(vae, transformer, scheduler, prompt, TOYWORLD_SPEC)
    if "render" in cfg.stages:
        render_stage(cfg)
    if "vae" in cfg.stages:
        vae_stage(cfg, model.vae)
    elif (cfg.workdir / "vae.safetensors").exists():
        model.vae = _load_module(cfg.workdir / "vae.safetensors", "vae", model.vae)
    model.vae.eval()
    if "encode" in cfg.stages:
        encode_stage(cfg, model)
    latents_file = cfg.workdir / "latents.safetensors"
    if latents_file.exists():
        model.vae.register_to_config(scaling_factor=float(_metadata(latents_file)["scaling_factor"]))
    if "dit" in cfg.stages:
        dit_stage(cfg, model)
    elif (cfg.workdir / "dit.safetensors").exists():
        ema = _load_module(cfg.workdir / "dit.safetensors", "ema", model.transformer)
        model.transformer = debiased_ema(ema, cfg, _checkpoint_step(cfg.workdir / "dit.safetensors"))
    if "export" in cfg.stages:
        export_stage(cfg, model)


def plot_losses(cfg: TrainConfig, out: Path) -> None:
    """Plot the VAE and transformer loss curves recorded in ``cfg.workdir`` to a PNG, with the
    transformer's objective switches marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, stage in zip(axes, ("vae", "dit")):
        rows = list(csv.DictReader((cfg.workdir / f"{stage}_loss.csv").open()))
        steps = np.array([int(r["step"]) for r in rows])
        loss = np.array([float(r["loss"]) for r in rows])
        window = max(1, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps, loss, alpha=0.3, label="every 20 steps")
        ax.plot(steps[window - 1:], smooth, label=f"moving mean ({window})")
        if stage == "dit":
            ax.axvline(cfg.x0_from, color="grey", linestyle="--", label=f"x0 objective from {cfg.x0_from}")
            ax.axvline(cfg.camera_weight_from, color="grey", linestyle=":",
                       label=f"camera x{cfg.camera_weight:g} from {cfg.camera_weight_from}")
        ax.set(title={"vae": "VAE (L1 + MSE)", "dit": "transformer (v, then x0 MSE)"}[stage],
               xlabel="step", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        if isinstance(value, tuple):
            kind = type(value[0])
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, nargs="+", default=value)
        else:
            kind = Path if isinstance(value, Path) else type(value)
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    args = parser.parse_args(argv)
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = parse_args()
    train(config)
    plot_losses(config, config.workdir / "loss.png")

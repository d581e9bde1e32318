"""Train toyworld from scratch on the procedural world: ``python -m hero.training.toyworld``.

Five stages, each resuming exactly from its checkpoint in ``--workdir`` (kill the run at any moment
and start the same command again): render clips -> train the VAE -> encode latents -> train the
transformer -> export the EMA weights (fp16 safetensors) into the package. Progress is visible
while it runs: loss CSVs, validation figures every ``monitor_every`` steps (``vae_val.csv``,
``dit_val.csv``) with a contact sheet each time (``sheets/``), and ``progress.png``.
See docs/toyworld.md for the recipe's reasons and its CPU-hours.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from hero.models.cogvideox_world import CogVideoXWorldModel
from hero.models.toyworld.model import TOYWORLD_SPEC, WEIGHTS_DIR, build_components
from hero.training import carry, dit, monitor, vae
from hero.training.checkpoints import checkpoint_step, load_module, metadata
from hero.training.data import render_clips
from hero.training.precision import PRECISIONS

log = logging.getLogger("toyworld.train")
STAGES = ("render", "vae", "encode", "dit", "export")
# where and how a run computes, not what it learns: left out of the recipe
NOT_RECIPE = ("workdir", "export_to", "resume_from", "stages", "threads", "render_workers", "compile",
              "precision")


@dataclass
class TrainConfig:
    """The training recipe; every field is a command-line flag of the same name (``--no-compile``
    for a false flag)."""

    workdir: Path = Path("runs/toyworld")
    export_to: Path = WEIGHTS_DIR
    resume_from: Path | None = None  # a folder written by `hero.training.carry save` (another machine's run)
    clips: int = 6000
    render_workers: int = 2
    vae_steps: int = 4500  # in all: single frames first, then video windows
    vae_image_steps: int = 2000  # single frames: the spatial filters learn 9x more scenes per second
    vae_image_batch: int = 16
    vae_batch: int = 6
    vae_window: int = 9  # 1 + 4n frames with n even: the causal VAE decodes odd latent counts exactly
    vae_lr: float = 1e-3
    vae_warmup: int = 100
    vae_kl_weight: float = 1e-6
    dit_init: Path | None = None  # an export whose transformer this run continues (fresh Adam, new schedule)
    dit_steps: int = 6000
    dit_batch: int = 16
    dit_lr: float = 5e-4
    dit_warmup: int = 300
    final_lr_fraction: float = 0.1  # both learning rates fall on a cosine to this fraction
    camera_weight: float = 1.0  # the 24 raymap channels' weight in the v-loss (their variance is the latents')
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    task_mix: tuple[float, float, float] = (0.7, 0.15, 0.15)  # prediction, planning, reconstruction
    standardise_latents: bool = True  # every latent channel at zero mean, unit std (ModelSpec.latent_mean)
    compile: bool = True  # the transformer's training forward through torch.compile (1.15-1.3x per step)
    precision: str = "auto"  # the forward's: bfloat16 autocast where the CPU is faster at it, else float32
    checkpoint_every: int = 100
    monitor_every: int = 500
    validation_clips: int = 8
    threads: int = 2
    seed: int = 0
    stages: tuple[str, ...] = field(default=STAGES)


def train(cfg: TrainConfig) -> None:
    """Run the requested stages in order, each resuming from its checkpoint."""
    torch.set_num_threads(cfg.threads)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    if cfg.resume_from is not None:
        log.info("resumed from %s: %s", cfg.resume_from, ", ".join(carry.restore(cfg.resume_from, cfg.workdir))
                 or "nothing newer than the work folder's")
    (cfg.workdir / "recipe.json").write_text(json.dumps(recipe_of(cfg), indent=2))
    if "render" in cfg.stages:
        render_clips(cfg.workdir / "clips", cfg.clips, cfg.render_workers)
    model = CogVideoXWorldModel(*build_components(seed=cfg.seed), TOYWORLD_SPEC)
    vae_ckpt, dit_ckpt = cfg.workdir / "vae.safetensors", cfg.workdir / "dit.safetensors"
    if "vae" in cfg.stages:
        vae.train_vae(cfg, model)
    elif vae_ckpt.exists():
        model.vae = load_module(vae_ckpt, "vae", model.vae)
    model.vae.eval()
    latents = cfg.workdir / "latents.safetensors"
    if "encode" in cfg.stages:
        dit.encode_latents(cfg, model, latents)
    if latents.exists():
        dit.apply_latents_metadata(model, metadata(latents))
    if "dit" in cfg.stages:
        dit.train_transformer(cfg, model, latents)
    elif dit_ckpt.exists():
        ema = load_module(dit_ckpt, "ema", model.transformer)
        model.transformer = dit.debiased_ema(ema, cfg, checkpoint_step(dit_ckpt))
    if "export" in cfg.stages:
        export(cfg, model)
    monitor.plot_progress(cfg.workdir)


def recipe_of(cfg: TrainConfig) -> dict:
    """The recipe as plain JSON (paths on the training machine are not part of it; a continued
    transformer is named by the revision it started from)."""
    recipe = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
              if k not in NOT_RECIPE}
    recipe["dit_init"] = dit.init_revision(cfg.dit_init)
    return recipe


def export(cfg: TrainConfig, model: CogVideoXWorldModel) -> None:
    """Save fp16 safetensors of the VAE and EMA transformer, the scheduler and prompt, into the
    package, with ``model.json``: revision (a hash of the transformer weights), steps, recipe and
    the last validation figures."""
    out = cfg.export_to
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model.vae).half().save_pretrained(out / "vae")
    copy.deepcopy(model.transformer).half().save_pretrained(out / "transformer")
    model.scheduler.save_pretrained(out / "scheduler")
    save_file({"prompt_embeds": model.prompt_embeds.contiguous()}, str(out / "prompt_embeds.safetensors"))
    digest = hashlib.sha256((out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes())
    steps = checkpoint_step(cfg.workdir / "dit.safetensors") + dit.init_steps(cfg.dit_init)  # a continuation's too
    info = {"revision": digest.hexdigest()[:12], "transformer_steps": steps,
            "vae_steps": checkpoint_step(cfg.workdir / "vae.safetensors"),
            "validation": monitor.last_validation(cfg.workdir), "recipe": recipe_of(cfg),
            "latent_mean": model.spec.latent_mean, "latent_std": model.spec.latent_std}
    (out / "model.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("exported toyworld weights (revision %s) to %s", info["revision"], out)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(TrainConfig()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=type(value[0]), nargs="+", default=value)
        else:
            kind = Path if value is None or isinstance(value, Path) else type(value)
            parser.add_argument(flag, type=kind, default=value)
    args = parser.parse_args(argv)
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown {sorted(unknown)}; choose from {STAGES}")
    if args.precision not in PRECISIONS:
        parser.error(f"--precision: {args.precision!r}; choose from {PRECISIONS}")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train(parse_args())

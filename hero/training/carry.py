"""Carry a training run to a fresh machine: its resume points, compacted, and its progress logs.

A work folder holds two kinds of things. Rendered clips and encoded latents are gigabytes, and
the run re-makes them deterministically (clips from their seeds, latents from the VAE). The
stages' checkpoints and logs are hours of CPU that nothing re-makes. :func:`save` copies the
latter into a folder small enough to commit (Adam's moments rounded to bfloat16, a third of a
checkpoint's size; weights, EMA and random generators kept exactly); :func:`restore` puts them
into a new work folder, and the same training command continues from the carried steps::

    python -m hero.training.carry save runs/toyworld checkpoints/toyworld-v2
    python -m hero.training.toyworld --workdir runs/toyworld --resume-from checkpoints/toyworld-v2

Within one machine a stage resumes bit for bit; across a carry it resumes with Adam's moments at
bfloat16 precision (relative error below 0.4%), which only perturbs the next few steps' sizes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from hero.training.checkpoints import checkpoint_step, metadata, write_atomically

CHECKPOINTS = ("vae.safetensors", "dit.safetensors")
LOGS = ("recipe.json", "vae_loss.csv", "vae_val.csv", "dit_loss.csv", "dit_val.csv", "progress.png")


def compact(source: Path, dest: Path) -> None:
    """Copy a checkpoint with its floating-point optimiser moments as bfloat16."""
    tensors = {key: value.to(torch.bfloat16) if _is_moment(key, value) else value
               for key, value in load_file(str(source)).items()}
    write_atomically(tensors, dest, metadata(source))


def _is_moment(key: str, value: torch.Tensor) -> bool:
    return key.startswith("optim/") and not key.endswith("/step") and value.dtype == torch.float32


def save(workdir: Path, dest: Path) -> list[str]:
    """Copy ``workdir``'s checkpoints (compacted), logs and contact sheets into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    carried = []
    for name in CHECKPOINTS:
        if (workdir / name).exists():
            compact(workdir / name, dest / name)
            carried.append(f"{name} (step {checkpoint_step(dest / name)})")
    for name in LOGS:
        if (workdir / name).exists():
            shutil.copy2(workdir / name, dest / name)
            carried.append(name)
    if (workdir / "sheets").is_dir():
        shutil.copytree(workdir / "sheets", dest / "sheets", dirs_exist_ok=True)
        carried.append("sheets/")
    return carried


def restore(source: Path, workdir: Path) -> list[str]:
    """Put a carried run into ``workdir``: a checkpoint only where the work folder has none or an
    earlier one, logs and sheets only where missing. Nothing newer is ever overwritten."""
    if not source.is_dir():
        raise FileNotFoundError(f"--resume-from: {source} is not a folder of carried checkpoints")
    workdir.mkdir(parents=True, exist_ok=True)
    restored = []
    for name in CHECKPOINTS:
        carried, here = source / name, workdir / name
        if carried.exists() and checkpoint_step(carried) > checkpoint_step(here):
            shutil.copy2(carried, here)
            restored.append(f"{name} (step {checkpoint_step(here)})")
    for name in LOGS:
        if (source / name).exists() and not (workdir / name).exists():
            shutil.copy2(source / name, workdir / name)
            restored.append(name)
    if (source / "sheets").is_dir():
        for sheet in (source / "sheets").iterdir():
            target = workdir / "sheets" / sheet.name
            if not target.exists():
                target.parent.mkdir(exist_ok=True)
                shutil.copy2(sheet, target)
    return restored


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("source", type=Path, help="save: the work folder; restore: the carried folder")
    parser.add_argument("dest", type=Path, help="save: the carried folder; restore: the work folder")
    args = parser.parse_args(argv)
    done = (save if args.action == "save" else restore)(args.source, args.dest)
    print(f"{args.action}: {', '.join(done) or 'nothing to carry'} -> {args.dest}")


if __name__ == "__main__":
    main()

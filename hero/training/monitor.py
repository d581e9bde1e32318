"""Progress a person can follow while toyworld trains: validation figures and contact sheets.

Every ``monitor_every`` steps the VAE stage reconstructs the validation clips (``vae_val.csv``:
RGB PSNR overall and on object pixels, disparity PSNR, depth AbsRel) and the transformer stage
samples 17-frame predictions from them with the debiased EMA weights (``dit_val.csv``: RGB PSNR,
object PSNR, median depth AbsRel, camera rotation error, beside the repeat-first-frame baseline).
Each check writes a contact sheet under ``sheets/`` (truth above model) and redraws
``progress.png``. Validation clips come from their own seeds, never the evaluation's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hero import geometry, metrics
from hero.models.base import RolloutRequest
from hero.models.cogvideox_world import CogVideoXWorldModel
from hero.training.checkpoints import CsvLog, read_log
from hero.training.data import disparity_unit, from_unit, to_unit, validation_clips
from hero.preview import comparison_rows, contact_sheet
from hero.world import FAR, Clip, Frames

if TYPE_CHECKING:
    from hero.training.toyworld import TrainConfig

VAE_COLUMNS = ("rgb_psnr", "object_psnr", "disparity_psnr", "abs_rel_median")
DIT_COLUMNS = ("rgb_psnr", "object_psnr", "baseline_psnr", "abs_rel_median", "rot_err_deg",
               "trans_err")


def rendered_clips(workdir: Path) -> int:
    """How many leading training clips are rendered and safe to read."""
    progress = workdir / "clips" / "progress.json"
    return json.loads(progress.read_text())["clips"] if progress.exists() else 0


def _psnr(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(metrics.psnr(pred, true)))


class Monitor:
    """Validation figures of one stage on the validation clips, appended to ``<csv_name>`` (a
    resumed run rewinds the file to its checkpoint's step)."""

    csv_name: str
    columns: tuple[str, ...]

    def __init__(self, cfg: "TrainConfig", model: CogVideoXWorldModel, step: int) -> None:
        self.cfg, self.model = cfg, model
        self.clips = validation_clips(cfg.validation_clips)
        self.log = CsvLog(cfg.workdir / self.csv_name, self.columns, step)

    def record(self, step: int, rows: list[dict[str, float]], sheet: list, what: str
               ) -> dict[str, float]:
        """Average the clips' figures, append them to the CSV, write a contact sheet of the first
        three clips to ``sheets/<stage>-<step>.png`` and redraw ``progress.png``."""
        figures = {name: float(np.nanmean([r[name] for r in rows])) for name in self.columns}
        self.log.write(step, **figures)
        stage = self.csv_name.split("_")[0]
        write_sheet(self.cfg.workdir / "sheets" / f"{stage}-{step:06d}.png", sheet[:3],
                    f"{what}, step {step}: RGB PSNR {figures['rgb_psnr']:.2f} dB")
        plot_progress(self.cfg.workdir)
        return figures


class VaeMonitor(Monitor):
    """Reconstruction figures of the VAE on the validation clips."""

    csv_name, columns = "vae_val.csv", VAE_COLUMNS

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        self.model.vae.eval()
        dmax = float(self.model.spec.metric_dmax)
        rows, sheet = [], []
        for clip in self.clips:
            rgb = from_unit(self._roundtrip(to_unit(clip.rgb)))
            disp_true = geometry.depth_to_disparity(clip.depth, dmax)
            disp = (self._roundtrip(disparity_unit(clip.depth, dmax)).mean(dim=1).numpy() + 1) / 2
            depth = geometry.disparity_to_depth(disp, dmax, FAR)
            rows.append({"rgb_psnr": _psnr(rgb, clip.rgb),
                         "object_psnr": object_psnr(rgb, clip.rgb, clip.objects),
                         "disparity_psnr": float(np.mean(metrics.psnr(disp[..., None], disp_true[..., None],
                                                                          data_range=1.0))),
                         "abs_rel_median": _median_abs_rel(depth, clip.depth)})
            sheet.append((clip, Frames(rgb=rgb, depth=depth, objects=clip.objects)))
        return self.record(step, rows, sheet, "VAE reconstruction")

    def _roundtrip(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode and decode one clip (T, 3, H, W) exactly as the sampler does (posterior mode)."""
        return self.model.decode_video(self.model.encode_video(frames[None]))[0]


class DitMonitor(Monitor):
    """Sampled 17-frame predictions of the EMA transformer on the validation clips."""

    csv_name, columns = "dit_val.csv", DIT_COLUMNS

    @torch.no_grad()
    def validate(self, step: int, transformer: torch.nn.Module) -> dict[str, float]:
        sampler = copy.copy(self.model)
        sampler.transformer = transformer.eval()
        requests = [RolloutRequest(id=str(i), task="prediction", frames=clip.rgb.shape[0],
                                   image=clip.rgb[0], c2w=clip.c2w, k=clip.k, seed=i)
                    for i, clip in enumerate(self.clips)]
        rollouts = sampler.generate(requests)
        rows, sheet = [], []
        for clip, rollout in zip(self.clips, rollouts):
            later = slice(1, None)  # frame 0 is given
            rows.append({
                "rgb_psnr": _psnr(rollout.rgb[later], clip.rgb[later]),
                "object_psnr": object_psnr(rollout.rgb[later], clip.rgb[later], clip.objects[later]),
                "baseline_psnr": _psnr(np.broadcast_to(clip.rgb[:1], clip.rgb.shape)[later], clip.rgb[later]),
                "abs_rel_median": _median_abs_rel(rollout.depth[later], clip.depth[later]),
                "rot_err_deg": float(metrics.rotation_error_deg(rollout.c2w, clip.c2w).mean()),
                "trans_err": float(metrics.translation_error(rollout.c2w, clip.c2w).mean())})
            sheet.append((clip, rollout))
        return self.record(step, rows, sheet, "17-frame prediction (EMA)")


def _median_abs_rel(pred: np.ndarray, true: np.ndarray) -> float:
    """Median over frames of the per-frame AbsRel on non-sky pixels."""
    valid = metrics.depth_valid_mask(true, max_depth=FAR * 0.999)
    return float(np.nanmedian(metrics.abs_rel(pred, true, valid)))


def write_sheet(path: Path, rows: list[tuple[Clip, Frames]], title: str) -> None:
    """A contact sheet of a few validation clips: truth above model, RGB then depth."""
    sheet = [row for i, (clip, made) in enumerate(rows) for row in comparison_rows(made, clip, f"{i}: ")]
    contact_sheet(sheet, path, columns=6, title=title)


def object_psnr(pred: np.ndarray, true: np.ndarray, objects: np.ndarray) -> float:
    return float(np.nanmean(metrics.object_psnr(pred, true, objects)))


def last_validation(workdir: Path) -> dict[str, Any]:
    """The latest row of each validation log (what the exported weights were last measured at)."""
    out = {}
    for stage in ("vae", "dit"):
        log = read_log(workdir / f"{stage}_val.csv")
        if log:
            out[stage] = {name: float(values[-1]) for name, values in log.items()}
    return out


def plot_progress(workdir: Path) -> None:
    """``progress.png``: both losses and both validation PSNR curves, as far as they go."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for stage, title in (("vae", "VAE loss (L1 + MSE)"), ("dit", "transformer v-loss")):
        log = read_log(workdir / f"{stage}_loss.csv")
        ax = axes[0 if stage == "vae" else 1]
        if log:
            window = max(1, len(log["loss"]) // 40)
            smooth = np.convolve(log["loss"], np.ones(window) / window, mode="valid")
            ax.plot(log["step"], log["loss"], alpha=0.3)
            ax.plot(log["step"][window - 1:], smooth)
        ax.set(title=title, xlabel="step", yscale="log")
    ax = axes[2]
    for stage, columns in (("vae", ("rgb_psnr", "object_psnr")),
                           ("dit", ("rgb_psnr", "object_psnr", "baseline_psnr"))):
        log = read_log(workdir / f"{stage}_val.csv")
        for column in columns:
            if log:
                ax.plot(log["step"], log[column], marker="o", label=f"{stage} {column}")
    ax.set(title="validation PSNR (dB)", xlabel="step")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / "progress.png", dpi=100)
    plt.close(fig)

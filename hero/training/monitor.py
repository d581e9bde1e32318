"""Progress a person can follow while toyworld trains: validation figures and contact sheets.

Every ``monitor_every`` steps the VAE stage reconstructs the validation clips (``vae_val.csv``:
RGB PSNR overall and on object pixels, disparity PSNR, depth AbsRel) and the transformer stage
samples 17-frame predictions from them with the debiased EMA weights (``dit_val.csv``: RGB and
object PSNR beside the repeat-first-frame baseline's, depth AbsRel, camera errors, scored as the
held-out evaluation scores them; plus the raw weights' and the unguided EMA's RGB PSNR).
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
from hero.evaluation import scoring
from hero.models.base import Rollout, RolloutRequest
from hero.models.cogvideox_world import CogVideoXWorldModel
from hero.training.checkpoints import CsvLog, read_log
from hero.training.data import disparity_unit, from_unit, to_unit, validation_clips
from hero.preview import comparison_rows, contact_sheet
from hero.world import FAR, Clip, Frames

if TYPE_CHECKING:
    from hero.training.toyworld import TrainConfig

VAE_COLUMNS = ("rgb_psnr", "object_psnr", "disparity_psnr", "abs_rel_median")
DIT_COLUMNS = ("rgb_psnr", "object_psnr", "baseline_psnr", "baseline_object_psnr", "abs_rel",
               "abs_rel_median", "rot_err_deg", "trans_err", "raw_rgb_psnr", "unguided_rgb_psnr")


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
    medians: tuple[str, ...] = ()  # columns summarised by their median over clips, not the mean

    def __init__(self, cfg: "TrainConfig", model: CogVideoXWorldModel, step: int) -> None:
        self.cfg, self.model = cfg, model
        self.clips = validation_clips(cfg.validation_clips)
        self.log = CsvLog(cfg.workdir / self.csv_name, self.columns, step)

    def record(self, step: int, rows: list[dict[str, float]], sheet: list, what: str
               ) -> dict[str, float]:
        """Average the clips' figures, append them to the CSV, write a contact sheet of the first
        three clips to ``sheets/<stage>-<step>.png`` and redraw ``progress.png``."""
        figures = {name: float((np.nanmedian if name in self.medians else np.nanmean)([r[name] for r in rows]))
                   for name in self.columns}
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
    """Sampled 17-frame predictions on the validation clips, scored as the held-out evaluation
    scores them (:mod:`hero.evaluation.scoring`, frame 0 left out since it is given).

    The headline figures are the debiased EMA's with the default guidance (what export ships).
    Two diagnostics sit beside them, one figure each: the raw (un-averaged) weights, which show
    how far the EMA lags early in training, and the EMA without guidance, which shows whether
    classifier-free guidance amplifies an undertrained model's errors.
    """

    csv_name, columns, medians = "dit_val.csv", DIT_COLUMNS, ("abs_rel_median",)

    def __init__(self, cfg: "TrainConfig", model: CogVideoXWorldModel, step: int) -> None:
        super().__init__(cfg, model, step)
        baseline = [scoring.scene_means(scoring.score_against_truth(scoring.baseline_rollout(clip), clip))
                    for clip in self.clips]
        self.baseline = {name: [b[name] for b in baseline] for name in ("psnr", "object_psnr")}

    @torch.no_grad()
    def validate(self, step: int, ema: torch.nn.Module, raw: torch.nn.Module) -> dict[str, float]:
        rollouts = self._sample(ema)
        scores = [scoring.scene_means(scoring.score_against_truth(r, c)) for r, c in zip(rollouts, self.clips)]
        raw_rollouts = self._sample(raw)
        unguided = self._sample(ema, guidance=1.0)
        rows = [{"rgb_psnr": s["psnr"], "object_psnr": s["object_psnr"], "baseline_psnr": base_psnr,
                 "baseline_object_psnr": base_object, "abs_rel": s["abs_rel"],
                 "abs_rel_median": s["abs_rel"], "rot_err_deg": s["rot_err_deg"],
                 "trans_err": s["trans_err"], "raw_rgb_psnr": _later_psnr(r, clip),
                 "unguided_rgb_psnr": _later_psnr(u, clip)}
                for s, base_psnr, base_object, r, u, clip in zip(
                    scores, self.baseline["psnr"], self.baseline["object_psnr"], raw_rollouts,
                    unguided, self.clips)]
        return self.record(step, rows, list(zip(self.clips, rollouts)), "17-frame prediction (EMA)")

    def _sample(self, transformer: torch.nn.Module, guidance: float | None = None) -> list[Rollout]:
        """The validation predictions of ``transformer`` (its train/eval mode is restored)."""
        training = transformer.training
        sampler = copy.copy(self.model)
        sampler.transformer = transformer.eval()
        requests = [RolloutRequest(id=str(i), task="prediction", frames=clip.rgb.shape[0],
                                   image=clip.rgb[0], c2w=clip.c2w, k=clip.k, seed=i, guidance=guidance)
                    for i, clip in enumerate(self.clips)]
        try:
            return sampler.generate(requests)
        finally:
            transformer.train(training)


def _later_psnr(rollout: Rollout, clip: Clip) -> float:
    """RGB PSNR of every frame but the given first, averaged over frames."""
    return _psnr(rollout.rgb[1:], clip.rgb[1:])


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

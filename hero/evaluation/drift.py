"""Drift of long rollouts: 113-frame (or longer) chained rollouts on held-out scenes, scored per chunk.

Each held-out scene gets a long path (one random training-style path per chunk, joined), the model
chains 17-frame prediction chunks along it (:mod:`hero.rollout`, poses predicted, so errors
accumulate honestly), and every chunk is scored over the frames it added: PSNR, object PSNR, SSIM,
AbsRel, global camera errors (with the drift of earlier chunks) and local ones (relative to the
chunk's first frame), beside a baseline that holds the true frame at the chunk's start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hero import metrics
from hero.evaluation.heldout import EvalConfig, Evaluation, calibrate_accelerator, describe, log, model_info
from hero.evaluation.scoring import METRICS, baseline_rollout, ci, finite_mean, over_scenes, score_against_truth
from hero.models.base import Rollout, RolloutRequest, WorldModel, pose_deltas
from hero.rollout import ChainConfig, rollout_long_batch
from hero.world import CLIP_FRAMES, Clip, Trajectory, render_clip


@dataclass
class LongEvalConfig(EvalConfig):
    """A drift evaluation: ``frames``-long rollouts chained from ``chunk_frames`` chunks."""

    scenes: int = 4
    frames: int = 113
    chunk_frames: int = CLIP_FRAMES
    poses: str = "predicted"



def long_trajectory(seed: int, frames: int, chunk_frames: int = CLIP_FRAMES) -> Trajectory:
    """A held-out path of ``frames`` frames: one random training-style path per chunk, joined."""
    rng = np.random.default_rng(seed + 7_919)
    parts = [Trajectory.random(rng, chunk_frames) for _ in range(-(-(frames - 1) // (chunk_frames - 1)))]
    segments = tuple(segment for part in parts for segment in part.segments)
    return Trajectory(segments=segments, speed=parts[0].speed, turn_deg=parts[0].turn_deg)


def long_clip(seed: int, frames: int, chunk_frames: int = CLIP_FRAMES) -> tuple[Clip, Trajectory]:
    """The rendered truth of a long held-out rollout."""
    trajectory = long_trajectory(seed, frames, chunk_frames)
    clip = render_clip(seed, trajectory, frames)
    return clip, trajectory


def chunk_scores(rollout: Rollout, clip: Clip) -> list[dict[str, Any]]:
    """Scores per chunk over the frames the chunk added, with chunk-local camera errors and a baseline.

    Global camera errors accumulate drift; local ones compare each frame's pose relative to the
    chunk's first frame. The baseline repeats the true frame at the chunk's start.
    """
    scores = score_against_truth(rollout, clip, slice(None))
    rows = []
    for chunk in rollout.meta["chunks"]:
        start, stop = chunk["start"], chunk["stop"]
        new = slice(start + 1, stop + 1)
        row = {"index": chunk["index"], "start": start, "stop": stop}
        row.update({name: float(finite_mean(scores[name][new])) for name in METRICS})
        local_pred = np.linalg.inv(rollout.c2w[start].astype(np.float64)) @ rollout.c2w[new]
        local_true = np.linalg.inv(clip.c2w[start]) @ clip.c2w[new]
        row["local_rot_err_deg"] = float(metrics.rotation_error_deg(local_pred, local_true).mean())
        row["local_trans_err"] = float(metrics.translation_error(local_pred, local_true).mean())
        held = Clip(rgb=clip.rgb[start: stop + 1], depth=clip.depth[start: stop + 1],
                    objects=clip.objects[start: stop + 1],
                    k=clip.k[start: stop + 1], c2w=clip.c2w[start: stop + 1])
        base = score_against_truth(baseline_rollout(held), held)
        row["baseline_psnr"] = metrics.summarize(base["psnr"])["mean"]
        row["baseline_abs_rel"] = metrics.summarize(base["abs_rel"])["mean"]
        rows.append(row)
    return rows


def last_frame_errors(rollout: Rollout, clip: Clip) -> dict[str, float]:
    """Camera errors of the rollout's last frame, with every chunk's drift accumulated."""
    return {"rot_err_deg": float(metrics.rotation_error_deg(rollout.c2w[-1:], clip.c2w[-1:])[0]),
            "trans_err": float(metrics.translation_error(rollout.c2w[-1:], clip.c2w[-1:])[0])}


def evaluate_long(model: WorldModel, config: LongEvalConfig | None = None, accel: str = "none",
                  keep_rollouts: bool = False) -> Evaluation:
    """Drift: chained rollouts of ``config.frames`` frames on held-out scenes, scored chunk by chunk."""
    config = config or LongEvalConfig()
    if config.frames < config.chunk_frames:
        raise ValueError(f"frames: a long rollout needs >= chunk_frames={config.chunk_frames}, "
                         f"got {config.frames}")
    truths = [long_clip(seed, config.frames, config.chunk_frames) for seed in config.seeds()]
    requests = [RolloutRequest(id=f"long-{seed}", task="prediction", frames=config.frames,
                               image=clip.rgb[0], c2w=clip.c2w, k=clip.k, steps=config.steps,
                               guidance=config.guidance, seed=config.sample_seed + i)
                for i, (seed, (clip, _)) in enumerate(zip(config.seeds(), truths))]
    chain = ChainConfig(chunk_frames=config.chunk_frames, poses=config.poses)
    first = requests[0]
    calibrate_accelerator(model, replace(first, frames=config.chunk_frames, c2w=first.c2w[:config.chunk_frames],
                                         k=first.k[:config.chunk_frames]))
    rollouts: list[Rollout] = []
    for start in range(0, len(requests), config.batch_size):
        rollouts += rollout_long_batch(model, requests[start: start + config.batch_size], chain)
        log.info("long: %d/%d rollouts generated", len(rollouts), len(requests))
    scenes = []
    for seed, (clip, trajectory), rollout in zip(config.seeds(), truths, rollouts):
        scenes.append({"seed": seed, "trajectory": describe(trajectory),
                       "chunks": chunk_scores(rollout, clip),
                       "last_frame": last_frame_errors(rollout, clip),
                       "actions_match_command": bool(np.allclose(rollout.actions, pose_deltas(clip.c2w),
                                                                 atol=1e-4))})
    keys = [k for k in scenes[0]["chunks"][0] if k not in ("index", "start", "stop")]
    per_chunk = []
    for i, chunk in enumerate(scenes[0]["chunks"]):
        entry = {"index": i, "start": chunk["start"], "stop": chunk["stop"]}
        entry.update({key: over_scenes([s["chunks"][i][key] for s in scenes]) for key in keys})
        per_chunk.append(entry)
    last = {key: over_scenes([s["last_frame"][key] for s in scenes]) for key in scenes[0]["last_frame"]}
    summary = {"per_chunk": per_chunk, "last_frame": last, "steps": rollouts[0].meta.get("steps")}
    return Evaluation(config=asdict(config), model=model_info(model, accel), scenes=scenes,
                      summary=summary, rollouts=rollouts if keep_rollouts else [],
                      truths=[clip for clip, _ in truths] if keep_rollouts else [])


def long_markdown(result: Evaluation) -> str:
    """The drift table as markdown: one row per chunk, means ± 95% CI over scenes."""
    cfg, model = result.config, result.model
    lines = [
        f"Drift of `{model['name']}` (revision `{model['revision']}`, accel `{model['accel']}`): "
        f"{cfg['frames']}-frame rollouts chained from {cfg['chunk_frames']}-frame chunks "
        f"(poses {cfg['poses']}), {cfg['scenes']} held-out scenes, "
        f"{result.summary['steps']} steps per chunk.",
        "",
        "| chunk | frames | PSNR (dB) ↑ | baseline PSNR | AbsRel ↓ | baseline AbsRel | rot err (deg) "
        "global / local | trans err (m) global / local |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result.summary["per_chunk"]:
        lines.append(
            f"| {row['index']} | {row['start'] + 1}-{row['stop']} | {ci(row['psnr'])} | "
            f"{ci(row['baseline_psnr'])} | {ci(row['abs_rel'])} | {ci(row['baseline_abs_rel'])} | "
            f"{ci(row['rot_err_deg'])} / {ci(row['local_rot_err_deg'])} | "
            f"{ci(row['trans_err'])} / {ci(row['local_trans_err'])} |")
    last = result.summary["last_frame"]
    lines += ["", f"At the last frame ({cfg['frames'] - 1}): rotation error {ci(last['rot_err_deg'])} deg, "
              f"translation error {ci(last['trans_err'])} m (mean ± 95% CI over scenes).",
              "", "Baseline: the true frame at the chunk's start repeated (what a model that never "
              "moves would score from a perfect start). Global camera errors include drift "
              "accumulated over earlier chunks; local ones are relative to the chunk's first frame."]
    return "\n".join(lines) + "\n"


def plot_drift(result: Evaluation, path: Path) -> Path:
    """PSNR, AbsRel and camera errors per chunk (mean and 95% CI band over scenes) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.summary["per_chunk"]
    x = np.array([row["stop"] for row in rows])
    series = lambda key: (np.array([row[key]["mean"] for row in rows]),
                          np.nan_to_num(np.array([row[key]["ci95"] for row in rows])))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = [("RGB PSNR (dB) ↑", [("psnr", "model"), ("baseline_psnr", "repeat chunk start")]),
              ("depth AbsRel ↓", [("abs_rel", "model"), ("baseline_abs_rel", "repeat chunk start")]),
              ("rotation error (deg)", [("rot_err_deg", "global"), ("local_rot_err_deg", "within chunk")]),
              ("translation error (m)", [("trans_err", "global"), ("local_trans_err", "within chunk")])]
    for ax, (title, lines) in zip(axes.ravel(), panels):
        for (key, label), style in zip(lines, ("-o", "--s")):
            mean, half = series(key)
            ax.plot(x, mean, style, label=label)
            ax.fill_between(x, mean - half, mean + half, alpha=0.2)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("frame at chunk end")
    cfg, model = result.config, result.model
    fig.suptitle(f"{model['name']} drift: {cfg['frames']} frames, {cfg['chunk_frames']}-frame chunks, "
                 f"{cfg['scenes']} held-out scenes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

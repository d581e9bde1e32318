"""Score toyworld against the rendered truth on held-out scenes: ``python -m hero.evaluation.toyworld``.

Two evaluations, both on seeds from :data:`~hero.world.HELDOUT_SEED_BASE` up (never
used in training):

* held-out table (default): 17-frame action-conditioned prediction (image = the true first frame,
  c2w and K = the commanded path) against the truth and against the "repeat the first frame"
  baseline (its depth is the first frame's depth, its camera never moves); frame 0 is given, so
  frames 1..16 are scored. Writes ``<out>.json`` and ``<out>.md``.
* ``--long``: a chained rollout of ``--frames`` (>= 100) frames on held-out scenes, scored chunk by
  chunk (drift). Writes ``<out>.json``, ``<out>.md``, ``<out>.png`` (the drift plot) and a preview
  of the first scene (``<out>_sheet.png``, ``<out>.gif``).

Other code (benchmarks) calls :func:`evaluate` / :func:`evaluate_long` with a model it has built
and accelerated itself.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hero import metrics
from hero.models.base import Rollout, RolloutRequest, WorldModel, pose_deltas
from hero.models.toyworld.model import TOYWORLD_SPEC
from hero.world import FAR, HELDOUT_SEED_BASE, Clip, Trajectory, clip_for_seed, render_clip
from hero.world import CLIP_FRAMES as FRAMES
from hero.rollout import ChainConfig, rollout_long_batch

log = logging.getLogger("toyworld.evaluate")

METRICS = ("psnr", "ssim", "abs_rel", "rot_err_deg", "trans_err")
LOWER_IS_BETTER = {"psnr": False, "ssim": False, "abs_rel": True, "rot_err_deg": True, "trans_err": True}
LABELS = {"psnr": "RGB PSNR (dB)", "ssim": "RGB SSIM", "abs_rel": "depth AbsRel",
          "rot_err_deg": "camera rotation error (deg)", "trans_err": "camera translation error (m)"}


@dataclass
class EvalConfig:
    """What to evaluate: ``scenes`` held-out seeds from ``HELDOUT_SEED_BASE + seed_offset``.

    ``steps`` / ``guidance`` of None take the model's defaults; ``sample_seed`` seeds the noise
    (scene i uses ``sample_seed + i``); ``batch_size`` requests go to ``generate`` at once.
    """

    scenes: int = 32
    seed_offset: int = 0
    steps: int | None = None
    guidance: float | None = None
    sample_seed: int = 0
    batch_size: int = 8

    def seeds(self) -> list[int]:
        return [HELDOUT_SEED_BASE + self.seed_offset + i for i in range(self.scenes)]


@dataclass
class LongEvalConfig(EvalConfig):
    """A drift evaluation: ``frames``-long rollouts chained from ``chunk_frames`` chunks."""

    scenes: int = 4
    frames: int = 113
    chunk_frames: int = FRAMES
    poses: str = "predicted"


@dataclass
class Evaluation:
    """Per-scene scores, their summary, and (when kept) the rollouts and truths behind them."""

    config: dict[str, Any]
    model: dict[str, Any]
    scenes: list[dict[str, Any]]
    summary: dict[str, Any]
    rollouts: list[Rollout] = field(default_factory=list, repr=False)
    truths: list[Clip] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "model": self.model, "summary": self.summary,
                "scenes": self.scenes}


# ------------------------------------------------------------------------------------- scoring
def baseline_rollout(clip: Clip, frames: int | None = None) -> Rollout:
    """"Repeat the first frame": its RGB and depth held still, the camera never moving."""
    frames = frames or clip.rgb.shape[0]
    return Rollout(
        rgb=np.repeat(clip.rgb[:1], frames, axis=0), depth=np.repeat(clip.depth[:1], frames, axis=0),
        depth_is_metric=True, k=np.repeat(clip.k[:1], frames, axis=0).astype(np.float32),
        c2w=np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1)),
        actions=np.zeros((frames, 6), np.float32), meta={"model": "repeat-first-frame"})


def score_against_truth(rollout: Rollout, clip: Clip, frames: slice = slice(1, None)
                        ) -> dict[str, np.ndarray]:
    """Per-frame scores of ``rollout`` against the truth over ``frames`` (default: all but the given first).

    Sky (depth at the renderer's far plane) is left out of AbsRel; relative-depth rollouts are
    median-aligned per frame and their translations scale-aligned.
    """
    relative = not rollout.depth_is_metric
    return metrics.score_frames(
        rollout.rgb[frames], rollout.depth[frames], clip.rgb[frames], clip.depth[frames],
        rollout.c2w[frames], clip.c2w[frames], max_depth=FAR,
        depth_align="median" if relative else "none", pose_align_scale=relative)


def scene_means(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """One number per metric for a clip: the mean over its finite per-frame values."""
    return {name: metrics.summarize(values)["mean"] for name, values in scores.items()}


def _model_info(model: WorldModel, accel: str) -> dict[str, Any]:
    return {"name": model.name, "revision": model.revision, "accel": accel}


def _summary(model_scores: list[dict[str, float]], base_scores: list[dict[str, float]]
             ) -> dict[str, Any]:
    """Mean ± std over scenes per metric for model and baseline, and how often the model wins."""
    summary = {}
    for name in METRICS:
        ours = np.array([s[name] for s in model_scores])
        theirs = np.array([s[name] for s in base_scores])
        wins = ours < theirs if LOWER_IS_BETTER[name] else ours > theirs
        model_stats, base_stats = metrics.summarize(ours), metrics.summarize(theirs)
        better = (model_stats["mean"] < base_stats["mean"]) if LOWER_IS_BETTER[name] \
            else (model_stats["mean"] > base_stats["mean"])
        summary[name] = {"model": model_stats, "baseline": base_stats, "model_wins": int(wins.sum()),
                         "scenes": int(ours.size), "model_better": bool(better)}
    return summary


# -------------------------------------------------------------------------------- held-out table
def heldout_request(seed: int, clip: Clip, config: EvalConfig, index: int) -> RolloutRequest:
    """The prediction request of a held-out clip: its first frame and its commanded camera path."""
    return RolloutRequest(id=f"heldout-{seed}", task="prediction", frames=clip.rgb.shape[0],
                          image=clip.rgb[0], c2w=clip.c2w, k=clip.k, steps=config.steps,
                          guidance=config.guidance, seed=config.sample_seed + index)


def evaluate(model: WorldModel, config: EvalConfig | None = None, accel: str = "none",
             keep_rollouts: bool = False) -> Evaluation:
    """The held-out table: 17-frame prediction vs the truth and vs "repeat the first frame"."""
    config = config or EvalConfig()
    clips = [clip_for_seed(seed) for seed in config.seeds()]
    requests = [heldout_request(seed, clip, config, i)
                for i, (seed, (clip, _)) in enumerate(zip(config.seeds(), clips))]
    rollouts: list[Rollout] = []
    for start in range(0, len(requests), config.batch_size):
        rollouts += model.generate(requests[start: start + config.batch_size])
        log.info("held-out: %d/%d scenes generated", len(rollouts), len(requests))
    scenes, ours, theirs = [], [], []
    per_frame: dict[str, list[np.ndarray]] = {f"{who}_{name}": [] for who in ("model", "baseline")
                                              for name in METRICS}
    for seed, (clip, trajectory), rollout in zip(config.seeds(), clips, rollouts):
        model_scores = score_against_truth(rollout, clip)
        base_scores = score_against_truth(baseline_rollout(clip), clip)
        for name in METRICS:
            per_frame[f"model_{name}"].append(model_scores[name])
            per_frame[f"baseline_{name}"].append(base_scores[name])
        ours.append(scene_means(model_scores))
        theirs.append(scene_means(base_scores))
        scenes.append({"seed": seed, "trajectory": _describe(trajectory), "model": ours[-1],
                       "baseline": theirs[-1],
                       "timings": rollout.meta.get("timings", {})})
    summary = _summary(ours, theirs)
    summary["per_frame_mean"] = {key: _finite_mean(np.stack(values), axis=0).tolist()
                                 for key, values in per_frame.items()}
    summary["steps"] = rollouts[0].meta.get("steps") if rollouts else None
    return Evaluation(config=asdict(config), model=_model_info(model, accel), scenes=scenes,
                      summary=summary, rollouts=rollouts if keep_rollouts else [],
                      truths=[clip for clip, _ in clips] if keep_rollouts else [])


def heldout_markdown(result: Evaluation) -> str:
    """The held-out table as markdown: per metric mean ± std over scenes, model vs baseline."""
    model, cfg, summary = result.model, result.config, result.summary
    lines = [
        f"Held-out toyworld evaluation: model `{model['name']}` (revision `{model['revision']}`, "
        f"accel `{model['accel']}`), {cfg['scenes']} scenes (seeds {HELDOUT_SEED_BASE + cfg['seed_offset']}"
        f"..{HELDOUT_SEED_BASE + cfg['seed_offset'] + cfg['scenes'] - 1}), 17-frame prediction, "
        f"{summary['steps']} sampling steps; frames 1..16 scored (frame 0 is given).",
        "",
        "| metric | model (mean ± std) | repeat first frame (mean ± std) | model better on |",
        "|---|---|---|---|",
    ]
    for name in METRICS:
        row = summary[name]
        arrow = "↓" if LOWER_IS_BETTER[name] else "↑"
        lines.append(f"| {LABELS[name]} {arrow} | {_pm(row['model'])} | {_pm(row['baseline'])} | "
                     f"{row['model_wins']}/{row['scenes']} scenes |")
    verdict = lambda name: "yes" if summary[name]["model_better"] else "NO"
    lines += ["", f"Model beats the baseline on mean RGB PSNR: {verdict('psnr')}; on mean depth "
              f"AbsRel: {verdict('abs_rel')}. The baseline's camera never moves, so its camera errors "
              "are the size of the commanded motion; sky pixels (depth at the far plane) are left "
              "out of AbsRel."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- long rollouts
def long_trajectory(seed: int, frames: int, chunk_frames: int = FRAMES) -> Trajectory:
    """A held-out path of ``frames`` frames: one random training-style path per chunk, joined."""
    rng = np.random.default_rng(seed + 7_919)
    parts = [Trajectory.random(rng, chunk_frames) for _ in range(-(-(frames - 1) // (chunk_frames - 1)))]
    segments = tuple(segment for part in parts for segment in part.segments)
    return Trajectory(segments=segments, speed=parts[0].speed, turn_deg=parts[0].turn_deg)


def long_clip(seed: int, frames: int, chunk_frames: int = FRAMES) -> tuple[Clip, Trajectory]:
    """The rendered truth of a long held-out rollout."""
    trajectory = long_trajectory(seed, frames, chunk_frames)
    clip = render_clip(seed, trajectory, frames, TOYWORLD_SPEC.height, TOYWORLD_SPEC.width,
                       TOYWORLD_SPEC.fov_x_deg)
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
        row.update({name: float(_finite_mean(scores[name][new])) for name in METRICS})
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
    rollouts: list[Rollout] = []
    for start in range(0, len(requests), config.batch_size):
        rollouts += rollout_long_batch(model, requests[start: start + config.batch_size], chain)
        log.info("long: %d/%d rollouts generated", len(rollouts), len(requests))
    scenes = []
    for seed, (clip, trajectory), rollout in zip(config.seeds(), truths, rollouts):
        scenes.append({"seed": seed, "trajectory": _describe(trajectory),
                       "chunks": chunk_scores(rollout, clip),
                       "actions_match_command": bool(np.allclose(rollout.actions, pose_deltas(clip.c2w),
                                                                 atol=1e-4))})
    keys = [k for k in scenes[0]["chunks"][0] if k not in ("index", "start", "stop")]
    per_chunk = []
    for i, chunk in enumerate(scenes[0]["chunks"]):
        entry = {"index": i, "start": chunk["start"], "stop": chunk["stop"]}
        entry.update({key: metrics.summarize([s["chunks"][i][key] for s in scenes]) for key in keys})
        per_chunk.append(entry)
    summary = {"per_chunk": per_chunk, "steps": rollouts[0].meta.get("steps")}
    return Evaluation(config=asdict(config), model=_model_info(model, accel), scenes=scenes,
                      summary=summary, rollouts=rollouts if keep_rollouts else [],
                      truths=[clip for clip, _ in truths] if keep_rollouts else [])


def long_markdown(result: Evaluation) -> str:
    """The drift table as markdown: one row per chunk, means ± std over scenes."""
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
            f"| {row['index']} | {row['start'] + 1}-{row['stop']} | {_pm(row['psnr'])} | "
            f"{_pm(row['baseline_psnr'])} | {_pm(row['abs_rel'])} | {_pm(row['baseline_abs_rel'])} | "
            f"{_pm(row['rot_err_deg'])} / {_pm(row['local_rot_err_deg'])} | "
            f"{_pm(row['trans_err'])} / {_pm(row['local_trans_err'])} |")
    lines += ["", "Baseline: the true frame at the chunk's start repeated (what a model that never "
              "moves would score from a perfect start). Global camera errors include drift "
              "accumulated over earlier chunks; local ones are relative to the chunk's first frame."]
    return "\n".join(lines) + "\n"


def plot_drift(result: Evaluation, path: Path) -> Path:
    """PSNR, AbsRel and camera errors per chunk (mean ± std over scenes) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.summary["per_chunk"]
    x = np.array([row["stop"] for row in rows])
    series = lambda key: (np.array([row[key]["mean"] for row in rows]),
                          np.array([row[key]["std"] for row in rows]))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = [("RGB PSNR (dB) ↑", [("psnr", "model"), ("baseline_psnr", "repeat chunk start")]),
              ("depth AbsRel ↓", [("abs_rel", "model"), ("baseline_abs_rel", "repeat chunk start")]),
              ("rotation error (deg)", [("rot_err_deg", "global"), ("local_rot_err_deg", "within chunk")]),
              ("translation error (m)", [("trans_err", "global"), ("local_trans_err", "within chunk")])]
    for ax, (title, lines) in zip(axes.ravel(), panels):
        for (key, label), style in zip(lines, ("-o", "--s")):
            mean, std = series(key)
            ax.plot(x, mean, style, label=label)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
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


# ------------------------------------------------------------------------------------------- CLI
def apply_accel(model: WorldModel, accel: str) -> None:
    """Accelerate ``model`` in place: "none", "hero" or "hero:<preset>" (HERO's named presets)."""
    name, _, preset = accel.partition(":")
    if name == "none":
        return
    if name != "hero":
        raise ValueError(f"accel: unknown {accel!r}; use none, hero or hero:<preset>")
    try:
        from hero import HeroConfig, apply_hero
    except ImportError as error:
        raise RuntimeError(f"accel: {accel!r} needs hero.apply_hero, which is not available") from error
    apply_hero(model.transformer, HeroConfig.preset(preset or "default"))


def build_model(name: str, weights: str | None, accel: str, device: str = "cpu") -> WorldModel:
    """The named model ("tiny" or "toyworld") on ``device``, accelerated as asked."""
    from hero.models import load_model

    if name not in ("tiny", "toyworld"):
        raise ValueError(f"model: {name!r} has no rendered truth; use tiny or toyworld")
    model = load_model(name, device=device, **({"weights": weights} if weights else {}))
    apply_accel(model, accel)
    return model


def write_outputs(result: Evaluation, out: Path, long: bool) -> list[Path]:
    """``<out>.json`` and ``<out>.md``; for drift also the plot and a preview of the first scene."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out.with_suffix(".json"), out.with_suffix(".md")]
    written[0].write_text(json.dumps(_json_safe(result.to_json()), indent=1, allow_nan=False) + "\n")
    written[1].write_text(long_markdown(result) if long else heldout_markdown(result))
    if long:
        from hero.preview import write_comparison

        written.append(plot_drift(result, out.with_suffix(".png")))
        if result.rollouts:
            written += write_comparison(result.rollouts[0], result.truths[0], out.parent, out.name)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "toyworld"), default="toyworld")
    parser.add_argument("--weights", default=None, help="toyworld weights dir (default: the shipped ones)")
    parser.add_argument("--accel", default="none", help="none, hero or hero:<preset>")
    parser.add_argument("--scenes", type=int, default=None,
                        help="held-out scenes (default 32; 4 with --long)")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--long", action="store_true", help="drift of chained long rollouts instead")
    parser.add_argument("--frames", type=int, default=113, help="with --long: rollout length")
    parser.add_argument("--poses", choices=("predicted", "commanded"), default="predicted")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.weights, args.accel, args.device)
    common = dict(seed_offset=args.seed_offset, steps=args.steps, guidance=args.guidance,
                  sample_seed=args.sample_seed, batch_size=args.batch_size)
    if args.long:
        config = LongEvalConfig(scenes=args.scenes or 4, frames=args.frames, poses=args.poses, **common)
        result = evaluate_long(model, config, accel=args.accel, keep_rollouts=True)
    else:
        result = evaluate(model, EvalConfig(scenes=args.scenes or 32, **common), accel=args.accel)
    written = write_outputs(result, args.out, args.long)
    print((args.out.with_suffix(".md")).read_text())
    for path in written:
        print(f"wrote {path}")
    return written


def _describe(trajectory: Trajectory) -> dict[str, Any]:
    return {"segments": [list(s) for s in trajectory.segments], "speed": trajectory.speed,
            "turn_deg": trajectory.turn_deg}


def _finite_mean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Mean over the finite entries (NaN where there are none)."""
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    count = finite.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None, so the JSON is strict."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _pm(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()

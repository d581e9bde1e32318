"""Does the model's output depend on how it is sampled? A yardstick for accelerators needs it to.

For each scene and each of ``noise_seeds`` noise seeds, the same request is sampled with 10, 20
and the default number of steps. The table gives the PSNR between fewer-step and default-step samples of
the same seed (if 10 steps agreed with 30 to 40 dB, no accelerator could be told from another),
the spread between seeds at the default steps, and each step count's PSNR against the truth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from hero import metrics
from hero.evaluation.heldout import (EvalConfig, Evaluation, calibrate_accelerator, generate_in_batches,
                                     heldout_request, model_info)
from hero.evaluation.scoring import ci, over_scenes
from hero.models.base import WorldModel
from hero.world import clip_for_seed


@dataclass
class SensitivityConfig(EvalConfig):
    """``scenes`` held-out scenes x ``noise_seeds`` noise seeds, sampled at each of
    ``step_counts`` (None = the model's default) and compared with the default."""

    scenes: int = 8
    noise_seeds: int = 4
    step_counts: tuple[int | None, ...] = (10, 20, None)


def evaluate_sensitivity(model: WorldModel, config: SensitivityConfig | None = None,
                         accel: str = "none") -> Evaluation:
    """PSNR between step counts (same seed), between seeds (default steps) and against the truth."""
    config = config or SensitivityConfig()
    default_steps = model.default_steps("prediction")
    counts = [c or default_steps for c in config.step_counts]
    clips = [clip_for_seed(seed)[0] for seed in config.seeds()]
    samples: dict[tuple[int, int], list[np.ndarray]] = {}
    for steps in counts:
        for noise in range(config.noise_seeds):
            run = replace(config, steps=steps, sample_seed=config.sample_seed + 1000 * noise)
            requests = [replace(heldout_request(0, clip, run, 0), id=f"s{i}", seed=run.sample_seed + i)
                        for i, clip in enumerate(clips)]
            if noise == 0:
                calibrate_accelerator(model, requests[0])
            rollouts = generate_in_batches(model, requests, config.batch_size, f"{steps} steps, seed {noise}")
            samples[steps, noise] = [r.rgb[1:] for r in rollouts]
    truth = [clip.rgb[1:] for clip in clips]
    summary: dict[str, Any] = {"default_steps": default_steps, "step_counts": counts}
    pairwise = lambda a, b: [float(np.mean(metrics.psnr(x, y))) for x, y in zip(a, b)]
    for steps in counts:
        summary[f"{steps}_vs_truth"] = over_scenes(np.concatenate(
            [pairwise(samples[steps, n], truth) for n in range(config.noise_seeds)]))
        if steps != default_steps:
            summary[f"{steps}_vs_default"] = over_scenes(np.concatenate(
                [pairwise(samples[steps, n], samples[default_steps, n]) for n in range(config.noise_seeds)]))
    between = [pairwise(samples[default_steps, a], samples[default_steps, b])
               for a in range(config.noise_seeds) for b in range(a + 1, config.noise_seeds)]
    summary["between_seeds"] = over_scenes(np.concatenate(between)) if between else over_scenes([])
    return Evaluation(config=asdict(config), model=model_info(model, accel), scenes=[], summary=summary)


def sensitivity_markdown(result: Evaluation) -> str:
    """The sampling-sensitivity table as markdown."""
    summary, cfg, model = result.summary, result.config, result.model
    default = summary["default_steps"]
    lines = [f"Sampling sensitivity of `{model['name']}` (revision `{model['revision']}`, accel "
             f"`{model['accel']}`): {cfg['scenes']} held-out scenes x {cfg['noise_seeds']} noise seeds, "
             f"17-frame prediction, frames 1..16. PSNR (dB), mean ± 95% CI over scene-seed pairs.",
             "", "| steps | vs the default-step sample of the same seed | vs the truth |", "|---|---|---|"]
    for steps in summary["step_counts"]:
        versus = ci(summary[f"{steps}_vs_default"]) if steps != default else "(the reference)"
        lines.append(f"| {steps} | {versus} | {ci(summary[f'{steps}_vs_truth'])} |")
    lines += ["", f"Between noise seeds at {default} steps: {ci(summary['between_seeds'])} dB."]
    return "\n".join(lines) + "\n"

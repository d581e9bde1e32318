"""Does the model's output depend on how it is sampled? A yardstick for accelerators needs it to.

For each scene and each of ``noise_seeds`` noise seeds, the same request is sampled with 10, 20
and the default number of steps. The table gives the PSNR between fewer-step and default-step samples of
the same seed (if 10 steps agreed with 30 to 40 dB, no accelerator could be told from another),
the spread between seeds at the default steps, and each step count's PSNR against the truth.

It also says *why* a model is insensitive, from how its default-step sample depends on the noise
(:func:`noise_response`): a model that has learnt only a Gaussian posterior around a conditional
mean turns noise into sample affinely, along straight sampling trajectories that any step count
follows alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from hero import metrics
from hero.evaluation.heldout import (EvalConfig, Evaluation, calibrate_accelerator, generate_in_batches,
                                     heldout_request, model_info)
from hero.evaluation.scoring import ci, over_scenes
from hero.models.base import RolloutRequest, WorldModel
from hero.models.cogvideox_world import PARTS, CogVideoXWorldModel
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
    if isinstance(model, CogVideoXWorldModel) and not model.samples_stochastically:
        requests = [heldout_request(0, clip, config, i) for i, clip in enumerate(clips)]
        summary["noise_response"] = noise_response(model, requests, default_steps, min(counts),
                                                   config.sample_seed)
    return Evaluation(config=asdict(config), model=model_info(model, accel), scenes=[], summary=summary)


def noise_response(model: CogVideoXWorldModel, requests: list[RolloutRequest], steps: int,
                   fewer_steps: int, seed: int) -> dict[str, dict[str, Any]]:
    """How the ``steps``-step sample's clean latents f(z) depend on the initial noise z, per
    latent part (rgb, disparity, camera), each figure per scene.

    mu = (f(z3) + f(-z3)) / 2 is the sample's centre and f(z) - mu its noise-driven part.
    ``noise_share``: the noise-driven part's energy over the sample's variance. ``non_affine``:
    the error of predicting f((z1 + z2) / sqrt 2) as mu + (f(z1) - mu + f(z2) - mu) / sqrt 2,
    over the noise-driven part's energy: 0 when the sample is an affine function of the noise (a
    Gaussian posterior), of order 1 when it is far from one. ``fewer_steps``: the energy of
    f_fewer(z1) - f(z1) over the noise-driven part's, the step count's effect on that scale.
    Meaningful for a deterministic sampler only: a stochastic one forgets its initial noise.
    """
    frames = requests[0].frames
    condition = model.sampling_inputs(requests, "prediction", frames, camera=True)[0]
    guidance = requests[0].guidance
    guidance = model.spec.default_guidance["prediction"] if guidance is None else guidance
    shape = (condition.shape[0], condition.shape[1], model.transformer.config.out_channels,
             *condition.shape[3:])
    generator = torch.Generator().manual_seed(seed)
    z1, z2, z3 = (torch.randn(shape, generator=generator) for _ in range(3))
    seeds = [r.seed for r in requests]
    sample = lambda z, n=steps: model.denoise(condition, "prediction", n, guidance, seeds, noise=z)
    f1, f2, f3, f_minus3, f_mixed = (sample(z) for z in (z1, z2, z3, -z3, (z1 + z2) / math.sqrt(2)))
    fewer = sample(z1, fewer_steps)
    centre = (f3 + f_minus3) / 2
    affine = centre + (f1 + f2 - 2 * centre) / math.sqrt(2)
    energy = lambda x, part: x[:, :, PARTS[part]].pow(2).mean(dim=(1, 2, 3, 4)).numpy()
    result: dict[str, dict[str, Any]] = {}
    for part in PARTS:
        driven = energy(f_mixed - centre, part)
        spread = f_mixed[:, :, PARTS[part]].flatten(1).var(dim=1).numpy()
        result[part] = {"noise_share": over_scenes(driven / spread),
                        "non_affine": over_scenes(energy(f_mixed - affine, part) / driven),
                        "fewer_steps": over_scenes(energy(fewer - f1, part) / energy(f1 - centre, part)),
                        "fewer_step_count": fewer_steps}
    return result


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
    if "noise_response" in summary:
        lines += noise_response_markdown(summary["noise_response"], default)
    return "\n".join(lines) + "\n"


def noise_response_markdown(response: dict[str, dict[str, Any]], steps: int) -> list[str]:
    fewer = next(iter(response.values()))["fewer_step_count"]
    lines = ["", f"How the {steps}-step sample depends on its noise (latent energy ratios, mean ± 95% "
             "CI over scenes; see `noise_response`). A non-affine fraction near 0 means a Gaussian "
             "posterior around a mean, whose sampling trajectories are straight, so the step count "
             "hardly matters.", "",
             "| latent part | noise-driven part / sample variance | non-affine fraction of it | "
             f"{fewer} steps vs {steps}, / noise-driven part |", "|---|---|---|---|"]
    for part, row in response.items():
        lines.append(f"| {part} | {ci(row['noise_share'])} | {ci(row['non_affine'])} | "
                     f"{ci(row['fewer_steps'])} |")
    return lines

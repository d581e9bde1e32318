"""Scoring world models against the rendered truth (hero.evaluation).

Run on the tiny random model: the numbers mean nothing, but every figure in the table is checked
against an independent computation, so the same command on the trained weights can be trusted.
"""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDPMScheduler

from hero import metrics
from hero.models.base import Rollout
from hero.models.toyworld import load_tiny
from hero.evaluation import METRICS, EvalConfig, baseline_rollout, evaluate, score_against_truth
from hero.evaluation.__main__ import apply_accel, main
from hero.evaluation.drift import long_clip, long_trajectory
from hero.evaluation.heldout import heldout_markdown, heldout_request
from hero.evaluation.sensitivity import SensitivityConfig, evaluate_sensitivity, noise_response, sensitivity_markdown
from hero.world import FAR, HELDOUT_SEED_BASE, clip_for_seed


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


def _truth_as_rollout(clip) -> Rollout:
    return Rollout(rgb=clip.rgb, depth=clip.depth, depth_is_metric=True, k=clip.k.astype(np.float32),
                   c2w=clip.c2w.astype(np.float32), actions=np.zeros((clip.rgb.shape[0], 6), np.float32))


def test_heldout_seeds_never_overlap_training():
    config = EvalConfig(scenes=5, seed_offset=3)
    assert config.seeds() == [HELDOUT_SEED_BASE + 3 + i for i in range(5)]
    assert min(EvalConfig().seeds()) >= HELDOUT_SEED_BASE and len(EvalConfig().seeds()) == 32


def test_the_truth_scores_perfectly():
    clip, _ = clip_for_seed(HELDOUT_SEED_BASE)
    scores = score_against_truth(_truth_as_rollout(clip), clip)
    assert np.isinf(scores["psnr"]).all()
    np.testing.assert_allclose(scores["ssim"], 1.0, atol=1e-12)
    np.testing.assert_allclose(scores["abs_rel"], 0.0, atol=1e-12)
    np.testing.assert_allclose(scores["rot_err_deg"], 0.0, atol=1e-3)
    np.testing.assert_allclose(scores["trans_err"], 0.0, atol=1e-6)
    object_frames = clip.objects[1:].any(axis=(1, 2))
    assert np.isinf(scores["object_psnr"][object_frames]).all()
    assert np.isnan(scores["object_psnr"][~object_frames]).all()
    assert all(values.shape == (16,) for values in scores.values())  # frame 0 is given, not scored


def test_baseline_holds_the_first_frame_and_never_moves():
    clip, _ = clip_for_seed(HELDOUT_SEED_BASE + 1)
    baseline = baseline_rollout(clip)
    assert baseline.frames == 17
    assert (baseline.rgb == clip.rgb[0]).all() and (baseline.depth == clip.depth[0]).all()
    scores = score_against_truth(baseline, clip)
    np.testing.assert_allclose(scores["trans_err"], np.linalg.norm(clip.c2w[1:, :3, 3], axis=-1), rtol=1e-6)
    expected_psnr = metrics.psnr(np.repeat(clip.rgb[:1], 16, axis=0), clip.rgb[1:])
    np.testing.assert_allclose(scores["psnr"], expected_psnr)


def test_long_trajectories_are_long_seeded_and_differ_by_seed():
    a, b = long_trajectory(HELDOUT_SEED_BASE, 113), long_trajectory(HELDOUT_SEED_BASE + 1, 113)
    assert a.steps >= 112 and a == long_trajectory(HELDOUT_SEED_BASE, 113) and a != b
    clip, _ = long_clip(HELDOUT_SEED_BASE, 113)
    assert clip.rgb.shape == (113, 48, 64, 3) and (clip.depth <= FAR).all()


def test_accel_none_is_a_no_op_and_unknown_names_are_refused(tiny):
    forward = tiny.transformer.forward
    apply_accel(tiny, "none")
    assert tiny.transformer.forward == forward
    with pytest.raises(ValueError, match="accel: unknown 'teacache'"):
        apply_accel(tiny, "teacache")


@pytest.fixture(scope="module")
def heldout(tiny):
    return evaluate(tiny, EvalConfig(scenes=2, steps=1, batch_size=2), keep_rollouts=True)


def test_every_scored_sample_under_hero_is_accelerated_not_its_calibration():
    """HERO's presets calibrate their split on the first generation of a shape, at full compute;
    the evaluation runs that generation unscored, so the scored batch is a HERO one."""
    from hero import hero_stats

    model = load_tiny()
    apply_accel(model, "hero")
    evaluate(model, EvalConfig(scenes=2, steps=8, batch_size=2))
    stats = hero_stats(model)
    assert stats["calibration_run"] is False
    assert stats["partial_steps"] > 0


def test_heldout_summary_matches_an_independent_computation(heldout):
    assert [s["seed"] for s in heldout.scenes] == [HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + 1]
    for scene, rollout, clip in zip(heldout.scenes, heldout.rollouts, heldout.truths):
        assert rollout.frames == 17 and rollout.meta["steps"] == 1
        assert scene["model"]["psnr"] == pytest.approx(metrics.psnr(rollout.rgb[1:], clip.rgb[1:]).mean())
        assert scene["baseline"]["abs_rel"] == pytest.approx(metrics.abs_rel(
            np.repeat(clip.depth[:1], 16, axis=0), clip.depth[1:], max_depth=FAR).mean())
    for name in METRICS:
        row = heldout.summary[name]
        ours = [s["model"][name] for s in heldout.scenes]
        assert row["model"]["mean"] == pytest.approx(np.mean(ours))
        assert row["model"]["std"] == pytest.approx(np.std(ours))
        half = 12.706 * np.std(ours, ddof=1) / np.sqrt(2)  # Student's t, 1 degree of freedom
        assert row["model"]["ci95"] == pytest.approx(half)
        assert row["scenes"] == 2 and 0 <= row["model_wins"] <= 2
    assert len(heldout.summary["per_frame_mean"]["model_psnr"]) == 16


def test_heldout_markdown_has_one_row_per_metric(heldout):
    table = heldout_markdown(heldout)
    rows = [line for line in table.splitlines() if line.endswith("scenes |")]
    assert len(rows) == len(METRICS)
    assert "2 scenes" in table and "model `tiny`" in table
    psnr = heldout.summary["psnr"]["model"]
    assert f"{psnr['mean']:.3f} ± {psnr['ci95']:.3f} [{psnr['median']:.3f}]" in rows[0]


def test_long_evaluation_command_writes_table_plot_and_preview(tmp_path):
    out = tmp_path / "drift"
    written = main(["drift", "--model", "tiny", "--scenes", "1", "--frames", "33", "--steps", "1",
                    "--out", str(out)])
    names = sorted(path.name for path in written)
    assert names == ["drift.gif", "drift.json", "drift.md", "drift.png", "drift_sheet.png"]
    data = json.loads(out.with_suffix(".json").read_text(),
                      parse_constant=lambda token: pytest.fail(f"non-standard JSON {token}"))
    assert data["config"]["frames"] == 33 and data["model"]["name"] == "tiny"
    chunks = data["summary"]["per_chunk"]
    assert [(c["start"], c["stop"]) for c in chunks] == [(0, 16), (16, 32)]
    scene = data["scenes"][0]
    assert scene["seed"] == HELDOUT_SEED_BASE and scene["actions_match_command"] is True
    assert chunks[1]["psnr"]["mean"] == pytest.approx(scene["chunks"][1]["psnr"])
    assert iio.imread(out.with_suffix(".png")).shape[-1] in (3, 4)
    assert iio.imread(out.with_suffix(".gif"), index=None).shape[0] == 33
    assert out.with_suffix(".md").read_text().count("\n| ") == 3  # header + two chunks
    assert set(data["summary"]["last_frame"]) == {"rot_err_deg", "trans_err"}


def test_heldout_command_writes_table_json_and_a_contact_sheet(tmp_path):
    written = main(["heldout", "--model", "tiny", "--scenes", "2", "--steps", "1", "--out", str(tmp_path / "h")])
    assert sorted(path.name for path in written) == ["h.json", "h.md", "h_sheet.png"]
    assert iio.imread(tmp_path / "h_sheet.png").shape[-1] in (3, 4)


def test_sensitivity_compares_step_counts_per_seed_and_seeds_at_the_default(tiny):
    config = SensitivityConfig(scenes=2, noise_seeds=2, step_counts=(1, 2, None), batch_size=2)
    result = evaluate_sensitivity(tiny, config)
    summary = result.summary
    assert summary["default_steps"] == tiny.default_steps("prediction") == 4
    assert summary["step_counts"] == [1, 2, 4]
    for steps in (1, 2):
        assert summary[f"{steps}_vs_default"]["count"] == 4  # 2 scenes x 2 seeds
        assert np.isfinite(summary[f"{steps}_vs_default"]["mean"])
    assert summary["between_seeds"]["count"] == 2  # one seed pair per scene
    assert "4_vs_default" not in summary
    table = sensitivity_markdown(result)
    assert "| 4 | (the reference) |" in table and "Between noise seeds at 4 steps" in table
    response = summary["noise_response"]
    assert set(response) == {"rgb", "disparity", "camera"}
    assert all(row["non_affine"]["count"] == 2 and row["fewer_step_count"] == 1 for row in response.values())
    assert "| rgb |" in table and "1 steps vs 4" in table


def test_noise_response_is_affine_exactly_when_the_transformer_ignores_its_input(tiny):
    """A transformer that predicts zero makes every DDIM step linear in the latents, so the sample
    is a linear function of the noise; the trained (here random) transformer is not."""
    requests = [heldout_request(0, clip_for_seed(HELDOUT_SEED_BASE + i)[0], EvalConfig(), i) for i in range(2)]
    nonlinear = noise_response(tiny, requests, steps=4, fewer_steps=2, seed=0)
    silent = load_tiny()
    torch.nn.init.zeros_(silent.transformer.proj_out.weight)
    torch.nn.init.zeros_(silent.transformer.proj_out.bias)
    linear = noise_response(silent, requests, steps=4, fewer_steps=2, seed=0)
    for part in ("rgb", "disparity", "camera"):
        assert linear[part]["non_affine"]["max"] < 1e-8
        assert nonlinear[part]["non_affine"]["min"] > 1e-4
        assert linear[part]["noise_share"]["min"] > 0.5  # the noise is all there is to the sample


def test_a_stochastic_sampler_gets_no_noise_response(tiny):
    """CogVideoX's DPM scheduler adds fresh noise every step, so how the sample depends on the
    initial noise says nothing about the model: the table leaves it out."""
    stochastic = load_tiny()
    stochastic.scheduler = CogVideoXDPMScheduler.from_config(stochastic.scheduler.config)
    assert stochastic.samples_stochastically and not tiny.samples_stochastically
    config = SensitivityConfig(scenes=1, noise_seeds=1, step_counts=(1, None), batch_size=1)
    result = evaluate_sensitivity(stochastic, config)
    assert "noise_response" not in result.summary and "1_vs_default" in result.summary


def test_model_spec_matches_the_loaded_models_without_weights():
    from hero.models import load_model, model_spec

    for name in ("tiny", "toyworld"):
        assert model_spec(name) == load_model(name).spec
    aether = model_spec("aether", height=64, width=96)
    assert (aether.name, aether.height, aether.width) == ("aether", 64, 96)
    assert aether.frame_options == (17, 25, 33, 41)

"""toyworld's training recipe: schedules, loss weights, exact resumption, and the stages end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hero.training import carry
from hero.training.checkpoints import CsvLog, checkpoint_step, load_checkpoint, read_log, save_checkpoint
from hero.training.data import VALIDATION_SEED_BASE, disparity_unit, from_unit, to_unit
from hero.training.dit import channel_weights, latent_statistics, weighted_mse
from hero.training.toyworld import TrainConfig, parse_args, train
from hero.training.optim import lr_at
from hero.training.precision import training_autocast
from hero.world import HELDOUT_SEED_BASE


def test_learning_rate_warms_up_then_falls_on_a_cosine_to_its_floor():
    lr = lambda step: lr_at(step, peak=1e-3, warmup=100, total=1100, final_fraction=0.1)
    assert lr(0) == pytest.approx(1e-5)
    assert lr(99) == pytest.approx(1e-3)
    assert lr(600) == pytest.approx(0.55e-3)
    assert lr(1100) == pytest.approx(1e-4)
    falling = [lr(s) for s in range(100, 1101, 50)]
    assert all(a > b for a, b in zip(falling, falling[1:]))


def test_camera_channels_cost_camera_weight_times_the_same_image_error():
    weights = channel_weights(4.0, 56)
    assert torch.equal(weights[:32], torch.ones(32)) and torch.equal(weights[32:], torch.full((24,), 4.0))
    target = torch.zeros(1, 5, 56, 3, 4)
    image_error, camera_error = target.clone(), target.clone()
    image_error[:, :, 0] = 1.0
    camera_error[:, :, 40] = 1.0
    ratio = weighted_mse(camera_error, target, weights) / weighted_mse(image_error, target, weights)
    assert float(ratio) == pytest.approx(4.0)
    pred = torch.randn(2, 5, 56, 3, 4)
    torch.testing.assert_close(weighted_mse(pred, target, torch.ones(56)), F.mse_loss(pred, target))


def test_validation_seeds_are_disjoint_from_training_and_evaluation_seeds():
    config = TrainConfig()
    assert config.clips < HELDOUT_SEED_BASE
    assert VALIDATION_SEED_BASE >= HELDOUT_SEED_BASE + 10_000  # evaluation uses the first few hundred


def test_unit_images_and_disparity_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    assert np.array_equal(from_unit(to_unit(rgb)), rgb)
    disparity = disparity_unit(np.array([[0.5, 2.0], [60.0, np.inf]]), dmax=2.0)
    assert disparity.shape == (3, 2, 2)
    assert float(disparity.max()) == pytest.approx(1.0) and float(disparity.min()) == pytest.approx(-1.0)


def test_standardised_latents_reach_the_transformer_at_unit_scale_and_decode_unchanged():
    """The spec's per-channel statistics put every probed channel at zero mean and unit std (a
    channel that never varies stays finite), and decoding undoes them: the VAE sees what it saw
    without them."""
    import dataclasses

    from hero.models import load_model

    model = load_model("tiny")
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.uniform(-1, 1, (2, 9, 3, 48, 64))).float()
    rays = torch.from_numpy(rng.normal(size=(2, 9, 6, 12, 16))).float()
    rays[:, :, 4] = 0.0  # a raymap component the world holds fixed
    plain = {"rgb": model.encode_video(frames), "disparity": model.encode_video(frames.flip(-1), "disparity"),
             "camera": model.encode_camera(rays)}
    model.spec = dataclasses.replace(model.spec, **latent_statistics(plain))
    assert len(model.spec.latent_mean) == len(model.spec.latent_std) == 56
    standard = torch.cat([model.encode_video(frames), model.encode_video(frames.flip(-1), "disparity"),
                          model.encode_camera(rays)], dim=2)
    per_channel = standard.transpose(0, 2).reshape(56, -1)
    varying = torch.tensor(model.spec.latent_std) > 1e-2
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(56), atol=1e-4)
    assert torch.allclose(per_channel.std(dim=1)[varying], torch.ones(int(varying.sum())), atol=1e-4)
    assert torch.isfinite(standard).all() and not varying.all()
    decoded = {"rgb": model.decode_video(standard[:, :, :16]),
               "disparity": model.decode_video(standard[:, :, 16:32], "disparity"),
               "camera": model.decode_camera(standard[:, :, 32:], 9)}
    model.spec = dataclasses.replace(model.spec, latent_mean=None, latent_std=None)
    assert torch.allclose(decoded["rgb"], model.decode_video(plain["rgb"]), atol=1e-5)
    assert torch.allclose(decoded["disparity"], model.decode_video(plain["disparity"], "disparity"), atol=1e-5)
    assert torch.allclose(decoded["camera"], rays, atol=1e-5)


def _steps(module, optimizer, rng, noise, count):
    for _ in range(count):
        x = torch.from_numpy(rng.normal(size=(4, 3))).float() + torch.randn(4, 3, generator=noise)
        loss = module(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _fresh_training():
    """A tiny module, its optimiser and both random generators, seeded alike every time."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    return (module, torch.optim.AdamW(module.parameters(), lr=1e-2), np.random.default_rng(1),
            torch.Generator().manual_seed(2))


def test_a_stage_killed_after_a_checkpoint_resumes_exactly(tmp_path):
    straight = _fresh_training()
    _steps(*straight, 10)

    first = _fresh_training()
    _steps(*first, 6)
    save_checkpoint(tmp_path / "ckpt.safetensors", 6, {"m": first[0]}, first[1], first[2], first[3])
    _steps(*first, 2)  # work after the checkpoint is lost with the process

    resumed = _fresh_training()
    step = load_checkpoint(tmp_path / "ckpt.safetensors", {"m": resumed[0]}, resumed[1], resumed[2], resumed[3])
    assert step == 6 == checkpoint_step(tmp_path / "ckpt.safetensors")
    _steps(*resumed, 4)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_run_carried_to_a_fresh_work_folder_continues_from_its_steps(tmp_path):
    straight = _fresh_training()
    _steps(*straight, 10)
    first, machine_a, machine_b, carried = _fresh_training(), tmp_path / "a", tmp_path / "b", tmp_path / "carried"
    machine_a.mkdir()
    _steps(*first, 6)
    save_checkpoint(machine_a / "dit.safetensors", 6, {"m": first[0]}, first[1], first[2], first[3])
    CsvLog(machine_a / "dit_loss.csv", ("loss",)).write(6, loss=0.5)
    carry.save(machine_a, carried)
    assert (carried / "dit.safetensors").stat().st_size < (machine_a / "dit.safetensors").stat().st_size

    assert carry.restore(carried, machine_b) == ["dit.safetensors (step 6)", "dit_loss.csv"]
    resumed = _fresh_training()
    assert load_checkpoint(machine_b / "dit.safetensors", {"m": resumed[0]}, *resumed[1:]) == 6
    for a, b in zip(first[0].parameters(), resumed[0].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # weights travel exactly, moments at bf16
    _steps(*resumed, 4)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)

    save_checkpoint(machine_b / "dit.safetensors", 9, {"m": resumed[0]}, *resumed[1:])
    assert carry.restore(carried, machine_b) == []  # never replaces a later checkpoint
    assert checkpoint_step(machine_b / "dit.safetensors") == 9
    with pytest.raises(FileNotFoundError, match="--resume-from"):
        carry.restore(tmp_path / "nowhere", machine_b)


def test_loss_log_drops_rows_written_after_the_checkpoint_it_resumes_from(tmp_path):
    path = tmp_path / "loss.csv"
    log = CsvLog(path, ("loss",))
    for step in (20, 40, 60):
        log.write(step, loss=step / 10)
    CsvLog(path, ("loss",), resume_from=40).write(60, loss=9.0)
    columns = read_log(path)
    assert columns["step"].tolist() == [20, 40, 60] and columns["loss"].tolist() == [2.0, 4.0, 9.0]


def test_flags_follow_the_recipe_fields_and_unknown_stages_are_refused():
    config = parse_args(["--dit-steps", "7", "--task-mix", "1", "0", "0", "--stages", "render", "vae",
                         "--no-compile", "--resume-from", "carried"])
    assert config.dit_steps == 7 and config.task_mix == (1.0, 0.0, 0.0) and config.stages == ("render", "vae")
    assert config.compile is False and str(config.resume_from) == "carried"
    assert parse_args([]).compile is True and parse_args([]).resume_from is None
    with pytest.raises(SystemExit):
        parse_args(["--stages", "paint"])
    with pytest.raises(SystemExit):
        parse_args(["--precision", "float8"])


def test_training_precision_is_bfloat16_autocast_or_float32_and_auto_picks_one():
    x = torch.randn(4, 4)
    for precision, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        with training_autocast(precision)():
            assert (x @ x).dtype == dtype
    with training_autocast("auto")():
        assert (x @ x).dtype in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="precision"):
        training_autocast("half")


@pytest.mark.timeout(900)
def test_every_stage_runs_end_to_end_and_exports_loadable_weights(tmp_path):
    """A few steps of each stage on a handful of clips: checkpoints, logs, sheets and an export
    that the model registry loads and samples from."""
    from hero.models import load_model

    workdir, export = tmp_path / "run", tmp_path / "weights"
    config = TrainConfig(workdir=workdir, export_to=export, clips=8, render_workers=1, vae_steps=2,
                         vae_batch=2, vae_warmup=1, dit_steps=2, dit_batch=2, dit_warmup=1,
                         checkpoint_every=1, monitor_every=2, validation_clips=1, threads=1,
                         compile=False)  # torch.compile costs minutes here; the training run uses it
    train(config)
    for name in ("vae.safetensors", "dit.safetensors", "latents.safetensors", "vae_val.csv", "dit_val.csv",
                 "progress.png", "sheets/vae-000002.png", "sheets/dit-000002.png"):
        assert (workdir / name).exists(), name
    assert checkpoint_step(workdir / "dit.safetensors") == 2
    model = load_model("toyworld", weights=str(export))
    assert model.spec.latent_std is not None and len(model.spec.latent_std) == 56
    latents = load_file(str(workdir / "latents.safetensors"))
    assert abs(float(latents["rgb"].mean())) < 0.2 and 0.7 < float(latents["rgb"].std()) < 1.3
    clip_rgb = np.zeros((48, 64, 3), np.uint8)
    from hero.models.base import RolloutRequest
    rollout = model.generate([RolloutRequest(id="a", image=clip_rgb, steps=2)])[0]
    assert rollout.rgb.shape == (17, 48, 64, 3) and np.isfinite(rollout.depth).all()
    _continued_transformer_starts_from_its_export(config, tmp_path)


def _continued_transformer_starts_from_its_export(finished: TrainConfig, tmp_path):
    """``--dit-init`` continues an exported transformer in a new work folder: at zero learning
    rate the new export holds the old one's weights (so the EMA is debiased against the export,
    not the seed), its steps add up and the recipe names the revision it started from; latents
    with other statistics are refused, naming the field."""
    import dataclasses
    import json
    import shutil

    def continued(name):
        workdir = tmp_path / name
        workdir.mkdir()
        for carried in ("vae.safetensors", "latents.safetensors"):
            shutil.copy2(finished.workdir / carried, workdir / carried)
        return dataclasses.replace(finished, workdir=workdir, export_to=tmp_path / f"{name}-weights",
                                   dit_init=finished.export_to, dit_lr=0.0, stages=("dit", "export"))

    train(again := continued("continued"))
    weights = lambda export: load_file(str(export / "transformer" / "diffusion_pytorch_model.safetensors"))
    started, ended = weights(finished.export_to), weights(again.export_to)
    assert started.keys() == ended.keys() and all(torch.equal(started[k], ended[k]) for k in started)
    before = json.loads((finished.export_to / "model.json").read_text())
    after = json.loads((again.export_to / "model.json").read_text())
    assert after["transformer_steps"] == before["transformer_steps"] + again.dit_steps
    assert after["recipe"]["dit_init"] == before["revision"] and before["recipe"]["dit_init"] is None

    before["latent_std"][0] *= 2
    (finished.export_to / "model.json").write_text(json.dumps(before))
    with pytest.raises(ValueError, match="latent_std"):
        train(continued("mismatched"))

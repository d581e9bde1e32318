"""The toyworld training recipe's schedule pieces: learning rate, objective switch and loss weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hero.training.toyworld import TrainConfig, channel_weights, dit_lr_at, weighted_mse

CFG = TrainConfig(dit_steps=1000, dit_warmup=100, dit_decay_from=500, dit_lr=1e-3,
                  camera_weight=10.0, camera_weight_from=700)


def test_learning_rate_warms_up_holds_then_falls_to_zero_on_a_cosine():
    assert dit_lr_at(CFG, 0) == pytest.approx(1e-5)
    assert dit_lr_at(CFG, 99) == dit_lr_at(CFG, 499) == pytest.approx(1e-3)
    assert dit_lr_at(CFG, 750) == pytest.approx(0.5e-3)
    assert dit_lr_at(CFG, 1000) == pytest.approx(0.0, abs=1e-12)
    falling = [dit_lr_at(CFG, s) for s in range(500, 1001, 50)]
    assert all(a > b for a, b in zip(falling, falling[1:]))


def test_unit_weights_give_the_plain_mse_and_camera_weights_start_on_time():
    pred, target = torch.randn(2, 5, 56, 3, 4), torch.randn(2, 5, 56, 3, 4)
    before = channel_weights(CFG, 699, 56)
    assert torch.equal(before, torch.ones(56))
    torch.testing.assert_close(weighted_mse(pred, target, before), F.mse_loss(pred, target))
    after = channel_weights(CFG, 700, 56)
    assert torch.equal(after[:32], torch.ones(32)) and torch.equal(after[32:], torch.full((24,), 10.0))


def test_camera_weight_makes_a_camera_error_cost_more_than_the_same_image_error():
    target = torch.zeros(1, 5, 56, 3, 4)
    image_error, camera_error = target.clone(), target.clone()
    image_error[:, :, 0] = 1.0
    camera_error[:, :, 40] = 1.0
    weights = channel_weights(CFG, 900, 56)
    ratio = weighted_mse(camera_error, target, weights) / weighted_mse(image_error, target, weights)
    assert float(ratio) == pytest.approx(10.0)
    assert np.isfinite(float(weighted_mse(camera_error, target, weights)))

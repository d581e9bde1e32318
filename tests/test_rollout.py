"""Long rollouts (hero.rollout) on the tiny random model, and previews (hero.preview).

The tiny model's weights are random, so these tests check what the chaining promises (lengths,
conditioning, re-basing, seeding, pose composition, depth alignment), never quality.
"""

from __future__ import annotations

import dataclasses

import imageio.v3 as iio
import numpy as np
import pytest

from hero import geometry
from hero.models.base import Rollout, RolloutRequest, pose_deltas
from hero.models.cogvideox_world import CogVideoXWorldModel
from hero.models.toyworld import load_tiny
from hero.world import HELDOUT_SEED_BASE, Trajectory, clip_for_seed
from hero.preview import colorize_depth, frame_indices, write_comparison, write_preview
from hero.rollout import (
    ChainConfig,
    chunk_request,
    chunk_seed,
    chunk_starts,
    depth_scale,
    extend_intrinsics,
    extend_path,
    generate_any_length,
    rescale_depth,
    rollout_long,
    rollout_long_batch,
)

FAR = 60.0


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def tiny_relative(tiny):
    """The same random components with Aether's relative depth (no metric disparity scale)."""
    spec = dataclasses.replace(tiny.spec, name="tiny-relative", metric_dmax=None)
    return CogVideoXWorldModel(tiny.vae, tiny.transformer, tiny.scheduler, tiny.prompt_embeds, spec)


def _clip(frames: int, offset: int = 0):
    return clip_for_seed(HELDOUT_SEED_BASE + offset, frames=frames)[0]


# ----------------------------------------------------------------------------- chunk arithmetic
@pytest.mark.parametrize("frames, starts", [(2, [0]), (17, [0]), (18, [0, 16]), (33, [0, 16]),
                                            (40, [0, 16, 32]), (113, [0, 16, 32, 48, 64, 80, 96])])
def test_chunk_starts_cover_the_path_with_one_shared_frame(frames, starts):
    assert chunk_starts(frames, 17) == starts
    assert starts[-1] + 16 >= frames - 1


def test_chunk_seeds_keep_the_request_seed_first_and_differ_after():
    assert chunk_seed(5, 0) == 5
    assert chunk_seed(5, 1) == chunk_seed(5, 1)
    assert len({chunk_seed(5, 1), chunk_seed(5, 2), chunk_seed(6, 1), 5, 6}) == 5


def test_extend_path_continues_the_last_motion():
    trajectory = Trajectory(segments=(("forward+turn_left", 30),), speed=0.1, turn_deg=3.0)
    extended = extend_path(trajectory.poses(12), 20)
    np.testing.assert_allclose(extended, trajectory.poses(20), atol=1e-12)
    k = geometry.intrinsics(48, 64, 70.0, 3)
    k[2, 0, 0] = 99.0
    np.testing.assert_array_equal(extend_intrinsics(k, 5)[3:, 0, 0], [99.0, 99.0])


def test_depth_scale_ignores_sky_and_rescale_keeps_it():
    current = np.random.default_rng(0).uniform(1, 10, (12, 16))
    reference = 2.0 * current
    current[:8], reference[:8] = FAR, 7.0  # sky in the new chunk (most of it), nonsense in the reference
    assert depth_scale(reference, current, far=FAR) == pytest.approx(2.0)
    assert depth_scale(reference, current) != pytest.approx(2.0)
    scaled = rescale_depth(current, 2.0, far=FAR)
    np.testing.assert_array_equal(scaled[:8], FAR)
    np.testing.assert_allclose(scaled[8:], 2.0 * current[8:], rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [("chunk_frames", 1, "chunk_frames"),
                                                   ("poses", "guessed", "poses"),
                                                   ("align_depth", "mean", "align_depth")])
def test_chain_config_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ChainConfig(**{field: value})


def test_bad_requests_are_refused_before_generating(tiny):
    clip = _clip(20)
    good = RolloutRequest(id="r7", frames=20, image=clip.rgb[0], c2w=clip.c2w, k=clip.k)
    with pytest.raises(ValueError, match="task: .*'r7'"):
        rollout_long_batch(tiny, [dataclasses.replace(good, task="planning")])
    with pytest.raises(ValueError, match=r"c2w: .*\(20, 4, 4\)"):
        rollout_long_batch(tiny, [dataclasses.replace(good, c2w=clip.c2w[:10])])
    with pytest.raises(ValueError, match="image"):
        rollout_long_batch(tiny, [dataclasses.replace(good, image=None)])
    with pytest.raises(ValueError, match="chunk_frames"):
        rollout_long_batch(tiny, [good], ChainConfig(chunk_frames=25))


# ------------------------------------------------------------------------ chaining on the model
@pytest.fixture(scope="module")
def commanded(tiny):
    """A 20-frame (2 chunks, the last one padded) and a 17-frame request, chained in lock-step."""
    long, short = _clip(20), _clip(17, offset=1)
    requests = [RolloutRequest(id="long", frames=20, image=long.rgb[0], c2w=long.c2w, k=long.k,
                               steps=1, seed=3),
                RolloutRequest(id="short", frames=17, image=short.rgb[0], c2w=short.c2w, k=short.k,
                               steps=1, seed=4)]
    return (long, short), rollout_long_batch(tiny, requests, ChainConfig(poses="commanded"))


def test_any_length_sends_model_lengths_direct_and_chains_the_rest_in_request_order(tiny):
    short, long = _clip(17, offset=2), _clip(20, offset=3)
    requests = [RolloutRequest(id="short", frames=17, image=short.rgb[0], c2w=short.c2w, k=short.k,
                               steps=1, seed=5),
                RolloutRequest(id="long", frames=20, image=long.rgb[0], c2w=long.c2w, k=long.k,
                               steps=1, seed=6)]
    short_out, long_out = generate_any_length(tiny, requests)
    direct = tiny.generate(requests[:1])[0]
    np.testing.assert_array_equal(short_out.rgb, direct.rgb)
    assert "chunks" not in short_out.meta
    assert long_out.rgb.shape[0] == 20 and len(long_out.meta["chunks"]) == 2


def test_commanded_poses_compose_back_to_the_commanded_path(commanded):
    clips, rollouts = commanded
    for clip, rollout in zip(clips, rollouts):
        frames = clip.rgb.shape[0]
        assert rollout.frames == frames
        assert rollout.rgb.shape == (frames, 48, 64, 3) and rollout.rgb.dtype == np.uint8
        assert rollout.depth.shape == (frames, 48, 64) and rollout.depth_is_metric
        np.testing.assert_allclose(rollout.c2w[0], np.eye(4), atol=1e-6)
        np.testing.assert_allclose(rollout.c2w, clip.c2w, atol=1e-5)
        np.testing.assert_allclose(rollout.k, clip.k, rtol=1e-6)
        np.testing.assert_allclose(rollout.actions, pose_deltas(clip.c2w), atol=1e-5)


def test_commanded_rollout_metadata_describes_every_chunk(commanded):
    _, (long, short) = commanded
    chunks = long.meta["chunks"]
    assert [(c["index"], c["start"], c["stop"]) for c in chunks] == [(0, 0, 16), (1, 16, 19)]
    assert [c["seed"] for c in chunks] == [chunk_seed(3, i) for i in range(2)]
    assert all(c["depth_scale"] == 1.0 for c in chunks)  # metric depth is never rescaled
    assert long.meta["depth_aligned"] is False and long.meta["poses_from"] == "commanded"
    assert long.meta["frames"] == 20 and long.meta["steps"] == 1
    assert [c["stop"] for c in short.meta["chunks"]] == [16]
    assert long.meta["timings"]["total_s"] > 0


@pytest.fixture(scope="module")
def predicted(tiny_relative):
    """A 33-frame (2 chunks) predicted-pose rollout, and its chunk 1 replayed by hand from its frame 16."""
    clip = _clip(33, offset=2)
    rollout = rollout_long(tiny_relative, clip.rgb[0], clip.c2w, clip.k, steps=1, seed=11)
    request = RolloutRequest(id="replay", frames=33, image=clip.rgb[0], c2w=clip.c2w, k=clip.k,
                             steps=1, seed=11)
    chunk1 = chunk_request(request, 1, 16, rollout.rgb[16], clip.c2w, clip.k, 17)
    return clip, rollout, chunk1, tiny_relative.generate([chunk1])[0]


def test_predicted_chunks_condition_on_the_last_frame_and_compose_their_poses(predicted):
    clip, rollout, chunk1, replay = predicted
    assert rollout.frames == 33 and not rollout.depth_is_metric
    np.testing.assert_allclose(rollout.c2w[0], np.eye(4), atol=1e-6)
    assert geometry.is_rigid(rollout.c2w)
    np.testing.assert_allclose(chunk1.c2w, geometry.relative_to(clip.c2w[16:], 0), atol=1e-12)
    assert chunk1.seed == chunk_seed(11, 1) == rollout.meta["chunks"][1]["seed"]
    np.testing.assert_array_equal(rollout.rgb[17:], replay.rgb[1:])
    composed = rollout.c2w[16].astype(np.float64) @ replay.c2w.astype(np.float64)
    np.testing.assert_allclose(rollout.c2w[16:], composed, atol=1e-5)
    np.testing.assert_allclose(rollout.k[17:], replay.k[1:], rtol=1e-6)
    np.testing.assert_allclose(rollout.actions, pose_deltas(clip.c2w), atol=1e-5)


def test_relative_depth_is_aligned_on_the_overlap_frame(predicted):
    _, rollout, _, replay = predicted
    scale = rollout.meta["chunks"][1]["depth_scale"]
    assert rollout.meta["depth_aligned"] is True
    assert scale == pytest.approx(depth_scale(rollout.depth[16], replay.depth[0], far=FAR))
    assert abs(scale - 1.0) > 1e-4
    np.testing.assert_allclose(rollout.depth[17:], rescale_depth(replay.depth[1:], scale, far=FAR),
                               rtol=1e-6)


# -------------------------------------------------------------------------------------- preview
def _synthetic_rollout(frames: int = 9) -> Rollout:
    rng = np.random.default_rng(1)
    depth = np.broadcast_to(np.linspace(1.0, 30.0, 48)[None, :, None], (frames, 48, 64)).astype(np.float32)
    return Rollout(rgb=rng.integers(0, 256, (frames, 48, 64, 3), dtype=np.uint8), depth=depth.copy(),
                   depth_is_metric=True, k=geometry.intrinsics(48, 64, 70.0, frames).astype(np.float32),
                   c2w=np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1)),
                   actions=np.zeros((frames, 6), np.float32))


def test_colorize_depth_maps_near_to_the_top_of_the_colormap():
    from matplotlib import colormaps

    colours = colorize_depth(np.array([[1.0, 100.0]]), value_range=(0.01, 1.0), cmap="viridis")
    top, bottom = [(np.array(colormaps["viridis"](v)[:3]) * 255 + 0.5).astype(np.uint8) for v in (1.0, 0.0)]
    np.testing.assert_array_equal(colours[0, 0], top)
    np.testing.assert_array_equal(colours[0, 1], bottom)


def test_frame_indices_spread_over_the_clip():
    indices = frame_indices(113, 12)
    assert indices[0] == 0 and indices[-1] == 112 and len(indices) == 12
    np.testing.assert_array_equal(frame_indices(5, 12), np.arange(5))


def test_previews_are_written_and_readable(tmp_path):
    rollout = _synthetic_rollout()
    sheet, gif = write_preview(rollout, tmp_path, "sample", scale=3)
    assert sheet.name == "sample_sheet.png" and iio.imread(sheet).ndim == 3
    frames = iio.imread(gif, index=None)
    assert frames.shape[0] == rollout.frames and frames.shape[1:3] == (48 * 3, (64 * 2 + 2) * 3)
    sheet, gif = write_comparison(rollout, _synthetic_rollout(), tmp_path, "versus")
    frames = iio.imread(gif, index=None)
    assert frames.shape[1:3] == ((48 * 2 + 2) * 2, (64 * 2 + 2) * 2)

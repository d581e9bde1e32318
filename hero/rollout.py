"""Long rollouts: chain fixed-length prediction chunks into one rollout of any length.

World models such as Aether have no autoregressive mode, so a path of N frames is cut into chunks
of ``chunk_frames`` that overlap by one frame. Chunk k starts at global frame k * (chunk_frames - 1):
its image is the last frame generated so far, its camera path is the rest of the commanded path
re-expressed relative to that frame (:func:`hero.geometry.relative_to`), padded at the end by
continuing the last commanded motion. Stitching drops each chunk's frame 0 (it duplicates the
previous chunk's last frame), keeps relative depth on one scale (median ratio on the overlap frame)
and composes the chunk's camera poses onto the global pose of its first frame.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from hero import geometry
from hero.models.base import Rollout, RolloutRequest, WorldModel

POSE_SOURCES = ("predicted", "commanded")
DEPTH_ALIGNMENTS = ("auto", "median", "none")


@dataclass
class ChainConfig:
    """How a long rollout is chained.

    ``poses``: "predicted" composes the poses the model predicts for each chunk (so errors
    accumulate honestly); "commanded" composes the re-based commanded path (cameras and K then
    equal the command). ``align_depth``: "auto" aligns relative depth by a median ratio on each
    overlap frame and leaves metric depth alone; "median" always aligns; "none" never does.
    Pixels at or beyond ``far`` (sky) are left out of the ratio and never rescaled; None takes the
    model's ``spec.far`` when it has one.
    """

    chunk_frames: int = 17
    poses: str = "predicted"
    align_depth: str = "auto"
    far: float | None = None

    def __post_init__(self) -> None:
        if self.chunk_frames < 2:
            raise ValueError(f"ChainConfig.chunk_frames={self.chunk_frames} must be >= 2")
        if self.poses not in POSE_SOURCES:
            raise ValueError(f"ChainConfig.poses={self.poses!r} must be one of {POSE_SOURCES}")
        if self.align_depth not in DEPTH_ALIGNMENTS:
            raise ValueError(f"ChainConfig.align_depth={self.align_depth!r} must be one of "
                             f"{DEPTH_ALIGNMENTS}")


def chunk_starts(frames: int, chunk_frames: int) -> list[int]:
    """Global index of each chunk's first frame; consecutive chunks share one frame."""
    stride = chunk_frames - 1
    return list(range(0, max(frames - 1, 1), stride))


def chunk_seed(seed: int, index: int) -> int:
    """The sampling seed of chunk ``index``: the request's own seed for chunk 0, a derived one after."""
    if index == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), index]).generate_state(1)[0])


def extend_path(c2w: np.ndarray, frames: int) -> np.ndarray:
    """The path (at least ``frames`` long), continued past its end by repeating its last motion."""
    c2w = np.asarray(c2w, dtype=np.float64)
    if c2w.shape[0] >= frames:
        return c2w
    step = np.linalg.inv(c2w[-2]) @ c2w[-1] if c2w.shape[0] > 1 else np.eye(4)
    extra = [c2w[-1]]
    for _ in range(frames - c2w.shape[0]):
        extra.append(extra[-1] @ step)
    return np.concatenate([c2w, np.stack(extra[1:])])


def extend_intrinsics(k: np.ndarray, frames: int) -> np.ndarray:
    """Intrinsics (at least ``frames`` long), the last one repeated."""
    k = np.asarray(k, dtype=np.float64)
    if k.shape[0] >= frames:
        return k
    return np.concatenate([k, np.repeat(k[-1:], frames - k.shape[0], axis=0)])


def depth_scale(reference: np.ndarray, current: np.ndarray, far: float | None = None) -> float:
    """Median of reference / current over pixels finite, positive and nearer than ``far`` in both."""
    valid = np.isfinite(reference) & np.isfinite(current) & (reference > 0) & (current > 0)
    if far is not None:
        valid &= (reference < far) & (current < far)
    if not valid.any():
        return 1.0
    return float(np.median(reference[valid] / current[valid]))


def rescale_depth(depth: np.ndarray, scale: float, far: float | None = None) -> np.ndarray:
    """``depth * scale``, except pixels at or beyond ``far``, which keep their value."""
    scaled = depth * np.float32(scale)
    if far is None:
        return scaled.astype(np.float32)
    return np.where(depth >= far, depth, scaled).astype(np.float32)


def chunk_request(request: RolloutRequest, index: int, start: int, image: np.ndarray,
                  c2w: np.ndarray, k: np.ndarray, chunk_frames: int) -> RolloutRequest:
    """Chunk ``index`` of ``request``: ``image`` first, the (extended) path from ``start`` re-based on it."""
    window = slice(start, start + chunk_frames)
    return dataclasses.replace(
        request, id=f"{request.id}/chunk{index:03d}", frames=chunk_frames, image=image,
        c2w=geometry.relative_to(c2w[window], 0), k=k[window],
        seed=chunk_seed(request.seed, index), extra=dict(request.extra))


class _Chain:
    """The stitched state of one long request while its chunks are generated."""

    def __init__(self, request: RolloutRequest, default_k: np.ndarray, config: ChainConfig,
                 far: float | None) -> None:
        self.request, self.config, self.far = request, config, far
        self.starts = chunk_starts(request.frames, config.chunk_frames)
        padded = self.starts[-1] + config.chunk_frames
        self.c2w = extend_path(request.c2w, padded)
        self.k = extend_intrinsics(request.k if request.k is not None else default_k, padded)
        self.rgb: list[np.ndarray] = []
        self.depth: list[np.ndarray] = []
        self.poses: list[np.ndarray] = []
        self.ks: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.chunks: list[dict[str, Any]] = []
        self.requests: list[RolloutRequest] = []
        self.metric = True
        self.align = config.align_depth == "median"

    def next_request(self) -> RolloutRequest | None:
        index = len(self.chunks)
        if index == len(self.starts):
            return None
        image = self.request.image if index == 0 else self.rgb[-1][-1]
        chunk = chunk_request(self.request, index, self.starts[index], image, self.c2w, self.k,
                              self.config.chunk_frames)
        self.requests.append(chunk)
        return chunk

    def add(self, chunk: Rollout) -> None:
        """Stitch the rollout of the chunk last asked for onto what came before."""
        index, start = len(self.chunks), self.starts[len(self.chunks)]
        if index == 0:
            self.metric = chunk.depth_is_metric
            self.align = self.config.align_depth == "median" or (
                self.config.align_depth == "auto" and not self.metric)
        keep = slice(0 if index == 0 else 1, min(self.config.chunk_frames, self.request.frames - start))
        overlap_ratio = 1.0 if index == 0 else depth_scale(self.depth[-1][-1], chunk.depth[0], self.far)
        scale = overlap_ratio if self.align else 1.0
        if self.config.poses == "commanded":
            local_c2w, local_k = self.requests[index].c2w, self.requests[index].k
        else:
            local_c2w, local_k = chunk.c2w.astype(np.float64), chunk.k.astype(np.float64)
        anchor = np.eye(4) if index == 0 else self.poses[-1][-1]
        self.rgb.append(chunk.rgb[keep])
        self.depth.append(rescale_depth(chunk.depth[keep], scale, self.far))
        self.poses.append(anchor[None] @ local_c2w[keep])
        self.ks.append(local_k[keep])
        self.actions.append(chunk.actions[keep])
        self.chunks.append({
            "index": index, "start": start, "stop": start + keep.stop - 1,
            "seed": self.requests[index].seed, "depth_scale": scale,
            "overlap_depth_ratio": overlap_ratio,
            **{key: chunk.meta[key] for key in ("steps", "guidance", "timings") if key in chunk.meta}})

    def rollout(self, model: WorldModel) -> Rollout:
        c2w = np.concatenate(self.poses)
        timings = {"sampling_s": 0.0, "total_s": 0.0}
        for chunk in self.chunks:
            for key in timings:
                timings[key] += float(chunk.get("timings", {}).get(key, 0.0))
        first = self.chunks[0]
        return Rollout(
            rgb=np.concatenate(self.rgb), depth=np.concatenate(self.depth), depth_is_metric=self.metric,
            k=np.concatenate(self.ks).astype(np.float32), c2w=c2w.astype(np.float32),
            actions=np.concatenate(self.actions).astype(np.float32),
            meta={"model": model.name, "revision": model.revision, "seed": self.request.seed,
                  "task": "prediction", "frames": self.request.frames, "steps": first.get("steps"),
                  "guidance": first.get("guidance"), "chunk_frames": self.config.chunk_frames,
                  "poses_from": self.config.poses, "depth_aligned": self.align,
                  "commanded_c2w": np.asarray(self.request.c2w, np.float64).tolist(),
                  "chunks": self.chunks, "timings": timings})


def rollout_long_batch(model: WorldModel, requests: list[RolloutRequest],
                       config: ChainConfig | None = None) -> list[Rollout]:
    """Generate prediction requests of any length (``frames``, with a c2w path of that length).

    Chunks advance in lock-step: chunk k of every request that has one goes to ``model.generate``
    in one call, so the model batches them.
    """
    config = config or ChainConfig()
    if config.chunk_frames not in model.frame_options:
        raise ValueError(f"chunk_frames: {model.name} takes {model.frame_options}, "
                         f"got {config.chunk_frames}")
    far = config.far if config.far is not None else getattr(getattr(model, "spec", None), "far", None)
    chains = []
    for request in requests:
        _check(request)
        chains.append(_Chain(request, _default_k(model, request.frames), config, far))
    started = time.perf_counter()
    while True:
        pending = [(chain, chain.next_request()) for chain in chains]
        pending = [(chain, request) for chain, request in pending if request is not None]
        if not pending:
            break
        for (chain, _), chunk in zip(pending, model.generate([request for _, request in pending])):
            chain.add(chunk)
    rollouts = [chain.rollout(model) for chain in chains]
    for rollout in rollouts:
        rollout.meta["timings"]["wall_s"] = time.perf_counter() - started
    return rollouts


def generate_any_length(model: WorldModel, requests: list[RolloutRequest],
                        config: ChainConfig | None = None) -> list[Rollout]:
    """Requests of a length the model takes go to ``model.generate`` in one call; longer ones are
    chained (:func:`rollout_long_batch`). Results come back in the order of ``requests``."""
    chained = [i for i, r in enumerate(requests) if r.frames not in model.frame_options]
    direct = [i for i in range(len(requests)) if i not in chained]
    out: dict[int, Rollout] = {}
    if direct:
        out.update(zip(direct, model.generate([requests[i] for i in direct])))
    if chained:
        out.update(zip(chained, rollout_long_batch(model, [requests[i] for i in chained], config)))
    return [out[i] for i in range(len(requests))]


def rollout_long(model: WorldModel, first_image: np.ndarray, c2w: np.ndarray,
                 k: np.ndarray | None = None, *, config: ChainConfig | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 request_id: str = "long") -> Rollout:
    """One long prediction rollout from ``first_image`` along ``c2w`` (N, 4, 4); see :class:`ChainConfig`."""
    c2w = np.asarray(c2w, dtype=np.float64)
    request = RolloutRequest(id=request_id, task="prediction", frames=int(c2w.shape[0]),
                             image=first_image, c2w=c2w, k=k, steps=steps, guidance=guidance,
                             seed=seed)
    return rollout_long_batch(model, [request], config)[0]


def _default_k(model: WorldModel, frames: int) -> np.ndarray:
    """The model's own default intrinsics where it has them, else a 60-degree pinhole."""
    if hasattr(model, "default_k"):
        return model.default_k(frames)
    return geometry.intrinsics(model.height, model.width, 60.0, frames)


def _check(request: RolloutRequest) -> None:
    if request.task != "prediction":
        raise ValueError(f"task: long rollouts chain prediction chunks, request {request.id!r} "
                         f"has {request.task!r}")
    if request.image is None:
        raise ValueError(f"image: request {request.id!r} needs a first image")
    if request.c2w is None or np.shape(request.c2w) != (request.frames, 4, 4):
        raise ValueError(f"c2w: request {request.id!r} needs a ({request.frames}, 4, 4) camera path, "
                         f"got {None if request.c2w is None else np.shape(request.c2w)}")
    if request.frames < 2:
        raise ValueError(f"frames: request {request.id!r} asks for {request.frames}; need >= 2")
    if request.k is not None and np.shape(request.k)[0] < request.frames:
        raise ValueError(f"k: request {request.id!r} has {np.shape(request.k)[0]} intrinsics for "
                         f"{request.frames} frames")

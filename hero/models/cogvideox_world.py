"""The Aether-style world model on a CogVideoX transformer: one code path for Aether and toyworld.

Latent packing (Aether): per latent frame 56 channels = 16 RGB + 16 disparity (the same VAE) + 24
raymap (6-channel raymaps of 4 frames folded into channels); the condition adds 16 image + 24 action
raymap channels, so the transformer is 96 in / 56 out. Disparity enters as sqrt(disparity / dmax)
mapped to [-1, 1] and replicated over RGB. The tasks and the inputs each one is conditioned on
are :data:`hero.models.base.TASKS`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXTransformer3DModel,
)
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from hero import geometry
from hero.models.base import OBSERVED_AT, TASKS, ModelSpec, Rollout, RolloutRequest, pose_deltas

RGB_CHANNELS = 16
RAYMAP_CHANNELS = 6
# Where each part sits in the packed latents the transformer denoises (B, T', 56, h, w).
PARTS = {"rgb": slice(0, RGB_CHANNELS), "disparity": slice(RGB_CHANNELS, 2 * RGB_CHANNELS),
         "camera": slice(2 * RGB_CHANNELS, None)}


def latent_frames(frames: int, temporal: int) -> int:
    return (frames - 1) // temporal + 1


def fold_raymap(raymap: torch.Tensor, temporal: int) -> torch.Tensor:
    """(B, T, 6, h, w) -> (B, T', 6*temporal, h, w): pad with leading frames, fold groups into channels.

    Aether's folding: the padded sequence is split into ``temporal`` consecutive runs of T' frames
    and run j fills channels [6j, 6j + 6) of every latent frame.
    """
    batch, frames, channels, h, w = raymap.shape
    pad = (-frames) % temporal
    if pad:
        raymap = torch.cat([raymap[:, :pad], raymap], dim=1)
    folded = raymap.reshape(batch, temporal, -1, channels, h, w)
    return folded.permute(0, 2, 1, 3, 4, 5).reshape(batch, -1, temporal * channels, h, w)


def unfold_raymap(camera: torch.Tensor, frames: int, temporal: int) -> torch.Tensor:
    """Inverse of :func:`fold_raymap`: (B, T', 6*temporal, h, w) -> (B, frames, 6, h, w)."""
    batch, lat, _, h, w = camera.shape
    unfolded = camera.reshape(batch, lat, temporal, RAYMAP_CHANNELS, h, w).permute(0, 2, 1, 3, 4, 5)
    return unfolded.reshape(batch, temporal * lat, RAYMAP_CHANNELS, h, w)[:, -frames:]


def build_condition(task: str, image: torch.Tensor | None, goal: torch.Tensor | None,
                    video: torch.Tensor | None, camera: torch.Tensor | None,
                    shape: tuple[int, ...]) -> torch.Tensor:
    """Condition latents (B, T', 16 + 24, h, w) for ``task`` from encoded inputs (B, t, 16, h, w).

    Each observation the task declares (:data:`~hero.models.base.TASKS`) fills the latent frames
    it shows (:data:`~hero.models.base.OBSERVED_AT`: the first, the last or all); ``shape`` is
    the (B, T', C, h, w) of the clip's latents; absent parts are zeros.
    """
    batch, lat, _, h, w = shape
    encoded = {"image": image, "goal": goal, "video": video}
    visual = torch.zeros(batch, lat, RGB_CHANNELS, h, w, dtype=torch.float32)
    for name in TASKS[task].observations:
        latents = encoded[name]
        frames = {"first": slice(0, latents.shape[1]), "last": slice(lat - latents.shape[1], lat),
                  "all": slice(0, lat)}[OBSERVED_AT[name]]
        visual[:, frames] = latents.float()
    if camera is None:
        camera = torch.zeros(batch, lat, shape[2] - 2 * RGB_CHANNELS, h, w)
    return torch.cat([visual.to(camera.dtype), camera], dim=2)


def unconditional(task: str, condition: torch.Tensor) -> torch.Tensor:
    """The classifier-free-guidance negative: Aether drops the first image (prediction) or all images."""
    uncond = condition.clone()
    if task == "prediction":
        uncond[:, :1, :RGB_CHANNELS] = 0
    else:
        uncond[:, :, :RGB_CHANNELS] = 0
    return uncond


GUIDANCE_RAMPS = ("normalised", "pipeline")


def guidance_at(scale: float, timestep: float, train_steps: int, dynamic: bool,
                ramp: str = "normalised", steps: int | None = None) -> float:
    """The guidance scale at ``timestep``: constant, or a cosine ramp from 1 to 1 + ``scale``.

    ``ramp="normalised"`` runs the ramp over normalised time 1 - t / ``train_steps``;
    ``ramp="pipeline"`` evaluates it at (``steps`` - t) / ``steps`` as the CogVideoX and Aether
    pipelines do (t is the raw timestep, so the scale jumps between 1 and 1 + ``scale`` until the
    last few steps): AetherV1's published samples were drawn with it.
    """
    if not dynamic:
        return scale
    if ramp == "pipeline":
        progress = (steps - float(timestep)) / steps
    elif ramp == "normalised":
        progress = 1.0 - float(timestep) / train_steps
    else:
        raise ValueError(f"guidance_ramp: {ramp!r} is not one of {GUIDANCE_RAMPS}")
    return 1.0 + scale * (1.0 - math.cos(math.pi * progress ** 5.0)) / 2.0


def rotary_embedding(head_dim: int, grid_h: int, grid_w: int, frames: int,
                     time_scale: float = 1.0, device: str | torch.device | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoX's 3-D rotary embedding (cos, sin), each (frames * grid_h * grid_w, head_dim).

    Equal to diffusers' ``get_3d_rotary_pos_embed`` over the full grid when ``time_scale`` is 1;
    otherwise temporal positions are multiplied by ``time_scale`` (Aether's base fps / fps).
    """
    sizes = (frames, grid_h, grid_w)
    dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    positions = [torch.linspace(0, n - 1, n, device=device, dtype=torch.float32) for n in sizes]
    positions[0] = positions[0] * time_scale
    freqs = [get_1d_rotary_pos_embed(d, p, use_real=True) for d, p in zip(dims, positions)]

    def combine(parts: list[torch.Tensor]) -> torch.Tensor:
        t, h, w = parts
        grid = (frames, grid_h, grid_w)
        return torch.cat([t[:, None, None].expand(*grid, -1), h[None, :, None].expand(*grid, -1),
                          w[None, None].expand(*grid, -1)], dim=-1).reshape(-1, head_dim)

    return combine([f[0] for f in freqs]), combine([f[1] for f in freqs])


def _placed(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a module to ``device`` and cast it only when its dtype differs (casting warns in diffusers)."""
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval()


class CogVideoXWorldModel:
    """A :class:`~hero.models.base.WorldModel` from a CogVideoX VAE, transformer and scheduler."""

    def __init__(self, vae: AutoencoderKLCogVideoX, transformer: CogVideoXTransformer3DModel,
                 scheduler: CogVideoXDDIMScheduler | CogVideoXDPMScheduler,
                 prompt_embeds: torch.Tensor, spec: ModelSpec, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.vae = _placed(vae, device, dtype)
        self.transformer = _placed(transformer, device, dtype)
        self.scheduler = scheduler
        self.prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.current_timestep: float | None = None
        self.spatial = 2 ** (len(vae.config.block_out_channels) - 1)
        self.temporal = int(vae.config.temporal_compression_ratio)

    name = property(lambda self: self.spec.name)
    revision = property(lambda self: self.spec.revision)
    height = property(lambda self: self.spec.height)
    width = property(lambda self: self.spec.width)
    frame_options = property(lambda self: self.spec.frame_options)

    def default_steps(self, task: str) -> int:
        return self.spec.default_steps[task]

    @property
    def samples_stochastically(self) -> bool:
        """Whether the sampler adds fresh noise at every step (CogVideoX's DPM scheduler, Aether's)
        rather than following the deterministic DDIM trajectory from the initial noise."""
        return isinstance(self.scheduler, CogVideoXDPMScheduler)

    # ----------------------------------------------------------------- encoding
    def _vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def _standardisation(self, part: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The spec's per-channel mean and std of one part, shaped to broadcast over (B, T', C, h, w)."""
        if self.spec.latent_mean is None:
            return None
        as_channels = lambda values: torch.tensor(values, dtype=like.dtype, device=like.device)[
            PARTS[part]].view(-1, 1, 1)
        return as_channels(self.spec.latent_mean), as_channels(self.spec.latent_std)

    def standardise(self, latents: torch.Tensor, part: str) -> torch.Tensor:
        """Raw latents of ``part`` ("rgb", "disparity" or "camera") -> the transformer's units."""
        stats = self._standardisation(part, latents)
        return latents if stats is None else (latents - stats[0]) / stats[1]

    def unstandardise(self, latents: torch.Tensor, part: str) -> torch.Tensor:
        """Inverse of :meth:`standardise`."""
        stats = self._standardisation(part, latents)
        return latents if stats is None else latents * stats[1] + stats[0]

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, part: str = "rgb") -> torch.Tensor:
        """(B, T, 3, H, W) in [-1, 1] -> latents (B, T', 16, h, w) in the transformer's units
        (posterior mode; ``part`` is "rgb" or "disparity", which the spec may standardise apart)."""
        x = frames.to(self.device, self.dtype).permute(0, 2, 1, 3, 4)
        latents = self.vae.encode(x).latent_dist.mode()
        return self.standardise((latents * self._vae_scale()).permute(0, 2, 1, 3, 4).float(), part)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor, part: str = "rgb") -> torch.Tensor:
        """Latents (B, T', 16, h, w) in the transformer's units -> (B, T, 3, H, W) in [-1, 1]."""
        z = self.unstandardise(latents.float(), part) / self._vae_scale()
        z = z.permute(0, 2, 1, 3, 4).to(self.device, self.dtype)
        return self.vae.decode(z).sample.permute(0, 2, 1, 3, 4).float().clamp(-1, 1)

    def encode_camera(self, raymaps: torch.Tensor) -> torch.Tensor:
        """Raymaps (B, T, 6, h, w) -> camera latents (B, T', 6*temporal, h, w), folded as Aether folds them."""
        return self.standardise(fold_raymap(raymaps, self.temporal), "camera")

    def decode_camera(self, latents: torch.Tensor, frames: int) -> torch.Tensor:
        """Camera latents -> raymaps (B, frames, 6, h, w)."""
        return unfold_raymap(self.unstandardise(latents.float(), "camera"), frames, self.temporal)

    def raymap(self, c2w: np.ndarray, k: np.ndarray, dmax: float) -> torch.Tensor:
        """Raymaps (T, 6, h, w) at latent resolution for a camera path given at image resolution."""
        h, w = self.height // self.spatial, self.width // self.spatial
        k_latent = geometry.scale_intrinsics(k, 1.0 / self.spatial)
        return torch.from_numpy(geometry.poses_to_raymap(c2w, k_latent, h, w, dmax))

    def default_k(self, frames: int) -> np.ndarray:
        return geometry.intrinsics(self.height, self.width, self.spec.fov_x_deg, frames)

    # --------------------------------------------------------------- generation
    def generate(self, requests: list[RolloutRequest]) -> list[Rollout]:
        """Generate every request; requests that share task, frames, steps, guidance, fps and
        camera conditioning (whether a commanded path conditions them) are batched."""
        results: dict[int, Rollout] = {}
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            self._check(request)
            key = (request.task, request.frames, self._steps(request), self._guidance(request),
                   self._fps(request), self._follows_camera(request))
            groups.setdefault(key, []).append(i)
        for (task, frames, steps, guidance, fps, camera), members in groups.items():
            batch = [requests[i] for i in members]
            for i, rollout in zip(members, self._generate_batch(batch, task, frames, steps, guidance,
                                                                fps, camera)):
                results[i] = rollout
        return [results[i] for i in range(len(requests))]

    def _steps(self, request: RolloutRequest) -> int:
        return int(request.steps or self.spec.default_steps[request.task])

    def _guidance(self, request: RolloutRequest) -> float:
        return float(request.guidance if request.guidance is not None
                     else self.spec.default_guidance[request.task])

    def _fps(self, request: RolloutRequest) -> int:
        return int(request.extra.get("fps", self.spec.fps))

    @staticmethod
    def _follows_camera(request: RolloutRequest) -> bool:
        """Whether the request's commanded path conditions the model (its task follows the camera
        and it has one); a batch never mixes requests that differ here."""
        return TASKS[request.task].follows_camera and request.c2w is not None

    def _check(self, request: RolloutRequest) -> None:
        if request.task not in TASKS:
            raise ValueError(f"task: {request.task!r} is not one of {tuple(TASKS)}")
        if request.frames not in self.frame_options:
            raise ValueError(f"frames: {self.name} takes {self.frame_options}, got {request.frames}")
        fps_options = self.spec.fps_options or (self.spec.fps,)
        if self._fps(request) not in fps_options:
            raise ValueError(f"extra.fps: {self.name} takes {fps_options}, got {self._fps(request)} "
                             f"(request {request.id!r})")
        for name in TASKS[request.task].observations:
            if getattr(request, name) is None:
                raise ValueError(f"{name}: required for task {request.task!r}")

    def sampling_inputs(self, requests: list[RolloutRequest], task: str, frames: int, camera: bool
                ) -> tuple[torch.Tensor, list[np.ndarray | None], list[np.ndarray]]:
        """Condition latents for a batch (the task's observations, and the commanded paths when
        ``camera``), with each request's commanded path (None without one) and intrinsics."""
        lat = latent_frames(frames, self.temporal)
        h, w = self.height // self.spatial, self.width // self.spatial
        shape = (len(requests), lat, 56, h, w)
        as_video = lambda clips: torch.from_numpy(np.stack(clips)).float().div(127.5).sub(1).permute(0, 1, 4, 2, 3)
        clip = lambda name, value: value[:frames] if OBSERVED_AT[name] == "all" else value[None]
        encoded = {name: self.encode_video(as_video([clip(name, getattr(r, name)) for r in requests]))
                   for name in TASKS[task].observations}
        ks = [r.k[:frames] if r.k is not None else self.default_k(frames) for r in requests]
        poses = [r.c2w[:frames] if camera else None for r in requests]
        rays = None
        if camera:
            dmax = self.spec.metric_dmax or 1.0
            rays = self.encode_camera(torch.stack([self.raymap(p, k, dmax) for p, k in zip(poses, ks)]))
        condition = build_condition(task, encoded.get("image"), encoded.get("goal"),
                                    encoded.get("video"), rays, shape)
        return condition, poses, ks

    def _rotary(self, lat: int, fps: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        config = self.transformer.config
        if not config.use_rotary_positional_embeddings:
            return None
        grid_h = self.height // (self.spatial * config.patch_size)
        grid_w = self.width // (self.spatial * config.patch_size)
        time_scale = self.spec.fps / (fps or self.spec.fps)
        return rotary_embedding(config.attention_head_dim, grid_h, grid_w, lat, time_scale,
                                device=self.device)

    @torch.no_grad()
    def denoise(self, condition: torch.Tensor, task: str, steps: int, guidance: float,
                seeds: list[int], fps: int | None = None, noise: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The sampling loop: returns clean latents (B, T', 56, h, w).

        Every transformer call runs under ``cache_context`` so cache hooks see the step index;
        with guidance the [uncond, cond] halves are batched in one call ("cond_uncond"). Each row
        draws its initial noise, and the DPM solver's step noise, from its own seeded generator;
        ``noise`` (B, T', 56, h, w), when given, is the initial noise instead (to study how a
        sample depends on it).
        """
        batch, lat, _, h, w = condition.shape
        out_channels = self.transformer.config.out_channels
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        if noise is None:
            noise = torch.cat([torch.randn((1, lat, out_channels, h, w), generator=g) for g in generators])
        latents = (noise * self.scheduler.init_noise_sigma).to(self.device, self.dtype)
        condition = condition.to(self.device, self.dtype)
        use_cfg = guidance > 1.0
        if use_cfg:
            condition = torch.cat([unconditional(task, condition), condition])
        self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps
        rotary = self._rotary(lat, fps)
        text = self.prompt_embeds.expand(condition.shape[0], -1, -1)
        train_steps = self.scheduler.config.num_train_timesteps
        old_x0 = None
        for i, t in enumerate(timesteps):
            self.current_timestep = float(t)
            model_in = torch.cat([latents] * 2) if use_cfg else latents
            model_in = torch.cat([self.scheduler.scale_model_input(model_in, t), condition], dim=2)
            with self.transformer.cache_context("cond_uncond" if use_cfg else "cond", step_index=i,
                                                num_inference_steps=steps, timestep=t):
                pred = self.transformer(hidden_states=model_in, encoder_hidden_states=text,
                                        timestep=t.expand(model_in.shape[0]),
                                        image_rotary_emb=rotary, return_dict=False)[0].float()
            if use_cfg:
                uncond, cond = pred.chunk(2)
                scale = guidance_at(guidance, t, train_steps, self.spec.dynamic_guidance[task],
                                    self.spec.guidance_ramp, steps)
                pred = uncond + scale * (cond - uncond)
            if self.samples_stochastically:
                back = timesteps[i - 1] if i > 0 else None
                latents, old_x0 = self.scheduler.step(pred, old_x0, t, back, latents.float(),
                                                      generator=generators, return_dict=False)
            else:
                latents = self.scheduler.step(pred, t, latents.float(), return_dict=False)[0]
            latents = latents.to(self.dtype)
        self.current_timestep = None
        return latents.float()

    def _generate_batch(self, requests: list[RolloutRequest], task: str, frames: int, steps: int,
                        guidance: float, fps: int, camera: bool) -> list[Rollout]:
        started = time.perf_counter()
        condition, poses, ks = self.sampling_inputs(requests, task, frames, camera)
        latents = self.denoise(condition, task, steps, guidance, [r.seed for r in requests], fps)
        sampled = time.perf_counter()
        rgb = self.decode_video(latents[:, :, PARTS["rgb"]])[:, :frames]
        disparity = self.decode_video(latents[:, :, PARTS["disparity"]], "disparity")[:, :frames]
        camera = self.decode_camera(latents[:, :, PARTS["camera"]], frames)
        rollouts = []
        for b, request in enumerate(requests):
            rollouts.append(self._rollout(request, rgb[b], disparity[b], camera[b], poses[b], ks[b]))
            rollouts[-1].meta["timings"] = {
                "sampling_s": (sampled - started) / len(requests),
                "total_s": (time.perf_counter() - started) / len(requests)}
            rollouts[-1].meta.update(task=task, frames=frames, steps=steps, guidance=guidance,
                                     fps=fps)
        return rollouts

    def _rollout(self, request: RolloutRequest, rgb: torch.Tensor, disparity: torch.Tensor,
                 camera: torch.Tensor, commanded: np.ndarray | None, k: np.ndarray) -> Rollout:
        """Turn one batch row of decoded tensors into a :class:`Rollout` in world units."""
        dmax = self.spec.metric_dmax or 1.0
        image = ((rgb.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
        disp = (disparity.mean(dim=1) * 0.5 + 0.5).clamp(0, 1).cpu().numpy()
        depth = geometry.disparity_to_depth(disp, dmax, self.spec.far).astype(np.float32)
        c2w, k_latent = geometry.raymap_to_poses(camera.cpu().numpy(), dmax)
        c2w = geometry.relative_to(c2w, 0)
        k_pred = geometry.scale_intrinsics(k_latent, self.spatial)
        actions = pose_deltas(commanded if commanded is not None else c2w)
        return Rollout(
            rgb=image, depth=depth, depth_is_metric=self.spec.metric_dmax is not None,
            k=k_pred.astype(np.float32), c2w=c2w.astype(np.float32), actions=actions,
            meta={"model": self.name, "revision": self.revision, "seed": request.seed,
                  "commanded_c2w": None if commanded is None else commanded.tolist()})

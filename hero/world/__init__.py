"""The procedural 3-D world: seeded scenes, camera paths and a ray-cast renderer that knows the truth.

toyworld is trained on it, the evaluation scores every rollout against it, and manifests can name
its scenes as observations. It depends on :mod:`hero.geometry` only.
"""

from hero.world.clips import (
    CLIP_FRAMES,
    FOV_X_DEG,
    HEIGHT,
    HELDOUT_SEED_BASE,
    OBJECTS,
    WIDTH,
    Clip,
    clip_for_seed,
    render_clip,
    trajectory_for_seed,
)
from hero.world.scene import FAR, Frames, Scene, render
from hero.world.trajectory import MOTIONS, Trajectory

__all__ = ["CLIP_FRAMES", "FAR", "FOV_X_DEG", "HEIGHT", "HELDOUT_SEED_BASE", "MOTIONS", "OBJECTS",
           "WIDTH", "Clip", "Frames", "Scene", "Trajectory", "clip_for_seed", "render",
           "render_clip", "trajectory_for_seed"]

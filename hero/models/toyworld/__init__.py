"""toyworld: an Aether-shaped world model small enough to train on two CPU cores and ship in the package.

Same latent packing, tasks and sampling code as Aether (:mod:`hero.models.cogvideox_world`), a
CogVideoX VAE with 16 latent channels and 4x spatial / 4x temporal compression, and a 12-block
CogVideoX transformer, trained on the procedural world of :mod:`hero.world`.
Disparity is normalised by a fixed ``metric_dmax``, so depth and camera paths come out in metres.
"""

from hero.models.toyworld.model import (
    TOYWORLD_SPEC,
    WEIGHTS_DIR,
    build_components,
    load_tiny,
    load_toyworld,
)

__all__ = ["TOYWORLD_SPEC", "WEIGHTS_DIR", "build_components", "load_tiny", "load_toyworld"]

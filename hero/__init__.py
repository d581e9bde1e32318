"""HERO: training-free hierarchical extrapolation and refresh for diffusion world models.

``from hero import HeroConfig, apply_hero, remove_hero, hero_stats`` accelerates a diffusers video
transformer; ``hero.models`` holds the world models it accelerates (Aether, toyworld). Names are
imported lazily so light modules (``hero.geometry``) load without torch's model stack.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "HeroConfig": "hero.cache", "PRESETS": "hero.cache", "apply_hero": "hero.cache",
    "remove_hero": "hero.cache", "reset_hero": "hero.cache", "hero_stats": "hero.cache",
    "run_probe": "hero.cache", "load_model": "hero.models",
    "apply_accelerator": "hero.accelerators", "ACCELERATORS": "hero.accelerators",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hero' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""HERO (hierarchical extrapolation and refresh) as diffusers-style hooks; see ``docs/hero.md``.

``apply_hero(transformer_or_pipeline, HeroConfig.preset("default"))`` accelerates a diffusers video
transformer (CogVideoX/Aether, Wan) or a stock pipeline's; ``hero_stats`` reads what the latest
generation skipped and executed; ``remove_hero`` restores the model. ``run_probe`` measures feature
coupling and how well each block is forecast, and writes the calibration that
``HeroConfig(split="auto", calibration_path=...)`` reads (``split="auto"`` alone calibrates itself).
"""

from hero.cache.adapters import ADAPTERS, BlockAdapter, adapter_for, register_adapter
from hero.cache.calibration import load_calibration
from hero.cache.config import PRESETS, HeroConfig
from hero.cache.hooks import apply_hero, hero_stats, remove_hero, reset_hero
from hero.cache.probe import FeatureCouplingProbe, choose_split, run_probe
from hero.cache.schedule import StepMode, schedule

__all__ = ["ADAPTERS", "PRESETS", "BlockAdapter", "FeatureCouplingProbe", "HeroConfig", "StepMode",
           "adapter_for", "apply_hero", "choose_split", "hero_stats", "load_calibration",
           "register_adapter", "remove_hero", "reset_hero", "run_probe", "schedule"]

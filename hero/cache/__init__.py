"""HERO (hierarchical extrapolation and refresh) as diffusers-style hooks; see ``docs/hero.md``.

``apply_hero(transformer, HeroConfig.preset("default"))`` accelerates a diffusers video
transformer (CogVideoX/Aether, Wan); ``hero_stats`` reads what the latest generation skipped and
executed; ``remove_hero`` restores the model. ``run_probe`` measures feature coupling and writes the
calibration that ``HeroConfig(split="auto", calibration_path=...)`` reads.
"""

from hero.cache.adapters import ADAPTERS, BlockAdapter, adapter_for, register_adapter
from hero.cache.config import PRESETS, HeroConfig, load_calibration
from hero.cache.hooks import apply_hero, hero_stats, remove_hero, reset_hero
from hero.cache.probe import FeatureCouplingProbe, choose_split, run_probe
from hero.cache.schedule import StepMode, schedule, step_mode

__all__ = ["ADAPTERS", "PRESETS", "BlockAdapter", "FeatureCouplingProbe", "HeroConfig", "StepMode",
           "adapter_for", "apply_hero", "choose_split", "hero_stats", "load_calibration",
           "register_adapter", "remove_hero", "reset_hero", "run_probe", "schedule", "step_mode"]

"""Classic training-free caches, implemented here as diffusers hooks to compare HERO against.

:mod:`~hero.baselines.fora` reuses whole blocks between FULL steps (FORA);
:mod:`~hero.baselines.toca` refreshes a scored fraction of tokens in every block (ToCa / DuCa).
"""

from hero.baselines.fora import FORA_PRESETS, ForaConfig, apply_fora, fora_stats, remove_fora
from hero.baselines.toca import TOCA_PRESETS, TocaConfig, apply_toca, remove_toca, toca_stats

__all__ = ["FORA_PRESETS", "TOCA_PRESETS", "ForaConfig", "TocaConfig", "apply_fora", "apply_toca",
           "fora_stats", "remove_fora", "remove_toca", "toca_stats"]

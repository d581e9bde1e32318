"""Scoring world models against the procedural world's rendered truth (``python -m hero.evaluation``).

:mod:`~hero.evaluation.heldout` (17-frame prediction on held-out scenes against the truth and the
repeat-first-frame baseline), :mod:`~hero.evaluation.drift` (long chained rollouts, per chunk),
:mod:`~hero.evaluation.sensitivity` (how much samples depend on the step count), all scored by
:mod:`~hero.evaluation.scoring` with 95% confidence intervals over scenes.
"""

from hero.evaluation.heldout import EvalConfig, Evaluation, evaluate, heldout_request
from hero.evaluation.scoring import METRICS, baseline_rollout, score_against_truth

__all__ = ["METRICS", "EvalConfig", "Evaluation", "baseline_rollout", "evaluate", "heldout_request",
           "score_against_truth"]

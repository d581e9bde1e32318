"""Score a world model against the rendered truth: ``python -m hero.evaluation {heldout,drift,sensitivity,all}``.

    python -m hero.evaluation heldout --scenes 32 --out docs/toyworld/heldout
    python -m hero.evaluation drift --scenes 4 --frames 113 --out docs/toyworld/drift
    python -m hero.evaluation sensitivity --scenes 8 --noise-seeds 4 --out docs/toyworld/sensitivity
    python -m hero.evaluation all --out docs/toyworld         # all three into one folder

Each writes ``<out>.json`` and ``<out>.md``; held-out adds a contact sheet (``<out>_sheet.png``),
drift its plot (``<out>.png``) and a preview of its first scene (``<out>_sheet.png``, ``<out>.gif``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from hero.evaluation.drift import LongEvalConfig, evaluate_long, long_markdown, plot_drift
from hero.evaluation.heldout import EvalConfig, Evaluation, evaluate, heldout_markdown, write_heldout_sheet
from hero.evaluation.scoring import json_safe
from hero.evaluation.sensitivity import SensitivityConfig, evaluate_sensitivity, sensitivity_markdown
from hero.models.base import WorldModel

KINDS = ("heldout", "drift", "sensitivity")


def apply_accel(model: WorldModel, accel: str) -> None:
    """Accelerate ``model`` in place: "none", "hero" or "hero:<preset>" (HERO's named presets)."""
    name, _, preset = accel.partition(":")
    if name == "none":
        return
    if name != "hero":
        raise ValueError(f"accel: unknown {accel!r}; use none, hero or hero:<preset>")
    from hero import HeroConfig, apply_hero

    apply_hero(model.transformer, HeroConfig.preset(preset or "default"))


def build_model(name: str, weights: str | None, accel: str, device: str = "cpu") -> WorldModel:
    """The named model ("tiny" or "toyworld") on ``device``, accelerated as asked."""
    from hero.models import load_model

    if name not in ("tiny", "toyworld"):
        raise ValueError(f"model: {name!r} has no rendered truth; use tiny or toyworld")
    model = load_model(name, device=device, **({"weights": weights} if weights else {}))
    apply_accel(model, accel)
    return model


def run(kind: str, model: WorldModel, args: argparse.Namespace) -> Evaluation:
    """One evaluation of ``kind`` with the command line's options."""
    common = dict(seed_offset=args.seed_offset, steps=args.steps, guidance=args.guidance,
                  sample_seed=args.sample_seed, batch_size=args.batch_size)
    if kind == "heldout":
        return evaluate(model, EvalConfig(scenes=args.scenes or 32, **common), args.accel, keep_rollouts=True)
    if kind == "drift":
        config = LongEvalConfig(scenes=args.scenes or 4, frames=args.frames, poses=args.poses, **common)
        return evaluate_long(model, config, args.accel, keep_rollouts=True)
    config = SensitivityConfig(scenes=args.scenes or 8, noise_seeds=args.noise_seeds, **common)
    return evaluate_sensitivity(model, config, args.accel)


def write_outputs(kind: str, result: Evaluation, out: Path) -> list[Path]:
    """``<out>.json`` and ``<out>.md``, plus the kind's pictures."""
    from hero.preview import write_comparison

    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = {"heldout": heldout_markdown, "drift": long_markdown, "sensitivity": sensitivity_markdown}[kind]
    written = [out.with_suffix(".json"), out.with_suffix(".md")]
    written[0].write_text(json.dumps(json_safe(result.to_json()), indent=1, allow_nan=False) + "\n")
    written[1].write_text(markdown(result))
    if kind == "heldout":
        written.append(write_heldout_sheet(result, out.parent / f"{out.name}_sheet.png"))
    if kind == "drift":
        written.append(plot_drift(result, out.with_suffix(".png")))
        written += write_comparison(result.rollouts[0], result.truths[0], out.parent, out.name)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hero.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS + ("all",))
    parser.add_argument("--model", choices=("tiny", "toyworld"), default="toyworld")
    parser.add_argument("--weights", default=None, help="toyworld weights dir (default: the shipped ones)")
    parser.add_argument("--accel", default="none", help="none, hero or hero:<preset>")
    parser.add_argument("--scenes", type=int, default=None,
                        help="held-out scenes (default: heldout 32, drift 4, sensitivity 8)")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--frames", type=int, default=113, help="drift: rollout length")
    parser.add_argument("--poses", choices=("predicted", "commanded"), default="predicted")
    parser.add_argument("--noise-seeds", type=int, default=4, help="sensitivity: noise seeds per scene")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True,
                        help="output path without suffix (with `all`: a folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.weights, args.accel, args.device)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    written = []
    for kind in kinds:
        out = args.out / kind if args.kind == "all" else args.out
        written += write_outputs(kind, run(kind, model, args), out)
        print(out.with_suffix(".md").read_text())
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()

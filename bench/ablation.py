"""HERO's parts one at a time on the trained toyworld: what each saves and what it costs.

    python -m bench.ablation [--scenes 4] [--out docs/bench]

Variants of the default preset, each scored as ``bench.accel`` scores a method (counted FLOPs of
the sampling loop, PSNR/SSIM/AbsRel against full compute, the PSNR drop against the rendered
truth, cache bytes): refresh only (every block shallow, nothing extrapolated), extrapolation
only (every block deep: PARTIAL steps extrapolate the whole stack), the split the
feature-coupling probe picks on this model instead of a third of the blocks, keys/values
recomputed instead of cached, and rate-of-change tracking. Writes ``<out>/ablation.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from bench.accel import coupling_profile, method_row, profile_method
from bench.methods import Method
from bench.report import json_safe, mib, number_text, psnr_text, speedup_text
from bench.workloads import toyworld_workload

log = logging.getLogger("bench.ablation")

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "hero (default)": ("the default preset: refresh shallow, extrapolate deep, cached keys/values",
                       {}),
    "refresh only": ("every block shallow (patch-wise refresh), nothing extrapolated",
                     {"shallow_fraction": 1.0}),
    "extrapolation only": ("every block deep: PARTIAL steps extrapolate the whole stack",
                           {"shallow_fraction": 0.0}),
    "recompute keys/values": ("keys/values of every token recomputed on PARTIAL steps",
                              {"kv_mode": "recompute_kv"}),
    "rate tracking": ("tokens with the largest expected drift refreshed first",
                      {"selection": "drift"}),
}


def run(scenes: int, out: Path, steps: int | None = None, model_name: str | None = None
        ) -> dict[str, Any]:
    """Profile full compute and every variant on ``scenes`` held-out toyworld scenes (``steps``
    None: the model's default; ``model_name`` None: the trained toyworld)."""
    workload = toyworld_workload(scenes, steps, model_name=model_name)
    device = torch.device("cpu")
    coupling = coupling_profile(workload)
    variants = {**VARIANTS, "probe's split": (
        f"k = {coupling['split']} shallow blocks, chosen by the feature-coupling probe",
        {"split": coupling["split"]})}
    full = Method("full", "full")
    reference = profile_method(workload, full, device)
    rows = {"full": method_row(full, reference, reference, workload)}
    for label, (meaning, options) in variants.items():
        log.info("profiling %s", label)
        method = Method(label, "hero", "hero", options)
        rows[label] = method_row(method, profile_method(workload, method, device), reference,
                                 workload)
        rows[label]["meaning"] = meaning
    result = {"info": workload.info, "steps": workload.steps, "guidance": workload.guidance,
              "coupling": coupling, "variants": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    (out / "ablation.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    info = result["info"]
    lines = [f"HERO ablation on `{info['model']}` (revision `{info['revision']}`), "
             f"{info['scenes']} held-out scenes, {result['steps']} steps, guidance "
             f"{result['guidance']}: `python -m bench.ablation --scenes {info['scenes']}`", "",
             "| variant | what changes | FLOPs reduction | PSNR vs full (dB) | SSIM vs full | "
             "depth AbsRel vs full | PSNR drop vs truth (dB) | latent rel. error | cache (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, row in result["variants"].items():
        if label == "full":
            continue
        quality = row["quality"]
        vs_full = quality["vs_full"]
        cells = [label, row["meaning"], speedup_text(row["flops_speedup"]), psnr_text(vs_full),
                 number_text(vs_full["ssim"], 4), number_text(vs_full["abs_rel"], 4),
                 number_text(quality["psnr_drop_vs_truth"]), number_text(row["latent_rel_err"], 4),
                 number_text(mib(row["cache_bytes"]), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=4, help="held-out toyworld scenes")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder of the results")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (model default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.scenes, args.out, args.steps)
    print(markdown(result))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()

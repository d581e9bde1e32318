"""HERO's parts one at a time, and its schedules side by side, on the trained toyworld: what each
saves and what it costs. The presets in ``hero.cache.config.PRESETS`` are read off this page.

    python -m bench.ablation [--scenes 8] [--part parts|schedules|orders|all] [--out docs/bench]

*Parts*: the default preset with one thing changed: the deep stack's whole residual forecast
instead of its blocks' pre-gate features, one shallow block refreshed (the probe picks none on
a flat profile), no deep extrapolation (every block refreshed), the shallow block's stale tokens
forecast to first order instead of reused, the paper's third of the blocks shallow instead of the
probe's split, step positions instead of timesteps, two warm-up steps, keys/values recomputed.
*Schedules*: the default preset's parts at every interval from 2 to 8, static, and verified (the
schedule checks itself: a PARTIAL step whose refreshed tokens find the forecast off by more than
the threshold makes the next step FULL) at longer intervals, so a verified schedule can be compared
with the static one of equal FLOPs. Each row is scored as ``bench.accel`` scores a method (counted
FLOPs of the sampling loop, PSNR/SSIM/AbsRel against full compute with 95% intervals over scenes,
the PSNR drop against the rendered truth, cache bytes). *Orders*: the deep forecast's polynomial
order 1, 2 and 3 at every static interval (each order keeps one more tensor per sub-layer).
Writes ``<out>/ablation.json``, ``.md`` and the plots ``ablation_schedules.png`` (static and
verified) and ``ablation_orders.png`` (one line per order), quality against FLOPs reduction; a
single ``--part`` writes ``ablation_<part>.*`` instead, leaving the other pages as they are.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from bench import command_line
from bench.accel import coupling_profile, method_row, profile_method
from bench.methods import Method
from bench.report import ci_text, json_safe, mib, pareto_front, quality_cells, speedup_text
from bench.workloads import toyworld_workload

log = logging.getLogger("bench.ablation")

PARTS: dict[str, tuple[str, dict[str, Any]]] = {
    "hero (default)": ("the default preset: the deep blocks' features extrapolated before their "
                       "gates, the probe's split (no shallow block on a flat profile)", {}),
    "residual forecast": ("the deep stack's whole residual extrapolated (gates of the FULL "
                          "steps) instead of its blocks' features", {"deep_forecast": "residual"}),
    "shallow refresh": ("one shallow block refreshing a quarter of its tokens (the rest reuse "
                        "their residual)", {"split": 1}),
    "no deep extrapolation": ("every block shallow: PARTIAL steps refresh a quarter of every "
                              "block's tokens", {"split": None, "shallow_fraction": 1.0}),
    "shallow forecast": ("one shallow block, its stale tokens forecast to first order instead "
                         "of reused", {"split": 1, "shallow_forecast": "linear"}),
    "paper's split": ("a third of the blocks shallow, not the probe's split",
                      {"split": None, "shallow_fraction": 1 / 3}),
    "step positions": ("forecasts in step index instead of timestep", {"positions": "step"}),
    "two warm-up steps": ("two FULL steps first: the first forecast extrapolates their slope",
                          {"warmup_steps": 2}),
    "recompute keys/values": ("one shallow block, keys/values of every token recomputed on "
                              "PARTIAL steps", {"split": 1, "kv_mode": "recompute_kv"}),
}
STATIC_INTERVALS = (2, 3, 4, 5, 6, 8)
VERIFIED = ((4, 0.3), (6, 0.3), (8, 0.1), (8, 0.2), (8, 0.5))
ORDERS = (1, 2, 3)
GROUPS = ("parts", "schedules", "orders")


def schedule_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """Static schedules at every interval and verified ones, all with the default preset's parts."""
    variants = {f"static, interval {i}": (f"a FULL step every {i} steps", {"interval": i})
                for i in STATIC_INTERVALS}
    for interval, threshold in VERIFIED:
        variants[f"verified, interval {interval}, threshold {threshold}"] = (
            f"a FULL step at the latest every {interval} steps, and after any PARTIAL step "
            f"whose refreshed tokens drift by more than {threshold}",
            {"interval": interval, "verify_threshold": threshold})
    return variants


def order_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """The deep forecast at every order and static interval, with the default preset's parts."""
    return {f"order {order}, interval {i}": (
        f"a FULL step every {i} steps, the polynomial of degree {order} through the last "
        f"{order + 1} FULL steps", {"interval": i, "forecast_order": order})
        for order in ORDERS for i in STATIC_INTERVALS}


def run(scenes: int, out: Path, steps: int | None = None, model_name: str | None = None,
        part: str = "all", weights: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Profile full compute and every variant on ``scenes`` held-out toyworld scenes (``steps``
    None: the model's default; ``model_name`` None: the trained toyworld, from ``weights`` when
    given). ``command`` is quoted on the page (None: the equivalent command line)."""
    workload = toyworld_workload(scenes, steps, model_name=model_name, weights=weights)
    device = torch.device("cpu")
    coupling = coupling_profile(workload)
    groups = {"parts": PARTS, "schedules": schedule_variants(), "orders": order_variants()}
    full = Method("full", "full")
    reference = profile_method(workload, full, device)
    command = command or command_line("bench.ablation", [
        "--scenes", str(scenes), "--part", part, *(["--steps", str(steps)] if steps else []),
        *(["--weights", weights] if weights else [])])
    result: dict[str, Any] = {"command": command, "info": workload.info, "steps": workload.steps,
                              "guidance": workload.guidance, "coupling": coupling,
                              "full": method_row(full, reference, reference, workload)}
    for group in (GROUPS if part == "all" else (part,)):
        rows = result[group] = {}
        for label, (meaning, options) in groups[group].items():
            log.info("profiling %s", label)
            method = Method(label, "hero", "hero", options)
            rows[label] = method_row(method, profile_method(workload, method, device), reference,
                                     workload)
            rows[label]["meaning"] = meaning
    out.mkdir(parents=True, exist_ok=True)
    stem = "ablation" if part == "all" else f"ablation_{part}"
    (out / f"{stem}.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result, part))
    for group in ("schedules", "orders"):
        if group in result:
            quality_plot(result[group], out / f"ablation_{group}.png")
    return result


def markdown(result: dict[str, Any], part: str = "all") -> str:
    info = result["info"]
    lines = [f"HERO ablation on `{info['model']}` (revision `{info['revision']}`), "
             f"{info['scenes']} held-out scenes, {result['steps']} steps, guidance "
             f"{result['guidance']}: `{result['command']}`. Quality: mean over scenes ± the 95% interval of the mean.", ""]
    for group in GROUPS:
        if group not in result:
            continue
        lines += [f"## {group}", "",
                  "| variant | what changes | FLOPs reduction | full / partial steps | PSNR vs full "
                  "(dB) | SSIM vs full | depth AbsRel vs full | PSNR drop vs truth (dB) | latent "
                  "rel. error | cache (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for label, row in result[group].items():
            stats = row["stats"]
            cells = [label, row["meaning"], speedup_text(row["flops_speedup"]),
                     f"{stats.get('full_steps')} / {stats.get('partial_steps')}",
                     *quality_cells(row["quality"]), ci_text(row["latent_rel_err"], None, 4),
                     ci_text(mib(row["cache_bytes"]), None, 1)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def quality_plot(rows: dict[str, Any], path: Path) -> Path:
    """PSNR against full compute versus FLOPs reduction, one line per series (a label's part
    before its first comma: "static"/"verified", or "order n"), each point named by the rest of
    its label; the Pareto front of all in gray."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    series: dict[str, list[tuple[float, float, str]]] = {}
    for label, row in rows.items():
        if row["quality"]["vs_full"]["psnr"] is not None:
            series.setdefault(label.split(",")[0], []).append(
                (row["flops_speedup"], row["quality"]["vs_full"]["psnr"], label))
    for name, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points],
                "s" if name == "verified" else "o-", label=name)
        for x, y, label in points:
            ax.annotate(label.split(", ", 1)[1], (x, y), textcoords="offset points",
                        xytext=(4, 3), fontsize=6)
    front = pareto_front([(row["flops_speedup"], row["quality"]["vs_full"]["psnr"])
                          for row in rows.values() if row["quality"]["vs_full"]["psnr"]])
    ax.plot(*zip(*front), color="gray", alpha=0.3, linewidth=3, zorder=0)
    ax.set_xlabel("FLOPs reduction on toyworld (x)")
    ax.set_ylabel("RGB PSNR vs full compute (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=8, help="held-out toyworld scenes")
    parser.add_argument("--part", choices=(*GROUPS, "all"), default="all")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder of the results")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (model default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--weights", default=None,
                        help="an exported toyworld folder (default: the shipped weights)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.scenes, args.out, args.steps, part=args.part, weights=args.weights,
                 command=command_line("bench.ablation"))
    print(markdown(result, args.part))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()

"""Turning a benchmark result into files: JSON of every figure, markdown tables, the speed-quality
Pareto plot, per-block feature-coupling plots, and the summary section of ``docs/benchmarks.md``."""

from __future__ import annotations

import datetime
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from bench.quality import paired_difference
from hero.cache.probe import plot_profile

MIB = 2 ** 20
TARGET_SPEEDUP = 2.0  # HERO default, both speed measures (issue 12; 2.5 is the stretch goal)
TARGET_TURBO = 3.5  # hero-turbo, wall-clock
TARGET_PSNR_DROP = 0.3
SPEED_WORKLOAD, QUALITY_WORKLOAD = "aether-shaped", "toyworld"
NO_SPEEDUP = "NO SPEEDUP"
IDLE_FLOPS = 1.005  # a FLOPs reduction below this on both workloads: nothing was skipped


# ------------------------------------------------------------------------------------ judgements
def claims(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and verdict."""
    speed = result["workloads"][SPEED_WORKLOAD]["methods"]
    toy = result["workloads"][QUALITY_WORKLOAD]
    rows = []
    if "hero" in speed:
        rows.append(_claim("HERO default: wall-clock speedup of sampling, Aether-shaped",
                           speed["hero"]["speedup"], ">=", TARGET_SPEEDUP))
        rows.append(_claim("HERO default: FLOPs reduction (full / executed), Aether-shaped",
                           speed["hero"]["flops_speedup"], ">=", TARGET_SPEEDUP))
    hero_toy = toy["methods"].get("hero")
    if hero_toy is not None and "quality" in hero_toy:
        note = None if toy["info"].get("trained") else "toyworld weights absent: random tiny model"
        drop_ci = hero_toy["quality"].get("psnr_drop_vs_truth_ci")
        rows.append(_claim("HERO default: PSNR drop against the rendered truth (dB), toyworld",
                           hero_toy["quality"]["psnr_drop_vs_truth"], "<", TARGET_PSNR_DROP,
                           note or (f"95% interval ±{drop_ci:.2f}" if drop_ci else None)))
    if "hero-turbo" in speed:
        rows.append(_claim("hero-turbo: wall-clock speedup of sampling, Aether-shaped",
                           speed["hero-turbo"]["speedup"], ">=", TARGET_TURBO))
    if result.get("verdicts"):
        unbeaten = sorted(n for n, text in result["verdicts"].items() if text.startswith("NOT"))
        idle = sorted(n for n, text in result["verdicts"].items() if text.startswith(NO_SPEEDUP))
        notes = ([", ".join(unbeaten)] if unbeaten else []) + \
            ([f"not accelerators here (skipped nothing): {', '.join(idle)}"] if idle else [])
        rows.append({"claim": "methods no HERO preset beats (quality at equal or higher speed) = 0",
                     "value": len(unbeaten), "target": 0, "met": not unbeaten,
                     "note": "; ".join(notes) or None})
    return rows


def _claim(name: str, value: float | None, op: str, target: float, note: str | None = None
           ) -> dict[str, Any]:
    met = None if value is None else (value >= target if op == ">=" else value < target)
    return {"claim": f"{name} {op} {target:g}", "value": value, "target": target, "met": met,
            "note": note}


def verdicts(result: dict[str, Any]) -> dict[str, str]:
    """For every other method: the HERO preset at least as fast on both speed measures with the
    best quality, when its quality is higher (with the paired per-scene PSNR difference and its
    95% interval), or a plain statement that none is. A method that skipped no computation on
    either workload (its output is full compute's) is said to be no accelerator here instead: no
    approximation can beat it on quality, and it is not faster than full compute."""
    speed = result["workloads"][SPEED_WORKLOAD]["methods"]
    toy = result["workloads"][QUALITY_WORKLOAD]["methods"]
    heroes = [n for n, row in toy.items() if row["family"] == "hero" and n in speed]
    out = {}
    for name, row in toy.items():
        if row["family"] in ("hero", "full") or "quality" not in row \
                or wall_speedup(name, speed, toy) is None:
            continue
        mine = _point(name, speed, toy)
        shaped_flops = speed.get(name, {}).get("flops_speedup") or mine["flops"]
        if max(mine["flops"], shaped_flops) < IDLE_FLOPS:
            out[name] = (f"{NO_SPEEDUP}: {name} skipped no computation on either workload "
                         f"({mine['flops']:.2f}x fewer FLOPs on toyworld, {shaped_flops:.2f}x "
                         f"Aether-shaped): its output is full compute's, and its "
                         f"{mine['wall']:.2f}x wall-clock is no speedup")
            continue
        faster = [h for h in heroes if _point(h, speed, toy)["wall"] >= mine["wall"]
                  and _point(h, speed, toy)["flops"] >= mine["flops"]]
        if not faster:
            out[name] = (f"NOT beaten by HERO: no HERO preset is as fast ({name}: "
                         f"{mine['wall']:.2f}x wall-clock, {mine['flops']:.2f}x fewer FLOPs, "
                         f"PSNR {_db(mine['psnr'])})")
            continue
        best = max(faster, key=lambda h: _point(h, speed, toy)["psnr"])
        theirs = _point(best, speed, toy)
        if theirs["psnr"] <= mine["psnr"]:
            out[name] = (f"NOT beaten by HERO: every HERO preset as fast has lower quality "
                         f"({best}: PSNR {_db(theirs['psnr'])} vs {_db(mine['psnr'])})")
            continue
        difference, ci = paired_difference(_scene_psnr(toy[best]), _scene_psnr(row))
        paired = "" if difference is None else \
            f"; per scene {difference:+.2f} ± {ci or 0:.2f} dB"
        out[name] = (f"HERO ({best}) is better: PSNR {_db(theirs['psnr'])} vs {_db(mine['psnr'])}"
                     f"{paired} at {theirs['wall']:.2f}x vs {mine['wall']:.2f}x wall-clock and "
                     f"{theirs['flops']:.2f}x vs {mine['flops']:.2f}x fewer FLOPs")
    return out


def _scene_psnr(row: dict[str, Any]) -> list[float]:
    return row["quality"]["vs_full"]["scenes"]["psnr"]


def _point(name: str, speed: dict[str, Any], toy: dict[str, Any]) -> dict[str, float]:
    """Speed and quality of a method: wall-clock speedup on the Aether-shaped transformer (its
    FLOPs reduction when untimed), FLOPs reduction and PSNR against full compute on toyworld."""
    return {"wall": wall_speedup(name, speed, toy), "flops": toy[name]["flops_speedup"],
            "psnr": _finite(toy[name]["quality"]["vs_full"]["psnr"], math.inf)}


def wall_speedup(name: str, speed: dict[str, Any], toy: dict[str, Any]) -> float | None:
    """Aether-shaped wall-clock speedup; for fewer-steps rows, whose step counts are per workload,
    toyworld's step ratio (a loop of n steps costs n/S of S steps on any model)."""
    if toy[name]["family"] == "steps":
        return toy[name]["flops_speedup"]
    shaped = speed.get(name)
    if shaped is None:
        return None
    return shaped["speedup"] if shaped["speedup"] is not None else shaped["flops_speedup"]


def _finite(value: float | None, default: float) -> float:
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _db(value: float) -> str:
    return "exact" if math.isinf(value) else f"{value:.2f} dB"


# ---------------------------------------------------------------------------------------- files
def write_all(result: dict[str, Any], out: Path, summary: Path | None) -> list[Path]:
    """``<out>/<stem>.json`` / ``.md`` / ``_pareto.png`` / ``_coupling_<workload>.png``; summary."""
    stem = "accel_quick" if result["settings"]["mode"] == "quick" else "accel"
    out.mkdir(parents=True, exist_ok=True)
    result["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    written = []
    for name, workload in result["workloads"].items():
        coupling = workload["coupling"]
        written.append(plot_profile(out / f"{stem}_coupling_{name}.png", coupling["profile"],
                                    coupling["split"],
                                    f"feature coupling, {name}: split {coupling['split']} of "
                                    f"{len(coupling['profile'])} blocks (probe)"))
    written.append(pareto_plot(result, out / f"{stem}_pareto.png"))
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown(result, stem))
    written += [json_path, md_path]
    if summary is not None:
        written.append(update_summary(summary, result, out, stem))
    return written


def json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become null, tensors lists, other objects their repr."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return repr(value)


def markdown(result: dict[str, Any], stem: str) -> str:
    """Every workload's full table, the claims and the verdicts."""
    lines = [f"# Accelerator benchmark ({result['settings']['mode']})", "",
             f"Command: `{result['command']}`", "", _machine_line(result), ""]
    lines += claims_table(result) + [""] + summary_table(result) + [""]
    for name, workload in result["workloads"].items():
        lines += [f"## {name}", "", _workload_line(name, workload), ""]
        lines += workload_table(workload) + [""]
    lines += [f"![speed-quality Pareto]({stem}_pareto.png)", ""]
    for name in result["workloads"]:
        lines += [f"![feature coupling, {name}]({stem}_coupling_{name}.png)", ""]
    return "\n".join(lines)


def claims_table(result: dict[str, Any]) -> list[str]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for row in result["claims"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"| {row['claim']} | {number_text(row['value'])} | {met}{note} |")
    return lines


def summary_table(result: dict[str, Any]) -> list[str]:
    """One row per method: speed on the Aether-shaped transformer, quality on toyworld, verdict."""
    speed = result["workloads"][SPEED_WORKLOAD]["methods"]
    toy = result["workloads"][QUALITY_WORKLOAD]["methods"]
    scenes = result["workloads"][QUALITY_WORKLOAD]["info"].get("scenes")
    lines = [f"Quality on toyworld: mean over {scenes} held-out scenes ± the 95% interval of the "
             "mean.", "",
             "| method | wall-clock speedup (Aether-shaped) | FLOPs reduction (Aether-shaped / "
             "toyworld) | PSNR vs full (dB) | SSIM vs full | depth AbsRel vs full | PSNR drop vs "
             "truth (dB) | cache (MiB, Aether-shaped) | compared with HERO |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in toy.items():
        shaped = speed.get(name, {}) if row["family"] != "steps" else {}
        wall = speedup_text(shaped.get("speedup")) if row["family"] != "steps" else \
            f"{speedup_text(row['flops_speedup'])} (step ratio)"
        cells = [name, wall, f"{speedup_text(shaped.get('flops_speedup'))} / "
                 f"{speedup_text(row['flops_speedup'])}", *quality_cells(row.get("quality", {})),
                 number_text(mib(shaped.get("cache_bytes")), 1), result["verdicts"].get(name, "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def workload_table(workload: dict[str, Any]) -> list[str]:
    has_quality = any("quality" in row for row in workload["methods"].values())
    head = ["method", "family", "steps", "wall-clock speedup", "FLOPs vs full", "peak memory (MiB)",
            "cache (MiB)", "latent rel. error"]
    if has_quality:
        head += ["PSNR vs full", "SSIM vs full", "AbsRel vs full", "PSNR vs truth",
                 "drop vs truth", "AbsRel vs truth"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in workload["methods"].items():
        cells = [name, row["family"], str(row["steps"]), speedup_text(row["speedup"]),
                 number_text(row["flops_ratio"], 3), number_text(mib(row["peak_memory_bytes"]), 1),
                 number_text(mib(row["cache_bytes"]), 2), number_text(row["latent_rel_err"], 4)]
        if has_quality:
            quality = row.get("quality", {})
            truth = quality.get("vs_truth", {})
            psnr, ssim, abs_rel, drop = quality_cells(quality)
            cells += [psnr, ssim, abs_rel, ci_text(truth.get("psnr"), truth.get("ci", {}).get("psnr")),
                      drop, ci_text(truth.get("abs_rel"), truth.get("ci", {}).get("abs_rel"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _machine_line(result: dict[str, Any]) -> str:
    machine = result["machine"]
    return (f"Machine: {machine['cpus']} CPUs, {machine['threads']} torch threads, device "
            f"{machine['gpu'] or machine['device']}, torch {machine['torch']}, allocator "
            f"{machine.get('allocator', 'default')}; load average "
            f"{machine['load_average_before'][0]:.1f} before, {machine['load_average_after'][0]:.1f} "
            f"after; {result['seconds'] / 60:.1f} min in all.")


def _workload_line(name: str, workload: dict[str, Any]) -> str:
    info = ", ".join(f"{k}={v}" for k, v in workload["info"].items() if k != "seeds")
    timed = "timed in alternating pairs" if workload["timed"] else "not timed"
    return f"{info}; {workload['steps']} steps, guidance {workload['guidance']}; {timed}."


def speedup_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def number_text(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def psnr_text(vs_full: dict[str, Any]) -> str:
    """Mean PSNR over scenes with its 95% half-width; "exact" for identical outputs."""
    if not vs_full:
        return "–"
    if vs_full.get("psnr") is None or math.isnan(vs_full["psnr"]):
        return "exact" if vs_full.get("identical_frames") else "–"
    return ci_text(vs_full["psnr"], vs_full.get("ci", {}).get("psnr"))


def ci_text(value: float | None, ci: float | None, digits: int = 2) -> str:
    """``value ± ci`` (the 95% half-width), or the value alone when there is no interval."""
    text = number_text(value, digits)
    return text if ci is None or text == "–" else f"{text} ± {ci:.{digits}f}"


def quality_cells(quality: dict[str, Any]) -> list[str]:
    """PSNR, SSIM and AbsRel against full compute and the PSNR drop against the truth, each with
    its 95% interval over scenes."""
    vs_full = quality.get("vs_full", {})
    ci = vs_full.get("ci", {})
    return [psnr_text(vs_full), ci_text(vs_full.get("ssim"), ci.get("ssim"), 4),
            ci_text(vs_full.get("abs_rel"), ci.get("abs_rel"), 4),
            ci_text(quality.get("psnr_drop_vs_truth"), quality.get("psnr_drop_vs_truth_ci"))]


def mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


# ---------------------------------------------------------------------------------------- plots
FAMILY_STYLE = {"full": ("black", "s"), "steps": ("tab:gray", "v"), "hero": ("tab:red", "*"),
                "diffusers": ("tab:blue", "o"), "baseline": ("tab:green", "D")}


def pareto_plot(result: dict[str, Any], path: Path) -> Path:
    """Toyworld PSNR against full compute versus speed: toyworld FLOPs reduction (left) and
    Aether-shaped wall-clock speedup (right); the Pareto front of each panel is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    toy = result["workloads"][QUALITY_WORKLOAD]["methods"]
    speed = result["workloads"][SPEED_WORKLOAD]["methods"]
    names = [n for n, row in toy.items() if "quality" in row and n != "full"]
    finite = [toy[n]["quality"]["vs_full"]["psnr"] for n in names]
    finite = [p for p in finite if p is not None and math.isfinite(p)]
    ceiling = (max(finite) if finite else 40.0) + 3.0
    psnr = {n: min(_finite(toy[n]["quality"]["vs_full"]["psnr"], ceiling), ceiling) for n in names}
    panels = [("FLOPs reduction on toyworld (x)", {n: toy[n]["flops_speedup"] for n in names}),
              ("wall-clock speedup, Aether-shaped (x; fewer steps: step ratio)",
               {n: wall_speedup(n, speed, toy) for n in names})]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), dpi=120)
    for ax, (label, xs) in zip(axes, panels):
        points = [(xs[n], psnr[n], n) for n in names if xs[n] is not None]
        for x, y, n in points:
            color, marker = FAMILY_STYLE[toy[n]["family"]]
            ax.scatter(x, y, color=color, marker=marker, s=90 if marker == "*" else 36, zorder=3)
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = pareto_front([(x, y) for x, y, _ in points])
        if front:
            ax.plot(*zip(*front), color="tab:red", alpha=0.35, linewidth=1.5, zorder=2)
        ax.axvline(TARGET_SPEEDUP, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("toyworld RGB PSNR vs full compute (dB; top = exact)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="", label=f)
               for f, (c, m) in FAMILY_STYLE.items() if f != "full"]
    axes[1].legend(handles=handles, fontsize=8, loc="lower left")
    fig.suptitle(f"speed vs quality ({result['settings']['mode']} run): up and right is better")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (larger is better), by increasing x."""
    front = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


# -------------------------------------------------------------------------------------- summary
def update_summary(path: Path, result: dict[str, Any], out: Path, stem: str) -> Path:
    """Replace (or append) the marked section of ``path`` with this run's summary."""
    mode = result["settings"]["mode"]
    begin, end = f"<!-- bench.accel:{mode}:begin -->", f"<!-- bench.accel:{mode}:end -->"
    relative = _relative(out, path.parent)
    section = "\n".join([
        begin, "", f"Run of {result['created']}: `{result['command']}`", "", _machine_line(result), "",
        *claims_table(result), "", *summary_table(result), "",
        f"Full tables: [{relative}/{stem}.md]({relative}/{stem}.md); every figure: "
        f"[{relative}/{stem}.json]({relative}/{stem}.json).", "",
        f"![speed-quality Pareto]({relative}/{stem}_pareto.png)", "",
        *[f"![feature coupling, {name}]({relative}/{stem}_coupling_{name}.png)"
          for name in result["workloads"]], "", end])
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else \
        text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _relative(target: Path, start: Path) -> str:
    try:
        return target.resolve().relative_to(start.resolve()).as_posix()
    except ValueError:
        return target.resolve().as_posix()

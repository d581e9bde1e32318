"""Every training-free accelerator side by side on the same requests, seeds and process:
``python -m bench.accel [--quick] [--out docs/bench]``.

Per workload (toyworld for quality, the Aether-shaped random-weight transformer for speed) and
per method: counted FLOPs of the sampling loop versus full compute, peak memory, the bytes the
accelerator's hooks hold, the latents' distance to full compute, on toyworld PSNR/SSIM/AbsRel
against full compute and against the rendered truth, and the wall-clock speedup of the sampling
loop as the median of paired ratios (full and method runs alternating). Writes
``<out>/<stem>.json``, ``<stem>.md``, ``<stem>_pareto.png`` and per-block feature-coupling plots,
and refreshes the summary section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import command_line, report
from bench.measure import (PeakMemory, TimedRun, count_flops, hook_state_bytes, paired_times,
                           steady_cpu_allocator)
from bench.methods import Method, apply_method, default_methods, steps_methods
from bench.quality import latent_error, paired_difference, versus_full, versus_truth
from bench.workloads import AetherShape, Workload, aether_shaped_workload, toyworld_workload
from hero.cache.probe import FeatureCouplingProbe, choose_split

log = logging.getLogger("bench.accel")


@dataclass
class Settings:
    """How much to run. ``toyworld_model`` None takes the trained toyworld when its weights exist
    (else the tiny random model, whose quality numbers mean nothing), from ``toyworld_weights``
    when given; ``toyworld_steps`` None
    takes the model's default; ``methods`` None runs all of :func:`bench.methods.default_methods`."""

    mode: str = "full"
    scenes: int = 8
    toyworld_model: str | None = None
    toyworld_weights: str | None = None
    toyworld_steps: int | None = None
    shape: AetherShape = field(default_factory=AetherShape)
    rounds: int = 3
    time_toyworld: bool = True
    steps_matched: bool = True
    methods: list[str] | None = None
    threads: int = 2
    device: str = "cpu"

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": self.shape.describe()}


QUICK = Settings(mode="quick", rounds=2, time_toyworld=False,
                 shape=AetherShape(layers=10, heads=2, latent_height=12, latent_width=16,
                                   text_tokens=8, steps=20, batch=1))
FULL = Settings()


def profile_method(workload: Workload, method: Method, device: torch.device) -> dict[str, Any]:
    """Everything but timing for one method: counted FLOPs, memory, cache bytes, outputs."""
    transformer = workload.model.transformer
    accelerator = None if method.family in ("full", "steps") else \
        apply_method(transformer, method, workload.steps)
    try:
        calibration = _calibrate(workload, method, accelerator)
        with PeakMemory(device) as memory:
            latents, flops = count_flops(lambda: workload.sample(method.steps))
        cache_bytes = hook_state_bytes(transformer)
        stats = accelerator.stats() if accelerator is not None else {}
        rollouts = workload.generate(method.steps) if workload.requests else []
    finally:
        if accelerator is not None:
            accelerator.remove()
    return {"latents": latents, "rollouts": rollouts, "flops": flops,
            "peak_memory_bytes": memory.peak_bytes, "cache_bytes": cache_bytes, "stats": stats,
            "calibration": calibration}


def _calibrate(workload: Workload, method: Method, accelerator: Any) -> dict[str, Any] | None:
    """Accelerators that calibrate on a first generation do it here, timed, before anything is
    measured: MagCache without ratios (later runs get the ratios as an option) and HERO with
    ``split="auto"`` and no cached calibration for this model and shape (later runs read the
    cache). For HERO the generation runs anyway and counts only if it calibrated."""
    if accelerator is None or not (method.family == "hero" or accelerator.stats().get("calibrating")):
        return None
    started = time.perf_counter()
    workload.sample()
    accelerator.reset()
    stats = accelerator.stats()
    if method.family == "hero":
        return {"seconds": time.perf_counter() - started, "split": stats["split"]} \
            if stats.get("calibration_run") else None
    return {"seconds": time.perf_counter() - started, "mag_ratios": stats.get("mag_ratios")}


def with_calibration(method: Method, profile: dict[str, Any]) -> Method:
    """The method as timed runs apply it: with its calibration's result as an option."""
    calibration = profile["calibration"]
    if not calibration or calibration.get("mag_ratios") is None:
        return method
    return dataclasses.replace(method, options={**method.options,
                                                "mag_ratios": calibration["mag_ratios"]})


def timed_run(workload: Workload, method: Method) -> TimedRun:
    """A timed sampling with ``method`` applied just before and removed just after."""
    transformer = workload.model.transformer
    if method.family in ("full", "steps"):
        return TimedRun(run=lambda: workload.sample(method.steps))
    holder: dict[str, Any] = {}
    return TimedRun(run=lambda: workload.sample(method.steps),
                    setup=lambda: holder.update(accel=apply_method(transformer, method, workload.steps)),
                    teardown=lambda: holder.pop("accel").remove())


def coupling_profile(workload: Workload) -> dict[str, Any]:
    """HERO's feature-coupling probe over one full sampling (also the warm-up run): per block the
    forecast error (``profile``, what the split follows) and the change between steps."""
    probe = FeatureCouplingProbe(workload.model.transformer)
    try:
        workload.sample()
        profiles = probe.recorder().profiles()
    finally:
        probe.remove()
    return {"profile": profiles["forecast_error"], "change": profiles["change"],
            "split": choose_split(profiles["forecast_error"])}


def bench_workload(workload: Workload, methods: list[Method], settings: Settings, timed: bool,
                   steps_matched: bool) -> dict[str, Any]:
    """Profile full compute and every method on ``workload``, then time them in pairs;
    ``steps_matched`` adds full compute at fewer steps for every distinct cost measured."""
    device = torch.device(settings.device)
    log.info("%s: probe + warm-up", workload.name)
    coupling = coupling_profile(workload)
    reference = profile_method(workload, Method("full", "full"), device)
    results = {"full": method_row(Method("full", "full"), reference, reference, workload)}
    runs: dict[str, Method] = {}
    for method in methods:
        log.info("%s: profiling %s", workload.name, method.name)
        profile = profile_method(workload, method, device)
        results[method.name] = method_row(method, profile, reference, workload)
        runs[method.name] = with_calibration(method, profile)
    if steps_matched:
        ratios = {name: row["flops_ratio"] for name, row in results.items() if name != "full"}
        for method in steps_methods(ratios, workload.steps):
            log.info("%s: profiling %s", workload.name, method.name)
            profile = profile_method(workload, method, device)
            results[method.name] = method_row(method, profile, reference, workload)
            runs[method.name] = method
    if timed:
        times = paired_times(lambda: workload.sample(), {n: timed_run(workload, m) for n, m in runs.items()},
                             settings.rounds, device, lambda line: log.info("%s: %s", workload.name, line))
        for name, paired in times.items():
            results[name]["timing"] = paired.summary()
            results[name]["speedup"] = results[name]["timing"]["speedup"]
    return {"info": workload.info, "steps": workload.steps, "guidance": workload.guidance,
            "timed": timed, "coupling": coupling, "methods": results}


def method_row(method: Method, profile: dict[str, Any], reference: dict[str, Any], workload: Workload
         ) -> dict[str, Any]:
    """A method's figures, relative to full compute's where a ratio or a distance is meant."""
    row = {"family": method.family, "accelerator": method.accelerator, "options": method.options,
           "description": method.describe(), "steps": method.steps or workload.steps,
           "matches": list(method.matches),
           "flops": profile["flops"], "flops_ratio": profile["flops"] / reference["flops"],
           "flops_speedup": reference["flops"] / profile["flops"],
           "peak_memory_bytes": profile["peak_memory_bytes"], "cache_bytes": profile["cache_bytes"],
           "latent_rel_err": latent_error(profile["latents"], reference["latents"]),
           "stats": profile["stats"], "calibration": profile["calibration"],
           "speedup": None, "timing": None}
    if profile["rollouts"]:
        truth = versus_truth(profile["rollouts"], workload.truths)
        full_truth = versus_truth(reference["rollouts"], workload.truths)
        drop, drop_ci = paired_difference(full_truth["scenes"]["psnr"], truth["scenes"]["psnr"])
        row["quality"] = {"vs_full": versus_full(profile["rollouts"], reference["rollouts"]),
                          "vs_truth": truth, "psnr_drop_vs_truth": drop,
                          "psnr_drop_vs_truth_ci": drop_ci}
    return row


def run(settings: Settings, out: Path, summary: Path | None, command: str) -> dict[str, Any]:
    """The whole benchmark: both workloads, every method; writes JSON, markdown and plots."""
    torch.set_num_threads(settings.threads)
    allocator = steady_cpu_allocator() if settings.device == "cpu" else "device allocator"
    started = time.time()
    methods = default_methods()
    if settings.methods is not None:
        unknown = sorted(set(settings.methods) - {m.name for m in methods})
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in settings.methods]
    load_before = os.getloadavg()
    toyworld = toyworld_workload(settings.scenes, settings.toyworld_steps,
                                 model_name=settings.toyworld_model, device=settings.device,
                                 weights=settings.toyworld_weights)
    workloads = {"toyworld": bench_workload(toyworld, methods, settings, settings.time_toyworld,
                                            settings.steps_matched)}
    del toyworld
    # Fewer-steps rows are scored on toyworld only: their speed is their step ratio on any model
    # (the last run that timed them on the Aether-shaped transformer: 3.88x for 13 of 50 steps).
    shaped = aether_shaped_workload(settings.shape, device=settings.device)
    workloads["aether-shaped"] = bench_workload(shaped, methods, settings, True, False)
    result = {"command": command, "settings": settings.describe(),
              "machine": _machine(settings, load_before, allocator), "workloads": workloads,
              "seconds": time.time() - started}
    result["verdicts"] = report.verdicts(result)
    result["claims"] = report.claims(result)
    report.write_all(result, out, summary)
    return result


def _machine(settings: Settings, load_before: tuple[float, float, float], allocator: str
             ) -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "threads": settings.threads,
            "device": settings.device, "allocator": allocator,
            "memory_source": PeakMemory(settings.device).source,
            "gpu": torch.cuda.get_device_name(0) if settings.device.startswith("cuda") else None,
            "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())}


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small settings (< 10 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder of the results")
    parser.add_argument("--summary", default="docs/benchmarks.md",
                        help="markdown file whose marked benchmark section is refreshed ('' for none)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    parser.add_argument("--scenes", type=int, default=None, help="toyworld held-out scenes")
    parser.add_argument("--toyworld-model", choices=("toyworld", "tiny"), default=None)
    parser.add_argument("--toyworld-weights", default=None,
                        help="an exported toyworld folder (default: the shipped weights)")
    parser.add_argument("--toyworld-steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="paired timing rounds")
    parser.add_argument("--layers", type=int, default=None, help="Aether-shaped blocks")
    parser.add_argument("--steps", type=int, default=None, help="Aether-shaped sampling steps")
    parser.add_argument("--batch", type=int, default=None,
                        help="Aether-shaped requests per sampling (default 2; x2 rows with guidance)")
    parser.add_argument("--no-toyworld-timing", action="store_true",
                        help="score toyworld's quality without timing it (speed comes from the "
                             "Aether-shaped workload)")
    parser.add_argument("--no-steps-matched", action="store_true",
                        help="leave out the fewer-steps comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(QUICK if args.quick else FULL)
    shape = dataclasses.replace(settings.shape, **{k: v for k, v in
                                                   (("layers", args.layers), ("steps", args.steps),
                                                    ("batch", args.batch))
                                                   if v is not None})
    overrides = {"scenes": args.scenes, "toyworld_model": args.toyworld_model,
                 "toyworld_weights": args.toyworld_weights,
                 "toyworld_steps": args.toyworld_steps, "rounds": args.rounds,
                 "threads": args.threads, "device": args.device,
                 "methods": args.methods.split(",") if args.methods else None}
    settings = dataclasses.replace(settings, shape=shape,
                                   steps_matched=not args.no_steps_matched,
                                   time_toyworld=(settings.time_toyworld
                                                  and not args.no_toyworld_timing),
                                   **{k: v for k, v in overrides.items() if v is not None})
    summary = Path(args.summary) if args.summary else None
    return settings, args.out, summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    settings, out, summary = parse_args(argv)
    return run(settings, out, summary, command_line("bench.accel", argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()

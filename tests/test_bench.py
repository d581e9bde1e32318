"""The benchmark harness (bench/) on tiny configurations: measurement helpers checked against
independent computations, and a smoke run of ``bench.accel`` whose JSON must hold every figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench import ablation, blocks
from bench.accel import Settings, run
from bench.measure import PairedTimes, PeakMemory, cpu_attention_flops, count_flops, hook_state_bytes
from bench.methods import default_methods, steps_methods
from bench.report import claims, pareto_front, update_summary, verdicts
from bench.workloads import AetherShape
from hero.accelerators import ACCELERATORS
from hero.baselines import ForaConfig, apply_fora, fora_stats, remove_fora
from hero.models.toyworld import load_tiny

CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops}
SMOKE_METHODS = ["hero", "magcache", "fora", "toca"]  # one per family, MagCache calibrating
TINY_SHAPE = AetherShape(layers=3, heads=2, head_dim=16, latent_frames=2, latent_height=8,
                         latent_width=8, text_tokens=4, steps=6)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = out / "benchmarks.md"
    summary.write_text("# Benchmarks\n\nHand-written text stays.\n")
    settings = Settings(mode="quick", scenes=1, toyworld_model="tiny", toyworld_steps=6, rounds=2,
                        shape=TINY_SHAPE, methods=SMOKE_METHODS, threads=1)
    result = run(settings, out, summary, "python -m bench.accel --smoke")
    return result, out, summary


def test_every_registered_accelerator_is_benchmarked():
    names = {m.name for m in default_methods()}
    assert set(ACCELERATORS) - {"none"} <= names
    assert {"taylorseer-o2", "fora", "toca", "duca"} <= names
    taylor2 = next(m for m in default_methods() if m.name == "taylorseer-o2")
    assert taylor2.options == {"max_order": 2}


def test_cpu_attention_flops_are_counted():
    q, k, v = (torch.randn(2, 3, 40, 8) for _ in range(3))
    _, flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * (2 * 3 * 40 * 40 * 8) * 2  # QK^T and AV, 2 FLOPs per multiply-add
    linear = torch.nn.Linear(8, 5)
    _, flops = count_flops(lambda: linear(torch.randn(7, 8)))
    assert flops == 2 * 7 * 8 * 5


def test_lean_counter_agrees_with_torchs_flop_counter():
    model = load_tiny()
    condition = torch.randn(1, 5, 40, 12, 16)
    run = lambda: model.denoise(condition, "prediction", 2, 3.0, [0])
    latents, flops = count_flops(run)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as reference:
        expected = run()
    assert flops == reference.get_total_flops() > 0
    assert torch.equal(latents, expected)


def test_hook_state_bytes_sees_a_baselines_cache():
    model = load_tiny()
    condition = torch.randn(1, 5, 40, 12, 16)
    apply_fora(model.transformer, ForaConfig(interval=2))
    try:
        model.denoise(condition, "prediction", 3, 1.0, [0])
        held, reported = hook_state_bytes(model.transformer), fora_stats(model.transformer)["cache_bytes"]
    finally:
        remove_fora(model.transformer)
    assert held == reported > 0
    assert hook_state_bytes(model.transformer) == 0


def test_peak_memory_sees_tensors_allocated_inside():
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(2 ** 21)  # 8 MiB, alive when the block ends
    assert memory.peak_bytes >= block.nbytes
    assert memory.source in ("malloc in use", "resident set size")


REALLOCATION_FAULTS = """
import ctypes, resource, torch
from bench.measure import steady_cpu_allocator

def faults(numel=2 ** 22, times=5):  # a 16 MiB block, 4096 pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.empty(numel).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

assert ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # glibc's first mmap threshold, fixed
default = faults()
print(steady_cpu_allocator())
faults()
print(default, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steady_allocator_reuses_memory_instead_of_faulting_in_new_pages():
    """In a fresh process (pytest's own heap is whatever earlier tests left)."""
    done = subprocess.run([sys.executable, "-c", REALLOCATION_FAULTS], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).parents[1])
    described, counts = done.stdout.strip().splitlines()[-2:]
    default, steady = map(int, counts.split())
    assert described.startswith("glibc")
    assert default >= 4 * 4096 and steady < 100, (default, steady)


def test_paired_ratio_is_the_median_over_rounds():
    times = PairedTimes(method=[1.0, 3.0, 2.0], full_before=[2.0, 4.0, 4.0], full_after=[2.0, 2.0, 4.0])
    summary = times.summary()
    assert summary["time_ratios"] == [0.5, 1.0, 0.5]
    assert summary["time_ratio_median"] == 0.5 and summary["speedup"] == 2.0


def test_steps_methods_cost_at_least_what_they_match_and_group_equal_costs():
    ratios = {"a": 0.5, "b": 0.48, "c": 0.3, "d": 0.97, "e": 0.01, "f": 0.81, "g": 0.52}
    methods = steps_methods(ratios, 10)
    assert [(m.name, m.steps, m.matches) for m in methods] == [
        ("steps-9", 9, ("f",)), ("steps-6", 6, ("g",)), ("steps-5", 5, ("a", "b")),
        ("steps-3", 3, ("c",)), ("steps-1", 1, ("e",))]


def test_pareto_front_keeps_undominated_points():
    points = [(1.0, 40.0), (2.0, 30.0), (1.5, 35.0), (1.2, 20.0), (2.0, 25.0)]
    assert pareto_front(points) == [(1.0, 40.0), (1.5, 35.0), (2.0, 30.0)]


def _judged_row(family: str, flops: float, psnr: float) -> dict:
    scenes = [psnr - 0.5, psnr + 0.5]
    return {"family": family, "flops_speedup": flops,
            "quality": {"vs_full": {"psnr": psnr, "scenes": {"psnr": scenes}},
                        "psnr_drop_vs_truth": 0.0, "psnr_drop_vs_truth_ci": 0.0}}


def test_verdicts_name_the_preset_that_wins_and_set_apart_what_skips_nothing():
    toy = {"full": _judged_row("full", 1.0, math.inf), "hero": _judged_row("hero", 3.0, 45.0),
           "fast-and-good": _judged_row("diffusers", 2.0, 40.0),
           "slow-and-better": _judged_row("diffusers", 1.5, 50.0),
           "too-fast": _judged_row("baseline", 4.0, 30.0),
           "idle": _judged_row("diffusers", 1.0, math.inf)}
    speed = {name: {"speedup": toy[name]["flops_speedup"] * 0.95,
                    "flops_speedup": toy[name]["flops_speedup"]} for name in toy}
    result = {"workloads": {"aether-shaped": {"methods": speed},
                            "toyworld": {"methods": toy, "info": {"trained": True}}}}
    result["verdicts"] = judged = verdicts(result)
    assert judged["fast-and-good"].startswith("HERO (hero) is better: PSNR 45.00 dB vs 40.00 dB")
    assert judged["slow-and-better"].startswith("NOT beaten by HERO: every HERO preset as fast")
    assert judged["too-fast"].startswith("NOT beaten by HERO: no HERO preset is as fast")
    assert judged["idle"].startswith("NO SPEEDUP: idle skipped no computation")
    count = next(c for c in claims(result) if c["claim"].startswith("methods no HERO"))
    assert count["value"] == 2 and not count["met"]
    assert count["note"] == ("slow-and-better, too-fast; "
                             "not accelerators here (skipped nothing): idle")


def test_smoke_json_has_every_method_and_sane_fields(smoke):
    result, out, _ = smoke
    saved = json.loads((out / "accel_quick.json").read_text())
    assert saved["command"] == "python -m bench.accel --smoke"
    for name, workload in saved["workloads"].items():
        methods = workload["methods"]
        steps_rows = [n for n, row in methods.items() if row["family"] == "steps"]
        assert set(methods) == {"full", *SMOKE_METHODS, *steps_rows}, name
        matched = sorted(m for n in steps_rows for m in methods[n]["matches"])
        cheaper = sorted(m for m in SMOKE_METHODS
                         if round(workload["steps"] * methods[m]["flops_ratio"]) < workload["steps"])
        if name == "toyworld":  # every saving method's cost matched once, where quality is scored
            assert cheaper and matched == cheaper, name
        else:  # a loop of n steps costs n/S on any model: not timed again on the speed workload
            assert not steps_rows, name
        for row in (methods[n] for n in steps_rows):
            assert row["steps"] < workload["steps"]
            assert row["flops_ratio"] == pytest.approx(row["steps"] / workload["steps"], rel=0.02)
        full = methods["full"]
        assert full["flops_ratio"] == 1.0 and full["latent_rel_err"] == 0.0 and full["cache_bytes"] == 0
        for method, row in methods.items():
            assert row["flops"] > 0 and 0 < row["flops_ratio"] <= 1.0, (name, method)
            timing = row["timing"] if method != "full" else None
            if method != "full":
                assert len(timing["time_ratios"]) == 2 and timing["speedup"] > 0, (name, method)
                assert math.isclose(timing["speedup"], 1 / timing["time_ratio_median"])
        assert methods["hero"]["flops_ratio"] < 1.0 and methods["hero"]["latent_rel_err"] > 0
        assert methods["fora"]["cache_bytes"] > 0 and methods["hero"]["stats"]["split"] >= 0
        assert methods["magcache"]["calibration"]["mag_ratios"], name
        assert workload["coupling"]["profile"] and 0 <= workload["coupling"]["split"] <= \
            len(workload["coupling"]["profile"])
    toy = saved["workloads"]["toyworld"]["methods"]
    assert toy["full"]["quality"]["vs_full"]["psnr"] is None  # identical frames: PSNR = inf
    assert toy["full"]["quality"]["vs_full"]["identical_frames"] == 16
    assert toy["full"]["quality"]["psnr_drop_vs_truth"] == 0.0
    hero = toy["hero"]["quality"]
    assert 0 < hero["vs_full"]["psnr"] < 200 and 0 < hero["vs_full"]["ssim"] <= 1
    assert set(hero["vs_truth"]) >= {"psnr", "ssim", "abs_rel", "rot_err_deg", "trans_err"}
    assert "quality" not in saved["workloads"]["aether-shaped"]["methods"]["hero"]
    assert len(saved["claims"]) == 4 and all(c["met"] in (True, False) for c in saved["claims"])
    assert set(saved["verdicts"]) >= {"magcache", "fora", "toca"}


def test_smoke_writes_tables_plots_and_summary(smoke):
    result, out, summary = smoke
    for name in ("accel_quick.md", "accel_quick_pareto.png", "accel_quick_coupling_toyworld.png",
                 "accel_quick_coupling_aether-shaped.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "accel_quick.md").read_text()
    assert all(f"| {name} |" in table for name in ["full", *SMOKE_METHODS])
    text = summary.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written text stays.\n")
    assert text.count("<!-- bench.accel:quick:begin -->") == 1
    update_summary(summary, result, out, "accel_quick")  # a second run replaces its section
    assert summary.read_text().count("<!-- bench.accel:quick:begin -->") == 1


def test_pipeline_overhead_arithmetic():
    from bench.pipeline import marginal_overhead, overhead

    stages = {"prep_s": 0.4, "generate_s": 9.0, "encode_s": 0.6, "model_total_s": 8.5,
              "model_sampling_s": 6.0}
    job = {"wall_s": 20.0, "rollouts": 4, "actors": 1, "stages": stages,
           "milestones": {"first_actor_ready_s": 7.0, "actor_init_s": 1.5, "after_last_commit_s": 2.0}}
    half = {"wall_s": 14.0, "rollouts": 2}
    plain = {"model_s": 8.0, "batch_s": [2.0, 2.0, 2.0, 2.0], "batch_size": 1, "model_load_s": 1.0}
    result = overhead(job, half, plain, ray_start_s=5.0)
    assert result["ratio"] == pytest.approx(1.5) and result["extra_s"] == pytest.approx(12.0)
    assert result["steady_ratio"] == pytest.approx((20.0 - 7.0 - 2.0) / 8.0 - 1.0)
    assert result["marginal_ratio"] == pytest.approx(6.0 / 4.0 - 1.0)
    assert result["outside_remaining_s"] == pytest.approx(20.0 - 9.0 - 7.0 - 2.0)
    assert marginal_overhead(job, {"wall_s": 14.0, "rollouts": 4}, plain) is None


def test_ablation_orders_hero_parts_by_cost(tmp_path):
    result = ablation.run(scenes=1, out=tmp_path, steps=6, model_name="tiny")
    parts, schedules, orders = result["parts"], result["schedules"], result["orders"]
    assert set(parts) == set(ablation.PARTS) and set(schedules) == set(ablation.schedule_variants())
    assert set(orders) == set(ablation.order_variants())
    saved = {label: row["flops_speedup"] for label, row in parts.items()}
    assert saved["hero (default)"] > saved["no deep extrapolation"] > 1.0
    assert saved["recompute keys/values"] < saved["shallow refresh"]
    assert saved["residual forecast"] == pytest.approx(saved["hero (default)"], rel=0.05)
    assert schedules["static, interval 2"]["flops_speedup"] \
        < schedules["static, interval 4"]["flops_speedup"]
    first, third = orders["order 1, interval 3"], orders["order 3, interval 3"]
    assert first["flops_speedup"] > third["flops_speedup"], "more levels to sum on PARTIAL steps"
    assert first["flops_speedup"] == pytest.approx(third["flops_speedup"], rel=0.01), \
        "the order changes what is kept and the forecast's sum, not which blocks compute"
    assert third["cache_bytes"] > first["cache_bytes"]
    for label, row in {**parts, **schedules, **orders}.items():
        assert math.isfinite(row["quality"]["vs_full"]["psnr"]), label
    assert json.loads((tmp_path / "ablation.json").read_text())["steps"] == 6
    table = (tmp_path / "ablation.md").read_text()
    assert all(f"| {label} |" in table for label in [*ablation.PARTS, *schedules, *orders])
    assert "`python -m bench.ablation --scenes 1 --part all --steps 6`" in table
    for plot in ("ablation_schedules.png", "ablation_orders.png"):
        assert (tmp_path / plot).stat().st_size > 0


def test_block_costs_set_time_beside_counted_work():
    result = blocks.measure(TINY_SHAPE, rounds=2, compiled=False)
    calls = result["calls"]
    assert len(calls) == 10 and all(row["ms"] > 0 for row in calls.values())
    assert calls["diffusers forward"]["flop_share"] == 1.0
    assert calls["HERO block, every token (FULL step)"]["flop_share"] == pytest.approx(1.0)
    assert 0 < calls["HERO partial block (PARTIAL step)"]["flop_share"] < 0.75  # 8 of 32 refreshed
    assert calls["HERO partial block, 4 tokens"]["flops"] is None
    full, hero_full, hero_partial = (calls[name] for name in blocks.STEP_CALLS)
    assert full["flop_share"] == 1.0 and hero_full["flop_share"] == pytest.approx(1.0, rel=0.01)
    assert 0 < hero_partial["flop_share"] < 0.5  # one shallow block of three, a quarter refreshed
    table = blocks.markdown(result, "python -m bench.blocks")
    assert all(f"| {name} |" in table for name in calls)


def test_the_toyworld_workload_samples_the_weights_folder_it_is_given(tmp_path):
    """``--toyworld-weights``/``--weights`` benchmark an export before it ships: the workload
    loads that folder, not the packaged one."""
    import shutil

    from bench.accel import parse_args
    from bench.workloads import toyworld_workload
    from hero.models.toyworld.model import WEIGHTS_DIR

    export = tmp_path / "export"
    shutil.copytree(WEIGHTS_DIR, export)
    info = json.loads((export / "model.json").read_text())
    (export / "model.json").write_text(json.dumps({**info, "revision": "unshipped"}))
    assert toyworld_workload(1, steps=2, weights=str(export)).info["revision"] == "unshipped"
    settings, _, _ = parse_args(["--quick", "--toyworld-weights", str(export)])
    assert settings.toyworld_weights == str(export)


def test_toyworld_timing_can_be_left_out_of_a_full_run():
    """Speed comes from the Aether-shaped workload; ``--no-toyworld-timing`` keeps toyworld for
    quality only and touches nothing else."""
    from bench.accel import parse_args

    timed, _, _ = parse_args([])
    untimed, _, _ = parse_args(["--no-toyworld-timing", "--rounds", "2"])
    assert timed.time_toyworld and not untimed.time_toyworld
    assert untimed.rounds == 2 and untimed.mode == "full"

"""Measuring one sampling loop: paired wall-clock ratios, counted FLOPs, peak and cache memory.

Wall-clock ratios are taken in alternation with full compute in the same process (full, method A,
full, method B, ..., full), each method's time divided by the mean of the two full runs around it,
and the median over rounds kept: slow drifts of a shared machine cancel within a pair.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil
import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper

aten = torch.ops.aten


def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu``, from its input shapes."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's formulas, plus the CPU attention kernel that SDPA dispatches to (torch's counter only
# knows the CUDA ones)
FLOP_FORMULAS = {**flop_registry,
                 aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(cpu_attention_flops)}


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the operations run inside, with torch's FLOP formulas.

    ``FlopCounterMode`` does the same plus a per-module breakdown whose bookkeeping costs more
    than a small model's compute; only the total is needed here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()`` with its FLOPs counted (CPU attention included): its result and total FLOPs."""
    with FlopCount() as counter:
        result = run()
    return result, counter.total


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc() -> ctypes.CDLL:
    """The C library, for glibc's malloc controls and statistics."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


# glibc mallopt parameters: give memory back to the system only when this much is free at the top
# of the heap; extra heap to ask for whenever it grows; serve blocks at least this large by mmap
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP_BYTES = 1 << 30


def steady_cpu_allocator() -> str:
    """Keep freed memory in the process instead of handing it back to the system (glibc).

    By default glibc serves every block of a few MiB (most activations here) with a fresh ``mmap``
    and trims the heap as soon as it shrinks, so every op touches new pages: measured on the
    Aether-shaped transformer, ~29,000 page faults per full-compute step and a step time that swings
    by 10% with whatever else is alive in the heap (an accelerator's caches change it). With
    the thresholds fixed there are none, and the timing measures computation. Returns how the
    allocator was set, for the results' machine record.
    """
    libc = _libc()
    if not hasattr(libc, "mallopt"):
        return "default (no glibc mallopt)"
    settings = ((_M_MMAP_THRESHOLD, _KEEP_BYTES), (_M_TRIM_THRESHOLD, _KEEP_BYTES),
                (_M_TOP_PAD, 64 << 20))
    if not all(libc.mallopt(param, value) for param, value in settings):
        return "default (mallopt refused)"
    return "glibc: mmap and trim thresholds 1 GiB, top pad 64 MiB"


def cpu_memory_probe() -> tuple[str, Callable[[], int]]:
    """How CPU memory in use is read: bytes malloc has handed out and not taken back (glibc's
    ``mallinfo2``, which sees every tensor's storage and nothing an allocator merely keeps), or the
    resident set size where that is not available."""
    libc = _libc()
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2

        def in_use() -> int:
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        return "malloc in use", in_use
    process = psutil.Process()
    return "resident set size", lambda: process.memory_info().rss


class PeakMemory:
    """Peak memory of a block of code above what was in use when it started.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: :func:`cpu_memory_probe`, sampled every
    ``interval_s`` by a thread (tensors live outside Python's allocator, so tracemalloc cannot
    see them).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.source = "cuda allocator" if self.device.type == "cuda" else cpu_memory_probe()[0]

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()  # garbage freed later, inside the block, would hide part of the block's own peak
        _, self._read = cpu_memory_probe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._max = 0
        self._thread.start()
        self._start = self._read()  # after the sampler's own start-up, which is not the block's
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, self._read())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        end = self._read()  # before the sampler's teardown frees its own memory
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._max, end) - self._start


def hook_state_bytes(model: nn.Module) -> int:
    """Bytes of every tensor held by the diffusers hooks' state under ``model`` (each counted once).

    Works for any accelerator built on diffusers hooks (HERO, the baselines, diffusers' caches):
    it walks each hook's attributes, its ``StateManager`` contexts and their states.
    """
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is None:
            continue
        for hook in registry.hooks.values():
            for tensor in _tensors_of(hook, depth=0):
                key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
                if key not in seen:
                    seen.add(key)
                    total += tensor.untyped_storage().nbytes()
    return total


def _tensors_of(value: Any, depth: int) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 8 or isinstance(value, (nn.Module, str, bytes, int, float, bool, type)) or value is None:
        return []
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set)):
        items = list(value)
    elif isinstance(value, StateManager):
        items = list(value._state_cache.values())
    elif isinstance(value, (ModelHook, BaseState)) or _is_plain_object(value):
        items = [v for k, v in vars(value).items() if k != "fn_ref"]
    else:
        return []
    return [t for item in items for t in _tensors_of(item, depth + 1)]


def _is_plain_object(value: Any) -> bool:
    """Objects of project or library classes that keep state in ``__dict__`` (not functions)."""
    return hasattr(value, "__dict__") and not callable(value)


@dataclass
class PairedTimes:
    """Times (s) of one method and of the full-compute runs around it, per round."""

    method: list[float] = field(default_factory=list)
    full_before: list[float] = field(default_factory=list)
    full_after: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [m / ((a + b) / 2) for m, a, b in zip(self.method, self.full_before, self.full_after)]

    def summary(self) -> dict[str, Any]:
        ratios = self.ratios
        median = statistics.median(ratios)
        return {"time_ratio_median": median, "speedup": 1.0 / median, "time_ratios": ratios,
                "method_s": self.method, "full_before_s": self.full_before,
                "full_after_s": self.full_after,
                "method_s_median": statistics.median(self.method),
                "full_s_median": statistics.median(self.full_before + self.full_after)}


def timed(run: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of ``run()`` (device synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@dataclass
class TimedRun:
    """What one timed run does: ``setup`` (untimed: apply an accelerator), ``run`` (timed),
    ``teardown`` (untimed: remove it)."""

    run: Callable[[], Any]
    setup: Callable[[], Any] = lambda: None
    teardown: Callable[[], Any] = lambda: None


def paired_times(full: Callable[[], Any], methods: dict[str, TimedRun], rounds: int,
                 device: torch.device, on_progress: Callable[[str], None] = lambda _: None
                 ) -> dict[str, PairedTimes]:
    """Alternate full compute with every method for ``rounds`` rounds; the method order rotates
    each round so no method always follows the same neighbour."""
    names = list(methods)
    times = {name: PairedTimes() for name in names}
    for r in range(rounds):
        shift = r % len(names) if names else 0
        previous = timed(full, device)
        for name in names[shift:] + names[:shift]:
            method = methods[name]
            method.setup()
            try:
                elapsed = timed(method.run, device)
            finally:
                method.teardown()
            after = timed(full, device)
            times[name].method.append(elapsed)
            times[name].full_before.append(previous)
            times[name].full_after.append(after)
            on_progress(f"round {r + 1}/{rounds} {name}: {elapsed:.2f}s vs full "
                        f"{(previous + after) / 2:.2f}s")
            previous = after
    return times

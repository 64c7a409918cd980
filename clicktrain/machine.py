"""Machine facts printed with every benchmark, thread settings shared by torch and TVM, and
the timing rule both the per-layer kernel choice and the benchmarks use."""

from __future__ import annotations

import os
import platform
import time


def cpu_description() -> str:
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("unknown CPU", "", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/other"
    return f"{name}, {os.cpu_count()} logical cores, SIMD {simd}"


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default: all cores) in torch and, for TVM's pool, via TVM_NUM_THREADS.
    Setting both together keeps the two runtimes from oversubscribing the cores."""
    import torch
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    os.environ["TVM_NUM_THREADS"] = str(n)
    return n


def fastest_alternating(fns: dict, rounds: int = 9) -> dict:
    """Fastest seconds of each function, the functions taking turns round after round, after
    one warm-up call each. On a shared machine a slow minute then hits every contender, and
    the minimum is what the code costs when nothing interferes (noise only ever adds time).
    Every other round runs in reverse order, so that each function also runs right after
    itself: a runtime's workers keep spinning after its call (TVM's pool does, by default)
    and slow whatever runs next, which would otherwise always be the other contender."""
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    for fn in fns.values():
        fn()  # warm-up: compile, tune, caches
    best = dict.fromkeys(fns, float("inf"))
    items = list(fns.items())
    for round_ in range(rounds):
        for key, fn in (items if round_ % 2 == 0 else items[::-1]):
            sync()
            started = time.perf_counter()
            fn()
            sync()
            best[key] = min(best[key], time.perf_counter() - started)
    return best

"""Shared benchmark set-up: threads, machine line, timing."""

from __future__ import annotations

import os

# torch's OpenMP workers spin after each parallel region and would steal the cores from
# TVM's thread pool between kernels; passive waiting must be set before torch loads. A set
# GOMP_SPINCOUNT wins (train_step.py sets the training setting, GOMP_SPINCOUNT=2000).
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import time  # noqa: E402

from clicktrain.machine import fastest_alternating  # noqa: E402,F401  (re-exported for the benchmarks)


def _sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        started = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def header(threads: int, target: str = "llvm") -> str:
    import torch
    import tvm

    from clicktrain.machine import cpu_description
    line = (f"CPU: {cpu_description()} | threads: torch {torch.get_num_threads()}, TVM {threads} | "
            f"torch {torch.__version__}, TVM {tvm.__version__} | OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
            f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    if target == "cuda" and torch.cuda.is_available():
        line += f" | GPU: {torch.cuda.get_device_name()} (torch dense = cuDNN)"
    return line

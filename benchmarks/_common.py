"""Shared benchmark set-up: threads, machine line, timing."""

from __future__ import annotations

import os

# torch's OpenMP workers spin after each parallel region and would steal the cores from
# TVM's thread pool between kernels; passive waiting must be set before torch loads. A pure
# torch baseline runs faster with OpenMP's default (measured 17 % on a VGG-11/4 training
# step): benchmarks time it in a child process with DEFAULT_OMP_ENV.
DEFAULT_OMP_ENV = "CLICKTRAIN_DEFAULT_OMP"
if os.environ.get(DEFAULT_OMP_ENV) != "1" and "GOMP_SPINCOUNT" not in os.environ:  # a set spin count wins
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import time  # noqa: E402


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


def in_default_omp_process(script: str, args: list[str]) -> str:
    """Run ``script args`` in a child process with OpenMP's default wait policy; its stdout."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env[DEFAULT_OMP_ENV] = "1"
    return subprocess.run([sys.executable, script, *args], env=env, check=True, capture_output=True,
                          text=True).stdout


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

"""Shared benchmark set-up: threads, machine line, timing."""

from __future__ import annotations

import os

# The benchmarks alternate torch and TVM calls in one process, and each runtime's workers
# spin after a parallel region, stealing the cores from the other's next call. TVM's pool
# (measured: with its default spin, dense convs timed right after a generated kernel took up
# to 2x as long, and ResNet-20 layers read 1.0x in one run and 2.3x in the next; a dense
# training step stepped right after an llvm one lost about 5 %): its spin is off in every
# benchmark, where dense runs alone in real training. torch's OpenMP workers: passive waiting
# (set before torch loads) for the per-kernel benchmarks; a set GOMP_SPINCOUNT wins, so
# train_step.py keeps the training setting (GOMP_SPINCOUNT=2000).
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from clicktrain.machine import ISA_LIMITS, fastest_alternating, restart_with_isa  # noqa: E402,F401  (re-exported)


def parse_args(parser):
    """``parser.parse_args()`` with ``--isa``: ``avx2`` restarts this process once with the
    AVX2 limits (``machine.ISA_LIMITS``) so that an AVX-512 machine measures both sides as an
    AVX2 one runs them (generated kernels and oneDNN alike)."""
    parser.add_argument("--isa", default="native", choices=sorted(ISA_LIMITS),
                        help="avx2: generated kernels, oneDNN and torch's ops limited to AVX2 (an AVX2 machine's code)")
    args = parser.parse_args()
    restart_with_isa(sys.argv, args.isa)
    return args


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


def full_fp32(fn):
    """``fn`` with cuDNN's TF32 tensor-core convolutions off (torch allows them by default): the
    same float32 arithmetic the generated CUDA kernels do."""
    import torch

    def run():
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            return fn()
        finally:
            torch.backends.cudnn.allow_tf32 = saved
    return run


def header(threads: int, target: str = "llvm") -> str:
    import torch
    import tvm

    from clicktrain.machine import cpu_description
    line = (f"CPU: {cpu_description()} | threads: torch {torch.get_num_threads()}, TVM {threads} | "
            f"torch {torch.__version__}, TVM {tvm.__version__} | OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
            f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')} "
            f"TVM_THREAD_POOL_SPIN_COUNT={os.environ.get('TVM_THREAD_POOL_SPIN_COUNT')}")
    if target == "cuda" and torch.cuda.is_available():
        line += f" | GPU: {torch.cuda.get_device_name()} (torch dense = cuDNN)"
    return line

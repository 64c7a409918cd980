"""Machine facts printed with every benchmark, thread settings shared by torch and TVM, and
the timing rule both the per-layer kernel choice and the benchmarks use."""

from __future__ import annotations

import os
import platform
import sys
import time
import warnings


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
    limits = ", ".join(f"{var}={os.environ[var]}" for var in ISA_LIMIT_VARS if os.environ.get(var))
    return f"{name}, {os.cpu_count()} logical cores, SIMD {simd}" + (f" (limited: {limits})" if limits else "")


# What runs narrower vectors than this CPU has, to measure or test an older machine's code on
# this one: the generated kernels (an LLVM CPU name, clicktrain/codegen/target.py), oneDNN's
# convolutions and torch's own vectorised ops. Both of torch's are read when torch loads.
ISA_LIMIT_VARS = ("CLICKTRAIN_LLVM_CPU", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
ISA_LIMITS = {"native": {}, "avx2": dict(zip(ISA_LIMIT_VARS, ("x86-64-v3", "AVX2", "avx2")))}


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default: all cores) in torch and, for TVM's pool, via TVM_NUM_THREADS.
    Setting both together keeps the two runtimes from oversubscribing the cores."""
    import torch
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    os.environ["TVM_NUM_THREADS"] = str(n)
    return n


# ``target="llvm"``: torch's OpenMP workers spin-wait after each op (by default for a long
# while), on the cores TVM's thread pool needs next. A short spin keeps torch's fast wake-up
# between its own ops and hands the cores to TVM soon after. Measured, training step of
# VGG-11/4 at batch 64 on 2 cores (3 runs each): OpenMP default: dense 36-43 ms, hardened on
# llvm 33-38 ms; OMP_WAIT_POLICY=PASSIVE: 43-47 / 38-56 ms; GOMP_SPINCOUNT=2000: 41-44 /
# 29-33 ms. OpenMP reads the setting once, when torch loads.
LLVM_OPENMP_ENV = {"GOMP_SPINCOUNT": "2000"}
OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # either one chooses how OpenMP waits
_openmp_warned = False


def llvm_openmp_env(env) -> dict:
    """``env`` with ``LLVM_OPENMP_ENV`` added, unless it already chooses an OpenMP wait setting."""
    env = dict(env)
    if not set(OPENMP_WAIT_VARS) & set(env):
        env.update(LLVM_OPENMP_ENV)
    return env


def restart_with_llvm_openmp(argv: list[str]) -> None:
    """Restart this process (``python *argv``) with ``llvm_openmp_env`` where the environment
    lacks it: OpenMP reads its wait setting when torch loads, so it must be there at start."""
    restart_with_env(argv, llvm_openmp_env(os.environ))


def restart_with_isa(argv: list[str], isa: str) -> None:
    """Restart this process with ``ISA_LIMITS[isa]`` in its environment where it lacks them
    (``native``: nothing to do). A benchmark's ``--isa avx2`` measures, on an AVX-512 machine,
    what an AVX2 one runs: 8-lane kernels with AVX2's 16 registers, oneDNN's AVX2 convolutions."""
    restart_with_env(argv, {**os.environ, **ISA_LIMITS[isa]})


def restart_with_env(argv: list[str], env: dict) -> None:
    """Restart this process (``python *argv``) with environment ``env`` where it differs."""
    if env != dict(os.environ):
        os.execve(sys.executable, [sys.executable, *argv], env)


def check_spin_waits() -> None:
    """Before generated CPU kernels run in a process whose torch loaded without an OpenMP
    wait setting (a script calling the API; the ``clicktrain`` command sets the short spin
    itself, restarting once): warn once, naming the fix, and turn TVM's pool spin off
    (``TVM_THREAD_POOL_SPIN_COUNT=0`` unless set; TVM reads it when its pool starts, at the
    first kernel). Both runtimes spinning after each call fight over the cores. Measured
    (``benchmarks/openmp_wait.py``, VGG-11/4, batch 64, 2 cores, session 7; hardened llvm
    step against dense's; docs/measurements/openmp-wait-amd-epyc-avx512-2core.txt): OpenMP's
    and TVM's defaults 26-168 ms (0.21-1.28x: 4 of 6 runs stalled), TVM's spin off 28-35 ms
    (1.05-1.79x), ``GOMP_SPINCOUNT=2000`` with TVM spinning 22-44 ms (0.76-1.85x), with TVM's
    spin off 31-35 ms (1.15-1.42x)."""
    global _openmp_warned
    if _openmp_warned or set(OPENMP_WAIT_VARS) & set(os.environ):
        return
    _openmp_warned = True
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    warnings.warn(
        "clicktrain: torch's OpenMP threads spin-wait after every op (no OMP_WAIT_POLICY or GOMP_SPINCOUNT "
        "was set when torch loaded) on the cores the generated llvm kernels need, which can take away most of "
        "their speed-up. Start Python with GOMP_SPINCOUNT=2000 in the environment (the clicktrain command "
        "does this itself); setting either variable yourself silences this warning.", RuntimeWarning, stacklevel=3)


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

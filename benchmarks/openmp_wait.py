"""One training step (forward, backward, SGD) of VGG-11/4 on 1x28x28 at batch 64: dense on
torch, and hardened (4/9 patterns, 75 % of kernels dropped) on ``target="llvm"``, under
whatever OpenMP wait settings this process started with. Compare settings by running it
several times, alternating:

    for i in 1 2 3; do
      .venv/bin/python benchmarks/openmp_wait.py
      OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/openmp_wait.py
      GOMP_SPINCOUNT=2000 .venv/bin/python benchmarks/openmp_wait.py
    done

(Deliberately not importing ``_common``, which sets PASSIVE.) Without an OpenMP setting,
``ct.harden`` warns and turns TVM's pool spin off (``clicktrain.machine.check_spin_waits``);
set ``TVM_THREAD_POOL_SPIN_COUNT`` yourself to measure other TVM spins.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

import clicktrain as ct
from clicktrain.machine import cpu_description, set_threads
from clicktrain.models import build_model


def step_ms(model, x, y, steps: int = 30) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    threads = set_threads(None)
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    dense = step_ms(build_model("vgg11", width=0.25), x, y)
    m = ct.compile_for_training(build_model("vgg11", width=0.25), x[:2], target="llvm",
                                config=ct.PruneConfig(connectivity=0.75))
    ct.select_patterns(m)
    ct.harden(m)
    llvm = step_ms(m, x, y)
    print(f"{cpu_description()} | threads {threads} | OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}: dense {dense:.1f} ms, hardened llvm {llvm:.1f} ms, "
          f"ratio {dense / llvm:.2f}x")


if __name__ == "__main__":
    main()

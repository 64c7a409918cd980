"""BatchNorm in training mode (+ ReLU, + residual add, or + ReLU + 2x2 max pool): the generated kernels
(``GeneratedBatchNorm``, what ``FuseBatchNorm`` puts in an llvm graph) against torch's ops,
forward and forward + backward, per activation shape of VGG-11 and ResNet-20 at batch 64,
and of the main job's VGG-11/4 blocks with their pools (1x28x28 input, ``ceil_mode``).

It runs under the OpenMP setting of training on llvm (``GOMP_SPINCOUNT=2000``, as
``train_step.py``), since a BatchNorm sits between other ops of a step: under the per-kernel
benchmarks' ``OMP_WAIT_POLICY=PASSIVE`` every torch op around the kernels (the running
statistics' update, the gradient's accumulation) wakes sleeping threads, and both sides
read 1.5-3x slower. Each time is the median over rounds in which both run in turn, a few
calls each (``timed``). "hot" repeats the call on
the same tensors (they stay in cache); "cold" first writes a 64 MB buffer, as a training
step does between one layer's BatchNorm and the next use of its tensors.

    .venv/bin/python benchmarks/batchnorm.py [--rounds 15] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clicktrain.machine import restart_with_llvm_openmp  # noqa: E402

restart_with_llvm_openmp(sys.argv)  # before torch loads: the training OpenMP setting
from _common import parse_args, header  # noqa: E402  (TVM's pool not spinning, as in the other benchmarks)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clicktrain.codegen.target import resolve_target  # noqa: E402
from clicktrain.machine import set_threads  # noqa: E402
from clicktrain.runtime.batchnorm import GeneratedBatchNorm  # noqa: E402

# (channels, H, W, fusion): ResNet-20's stages (bn_relu after conv1, bn_add_relu after conv2)
# and VGG-11's layers at 32x32 input
CASES = [(16, 32, 32, "bn_relu"), (16, 32, 32, "bn_add_relu"), (32, 16, 16, "bn_relu"), (32, 16, 16, "bn_add_relu"),
         (64, 8, 8, "bn_relu"), (64, 8, 8, "bn_add_relu"), (64, 32, 32, "bn_relu"), (128, 16, 16, "bn_relu"),
         (256, 8, 8, "bn_relu"), (512, 4, 4, "bn_relu"), (512, 2, 2, "bn_relu"),
         (16, 28, 28, "bn_relu_maxpool"), (32, 14, 14, "bn_relu_maxpool"), (64, 7, 7, "bn_relu_maxpool"),
         (128, 4, 4, "bn_relu_maxpool"), (128, 2, 2, "bn_relu_maxpool")]


def timed(fns: dict, rounds: int, evict, block: int = 3) -> dict:
    """Median seconds of each function, each round calling every function ``block`` times in
    a row and timing all but the first (``evict`` before each). In a step a BatchNorm follows
    ops of its own kind (torch's after torch's conv, the generated one after a generated
    conv); right after a torch op the generated call measured up to 6x slower (1.8 against
    0.3 ms on 64x16x32x32, passive or spinning OpenMP alike), which a strict alternation
    would charge to it on every call."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for i in range(block):
                evict()
                started = time.perf_counter()
                fn()
                if i:
                    times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parse_args(parser)
    threads = set_threads(args.threads)
    print(header(threads))
    print(f"batch {args.batch}; ms, median of {args.rounds} rounds; ratio = torch / generated")
    print(f"{'shape':<16} {'fused':<16} {'fwd hot':>16} {'fwd+bwd hot':>18} {'fwd cold':>16} {'fwd+bwd cold':>18}")
    target = resolve_target("llvm")
    scratch = torch.empty(16 << 20)

    def evict():
        scratch.add_(1.0)
    for c, h, w, fusion in CASES:
        torch.manual_seed(0)
        shape = (args.batch, c, h, w)
        bn = torch.nn.BatchNorm2d(c)
        pooled = fusion == "bn_relu_maxpool"
        generated = GeneratedBatchNorm(bn, "bn", fusion, target, pool_ceil=pooled)
        x = torch.randn(shape, requires_grad=True)
        residual = torch.randn(shape, requires_grad=True) if fusion == "bn_add_relu" else None
        dy = torch.randn(args.batch, c, -(-h // 2), -(-w // 2)) if pooled else torch.randn(shape)

        def plain():
            y = F.relu(bn(x) if residual is None else bn(x) + residual)
            return F.max_pool2d(y, 2, 2, ceil_mode=True) if pooled else y

        def ours():
            return generated(x, residual)
        fns = {"torch fwd": plain, "ours fwd": ours,
               "torch both": lambda: plain().backward(dy), "ours both": lambda: ours().backward(dy)}
        cells = []
        for evicting in (lambda: None, evict):
            t = timed(fns, args.rounds, evicting)
            for kind in ("fwd", "both"):
                mine, theirs = t[f"ours {kind}"] * 1e3, t[f"torch {kind}"] * 1e3
                cells.append(f"{mine:5.2f}/{theirs:5.2f} {theirs / mine:4.1f}x")
        print(f"{f'{c}x{h}x{w}':<16} {fusion:<16} " + " ".join(f"{cell:>17}" for cell in cells), flush=True)
    print("cells: generated ms / torch ms, ratio")


if __name__ == "__main__":
    main()

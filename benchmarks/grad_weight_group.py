"""Grad-weight block size: kept kernels per block that share an input channel and a pattern
(``GRAD_WEIGHT_GROUP``), against torch's dense grad-weight, on layers of VGG-11 and ResNet-20
at batch 64. Each variant and dense are timed in turn, nine rounds, fastest of each.

    .venv/bin/python benchmarks/grad_weight_group.py [--connectivity 0.0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fastest_alternating, header  # noqa: E402

import torch  # noqa: E402

import clicktrain.codegen.kernels as K  # noqa: E402
from clicktrain.codegen.kernels import ConvGeometry, LayerIndex, LayerKernels  # noqa: E402
from clicktrain.codegen.target import resolve_target  # noqa: E402
from clicktrain.machine import set_threads  # noqa: E402
from clicktrain.runtime.pattern_conv import LayerRunner  # noqa: E402
from clicktrain.runtime.selection import assign_patterns, generate_library  # noqa: E402

LAYERS = [(64, 128, 14, 14), (128, 256, 7, 7), (16, 16, 28, 28), (16, 16, 32, 32), (32, 32, 16, 16), (64, 64, 8, 8),
          (256, 256, 4, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connectivity", type=float, default=0.0)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    threads = set_threads(None)
    print(header(threads))
    print(f"4/9 patterns, {args.connectivity:.0%} of kernels dropped; ratio = dense time / generated time")
    target = resolve_target("llvm")
    default_group = K.grad_weight_group
    for c, o, h, w in LAYERS:
        torch.manual_seed(0)
        wt = torch.randn(o, c, 3, 3)
        lib = generate_library({"w": wt ** 2}, 4, 8)
        ids = assign_patterns(wt ** 2, lib, args.connectivity)
        x = torch.randn(64, c, h, w)
        fns = {}
        for group in args.groups:
            K.grad_weight_group = lambda t, group=group: group  # the plan's block size
            runner = LayerRunner(LayerKernels.build(ConvGeometry.of(wt.shape, (h, w), 1, 1, 1), lib, target),
                                 LayerIndex.build(lib, ids, x.device, group))
            out, xpad = runner.forward(x, wt, None)
            dout = torch.randn_like(out)
            fns[group] = (lambda r=runner, dout=dout, xpad=xpad: r.grad_weight(dout, x, xpad, wt))
        K.grad_weight_group = default_group
        fns["dense"] = lambda: torch.ops.aten.convolution_backward(dout, x, wt, None, [1, 1], [1, 1], [1, 1], False,
                                                                   [0, 0], 1, [False, True, False])
        best = fastest_alternating(fns)
        print(f"{c}->{o} {h}x{w} ({runner.kernels.plan.grad_weight.layout}): "
              + "  ".join(f"group {g} {best['dense'] / best[g]:.2f}x" for g in args.groups), flush=True)


if __name__ == "__main__":
    main()

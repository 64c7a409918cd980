"""Register-tile choices of the generated kernels, each against torch's dense conv, on layers
of VGG-11 and ResNet-20 at batch 64: the grad-weight block size (kept kernels per block that
share an input channel and a pattern, ``GRAD_WEIGHT_GROUP``) or its batch slices
(``grad_weight_slice``), or the rows of the forward /
grad-input tile (``choose_rows``), or the grad-weight layout (``choose_layouts``: batch in
the lanes, chwn, or along the row, nchw; glue included), or the forward and grad-input layout
(``--vary direct``). Each variant and dense are timed in turn, nine rounds, fastest of each;
ratio = dense time / generated time.

    .venv/bin/python benchmarks/tile_variants.py --vary group [--values 1 2 4] [--connectivity 0.0]
    .venv/bin/python benchmarks/tile_variants.py --vary rows  [--values 2 4 8]
    .venv/bin/python benchmarks/tile_variants.py --vary layout [--values chwn nchw]
    .venv/bin/python benchmarks/tile_variants.py --vary direct [--values chwn nchw]
    .venv/bin/python benchmarks/tile_variants.py --vary group --pattern-block 4x4   # on blocked ids
    .venv/bin/python benchmarks/tile_variants.py --vary rowgroup --pattern-block 4x4 [--values 1 2 4]
    .venv/bin/python benchmarks/tile_variants.py --vary phases [--values on off]   # stride-2 grad-input
    .venv/bin/python benchmarks/tile_variants.py --vary slice [--values off on]    # grad-weight by batch slices
    .venv/bin/python benchmarks/tile_variants.py --vary weave [--values off on]    # stride phases woven by torch or generated
    .venv/bin/python benchmarks/tile_variants.py --vary xtile --pattern-block 4x4  # chwn columns per tile (0: whole rows)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, fastest_alternating, header  # noqa: E402

import torch  # noqa: E402

import clicktrain.codegen.kernels as K  # noqa: E402
from clicktrain.codegen.kernels import MAX_ROW_GROUP, ConvGeometry, LayerIndex, LayerKernels  # noqa: E402
from clicktrain.config import parse_pattern_block  # noqa: E402
from clicktrain.passes.reorder import row_group_of  # noqa: E402
from clicktrain.codegen.target import resolve_target  # noqa: E402
from clicktrain.machine import set_threads  # noqa: E402
from clicktrain.runtime.pattern_conv import LayerRunner  # noqa: E402
from clicktrain.runtime.selection import assign_patterns, generate_library  # noqa: E402

LAYERS = {  # (in, out, h, w): grad-weight runs nchw and chwn; rows matter where the forward is nchw
    "group": [(64, 128, 14, 14), (128, 256, 7, 7), (16, 16, 28, 28), (16, 16, 32, 32), (32, 32, 16, 16),
              (64, 64, 8, 8), (256, 256, 4, 4)],
    "rows": [(64, 128, 14, 14), (16, 16, 28, 28), (16, 16, 32, 32), (32, 32, 16, 16), (64, 64, 14, 14),
             (8, 16, 28, 28)],
    "layout": [(64, 64, 8, 8), (256, 256, 8, 8), (64, 64, 7, 7), (128, 256, 7, 7), (64, 128, 4, 4),
               (256, 256, 4, 4), (128, 128, 2, 2), (512, 512, 2, 2)],
    "direct": [(64, 64, 7, 7), (64, 64, 8, 8), (128, 256, 7, 7), (256, 256, 7, 7), (128, 256, 8, 8),
               (256, 256, 8, 8), (32, 32, 14, 14), (128, 128, 14, 14)],
    "rowgroup": [(64, 128, 16, 16), (128, 128, 16, 16), (16, 16, 28, 28), (16, 16, 32, 32), (64, 64, 8, 8),
                 (256, 256, 7, 7), (512, 512, 4, 4), (512, 512, 2, 2)],
    "phases": [(16, 32, 32, 32), (32, 64, 16, 16), (16, 32, 28, 28), (32, 64, 14, 14), (64, 128, 16, 16)],
    "weave": [(16, 32, 32, 32), (32, 64, 16, 16), (16, 32, 28, 28), (32, 64, 14, 14)],
    "xtile": [(64, 64, 8, 8), (128, 256, 8, 8), (256, 256, 8, 8), (64, 128, 8, 8)],
    "slice": [(64, 128, 16, 16), (64, 128, 14, 14), (128, 128, 16, 16), (128, 256, 8, 8), (256, 256, 8, 8),
              (64, 64, 8, 8), (32, 32, 16, 16), (16, 16, 28, 28)],
}
DEFAULT_VALUES = {"group": ["1", "2", "4"], "rows": ["2", "4", "8"], "layout": ["chwn", "nchw"],
                  "direct": ["chwn", "nchw"], "rowgroup": ["1", "2", "4"], "phases": ["off", "on"],
                  "slice": ["off", "on"], "weave": ["off", "on"], "xtile": ["0", "4"]}
DIRECT = ("rows", "direct", "rowgroup", "phases", "weave", "xtile")  # the variants timed on forward and grad-input
STRIDE = {"phases": 2, "weave": 2}  # the layers' stride (1 unless named)


def runner_with(vary: str, value: str, weight, library, ids, hw, target, row_groups=(1, 1)):
    """A LayerRunner whose plan uses ``value`` for the varied choice (the defaults otherwise)."""
    saved = K.grad_weight_group, K.choose_rows, K.choose_layouts, K.STRIDE_PHASES, K.GRAD_WEIGHT_SLICES, \
        K.WEAVE_PHASES, K.CHWN_X_TILE
    if vary == "rowgroup":  # at most ``value`` rows per group (the ids' own groups at most)
        row_groups = tuple(min(int(value), g) for g in row_groups)
    K.STRIDE_PHASES = value != "off" if vary == "phases" else saved[3]
    K.WEAVE_PHASES = value != "off" if vary == "weave" else saved[5]
    K.CHWN_X_TILE = int(value) if vary == "xtile" else saved[6]
    if vary == "group":
        K.grad_weight_group = lambda t, layout="nchw", pixels=0, full=True: int(value)
    elif vary == "rows":
        K.choose_rows = lambda lanes, simd: int(value)
    elif vary == "direct":  # forward and grad-input layout
        K.choose_layouts = lambda g, simd, cuda, *rows: (value, value, saved[2](g, simd, cuda, *rows)[2])
    elif vary == "layout":
        K.choose_layouts = lambda g, simd, cuda, *rows: (*saved[2](g, simd, cuda, *rows)[:2], value)
    elif vary == "slice":  # on: by slices of the batch (the default), off: the whole batch at once
        K.GRAD_WEIGHT_SLICES = value == "on"
    try:
        kernels = LayerKernels.build(ConvGeometry.of(weight.shape, hw, STRIDE.get(vary, 1), 1, 1), library, target,
                                     row_groups)
    finally:
        (K.grad_weight_group, K.choose_rows, K.choose_layouts, K.STRIDE_PHASES, K.GRAD_WEIGHT_SLICES,
         K.WEAVE_PHASES, K.CHWN_X_TILE) = saved
    return LayerRunner(kernels, LayerIndex.build(library, ids, weight.device, kernels.plan))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vary", choices=sorted(LAYERS), default="group")
    parser.add_argument("--values", nargs="+", default=None)
    parser.add_argument("--connectivity", type=float, default=0.0)
    parser.add_argument("--pattern-block", default="1x1", help="filters x input channels sharing a pattern")
    args = parse_args(parser)
    block = parse_pattern_block(args.pattern_block)
    values = args.values or DEFAULT_VALUES[args.vary]
    threads = set_threads(None)
    print(header(threads))
    print(f"varying {args.vary}; 4/9 patterns in blocks of {block[0]}x{block[1]}, {args.connectivity:.0%} of kernels dropped; "
          f"ratio = dense time / generated time ({'forward, grad-input' if args.vary in DIRECT else 'grad-weight'})")
    target = resolve_target("llvm")
    for c, o, h, w in LAYERS[args.vary]:
        torch.manual_seed(0)
        wt = torch.randn(o, c, 3, 3)
        lib = generate_library({"w": wt ** 2}, 4, 8)
        ids = assign_patterns(wt ** 2, lib, args.connectivity, block)
        groups = (row_group_of(ids, MAX_ROW_GROUP), row_group_of(ids.t(), MAX_ROW_GROUP))
        stride = STRIDE.get(args.vary, 1)
        x = torch.randn(64, c, h, w)
        dout = torch.randn(64, o, (h - 1) // stride + 1, (w - 1) // stride + 1)
        fns = {}
        for value in values:
            r = runner_with(args.vary, value, wt, lib, ids, (h, w), target, groups)
            if args.vary not in DIRECT:
                xpad = r.pad_input(x)  # the forward's; grad-weight pads its own if its layout differs
                fns[value] = (lambda r=r, xpad=xpad: r.grad_weight(dout, x, xpad, wt))
            else:
                fns[(value, "fwd")] = (lambda r=r: r.forward(x, wt, None))
                fns[(value, "dgrad")] = (lambda r=r: r.grad_input(dout, wt, tuple(x.shape)))
        dense_bwd = (lambda mask: lambda: torch.ops.aten.convolution_backward(
            dout, x, wt, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask))
        if args.vary not in DIRECT:
            fns["dense"] = dense_bwd([False, True, False])
        else:
            fns[("dense", "fwd")] = lambda: torch.nn.functional.conv2d(x, wt, None, stride, 1)
            fns[("dense", "dgrad")] = dense_bwd([True, False, False])
        best = fastest_alternating(fns)
        if args.vary not in DIRECT:
            cells = [f"{args.vary} {v} {best['dense'] / best[v]:.2f}x" for v in values]
            layout = r.kernels.plan.forward.layout + " forward"
        else:
            cells = [f"{args.vary} {v} fwd {best[('dense', 'fwd')] / best[(v, 'fwd')]:.2f}x "
                     f"dgrad {best[('dense', 'dgrad')] / best[(v, 'dgrad')]:.2f}x" for v in values]
            layout = f"{r.kernels.plan.forward.layout}, {r.kernels.plan.forward.lanes} lanes"
        print(f"{c}->{o} {h}x{w}{f' s{stride}' if stride > 1 else ''} ({layout}): " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()

"""Generated pattern-conv kernels vs torch's dense conv (oneDNN), per conv layer.

For every prunable conv of VGG-11 and ResNet-20 on 28x28 and 32x32 inputs: forward,
grad-input and grad-weight time of the generated kernels against torch's dense
``conv2d`` / ``convolution_backward`` on the same shapes and threads, at 4/9 density and at
4/9 with half the kernels dropped. Ratios are dense time / generated time, measured in this
run on this machine, dense and generated taking turns and each the fastest of ``--repeats``
rounds (this shared VM's slow minutes otherwise decide single ratios); the summary is the
median over layers.

    .venv/bin/python benchmarks/kernels.py [--batch 64] [--models vgg11 resnet20] [--sizes 28 32]
        [--pattern-block 2x2]   # coarser granularity (PruneConfig.pattern_block)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, fastest_alternating, full_fp32, header  # noqa: E402

import torch  # noqa: E402

import clicktrain as ct  # noqa: E402
from clicktrain.machine import set_threads  # noqa: E402
from clicktrain.models import build_model  # noqa: E402
from clicktrain.runtime.pattern_conv import LayerRunner, PatternConv2d  # noqa: E402


def kind_times(runner, inp, weight, dout, xpad, repeats):
    """((dense fwd, dgrad, wgrad), (generated fwd, dgrad, wgrad), (dense in full float32, or
    None off CUDA)) seconds, the contenders of each kind timed in turn."""
    g = runner.geometry
    stride, padding, dilation = list(g.stride), list(g.padding), list(g.dilation)

    def dense_bwd(mask):
        return lambda: torch.ops.aten.convolution_backward(dout, inp, weight, None, stride, padding, dilation, False,
                                                           [0, 0], 1, mask)
    pairs = [(lambda: torch.nn.functional.conv2d(inp, weight, None, g.stride, g.padding, g.dilation),
              lambda: runner.forward(inp, weight, None)),
             (dense_bwd([True, False, False]), lambda: runner.grad_input(dout, weight)),
             (dense_bwd([False, True, False]), lambda: runner.grad_weight(dout, inp, xpad, weight))]
    cuda = inp.is_cuda
    best = [fastest_alternating({"dense": d, "ours": o, **({"fp32": full_fp32(d)} if cuda else {})}, repeats)
            for d, o in pairs]
    return (tuple(b["dense"] for b in best), tuple(b["ours"] for b in best),
            tuple(b["fp32"] for b in best) if cuda else None)


def layer_rows(model_name, size, batch, connectivity, repeats, target="llvm", compile_only=False, width=1.0,
               in_channels=3, pattern_block="1x1"):
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=in_channels, num_classes=10, width=width)
    x = torch.randn(2, in_channels, size, size)
    m = ct.compile_for_training(model, x, target=target, config=ct.PruneConfig(connectivity=connectivity,
                                                                                   pattern_block=pattern_block))
    ct.select_patterns(m)
    ct.harden(m)
    if compile_only:  # how much came from the cache: a lent GPU machine's minutes are counted
        built = [k for mod in m.modules() if isinstance(mod, PatternConv2d) for k in mod._kernels.values()]
        total = sum(len(k.plan.specs) + len(k.relayouts) + bool(k.gather_weights) for k in built)
        print(f"{model_name}@{size}, {connectivity:.0%} dropped: {sum(k.cache_hits for k in built)} of {total} "
              f"kernels and copies from the cache, {sum(k.compile_seconds for k in built):.1f} s", flush=True)
        return []
    device = torch.device("cuda" if target == "cuda" else "cpu")
    m.to(device)
    state = m._clicktrain
    rows = []
    for name, module in m.named_modules():
        if not isinstance(module, PatternConv2d):
            continue
        site = state.sites[module.site_name]
        c, h, w_ = site.input_shape[1:]
        weight = m.get_parameter(site.weight_target).detach()
        inp = torch.randn(batch, c, h, w_, device=device)
        kernels = module.kernels_for((h, w_), weight.shape)
        runner = LayerRunner(kernels, module.index_for(inp.device, kernels))
        g = runner.geometry
        out, xpad = runner.forward(inp, weight, None)
        dout = torch.randn_like(out)
        dense, ours, fp32 = kind_times(runner, inp, weight, dout, xpad, repeats)
        rows.append((f"{model_name}@{size}", module.site_name, f"{g.in_channels}->{g.out_channels} {h}x{w_} s{g.stride[0]}",
                     dense, ours, fp32))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet20"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 32])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7, help="rounds; each time is the fastest, dense and ours in turn")
    parser.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    parser.add_argument("--width", type=float, default=1.0, help="channel width multiplier (the main job: 0.25)")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--connectivity", type=float, nargs="+", default=[0.0, 0.5],
                        help="fractions of kernels dropped, one table each")
    parser.add_argument("--pattern-block", default="1x1", help="filters x input channels sharing a pattern")
    parser.add_argument("--compile-only", action="store_true", help="generate and compile the kernels, time nothing")
    args = parse_args(parser)
    threads = set_threads(args.threads)
    if args.compile_only:
        for model_name in args.models:
            for size in args.sizes:
                for connectivity in args.connectivity:
                    layer_rows(model_name, size, args.batch, connectivity, 0, args.target, compile_only=True,
                               width=args.width, in_channels=args.in_channels, pattern_block=args.pattern_block)
        return
    print(header(threads, args.target))
    print(f"batch {args.batch}, width {args.width}, {args.in_channels} input channels, pattern block "
          f"{args.pattern_block}; ratio = torch dense time / generated time (>1: generated is faster)")
    cuda = args.target == "cuda"
    if cuda:
        print("dense = cuDNN as torch runs it by default (TF32 tensor cores allowed); 'fp32' = the total against "
              "cuDNN in full float32, the arithmetic of the generated kernels")
    for connectivity in args.connectivity:
        density = 4 / 9 * (1 - connectivity)
        dropped = f", {connectivity:.0%} of kernels dropped" if connectivity else ""
        print(f"\n== density {density:.3f} (4 of 9 weights{dropped}) ==")
        print(f"{'model':<12} {'conv':<18} {'shape':<20} {'fwd':>6} {'dgrad':>6} {'wgrad':>6} {'total':>6}"
              f"{'  fp32' if cuda else ''}   dense ms / ours ms")
        totals, fp32_totals = [], []
        for model_name in args.models:
            for size in args.sizes:
                for model, conv, shape, dense, ours, fp32 in layer_rows(model_name, size, args.batch, connectivity,
                                                                  args.repeats, args.target, width=args.width,
                                                                  in_channels=args.in_channels,
                                                                  pattern_block=args.pattern_block):
                    ratios = [d / o for d, o in zip(dense, ours)]
                    total = sum(dense) / sum(ours)
                    totals.append(total)
                    fp32_col = ""
                    if fp32:
                        fp32_totals.append(sum(fp32) / sum(ours))
                        fp32_col = f"{fp32_totals[-1]:>6.2f}"
                    print(f"{model:<12} {conv:<18} {shape:<20} {ratios[0]:>6.2f} {ratios[1]:>6.2f} {ratios[2]:>6.2f} "
                          f"{total:>6.2f}{fp32_col}   {sum(dense) * 1e3:.1f} / {sum(ours) * 1e3:.1f}")
        print(f"median over {len(totals)} layers (fwd+dgrad+wgrad): {statistics.median(totals):.2f}x"
              + (f"; against full-float32 cuDNN {statistics.median(fp32_totals):.2f}x" if fp32_totals else ""))


if __name__ == "__main__":
    main()

"""A full training step (forward, backward, SGD step) of a hardened model on generated
kernels (``target="llvm"``, or ``"cuda"`` with ``--target cuda``) against the same model
trained dense with torch.

All three models -- dense (the plain ``nn.Module``), torch-masked (hardened on
``target="torch"``) and llvm (hardened on ``target="llvm"``) -- live in this one process and
take their steps in turn, round after round, so a slow minute of this shared machine slows
all three alike; each figure is the median over the rounds. The process runs under the
OpenMP setting ``clicktrain train --target llvm`` uses (``GOMP_SPINCOUNT=2000``, measured as
fast as OpenMP's default for dense torch: ``benchmarks/openmp_wait.py``) unless you set one,
with TVM's pool not spinning (``benchmarks/_common.py``: its spin would slow the dense step
taken right after an llvm one, which in real training runs alone).
On llvm, BatchNorm (with the ReLU and residual add after it) runs on generated kernels too;
a fourth model in the same rounds, the llvm model with torch's BatchNorm, separates what
that gives from what the generated convs give.
The llvm model picks, per layer and kernel kind, the faster of its generated kernel and
torch's dense conv (measured during warm-up, glue included); the choice is printed.

    .venv/bin/python benchmarks/train_step.py [--models vgg11 resnet20] [--sizes 28 32] [--batch 64]
    .venv/bin/python benchmarks/train_step.py --models vgg11 --sizes 28 --width 0.25 --in-channels 1 \\
        --ramp --profile          # the main job's model and pruning, with time per op
    .venv/bin/python benchmarks/train_step.py --target cuda   # on a GPU: cuda kernels vs cuDNN
    .venv/bin/python benchmarks/train_step.py --pattern-block 2x2   # coarser granularity
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clicktrain.machine import restart_with_llvm_openmp  # noqa: E402

restart_with_llvm_openmp(sys.argv)  # before torch loads: the training OpenMP setting
from _common import parse_args, full_fp32, header  # noqa: E402

import collections  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import clicktrain as ct  # noqa: E402
from clicktrain.machine import set_threads  # noqa: E402
from clicktrain.models import build_model  # noqa: E402
from clicktrain.passes.insert_masks import prunable_layers  # noqa: E402
from clicktrain.runtime.pattern_conv import PatternConv2d  # noqa: E402
from clicktrain.runtime.selection import ramped_connectivity  # noqa: E402


def stepper(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def hardened(name, x, target, connectivity, ramp, args, fuse_batchnorm=True):
    torch.manual_seed(0)
    m = ct.compile_for_training(build_model(name, x.shape[1], 10, width=args.width), x[:2], target=target,
                                config=ct.PruneConfig(connectivity=connectivity, pattern_block=args.pattern_block,
                                                      fuse_batchnorm=fuse_batchnorm))
    ratios = None
    if ramp:  # the trainer's default: drop ratios rising with depth, same overall compression
        layers = prunable_layers(m)
        ratios = dict(zip((layer.site.name for layer in layers),
                          ramped_connectivity(connectivity, [layer.mask.pattern_ids.numel() for layer in layers])))
    ct.select_patterns(m, connectivity=ratios)
    ct.harden(m)
    return m


def round_robin(steps: dict, rounds: int, warmup: int = 3, sync=lambda: None) -> dict:
    """Median seconds per step of each stepper, taking one step of each in turn (``sync``
    waits for a GPU's queued work, so a step is timed to its end)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            started = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def op_profile(steps: dict, rounds: int = 4, per_round: int = 5) -> str:
    """Self CPU time per op and step, per model: where a step's time goes."""
    from torch.profiler import profile
    totals = {name: collections.Counter() for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            with profile() as prof:
                for _ in range(per_round):
                    step()
            for event in prof.key_averages():
                totals[name][event.key] += event.self_cpu_time_total / 1e3 / (rounds * per_round)
    keys = sorted(set().union(*totals.values()), key=lambda k: -sum(t[k] for t in totals.values()))
    lines = [f"{'op (self CPU ms per step)':<44}" + "".join(f"{name:>14}" for name in steps)]
    for key in keys[:20]:
        lines.append(f"{key[:44]:<44}" + "".join(f"{totals[name][key]:>14.2f}" for name in steps))
    lines.append(f"{'total (all ops)':<44}" + "".join(f"{sum(totals[name].values()):>14.2f}" for name in steps))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet20"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 32])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--connectivity", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    parser.add_argument("--ramp", action="store_true", help="per-layer drop ratios rising with depth (the trainer's default)")
    parser.add_argument("--repeats", type=int, default=15, help="rounds (one step of each model per round)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="also print the time per op of dense and llvm")
    parser.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    parser.add_argument("--pattern-block", default="1x1", help="filters x input channels sharing a pattern")
    args = parse_args(parser)
    threads = set_threads(args.threads)
    gen = args.target
    device = torch.device("cuda" if gen == "cuda" else "cpu")
    sync = torch.cuda.synchronize if gen == "cuda" else (lambda: None)
    print(header(threads, gen))
    print(f"batch {args.batch}, width {args.width}, {args.in_channels} input channels, pattern block {args.pattern_block}"
          f"{', layer-ramped drop ratios' if args.ramp else ''}; ratio = dense step time / {gen} step time "
          f"(>1: {gen} is faster); median over {args.repeats} rounds, the models alternating")
    cuda = gen == "cuda"
    if cuda:
        print("dense = cuDNN as torch runs it by default (TF32 tensor cores allowed); 'fp32' = the same dense step "
              "with TF32 off, the arithmetic of the generated kernels")
    print(f"{'model':<10} {'input':>6} {'density':>8} {'dense ms':>9} {'torch-masked ms':>16} {gen + ' ms':>8} "
          f"{gen + ' vs dense':>14}{'  fp32 ms  vs fp32' if cuda else '  torch-BN ms vs dense'}"
          f"  generated kinds (fwd/dgrad/wgrad) per layer")
    if not cuda:
        print("llvm runs BatchNorm (+ ReLU, + residual add or max pool) on generated kernels (PruneConfig.fuse_batchnorm); "
              "'torch-BN' = the same llvm model with torch's BatchNorm (what the generated convs alone give)")
    for name in args.models:
        for size in args.sizes:
            torch.manual_seed(0)
            x, y = torch.randn(args.batch, args.in_channels, size, size), torch.randint(0, 10, (args.batch,))
            torch.manual_seed(0)
            dense_model = build_model(name, args.in_channels, 10, width=args.width).to(device)
            x, y = x.to(device), y.to(device)
            for connectivity in args.connectivity:
                generated = hardened(name, x.cpu(), gen, connectivity, args.ramp, args).to(device)
                steps = {"dense": stepper(dense_model, x, y),
                         "torch-masked": stepper(hardened(name, x.cpu(), "torch", connectivity, args.ramp, args)
                                                 .to(device), x, y),
                         gen: stepper(generated, x, y)}
                if cuda:
                    steps["fp32"] = full_fp32(stepper(dense_model, x, y))
                else:  # what the generated BatchNorm gives: the llvm model without it
                    steps["torch-bn"] = stepper(hardened(name, x, gen, connectivity, args.ramp, args, False), x, y)
                times = round_robin(steps, args.repeats, sync=sync)
                kinds = " ".join("".join("G" if u else "t" for u in mod._use[next(iter(mod._use))].values())
                                 for mod in generated.modules() if isinstance(mod, PatternConv2d) and mod._use)
                density = ct.pruning_report(generated).conv_density
                print(f"{name:<10} {size:>6} {density:>8.3f} {times['dense'] * 1e3:>9.1f} "
                      f"{times['torch-masked'] * 1e3:>16.1f} {times[gen] * 1e3:>8.1f} "
                      f"{times['dense'] / times[gen]:>13.2f}x"
                      + (f"  {times['fp32'] * 1e3:>7.1f} {times['fp32'] / times[gen]:>7.2f}x" if cuda else
                         f"  {times['torch-bn'] * 1e3:>7.1f} {times['dense'] / times['torch-bn']:>6.2f}x")
                      + f"  {kinds}", flush=True)
                if args.profile:
                    print(op_profile({k: steps[k] for k in ("dense", gen)}))
    print("G = generated kernel, t = torch dense conv on the masked weight (measured faster for that layer)")


if __name__ == "__main__":
    main()

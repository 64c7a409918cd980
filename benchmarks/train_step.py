"""A full training step (forward, backward, SGD step) of a hardened model on generated
kernels (``target="llvm"``) against the same model trained dense with torch.

Both are measured in this run on this machine, with the same threads; the llvm model picks,
per layer and kernel kind, the faster of its generated kernel and torch's dense conv (that
choice is measured during warm-up and is part of what is timed after it). The dense model
is the plain ``nn.Module``, timed in a child process with OpenMP's default wait policy (the
llvm and torch-masked models run with ``OMP_WAIT_POLICY=PASSIVE``, which TVM needs).

    .venv/bin/python benchmarks/train_step.py [--models vgg11 resnet20] [--sizes 28 32] [--batch 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_OMP_ENV, header, in_default_omp_process, median_seconds  # noqa: E402

import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import clicktrain as ct  # noqa: E402
from clicktrain.machine import set_threads  # noqa: E402
from clicktrain.models import build_model  # noqa: E402
from clicktrain.runtime.pattern_conv import PatternConv2d  # noqa: E402


def step_time(model, x, y, repeats):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return median_seconds(step, repeats=repeats, warmup=2)


def dense_step(name: str, size: int, args) -> float:
    assert os.environ.get(DEFAULT_OMP_ENV) == "1"
    torch.manual_seed(0)
    model = build_model(name, in_channels=3, num_classes=10, width=args.width)
    x, y = torch.randn(args.batch, 3, size, size), torch.randint(0, 10, (args.batch,))
    return step_time(model, x, y, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet20"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 32])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--connectivity", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dense-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    if args.dense_only:  # the child: dense step times as JSON
        print(json.dumps({f"{n}@{s}": dense_step(n, s, args) for n in args.models for s in args.sizes}))
        return
    common = ["--models", *args.models, "--sizes", *map(str, args.sizes), "--batch", str(args.batch),
              "--width", str(args.width), "--repeats", str(args.repeats), "--threads", str(threads)]
    dense_times = json.loads(in_default_omp_process(__file__, common + ["--dense-only"]))
    print(header(threads))
    print(f"batch {args.batch}, width {args.width}; ratio = dense step time / pruned step time (>1: pruned is faster); "
          f"dense = the plain model, timed in a child process with OpenMP's default wait policy")
    print(f"{'model':<10} {'input':>6} {'density':>8} {'dense ms':>9} {'torch-masked ms':>16} {'llvm ms':>8} "
          f"{'llvm vs dense':>14}  generated kinds (fwd/dgrad/wgrad) per layer")
    for name in args.models:
        for size in args.sizes:
            x, y = torch.randn(args.batch, 3, size, size), torch.randint(0, 10, (args.batch,))
            dense = dense_times[f"{name}@{size}"]
            for connectivity in args.connectivity:
                times = {}
                for target in ("torch", "llvm"):
                    torch.manual_seed(0)
                    m = ct.compile_for_training(build_model(name, 3, 10, width=args.width), x[:2], target=target,
                                                config=ct.PruneConfig(connectivity=connectivity))
                    ct.select_patterns(m)
                    ct.harden(m)
                    times[target] = step_time(m, x, y, args.repeats)
                kinds = " ".join("".join("G" if u else "t" for u in mod._use[next(iter(mod._use))].values())
                                 for mod in m.modules() if isinstance(mod, PatternConv2d) and mod._use)
                report = ct.pruning_report(m)
                print(f"{name:<10} {size:>6} {report.conv_density:>8.3f} {dense * 1e3:>9.1f} {times['torch'] * 1e3:>16.1f} "
                      f"{times['llvm'] * 1e3:>8.1f} {dense / times['llvm']:>13.2f}x  {kinds}")
    print("G = generated kernel, t = torch dense conv on the masked weight (measured faster for that layer)")


if __name__ == "__main__":
    main()

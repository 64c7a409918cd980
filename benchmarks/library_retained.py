"""How much importance each pattern-library strategy keeps, on one model's real gradients.

Loads a `clicktrain train` checkpoint, accumulates the ClickTrain importance (W * dL/dW)^2
over N training mini-batches, then for each library strategy (generated, frequency, fixed)
selects patterns and drops the configured share of kernels, and prints the share of total
importance kept -- with patterns only (connectivity 0) and with the run's connectivity.

    .venv/bin/python benchmarks/library_retained.py runs/dense/checkpoint.pt [--batches 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (thread settings)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clicktrain.codegen.export import _from_trainer_checkpoint  # noqa: E402
from clicktrain.data import default_data_dir, load_dataset, normalize  # noqa: E402
from clicktrain.passes.insert_masks import prunable_layers  # noqa: E402
from clicktrain.patterns import kernel_masks, pattern_str  # noqa: E402
from clicktrain.runtime.selection import LIBRARIES, assign_patterns, generate_library  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default=None)
    parser.add_argument("--batches", type=int, default=32)
    args = parser.parse_args()
    payload = torch.load(args.checkpoint, weights_only=True)
    x, y, _, _, _ = load_dataset(args.data or payload["config"].get("data") or default_data_dir())
    x, _, _ = normalize(x)
    m, _ = _from_trainer_checkpoint(payload, tuple(x.shape[1:]), int(y.max()) + 1)
    layers = prunable_layers(m)
    scores = {layer.site.name: torch.zeros_like(layer.weight) for layer in layers}
    g = torch.Generator().manual_seed(0)
    for _ in range(args.batches):
        idx = torch.randint(0, len(x), (64,), generator=g)
        m.zero_grad()
        F.cross_entropy(m(x[idx]), y[idx]).backward()
        for layer in layers:
            scores[layer.site.name] += (layer.weight.detach() * layer.weight.grad).square() / args.batches
    cfg = payload["config"]
    print(f"checkpoint {args.checkpoint}: importance from {args.batches} mini-batches; k={cfg['pattern_nnz']}, "
          f"{cfg['num_patterns']} patterns")
    print(f"| library | importance kept, patterns only | importance kept, + {cfg['connectivity']:.0%} of kernels dropped "
          f"| patterns |")
    print("|---|---|---|---|")
    total = sum(float(s.sum()) for s in scores.values())
    for strategy in LIBRARIES:
        library = generate_library(scores, cfg["pattern_nnz"], cfg["num_patterns"], strategy)
        kept = []
        for connectivity in (0.0, cfg["connectivity"]):
            kept.append(sum(float((s * kernel_masks(library, assign_patterns(s, library, connectivity).long())).sum())
                            for s in scores.values()) / total)
        shapes = " ".join(f"`{pattern_str(p)}`" for p in library)
        print(f"| {strategy} | {100 * kept[0]:.1f} % | {100 * kept[1]:.1f} % | {shapes} |")


if __name__ == "__main__":
    main()

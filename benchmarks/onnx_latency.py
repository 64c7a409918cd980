"""onnxruntime latency of a dense vs a pattern-pruned export of the same model.

ONNX Runtime executes Conv densely: zeros cost as much as any other weight, so the pruned
export is expected to run at the dense speed. This benchmark measures that honestly, in
one run on one machine, and prints the ratio.

    .venv/bin/python benchmarks/onnx_latency.py [--model vgg11] [--batch 1 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import clicktrain as ct
from clicktrain.machine import cpu_description, set_threads
from clicktrain.models import build_model


def latency_ms(path: Path, x: np.ndarray, threads: int, repeats: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"input": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"CPU: {cpu_description()} | threads: {threads} | onnxruntime {ort.__version__}")
    torch.manual_seed(0)
    x = torch.randn(2, 1, args.size, args.size)
    model = build_model(args.model, 1, 10).eval()
    with tempfile.TemporaryDirectory() as tmp:
        dense = ct.export_onnx(ct.compile_for_training(model, x).eval(), Path(tmp) / "dense.onnx", x, fold_batchnorm=True)
        m = ct.compile_for_training(model, x, config=ct.PruneConfig(connectivity=0.5))
        ct.select_patterns(m)
        ct.harden(m)
        cr = ct.pruning_report(m).compression_ratio
        pruned = ct.export_onnx(m.eval(), Path(tmp) / "pruned.onnx", x, fold_batchnorm=True)
        print(f"model {args.model} on 1x{args.size}x{args.size}; pruned: 4 of 9 weights + 50% kernels dropped "
              f"(conv compression {cr:.2f}x)")
        print(f"{'batch':>5}  {'dense ms':>9}  {'pruned ms':>9}  {'dense/pruned':>12}")
        for batch in args.batch:
            xb = np.random.default_rng(0).standard_normal((batch, 1, args.size, args.size), dtype=np.float32)
            d = latency_ms(dense, xb, threads, args.repeats)
            p = latency_ms(pruned, xb, threads, args.repeats)
            print(f"{batch:>5}  {d:>9.2f}  {p:>9.2f}  {d / p:>11.2f}x")


if __name__ == "__main__":
    main()

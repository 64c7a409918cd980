"""The README's main job: prune-train a small CNN on Fashion-MNIST, print and plot the result.

Dense training, magnitude pattern selection, harden, fine-tuning with masks. (The
gradient-importance ClickTrain schedule and trainer supersede this in ``clicktrain train``.)
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import PruneConfig, compile_for_training, harden, pruning_report, select_patterns
from .data import default_data_dir, load_idx_split, normalize
from .machine import cpu_description, set_threads
from .models import build_model
from .util import atomic_write, atomic_write_text


@torch.no_grad()
def evaluate(model, x, y, batch_size: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / len(x)


def run_demo(args) -> dict:
    threads = set_threads(args.threads)
    torch.manual_seed(args.seed)
    data_dir = args.data or default_data_dir()
    print(f"clicktrain demo | CPU: {cpu_description()} | threads: {threads} | data: {data_dir}")
    x_train, y_train = load_idx_split(data_dir, "train")
    x_test, y_test = load_idx_split(data_dir, "test")
    x_train, mean, std = normalize(x_train)
    x_test, _, _ = normalize(x_test, mean, std)

    out = Path(args.out)
    config = PruneConfig(pattern_nnz=args.pattern_nnz, num_patterns=args.num_patterns, connectivity=args.connectivity)
    model = build_model(args.model, in_channels=x_train.shape[1], num_classes=int(y_train.max()) + 1)
    m = compile_for_training(model, x_train[:2], target=args.target, config=config, debug_dir=out / "dump")
    total_steps = args.dense_steps + args.finetune_steps
    opt = torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    gen = torch.Generator().manual_seed(args.seed)
    history, started = [], time.perf_counter()

    def train(steps: int, phase: str):
        m.train()
        bar = tqdm(range(steps), desc=f"{phase:>8}", unit="step", leave=True, mininterval=1.0)
        for _ in bar:
            idx = torch.randint(0, len(x_train), (args.batch_size,), generator=gen)
            loss = F.cross_entropy(m(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append({"step": len(history), "phase": phase, "loss": loss.item(),
                            "seconds": time.perf_counter() - started})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", refresh=False)

    train(args.dense_steps, "dense")
    dense_acc = evaluate(m, x_test, y_test)
    select_patterns(m)
    harden(m)
    pruned_acc_before_finetune = evaluate(m, x_test, y_test)
    train(args.finetune_steps, "finetune")
    final_acc = evaluate(m, x_test, y_test)
    report = pruning_report(m)

    print()
    print(report)
    print()
    print(f"test accuracy  dense: {dense_acc:.4f}   just hardened: {pruned_acc_before_finetune:.4f}   "
          f"final (pruned, fine-tuned): {final_acc:.4f}")
    print(f"conv compression {report.compression_ratio:.2f}x (density {report.conv_density:.3f}), "
          f"wall time {history[-1]['seconds']:.1f} s")
    result = {"model": args.model, "test_accuracy": final_acc, "dense_test_accuracy": dense_acc,
              "hardened_test_accuracy_before_finetune": pruned_acc_before_finetune,
              "compression_ratio": report.compression_ratio, "conv_density": report.conv_density,
              "wall_time_s": history[-1]["seconds"], "cpu": cpu_description(), "threads": threads,
              "config": vars(args) | {"func": None}}
    atomic_write_text(out / "final.json", json.dumps(result, indent=2, default=str) + "\n")

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)
    atomic_write(out / "metrics.csv", write_csv)
    _plot(history, dense_acc, final_acc, out / "plot.png")
    print(f"wrote {out}/final.json, metrics.csv, plot.png and the per-pass dump {out}/dump/")
    return result


def _plot(history, dense_acc, final_acc, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = 20
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.25, color="tab:blue")
    ax.plot(steps, smooth, color="tab:blue", label="training loss (20-step mean)")
    hard_at = next((h["step"] for h in history if h["phase"] == "finetune"), None)
    if hard_at is not None:
        ax.axvline(hard_at, color="tab:red", ls="--", label="select + harden")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"test accuracy: dense {dense_acc:.3f} -> pruned {final_acc:.3f}")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

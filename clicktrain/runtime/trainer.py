"""The trainer behind ``clicktrain train``: data, model, ClickTrain schedule, metrics,
atomic per-epoch checkpoints that ``--resume`` continues exactly, final figures and a plot."""

from __future__ import annotations

import csv
import importlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..api import compile_for_training
from ..config import PruneConfig
from ..data import default_data_dir, load_dataset, normalize
from ..errors import ConfigError, StateError, TargetError
from ..machine import cpu_description, set_threads
from ..models import build_model
from ..util import atomic_write, atomic_write_text
from .pattern_conv import KernelRace
from .report import conv_positions, model_costs, pruning_report
from .schedule import ClickTrain

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    model: str = "vgg11"
    width: float = 0.25
    data: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    train_subset: int | None = None
    target: str = "torch"
    seed: int = 0
    out: str = "runs/train"
    resume: bool = False
    threads: int | None = None
    method: str = "clicktrain"    # clicktrain | dense | admm | prunetrain (see METHODS)
    choose: float = 0.3
    hard: float = 0.6
    lam: float | str = "auto"
    auto_lam: float | None = None
    importance: str = "accumulated"
    window: int = 32
    library: str = "generated"
    pattern_nnz: int = 4
    num_patterns: int = 8
    connectivity: float = 0.75
    connectivity_ramp: str = "layers"  # measured: +0.58 points over "none" (docs/results.md)
    pattern_block: str = "1x1"      # filters x input channels sharing a pattern (PruneConfig.pattern_block)
    mixup: float = 0.0
    admm_split: str = "190:120:60"  # pretrain : ADMM : retrain, scaled to the epochs
    admm_rho: str = "1e-3:1e-1"     # rho's geometric ramp over the ADMM stage
    finetune_lr: float = 0.1        # peak lr of the ADMM and retrain stages, as a fraction of lr
    penalty_ratio: float = 0.2      # PruneTrain: group-lasso penalty / loss at the start
    reconfigure_every: int = 0      # PruneTrain: epochs between channel removals (0: epochs // 10)
    penalty_budget: bool = True     # PruneTrain: scale lam to its original 182-epoch schedule's reach
    kernel_race: bool = True        # llvm/cuda: after hardening, time steps on generated kernels vs torch's conv
    extra: dict = field(default_factory=dict)

    def prune_config(self) -> PruneConfig:
        return PruneConfig(pattern_nnz=self.pattern_nnz, num_patterns=self.num_patterns, connectivity=self.connectivity,
                           pattern_block=self.pattern_block)


METHODS = {
    "clicktrain": "prune while training (the ClickTrain schedule)",
    "dense": "the same model trained without pruning",
    "admm": "pruning after training: dense pretraining, ADMM, hard prune, retrain (PatDNN)",
    "prunetrain": "channel group lasso with periodic physical channel removal (PruneTrain)",
}


def _ratio(text: str, name: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in str(text).split(":"))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ConfigError(f"{name}={text!r}: expected {count} numbers separated by ':'")
    return values


def _build_user_model(spec: str, in_channels: int, num_classes: int):
    """``module:callable`` -> callable(in_channels=..., num_classes=...) or callable()."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--model {spec!r}: cannot import {attr!r} from module {module_name!r} ({exc})") from None
    try:
        return factory(in_channels=in_channels, num_classes=num_classes)
    except TypeError:
        return factory()


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)

    # -- set-up ----------------------------------------------------------------------------
    def _data(self):
        cfg = self.cfg
        x_train, y_train, x_test, y_test, fmt = load_dataset(cfg.data or default_data_dir())
        if cfg.train_subset:
            g = torch.Generator().manual_seed(cfg.seed)
            keep = torch.randperm(len(x_train), generator=g)[:cfg.train_subset]
            x_train, y_train = x_train[keep], y_train[keep]
        x_train, mean, std = normalize(x_train)
        x_test, _, _ = normalize(x_test, mean, std)
        return x_train, y_train, x_test, y_test, fmt

    def _model(self, in_channels, num_classes):
        cfg = self.cfg
        if ":" in cfg.model:
            return _build_user_model(cfg.model, in_channels, num_classes)
        return build_model(cfg.model, in_channels=in_channels, num_classes=num_classes, width=cfg.width)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        if cfg.method not in METHODS:
            raise ConfigError(f"--method {cfg.method!r}; choose one of {sorted(METHODS)}")
        if cfg.method in ("dense", "prunetrain") and cfg.target == "llvm":
            raise ConfigError(f"--method {cfg.method} trains a plain model with no pattern-pruned convs, so "
                              f"--target llvm (generated pattern kernels) does not apply: use --target torch")
        cfg.prune_config()  # a bad pruning setting (e.g. --pattern-block) fails before the data loads
        threads = set_threads(cfg.threads)
        device = torch.device("cuda" if cfg.target == "cuda" else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TargetError("--target cuda needs a CUDA GPU and none is visible; use --target llvm (generated CPU "
                              "kernels) or --target torch")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        x_train, y_train, x_test, y_test, fmt = self._data()
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        print(f"clicktrain train | CPU: {cpu_description()} | threads {threads} | data {fmt} "
              f"{tuple(x_train.shape)} -> {num_classes} classes | model {cfg.model} | target {cfg.target} | "
              f"method {cfg.method}: {METHODS[cfg.method]}")
        model = self._model(x_train.shape[1], num_classes)
        example = x_train[:2]
        if cfg.method in ("dense", "prunetrain"):  # plain modules: nothing to mask, PruneTrain reshapes them
            m = model.to(device)
            positions = conv_positions(m, example.to(device))
        else:
            m = compile_for_training(model, example, target=cfg.target, config=cfg.prune_config(),
                                     debug_dir=self.out / "dump").to(device)
            positions = None
        reference_weights = model_costs(m, positions=positions).conv_weights
        x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
        steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
        opt = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=True)
        segments = [(0, cfg.epochs, 1.0)]
        if cfg.method == "admm":
            from ..baselines import ADMM
            segments = ADMM.lr_segments_for(cfg.epochs, _ratio(cfg.admm_split, "admm_split", 3), cfg.finetune_lr)
        lr_factor = cosine_segments(segments, steps_per_epoch)
        lr_steps = cfg.lr * sum(lr_factor(s) for s in range(cfg.epochs * steps_per_epoch))
        pruner = self._pruner(m, opt, example.to(device), lr_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

        def costs():
            return model_costs(m, applied=pruner is None or pruner.applied, positions=positions,
                               reference_conv_weights=reference_weights)
        metrics: list[dict] = []
        start_epoch, wall_before = 0, 0.0
        if cfg.resume and (self.out / CHECKPOINT).exists():
            start_epoch, wall_before, metrics = self._load(m, opt, sched, pruner)
            print(f"resumed from {self.out / CHECKPOINT} after epoch {start_epoch}")
        started = time.perf_counter()
        race = None
        for epoch in range(start_epoch, cfg.epochs):
            epoch_started = time.perf_counter()
            phase = pruner.phase if pruner else "dense"  # the phase this epoch trains in
            step_flops = 3 * costs().flops  # forward + grad-input + grad-weight, per sample
            if race is None and cfg.kernel_race and cfg.target != "torch" and pruner is not None and pruner.applied:
                race = KernelRace(m)
            loss, train_acc = self._train_epoch(m, opt, sched, pruner, x_train, y_train, epoch, race)
            if pruner is not None:
                pruner.epoch_end()
            epoch_seconds = time.perf_counter() - epoch_started
            test_acc = evaluate(m, x_test, y_test)
            now = costs()
            planned = pruning_report(m).conv_density if hasattr(m, "_clicktrain") else now.conv_density
            row = {"epoch": epoch + 1, "phase": phase, "phase_after": pruner.phase if pruner else "dense",
                   "loss": round(loss, 5),
                   "train_accuracy": round(train_acc, 5), "test_accuracy": round(test_acc, 5),
                   "conv_density": round(now.conv_density, 5),
                   "compression_ratio": round(now.compression_ratio, 4),
                   "planned_density": round(planned, 5),
                   "train_flops": float(step_flops * len(x_train)),
                   "epoch_seconds": round(epoch_seconds, 3),
                   "wall_seconds": round(wall_before + time.perf_counter() - started, 3)}
            metrics.append(row)
            tqdm.write(" | ".join(f"{k} {v}" for k, v in row.items()))
            self._save(m, opt, sched, pruner, epoch + 1, row["wall_seconds"], metrics)
        now = costs()
        phase_seconds: dict[str, float] = {}
        for r in metrics:
            phase_seconds[r["phase"]] = round(phase_seconds.get(r["phase"], 0.0) + r["epoch_seconds"], 3)
        final = {
            "method": cfg.method, "target": cfg.target,
            "test_accuracy": metrics[-1]["test_accuracy"], "compression_ratio": now.compression_ratio,
            "conv_density": now.conv_density, "wall_time_s": metrics[-1]["wall_seconds"],
            "train_seconds": sum(r["epoch_seconds"] for r in metrics), "phase_seconds": phase_seconds,
            "train_flops": sum(r["train_flops"] for r in metrics), "inference_flops": now.flops,
            "kept_parameters": now.parameters, "conv_weights": now.conv_weights,
            "kept_conv_weights": now.kept_conv_weights, "epochs": cfg.epochs,
            "phase": metrics[-1]["phase_after"], "model": cfg.model, "data_format": fmt, "cpu": cpu_description(),
            "threads": threads, "config": asdict(cfg),
            "importance_overhead_s": getattr(pruner, "importance_seconds", 0.0),
            "penalty_overhead_s": getattr(pruner, "penalty_seconds", 0.0),
        }
        if race is not None:
            final["kernel_race"] = race.summary()
        if hasattr(m, "_clicktrain"):
            report = pruning_report(m)
            final.update(library=report.library, layers=report.as_dict()["layers"])
        elif pruner is not None:
            final.update(channels=[len(k) for k in pruner.kept], removed_channels=pruner.removed_channels)
        atomic_write_text(self.out / "final.json", json.dumps(final, indent=2, default=str) + "\n")
        plot_metrics(metrics, self.out / "plot.png", title=f"{cfg.model} ({cfg.method})")
        print()
        if hasattr(m, "_clicktrain"):
            print(report)
        print(f"\nfinal test accuracy {final['test_accuracy']:.4f} (the pruned model after the last epoch) | "
              f"conv compression {final['compression_ratio']:.2f}x | wall {final['wall_time_s']:.1f} s")
        print(f"wrote {self.out}/final.json, metrics.csv, plot.png, {CHECKPOINT}")
        return final

    def _pruner(self, m, opt, example, lr_steps: float):
        cfg = self.cfg
        if cfg.method == "clicktrain":
            return ClickTrain(m, opt, epochs=cfg.epochs, choose=_as_epoch(cfg.choose), hard=_as_epoch(cfg.hard),
                              lam=cfg.lam, auto_lam=cfg.auto_lam or None, importance=cfg.importance,
                              window=cfg.window, library=cfg.library, connectivity_ramp=cfg.connectivity_ramp)
        if cfg.method == "admm":
            from ..baselines import ADMM
            return ADMM(m, opt, cfg.epochs, split=_ratio(cfg.admm_split, "admm_split", 3),
                        rho=_ratio(cfg.admm_rho, "admm_rho", 2), finetune_lr=cfg.finetune_lr)
        if cfg.method == "prunetrain":
            from ..baselines import PruneTrain
            return PruneTrain(m, opt, cfg.epochs, example, penalty_ratio=cfg.penalty_ratio,
                              reconfigure_every=cfg.reconfigure_every or None,
                              lr_steps=lr_steps if cfg.penalty_budget else None)
        return None

    def _train_epoch(self, m, opt, sched, pruner, x, y, epoch, race=None):
        cfg = self.cfg
        m.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).to(x.device)
        mix = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 7)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(range(0, len(x), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   mininterval=2.0, leave=False)
        for i in bar:
            racing = race is not None and not race.decided
            if racing:
                race.before_step()
                step_started = time.perf_counter()
            idx = order[i:i + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if cfg.mixup > 0:
                lam = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())
                perm = torch.randperm(len(xb), generator=mix).to(x.device)
                out = m(lam * xb + (1 - lam) * xb[perm])
                loss = lam * F.cross_entropy(out, yb) + (1 - lam) * F.cross_entropy(out, yb[perm])
            else:
                out = m(xb)
                loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if pruner is not None:
                pruner.step(loss.detach())
            total_loss += loss.item() * len(xb)
            if racing:
                race.after_step(time.perf_counter() - step_started)
                if race.decided:
                    r = race.summary()
                    tqdm.write(f"kernels: training steps ran {r['generated_ms']} ms on the generated kernels and "
                               f"{r['torch_ms']} ms on torch's conv (medians): {r['chosen']} from here on")
            correct += int((out.argmax(1) == yb).sum())
            seen += len(xb)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", refresh=False)
        return total_loss / seen, correct / seen

    # -- checkpoints -----------------------------------------------------------------------
    def _save(self, m, opt, sched, pruner, epoch, wall, metrics):
        state = {"epoch": epoch, "wall_seconds": wall, "metrics": metrics, "config": asdict(self.cfg),
                 "model": m.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "pruner": pruner.state_dict() if pruner else None,
                 "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state_out(), "python": random.getstate()}}
        atomic_write(self.out / CHECKPOINT, lambda tmp: torch.save(state, tmp))

        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(metrics[0]))
                w.writeheader()
                w.writerows(metrics)
        atomic_write(self.out / "metrics.csv", write_csv)

    def _load(self, m, opt, sched, pruner):
        state = torch.load(self.out / CHECKPOINT, weights_only=True)  # tensors and plain data only
        saved = {k: v for k, v in state["config"].items() if k not in ("resume", "out", "threads")}
        current = {k: v for k, v in asdict(self.cfg).items() if k not in ("resume", "out", "threads")}
        if saved != current:
            diff = {k: (saved.get(k), current.get(k)) for k in saved if saved.get(k) != current.get(k)}
            raise StateError(f"--resume: {self.out / CHECKPOINT} was written with different settings {diff}; "
                             f"use the same arguments or another --out")
        if hasattr(pruner, "restore_architecture"):
            pruner.restore_architecture(state["pruner"])  # PruneTrain: shrink to the saved channels first
        m.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if pruner is not None:
            pruner.load_state_dict(state["pruner"])
        torch.set_rng_state(state["rng"]["torch"])
        _numpy_state_in(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        return state["epoch"], state["wall_seconds"], state["metrics"]


def _numpy_state_out() -> list:
    """numpy's RNG state with its key array as a tensor, so checkpoints load with weights_only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]


def _numpy_state_in(state: list) -> None:
    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def cosine_segments(segments: list[tuple[int, int, float]], steps_per_epoch: int):
    """The lr factor per step: a cosine from ``peak`` to 0 over each ``(first, end, peak)``
    epoch range (one range: plain cosine annealing; ADMM restarts it per stage)."""
    bounds = [(a * steps_per_epoch, b * steps_per_epoch, peak) for a, b, peak in segments if b > a]

    def factor(step: int) -> float:
        for first, end, peak in bounds:
            if step < end:
                return peak * 0.5 * (1 + math.cos(math.pi * (step - first) / (end - first)))
        return 0.0
    return factor


def _as_epoch(value: float):
    """CLI numbers: 3.0 is epoch 3, 0.25 a fraction of the epochs."""
    return int(value) if float(value).is_integer() and value >= 1 else value


@torch.no_grad()
def evaluate(model, x, y, batch_size: int = 500) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / len(x)


def plot_metrics(metrics: list[dict], path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wall = [r["wall_seconds"] for r in metrics]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(wall, [r["test_accuracy"] for r in metrics], "o-", color="tab:blue", label="test accuracy")
    ax.plot(wall, [r["train_accuracy"] for r in metrics], "s--", color="tab:cyan", label="train accuracy")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("accuracy")
    ax2 = ax.twinx()
    ax2.plot(wall, [r["conv_density"] for r in metrics], "^-", color="tab:red", label="conv density")
    ax2.set_ylabel("conv density (kept / all conv weights)")
    ax2.set_ylim(0, 1.05)
    for r in metrics:
        if r["phase"] == "hard":
            ax.axvspan(r["wall_seconds"] - r["epoch_seconds"], r["wall_seconds"], color="0.92", zorder=0)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    ax.set_title(title + "  (grey: hard phase)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

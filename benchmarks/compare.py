"""Head to head on one machine, model, data set and epoch budget: dense training, pruning after
training (ADMM, PatDNN-style), PruneTrain-style channel pruning, and clicktrain on
``target="torch"`` and ``target="llvm"``.

    .venv/bin/python benchmarks/compare.py --model vgg11 --data DIR --epochs 10 --out runs/compare-vgg11
    .venv/bin/python benchmarks/compare.py --quick --out /tmp/compare   # tiny: what the tests run

Each method trains with ``clicktrain train``'s trainer into ``OUT/<method>/`` (its own
metrics.csv, final.json, checkpoint). A method with a final.json is not rerun; one that was
interrupted resumes from its checkpoint. Writes ``OUT/compare.csv``, ``compare.json`` and
``compare.png`` (accuracy vs wall time; conv density over wall time). Run on a quiet machine,
one comparison at a time: the wall times are the point.

Each method runs as its own ``clicktrain train`` process, as a user would run it: the
``target="llvm"`` run with the short OpenMP spin that ``clicktrain train --target llvm``
sets (``clicktrain.machine.llvm_openmp_env``; TVM's thread pool needs the cores torch's OpenMP
workers would spin on), the torch runs with OpenMP's defaults.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from clicktrain.machine import llvm_openmp_env
from clicktrain.errors import ClicktrainError
from clicktrain.machine import cpu_description
from clicktrain.runtime.trainer import TrainConfig
from clicktrain.util import atomic_write, atomic_write_text

# name -> (method, target); the order they run in
METHODS = {
    "dense": ("dense", "torch"),
    "admm": ("admm", "torch"),
    "prunetrain": ("prunetrain", "torch"),
    "clicktrain-torch": ("clicktrain", "torch"),
    "clicktrain-llvm": ("clicktrain", "llvm"),
}
QUICK = dict(model="vgg_small", width=1.0, epochs=3, train_subset=512, batch_size=64)
COLUMNS = ["method", "target", "test_accuracy", "compression_ratio", "conv_density", "wall_time_s",
           "time_vs_dense", "phase_seconds", "train_flops", "inference_flops", "kept_parameters", "epochs"]


def parse_method(spec: str, default_epochs: int) -> tuple[str, str, int]:
    """``name`` or ``name@EPOCHS`` (another epoch budget, e.g. ``admm@23``) -> (run name,
    method name, epochs)."""
    name, _, epochs = spec.partition("@")
    if name not in METHODS or (epochs and not (epochs.isdigit() and int(epochs) > 0)):
        raise ClicktrainError(f"--methods: {spec!r}; use one of {list(METHODS)}, optionally @EPOCHS")
    return (f"{name}-{epochs}ep" if epochs else name), name, int(epochs or default_epochs)


def run_method(spec: str, base: TrainConfig, out: Path) -> tuple[str, dict]:
    name, method_name, epochs = parse_method(spec, base.epochs)
    method, target = METHODS[method_name]
    final_path = out / name / "final.json"
    if final_path.exists():
        final = json.loads(final_path.read_text())
        if final.get("config", {}).get("epochs") == epochs and final.get("model") == base.model:
            tqdm.write(f"{name}: finished before, not rerun ({final_path})")
            return name, final
        raise ClicktrainError(f"{final_path} is from another comparison (model {final.get('model')}, "
                              f"{final.get('config', {}).get('epochs')} epochs); use another --out")
    cmd = [sys.executable, "-m", "clicktrain.cli", "train", "--method", method, "--target", target,
           "--out", str(out / name), "--resume", "--model", base.model, "--width", str(base.width),
           "--epochs", str(epochs), "--batch-size", str(base.batch_size), "--seed", str(base.seed)]
    for flag, value in (("--data", base.data), ("--train-subset", base.train_subset), ("--threads", base.threads)):
        if value is not None:
            cmd += [flag, str(value)]
    # what `clicktrain train --target llvm` sets itself, set here so the run needs no restart
    env = llvm_openmp_env(os.environ) if target == "llvm" else dict(os.environ)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not final_path.exists():
        raise ClicktrainError(f"{name}: `{' '.join(cmd)}` failed with exit status {proc.returncode} (output above)")
    return name, json.loads(final_path.read_text())


def summary_row(name: str, final: dict, dense_wall: float | None) -> dict:
    return {
        "method": name, "target": final["target"], "test_accuracy": final["test_accuracy"],
        "compression_ratio": round(final["compression_ratio"], 3), "conv_density": round(final["conv_density"], 4),
        "wall_time_s": final["wall_time_s"],
        "time_vs_dense": round(final["wall_time_s"] / dense_wall, 3) if dense_wall else "",
        "phase_seconds": ";".join(f"{k}={v:.1f}" for k, v in final["phase_seconds"].items()),
        "train_flops": f"{final['train_flops']:.4g}", "inference_flops": final["inference_flops"],
        "kept_parameters": final["kept_parameters"], "epochs": final["epochs"],
    }


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, res) in enumerate(results.items()):
        final, color = res["final"], f"C{i}"
        left.scatter(final["wall_time_s"], 100 * final["test_accuracy"], s=70, color=color,
                     label=f"{name} ({final['compression_ratio']:.1f}x)")
        wall = [0.0] + [r["wall_seconds"] for r in res["metrics"]]
        right.step(wall, [1.0] + [r["conv_density"] for r in res["metrics"]], where="post", color=color, label=name)
    left.set_xlabel("wall time (s)")
    left.set_ylabel("final test accuracy (%)")
    left.set_title("accuracy vs end-to-end time (legend: conv compression)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.set_xlabel("wall time (s)")
    right.set_ylabel("conv density (kept / all conv weights)")
    right.set_ylim(0, 1.05)
    right.set_title("conv density over time")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def compare(base: TrainConfig, out: Path, names: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for spec in tqdm(names, desc="methods", unit="method"):
        tqdm.write(f"\n=== {spec} ===")
        name, final = run_method(spec, base, out)
        with open(out / name / "metrics.csv", newline="") as f:
            metrics = [{k: (v if k in ("phase", "phase_after") else float(v)) for k, v in r.items()}
                       for r in csv.DictReader(f)]
        results[name] = {"final": final, "metrics": metrics}
    dense_wall = results["dense"]["final"]["wall_time_s"] if "dense" in results else None
    rows = [summary_row(name, res["final"], dense_wall) for name, res in results.items()]

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    atomic_write(out / "compare.csv", write_csv)
    machine = cpu_description()
    summary = {"model": base.model, "width": base.width, "epochs": base.epochs, "train_subset": base.train_subset,
               "cpu": machine, "rows": rows,
               "methods": {name: {"final": {k: v for k, v in res["final"].items() if k != "layers"},
                                  "metrics": res["metrics"]} for name, res in results.items()}}
    atomic_write_text(out / "compare.json", json.dumps(summary, indent=2, default=str) + "\n")
    plot(results, out / "compare.png",
         f"{base.model} (width {base.width}), {base.epochs} epochs, batch {base.batch_size} | {machine}")
    print(f"\nCPU: {machine}")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    print(f"wrote {out}/compare.csv, compare.json, compare.png")
    return summary


def main(argv=None) -> int:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model)
    p.add_argument("--width", type=float, default=d.width)
    p.add_argument("--data", default=None, help="data directory (default: as `clicktrain train`)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {list(METHODS)}; NAME@EPOCHS runs it with another epoch "
                        f"budget (e.g. admm@23: ADMM given 2.3x the epochs)")
    p.add_argument("--quick", action="store_true", help=f"a tiny comparison for the tests: {QUICK}")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    try:
        for spec in names:
            parse_method(spec, 1)
    except ClicktrainError as exc:
        p.error(str(exc))
    if not names:
        p.error("--methods: name at least one method")
    settings = dict(model=args.model, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                    train_subset=args.train_subset)
    if args.quick:
        settings.update(QUICK)
    base = TrainConfig(data=args.data, seed=args.seed, threads=args.threads, **settings)
    try:
        compare(base, Path(args.out), names)
    except ClicktrainError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

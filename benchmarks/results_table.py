"""Summarise `clicktrain train` runs (their final.json and metrics.csv) as a markdown table.

    .venv/bin/python benchmarks/results_table.py runs/dense runs/clicktrain runs/fixed_library ...

Run them first, one at a time on a quiet machine so wall times compare, e.g.:

    clicktrain train --out runs/dense --dense
    clicktrain train --out runs/clicktrain
    clicktrain train --out runs/batch_importance --importance batch
    clicktrain train --out runs/fixed_library --library fixed
    clicktrain train --out runs/frequency_library --library frequency
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    rows = []
    for d in map(Path, dirs):
        final = json.loads((d / "final.json").read_text())
        metrics = list(csv.DictReader((d / "metrics.csv").open()))
        hard = [r for r in metrics if r["phase"] == "hard"]
        before_hard = [r for r in metrics if r["phase"] != "hard"]
        cfg = final["config"]
        steps = sum(1 for _ in range(0, cfg.get("train_subset") or 60000, cfg["batch_size"])) * final["epochs"]
        rows.append([
            d.name, cfg.get("method", "clicktrain") if cfg.get("method", "clicktrain") != "clicktrain" else f"{cfg['importance']} / {cfg['library']}",
            f"{100 * final['test_accuracy']:.2f}",
            f"{100 * float(before_hard[-1]['test_accuracy']):.2f}" if before_hard and hard else "-",
            f"{100 * float(hard[0]['test_accuracy']):.2f}" if hard else "-",
            f"{final['compression_ratio']:.2f}x", f"{final['wall_time_s']:.0f}", f"{final['train_seconds']:.0f}",
            f"{1e3 * final['importance_overhead_s'] / steps:.2f}" if cfg.get("method", "clicktrain") == "clicktrain" else "-",
            f"{1e3 * final['penalty_overhead_s'] / steps:.2f}" if cfg.get("method", "clicktrain") == "clicktrain" else "-",
        ])
    header = ["run", "importance / library", "final test acc %", "acc before hard %", "acc after 1st hard epoch %",
              "conv CR", "wall s", "train s", "importance ms/step (avg)", "group-lasso ms/step (avg)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nCPU: {json.loads((Path(dirs[0]) / 'final.json').read_text())['cpu']}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The command line: inspect a dump, run the demo end to end on real data."""

import json
import subprocess
import sys

import pytest
import torch

import clicktrain as ct
from clicktrain.cli import main


def test_inspect_dump(tmp_path, capsys):
    from zoo import BranchNet
    m = ct.compile_for_training(BranchNet(), torch.randn(1, 3, 8, 8), debug_dir=tmp_path)
    ct.select_patterns(m)
    ct.harden(m)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(10 stages)" in out and "008_filter_kernel_reorder" in out
    assert "## filter-kernel reorder" in out and "merge" in out


def test_inspect_missing_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "expected a debug-dump directory" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_learns_and_prunes(tmp_path, fashion_dir):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "clicktrain.cli", "demo", "--data", str(fashion_dir), "--out", str(out),
         "--dense-steps", "120", "--finetune-steps", "80", "--batch-size", "32", "--threads", "2"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "final.json").read_text())
    assert result["test_accuracy"] > 0.6          # 10 classes: chance is 0.1
    assert result["compression_ratio"] > 4.0      # 4/9 patterns + 50% connectivity on most weights
    assert (out / "plot.png").stat().st_size > 1000
    assert (out / "metrics.csv").read_text().count("\n") == 201
    assert "final (pruned, fine-tuned)" in proc.stdout
    assert sorted(p.name for p in (out / "dump").iterdir())[0] == "000_trace.txt"


def test_demo_reports_missing_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clicktrain.cli", "demo", "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "final.json").exists()

"""The command line: inspect a debug dump."""

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
    assert "(11 stages)" in out and "008_filter_kernel_reorder" in out
    assert "## filter-kernel reorder" in out and "merge" in out


def test_inspect_missing_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "expected a debug-dump directory" in capsys.readouterr().err



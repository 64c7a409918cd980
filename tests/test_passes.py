"""Before/Expected tests of each pass on small graphs."""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clicktrain as ct
from clicktrain.frontend.trace import trace_model
from clicktrain.passes.base import CompileState, PassManager
from clicktrain.passes.find_prunable import FindPrunableConvs
from clicktrain.passes.functionalize import FunctionalizeConvs
from clicktrain.passes.insert_masks import InsertPatternMasks, prunable_layers
from clicktrain.passes.propagate_shapes import PropagateShapes
from clicktrain.passes.reorder import FilterKernelLayout
from clicktrain.patterns import DROPPED


def code(gm) -> str:
    return "\n".join(line.rstrip() for line in gm.code.strip().splitlines() if line.strip())


def expected(text: str) -> str:
    return textwrap.dedent(text).strip()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False, padding_mode="circular")

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def run(gm, passes, config=None, example=None):
    gm._clicktrain = CompileState(config=config or ct.PruneConfig(skip_first_conv=False), target="torch")
    return PassManager(passes)(gm).graph_module


def test_functionalize_convs():
    gm = trace_model(Tiny())
    assert code(gm) == expected("""
        def forward(self, x):
            a = self.a(x);  x = None
            relu = torch.nn.functional.relu(a, inplace = False);  a = None
            b = self.b(relu);  relu = None
            return b""")
    run(gm, [FunctionalizeConvs()])
    assert code(gm) == expected("""
        def forward(self, x):
            a_weight = self.a.weight
            a_bias = self.a.bias
            a_conv = torch.conv2d(x, a_weight, a_bias, (1, 1), (1, 1), (1, 1), 1);  x = a_weight = a_bias = None
            relu = torch.nn.functional.relu(a_conv, inplace = False);  a_conv = None
            b_weight = self.b.weight
            pad = torch.nn.functional.pad(relu, (1, 1, 1, 1), mode = 'circular');  relu = None
            b_conv = torch.conv2d(pad, b_weight, None, (1, 1), (0, 0), (1, 1), 1);  pad = b_weight = None
            return b_conv""")


def test_insert_pattern_masks():
    x = torch.randn(2, 3, 6, 6)
    gm = run(trace_model(Tiny()), [PropagateShapes((x,)), FunctionalizeConvs(),
                                   FindPrunableConvs(ct.PruneConfig(skip_first_conv=True)),
                                   InsertPatternMasks(ct.PruneConfig())])
    assert code(gm) == expected("""
        def forward(self, x):
            a_weight = self.a.weight
            a_bias = self.a.bias
            a_conv = torch.conv2d(x, a_weight, a_bias, (1, 1), (1, 1), (1, 1), 1);  x = a_weight = a_bias = None
            relu = torch.nn.functional.relu(a_conv, inplace = False);  a_conv = None
            b_weight = self.b.weight
            clicktrain_masks_b = self.clicktrain_masks.b(b_weight);  b_weight = None
            pad = torch.nn.functional.pad(relu, (1, 1, 1, 1), mode = 'circular');  relu = None
            b_conv = torch.conv2d(pad, clicktrain_masks_b, None, (1, 1), (0, 0), (1, 1), 1);  pad = clicktrain_masks_b = None
            return b_conv""")
    assert "clicktrain_masks.b.pattern_ids" in gm.state_dict()


def test_find_prunable_convs_reasons():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(3, 8, 3)
            self.five = nn.Conv2d(8, 8, 5, padding=2)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.one = nn.Conv2d(8, 8, 1)
            self.skipme = nn.Conv2d(8, 8, 3, padding=1)
            self.keep = nn.Conv2d(8, 8, 3, padding=1, stride=2, dilation=1)

        def forward(self, x):
            x = self.first(x)
            x = self.five(x) + self.grouped(x) + self.dw(x) + self.one(x)
            x = self.skipme(x)
            x = F.conv2d(x, self.keep.weight * 2, padding=1)  # computed weight
            return self.keep(x)

    m = ct.compile_for_training(M(), torch.randn(1, 3, 10, 10), config=ct.PruneConfig(skip=("skip*",)))
    treatments = {r.name: r.treatment for r in ct.pruning_report(m).layers}
    assert treatments == {
        "first": "dense: first conv (skip_first_conv=True)",
        "five": "dense: 5x5 kernel (patterns are 3x3)",
        "grouped": "dense: grouped conv (groups=4)",
        "dw": "dense: depthwise conv",
        "one": "dense: 1x1 kernel (patterns are 3x3)",
        "skipme": "dense: skipped by config (skip='skip*')",
        "conv2d": "dense: weight is computed, not a parameter",
        "keep": "pattern",
    }


# -- filter-kernel reorder: Before (pattern ids) / Expected (layout) -----------------------
LIBRARY = torch.tensor([[1, 1, 0, 1, 1, 0, 0, 0, 0],   # pattern 0: top-left 2x2
                        [0, 0, 0, 0, 1, 1, 0, 1, 1]],  # pattern 1: bottom-right 2x2
                       dtype=torch.bool)


def test_filter_kernel_reorder_layout():
    pattern_ids = torch.tensor([[1, DROPPED, 0],    # filter 0: one of each  -> signature (1, 1)
                                [0, 0, 1],          # filter 1: 2x p0, 1x p1  -> (2, 1), longest
                                [DROPPED, 1, 0],    # filter 2: same as 0     -> (1, 1)
                                [DROPPED, DROPPED, 1]])  # filter 3: (0, 1)
    layout = FilterKernelLayout.build(LIBRARY, pattern_ids)
    assert layout.perm.tolist() == [1, 0, 2, 3]
    assert layout.groups == [(0, 1), (1, 3), (3, 4)]
    assert layout.signatures == [(2, 1), (1, 1), (1, 1), (0, 1)]
    assert layout.kernel_ptr.tolist() == [0, 3, 5, 7, 8]
    # kernels inside each filter ordered by (pattern, channel)
    assert layout.kernel_pattern.tolist() == [0, 0, 1, 0, 1, 0, 1, 1]
    assert layout.kernel_channel.tolist() == [0, 1, 2, 2, 0, 2, 1, 2]
    # the first kept kernel is filter 1, channel 0, pattern 0 -> positions 0, 1, 3, 4
    assert layout.weight_index[0].tolist() == [(1 * 3 + 0) * 9 + p for p in (0, 1, 3, 4)]


def test_filter_kernel_reorder_compact_round_trip():
    torch.manual_seed(0)
    pattern_ids = torch.randint(-1, 2, (6, 5))
    w = torch.randn(6, 5, 3, 3)
    layout = FilterKernelLayout.build(LIBRARY, pattern_ids)
    compact = layout.compact(w)
    assert compact.shape == (int((pattern_ids >= 0).sum()), 4)
    from clicktrain.patterns import kernel_masks
    assert torch.equal(layout.expand(compact), w * kernel_masks(LIBRARY, pattern_ids))


def test_harden_pipeline_dumps_and_checks(tmp_path):
    m = ct.compile_for_training(Tiny(), torch.randn(1, 3, 6, 6), debug_dir=tmp_path,
                                config=ct.PruneConfig(skip_first_conv=False, connectivity=0.25))
    with pytest.raises(ct.StateError, match="select_patterns"):
        ct.harden(m)
    ct.select_patterns(m)
    ct.harden(m)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000_trace.txt", "001_propagate_shapes.txt", "002_functionalize_convs.txt",
                     "003_find_prunable_convs.txt", "004_insert_pattern_masks.txt", "005_lower_to_target.txt",
                     "006_select_patterns.txt", "007_harden_masks.txt", "008_filter_kernel_reorder.txt",
                     "009_generate_kernels.txt", "010_fuse_batchnorm.txt"]
    table = (tmp_path / "007_harden_masks.txt").read_text()
    assert "## pattern layers" in table and "HARD" in table and "9/12" in table and "12/16" in table  # 25% of kernels dropped
    reorder = (tmp_path / "008_filter_kernel_reorder.txt").read_text()
    assert "## filter-kernel reorder" in reorder
    # a fresh compile into the same directory starts over at 000
    ct.compile_for_training(Tiny(), torch.randn(1, 3, 6, 6), debug_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 6


def test_harden_ensures_catches_a_broken_invariant():
    from clicktrain.passes.harden import HardenMasks
    m = ct.compile_for_training(Tiny(), torch.randn(1, 3, 6, 6), config=ct.PruneConfig(skip_first_conv=False))
    ct.select_patterns(m)
    ct.harden(m)
    layer = prunable_layers(m)[0]
    with torch.no_grad():
        layer.weight[~layer.mask.mask()] = 1.0
    with pytest.raises(AssertionError, match="outside the patterns"):
        HardenMasks().ensures(m)

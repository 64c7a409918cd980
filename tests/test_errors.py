"""Bad input gets a clicktrain error that names the culprit and says what to do."""

import gzip

import pytest
import torch
from torch import nn

import clicktrain as ct
from clicktrain.data import load_idx_split, read_idx


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return x * 2
        return x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = DataDependent()
        self.out = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.out(self.gate(self.conv(x)))


def test_untraceable_submodule_is_named_with_advice():
    with pytest.raises(ct.TraceError) as info:
        ct.compile_for_training(Wrapper(), torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "'gate' (DataDependent)" in msg
    assert "leaf_modules=('gate',)" in msg
    assert "x.sum() > 0" in msg  # the user's failing line
    assert info.value.__suppress_context__  # our message first, not an FX traceback


def test_leaf_modules_makes_it_traceable():
    model = Wrapper().eval()
    x = torch.randn(2, 3, 8, 8)
    m = ct.compile_for_training(model, x, leaf_modules=("gate",), config=ct.PruneConfig(skip_first_conv=False))
    torch.testing.assert_close(m(x), model(x))
    assert {r.name for r in ct.pruning_report(m).layers if r.treatment == "pattern"} == {"conv", "out"}
    m2 = ct.compile_for_training(model, x, leaf_modules=(DataDependent,))
    torch.testing.assert_close(m2(x), model(x))


def test_untraceable_top_level_forward():
    with pytest.raises(ct.TraceError, match="model's forward"):
        ct.compile_for_training(DataDependent(), torch.randn(1, 3, 4, 4))


def test_example_inputs_that_do_not_fit():
    with pytest.raises(ct.TraceError, match=r"example inputs \[\(1, 5, 8, 8\)\]"):
        ct.compile_for_training(Wrapper(), torch.randn(1, 5, 8, 8), leaf_modules=("gate",))


def test_not_a_module():
    with pytest.raises(ct.TraceError, match="expects a torch.nn.Module"):
        ct.compile_for_training(lambda x: x, torch.randn(1))


@pytest.mark.parametrize("kwargs, match", [
    ({"pattern_nnz": 0}, "pattern_nnz must be an integer in 1..9"),
    ({"pattern_nnz": 10}, "pattern_nnz"),
    ({"pattern_nnz": 4.0}, "pattern_nnz"),
    ({"num_patterns": 127}, r"num_patterns must be an integer in 1..126"),
    ({"pattern_nnz": 8, "num_patterns": 10}, r"1..9 \(there are C\(9,8\) = 9"),
    ({"connectivity": 1.0}, r"connectivity .* \[0, 1\)"),
    ({"connectivity": -0.1}, "connectivity"),
    ({"skip": (3,)}, "skip must be a tuple of module names"),
    ({"pattern_block": "2y2"}, r"pattern_block must be \(filters, input channels\).*got '2y2'"),
    ({"pattern_block": (0, 2)}, "pattern_block"),
    ({"pattern_block": (2, 2, 2)}, "pattern_block"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ct.ConfigError, match=match):
        ct.PruneConfig(**kwargs)


def test_skip_accepts_a_single_string():
    assert ct.PruneConfig(skip="features.3").skip == ("features.3",)


def test_pattern_block_accepts_a_string():
    assert ct.PruneConfig(pattern_block="4x2").pattern_block == (4, 2)
    assert ct.PruneConfig().pattern_block == (1, 1)


def test_config_of_wrong_type():
    with pytest.raises(ct.ConfigError, match="PruneConfig"):
        ct.compile_for_training(Wrapper(), torch.randn(1, 3, 8, 8), config={"pattern_nnz": 4})


def test_unknown_and_unavailable_targets():
    with pytest.raises(ct.TargetError, match="unknown target 'tpu'"):
        ct.compile_for_training(Wrapper(), torch.randn(1, 3, 8, 8), target="tpu")


def test_library_of_the_wrong_shape():
    m = ct.compile_for_training(Wrapper(), torch.randn(1, 3, 8, 8), leaf_modules=("gate",))
    with pytest.raises(ct.ConfigError, match="library must hold 8 patterns of 4 weights"):
        ct.select_patterns(m, library=torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(ct.ConfigError, match="unknown prunable convs"):
        ct.select_patterns(m, importance={"nope": torch.ones(4, 4, 3, 3)})


def test_select_after_harden_and_uncompiled_model():
    m = ct.compile_for_training(Wrapper(), torch.randn(1, 3, 8, 8), leaf_modules=("gate",))
    ct.select_patterns(m)
    ct.harden(m)
    with pytest.raises(ct.StateError, match="already hardened"):
        ct.select_patterns(m)
    with pytest.raises(ct.StateError, match="compile_for_training"):
        ct.pruning_report(Wrapper())


def test_corrupt_and_missing_data_files(tmp_path):
    with pytest.raises(ct.DataError, match="does not exist"):
        load_idx_split(tmp_path / "nowhere")
    with pytest.raises(ct.DataError, match="no train-images-idx3-ubyte"):
        load_idx_split(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ct.DataError, match="cannot read IDX file"):
        read_idx(bad)
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (4).to_bytes(4, "big") * 2 + b"\x00" * 5))
    with pytest.raises(ct.DataError, match=r"corrupt or truncated: header says shape \(2, 4, 4\)"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ct.DataError, match="not an IDX file"):
        read_idx(bad)

"""Generated BatchNorm (+ ReLU, + residual add) against torch's ops; the FuseBatchNorm pass
Before/Expected; a fused model trains, evaluates and exports as the unfused one."""

import copy
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clicktrain as ct
from clicktrain.codegen.target import resolve_target
from clicktrain.frontend.trace import trace_model
from clicktrain.models import build_model
from clicktrain.passes.base import CompileState, PassManager
from clicktrain.passes.fuse_batchnorm import FuseBatchNorm, unfuse_batchnorm
from clicktrain.passes.propagate_shapes import PropagateShapes
from clicktrain.runtime.batchnorm import GeneratedBatchNorm

from test_passes import code, expected


def reference(bn, x, residual, fusion, ceil=True):
    y = bn(x)
    if residual is not None:
        y = y + residual
    y = F.relu(y) if fusion != "bn" else y
    return F.max_pool2d(y, 2, 2, ceil_mode=ceil) if fusion == "bn_relu_maxpool" else y


# (N, C, H, W): lanes' worth of pixels, a scalar tail only (7x7 = 49 = 3 x 16 + 1 on AVX-512),
# fewer pixels than a vector, one image, one pixel a channel
SHAPES = [(4, 16, 8, 8), (3, 5, 7, 7), (2, 3, 3, 5), (1, 4, 6, 6), (6, 2, 1, 1)]


@pytest.mark.parametrize("fusion", ["bn", "bn_relu", "bn_add_relu", "bn_relu_maxpool"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_generated_batchnorm_matches_torch(fusion, shape, ceil=True):
    """Output, the gradients of input, weight, bias and residual, and the running statistics
    after two steps equal torch's BatchNorm2d (+ add + ReLU, or + ReLU + 2x2 max pool, whose
    odd sizes end in partial windows) on the same values; the inputs carry a large mean,
    which a one-pass variance would cancel away."""
    torch.manual_seed(0)
    ref_bn = nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 1.5)
        ref_bn.bias.normal_()
    bn = copy.deepcopy(ref_bn)
    fused = GeneratedBatchNorm(bn, "bn", fusion, resolve_target("llvm"), pool_ceil=ceil)
    assert fused._runs_generated(torch.randn(shape), torch.randn(shape) if fusion == "bn_add_relu" else None)
    for _ in range(2):
        x = (torch.randn(shape) * 3 + 20).requires_grad_()
        residual = torch.randn(shape, requires_grad=True) if fusion == "bn_add_relu" else None
        xr = x.detach().clone().requires_grad_()
        rr = residual.detach().clone().requires_grad_() if residual is not None else None
        expect = reference(ref_bn, xr, rr, fusion, ceil)
        dy = torch.randn(expect.shape)
        expect.backward(dy)
        got = fused(x, residual)
        got.backward(dy)
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
        if residual is not None:
            torch.testing.assert_close(residual.grad, rr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 2


@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (1, 4, 6, 6), (3, 2, 4, 10)], ids=lambda s: "x".join(map(str, s)))
def test_maxpool_without_ceil_mode_matches_torch(shape):
    """Floor mode on even sizes: every element in exactly one window, as with ceil_mode."""
    test_generated_batchnorm_matches_torch("bn_relu_maxpool", shape, ceil=False)


def test_maxpool_ties_nan_and_uncovered_sizes_follow_torch():
    """Torch's max_pool2d gives a window's gradient to its first largest element in row-major
    order: the generated backward recomputes the same winner. A NaN poisons its channel, as
    in torch. Floor mode on an odd size (a last row no window covers) runs torch's ops."""
    torch.manual_seed(2)
    ref_bn = nn.BatchNorm2d(3)
    bn = copy.deepcopy(ref_bn)
    fused = GeneratedBatchNorm(bn, "bn", "bn_relu_maxpool", resolve_target("llvm"), pool_ceil=True)
    x = torch.randn(2, 3, 5, 6) + 1
    x[:, :, 0, 1] = x[:, :, 0, 0] = 3.0       # ties in the first windows: the left one wins
    x[:, :, 3, 2] = x[:, :, 2, 3] = 4.0       # the top-right one wins over the bottom-left
    x[:, :, 4, 4] = x[:, :, 4, 5] = 5.0       # a partial window (the odd last row), tied
    x[1, 2, 1, 1] = float("nan")              # channel 2: NaN statistics, NaN output
    xr = x.clone().requires_grad_()
    x.requires_grad_()
    expect = reference(ref_bn, xr, None, "bn_relu_maxpool")
    got = fused(x)
    dy = torch.randn(expect.shape)
    expect.backward(dy)
    got.backward(dy)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert bool(got[:, 2].isnan().all()) and not bool(got[:, :2].isnan().any())
    floor = GeneratedBatchNorm(bn, "bn", "bn_relu_maxpool", resolve_target("llvm"), pool_ceil=False)
    odd = torch.randn(2, 3, 5, 6)
    assert not floor._runs_generated(odd, None)
    torch.testing.assert_close(floor(odd), F.max_pool2d(F.relu(F.batch_norm(
        odd, None, None, bn.weight, bn.bias, True)), 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False)],
                         ids=["cumulative-average", "no-affine", "no-running-stats"])
def test_generated_batchnorm_options_match_torch(options):
    torch.manual_seed(1)
    ref_bn = nn.BatchNorm2d(5, **options)
    bn = copy.deepcopy(ref_bn)
    fused = GeneratedBatchNorm(bn, "bn", "bn_relu", resolve_target("llvm"))
    for _ in range(3):
        x = torch.randn(4, 5, 6, 6)
        torch.testing.assert_close(fused(x), F.relu(ref_bn(x)), rtol=1e-4, atol=1e-5)
    assert fused._runs_generated(x, None)
    torch.testing.assert_close(bn.state_dict(), ref_bn.state_dict(), rtol=1e-5, atol=1e-5)
    # evaluation uses the running statistics (where there are some): torch's ops, same numbers
    bn.eval(), ref_bn.eval()
    assert fused._runs_generated(x, None) == (not bn.track_running_stats)
    torch.testing.assert_close(fused(x), F.relu(ref_bn(x)), rtol=1e-4, atol=1e-5)


def test_relu_keeps_nan_and_torch_raises_on_one_value_a_channel():
    fused = GeneratedBatchNorm(nn.BatchNorm2d(2), "bn", "bn_relu", resolve_target("llvm"))
    x = torch.randn(2, 2, 4, 4)
    x[1, 0, 2, 3] = float("nan")
    y = fused(x)
    assert bool(y[:, 0].isnan().all()) and not bool(y[:, 1].isnan().any())  # a NaN poisons its channel's stats
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 2, 1, 1))


class Block(nn.Module):
    """A ResNet basic block, with a BatchNorm whose output has two readers (not fusable
    beyond itself) and an add that broadcasts (not fused)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)
        self.bn4 = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(out) + x)
        twice = self.bn3(out)
        out = (twice + twice.mean((2, 3), keepdim=True)).relu()
        return torch.relu(self.bn4(out) + out[:, :, :1, :1])


def test_fuse_batchnorm_before_expected():
    gm = trace_model(Block())
    gm._clicktrain = CompileState(config=ct.PruneConfig(), target="llvm")
    keys = list(gm.state_dict())
    assert code(gm) == expected("""
        def forward(self, x):
            conv1 = self.conv1(x)
            bn1 = self.bn1(conv1);  conv1 = None
            act = self.act(bn1);  bn1 = None
            bn2 = self.bn2(act);  act = None
            add = bn2 + x;  bn2 = x = None
            relu = torch.nn.functional.relu(add, inplace = False);  add = None
            bn3 = self.bn3(relu);  relu = None
            mean = bn3.mean((2, 3), keepdim = True)
            add_1 = bn3 + mean;  bn3 = mean = None
            relu_1 = add_1.relu();  add_1 = None
            bn4 = self.bn4(relu_1)
            getitem = relu_1[(slice(None, None, None), slice(None, None, None), slice(None, 1, None), slice(None, 1, None))];  relu_1 = None
            add_2 = bn4 + getitem;  bn4 = getitem = None
            relu_2 = torch.relu(add_2);  add_2 = None
            return relu_2""")
    fuse = FuseBatchNorm("llvm")
    PassManager([PropagateShapes((torch.randn(2, 4, 6, 6),)), fuse])(gm)
    assert code(gm) == expected("""
        def forward(self, x):
            conv1 = self.conv1(x)
            clicktrain_batchnorm_bn1 = self.clicktrain_batchnorm.bn1(conv1);  conv1 = None
            clicktrain_batchnorm_bn2 = self.clicktrain_batchnorm.bn2(clicktrain_batchnorm_bn1, x);  clicktrain_batchnorm_bn1 = x = None
            clicktrain_batchnorm_bn3 = self.clicktrain_batchnorm.bn3(clicktrain_batchnorm_bn2);  clicktrain_batchnorm_bn2 = None
            mean = clicktrain_batchnorm_bn3.mean((2, 3), keepdim = True)
            add_1 = clicktrain_batchnorm_bn3 + mean;  clicktrain_batchnorm_bn3 = mean = None
            relu_1 = add_1.relu();  add_1 = None
            clicktrain_batchnorm_bn4 = self.clicktrain_batchnorm.bn4(relu_1)
            getitem = relu_1[(slice(None, None, None), slice(None, None, None), slice(None, 1, None), slice(None, 1, None))];  relu_1 = None
            add_2 = clicktrain_batchnorm_bn4 + getitem;  clicktrain_batchnorm_bn4 = getitem = None
            relu_2 = torch.relu(add_2);  add_2 = None
            return relu_2""")
    assert [(name, fusion) for name, fusion, _ in fuse.fused] == [
        ("bn1", "bn_relu"), ("bn2", "bn_add_relu"), ("bn3", "bn"), ("bn4", "bn")]
    assert list(gm.state_dict()) == keys  # the BatchNorms stay where they were
    unfuse_batchnorm(gm)
    assert "clicktrain_batchnorm" not in code(gm) and code(gm).count("self.bn") == 4
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add) == 3


class PooledBlocks(nn.Module):
    """VGG blocks: BatchNorm, ReLU and a 2x2 max pool as a module and as functions (fused);
    a 3x3 pool, a pool returning indices and a ReLU output with a second reader (not fused)."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(5))
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)

    def forward(self, x):
        x = self.pool(self.act(self.bns[0](x)))
        x = F.max_pool2d(F.relu(self.bns[1](x)), kernel_size=(2, 2))
        x = F.max_pool2d(F.relu(self.bns[2](x)), 3, 1, 1)
        x, where = F.max_pool2d(F.relu(self.bns[3](x)), 2, return_indices=True)
        y = F.relu(self.bns[4](x))
        return F.max_pool2d(y, 2) + y.mean(), where


def test_fuse_batchnorm_takes_the_max_pool_before_expected():
    gm = trace_model(PooledBlocks())
    gm._clicktrain = CompileState(config=ct.PruneConfig(), target="llvm")
    before = code(gm)
    assert before.count("functional.max_pool2d") == 4 and "self.pool(" in before
    fuse = FuseBatchNorm("llvm")
    PassManager([PropagateShapes((torch.randn(2, 4, 16, 16),)), fuse])(gm)
    assert code(gm) == expected("""
        def forward(self, x):
            clicktrain_batchnorm_bns_0 = self.clicktrain_batchnorm.bns_0(x);  x = None
            clicktrain_batchnorm_bns_1 = self.clicktrain_batchnorm.bns_1(clicktrain_batchnorm_bns_0);  clicktrain_batchnorm_bns_0 = None
            clicktrain_batchnorm_bns_2 = self.clicktrain_batchnorm.bns_2(clicktrain_batchnorm_bns_1);  clicktrain_batchnorm_bns_1 = None
            max_pool2d_1 = torch.nn.functional.max_pool2d(clicktrain_batchnorm_bns_2, 3, stride = 1, padding = 1, dilation = 1, ceil_mode = False, return_indices = False);  clicktrain_batchnorm_bns_2 = None
            clicktrain_batchnorm_bns_3 = self.clicktrain_batchnorm.bns_3(max_pool2d_1);  max_pool2d_1 = None
            max_pool2d_with_indices = torch.nn.functional.max_pool2d_with_indices(clicktrain_batchnorm_bns_3, 2, stride = None, padding = 0, dilation = 1, ceil_mode = False, return_indices = True);  clicktrain_batchnorm_bns_3 = None
            getitem = max_pool2d_with_indices[0]
            getitem_1 = max_pool2d_with_indices[1];  max_pool2d_with_indices = None
            clicktrain_batchnorm_bns_4 = self.clicktrain_batchnorm.bns_4(getitem);  getitem = None
            max_pool2d_2 = torch.nn.functional.max_pool2d(clicktrain_batchnorm_bns_4, 2, stride = None, padding = 0, dilation = 1, ceil_mode = False, return_indices = False)
            mean = clicktrain_batchnorm_bns_4.mean();  clicktrain_batchnorm_bns_4 = None
            add = max_pool2d_2 + mean;  max_pool2d_2 = mean = None
            return (add, getitem_1)""")
    assert [(name, fusion) for name, fusion, _ in fuse.fused] == [
        ("bns.0", "bn_relu_maxpool"), ("bns.1", "bn_relu_maxpool"), ("bns.2", "bn_relu"), ("bns.3", "bn_relu"),
        ("bns.4", "bn_relu")]
    assert [gm.clicktrain_batchnorm[k].pool_ceil for k in ("bns_0", "bns_1")] == [True, False]
    x = torch.randn(2, 4, 16, 16)
    reference_model = trace_model(PooledBlocks())
    reference_model.load_state_dict(gm.state_dict())
    torch.testing.assert_close(gm(x), reference_model(x), rtol=1e-4, atol=1e-5)
    unfuse_batchnorm(gm)
    assert code(gm).count("functional.max_pool2d") == 5 and "clicktrain_batchnorm" not in code(gm)  # 3 + 2 put back
    torch.testing.assert_close(gm(x), reference_model(x), rtol=1e-4, atol=1e-5)


def hardened_pair(name: str, x, width: float, connectivity: float, dump=None) -> dict:
    """The same built-in model, hardened on "torch" and on "llvm" (``dump``: the llvm one's debug dump)."""
    models = {}
    for target in ("torch", "llvm"):
        torch.manual_seed(0)
        m = ct.compile_for_training(build_model(name, x.shape[1], 10, width=width), x[:2], target=target,
                                    config=ct.PruneConfig(connectivity=connectivity),
                                    debug_dir=dump if target == "llvm" else None)
        ct.select_patterns(m)
        ct.harden(m)
        models[target] = m
    return models


def trains_evaluates_and_exports_as_torch(models: dict, x, y, tmp_path):
    """Two SGD steps of the "llvm" and "torch" models give the same loss, weights and running
    statistics, eval mode the same outputs; returns the llvm model's ONNX export and output."""
    losses = {}
    for target, m in models.items():
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
        losses[target] = loss.item()
    assert losses["llvm"] == pytest.approx(losses["torch"], rel=1e-4)
    torch.testing.assert_close(models["llvm"].state_dict(), models["torch"].state_dict(), rtol=1e-3, atol=1e-4)
    for m in models.values():
        m.eval()
    with torch.no_grad():
        out = models["llvm"](x)
        torch.testing.assert_close(out, models["torch"](x), rtol=1e-3, atol=1e-4)
    return ct.export_onnx(models["llvm"], tmp_path / "m.onnx", x[:1]), out


def test_fused_resnet_trains_evaluates_and_exports_as_torch(tmp_path):
    """A hardened ResNet-style model on llvm (generated convs and BatchNorms) gives torch's
    loss, gradients and running statistics over two SGD steps, the same outputs in eval
    mode, and an ONNX export with BatchNormalization nodes that onnxruntime agrees with."""
    import onnx
    import onnxruntime as ort
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    models = hardened_pair("resnet20", x, 0.5, 0.3, tmp_path / "dump")
    assert len(models["llvm"].clicktrain_batchnorm) == 21  # the stem, 9 blocks x 2, 2 shortcuts
    table = (tmp_path / "dump" / "010_fuse_batchnorm.txt").read_text()
    assert "## generated BatchNorm (llvm)" in table and "layers.8.bn2" in table and "bn_add_relu" in table
    # each kind of (fusion, channels, pixels) once, forward and backward: (bn_relu, bn_add_relu) at three
    # sizes, the shortcuts' bn at two
    sources = list((tmp_path / "dump").glob("010_fuse_batchnorm.ct_*.tir.py"))
    assert len(sources) == 16 and all("T.prim_func" in p.read_text() for p in sources)
    report = ct.pruning_report(models["llvm"])
    assert "layers.8.bn2 (BatchNorm)" in report.compile_seconds and "layers.8.conv2" in report.compile_seconds
    path, out = trains_evaluates_and_exports_as_torch(models, x, y, tmp_path)
    assert "BatchNormalization" in [n.op_type for n in onnx.load(str(path)).graph.node]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], out.numpy(), rtol=1e-4, atol=1e-4)


def test_fused_vgg_with_pools_trains_evaluates_and_exports_as_torch(tmp_path):
    """The main job's VGG-11/4 on 1x28x28, hardened on llvm: five of its eight BatchNorms take
    the max pool after them (28 -> 14 -> 7 -> 4 -> 2 -> 1, ceil_mode, so 7 -> 4 ends in partial
    windows); two SGD steps give torch's loss, weights and running statistics, eval mode the
    same outputs, and the ONNX export (MaxPool nodes back) what onnxruntime computes."""
    import onnx
    import onnxruntime as ort
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    models = hardened_pair("vgg11", x, 0.25, 0.5)
    fusions = [b.fusion for b in models["llvm"].clicktrain_batchnorm.values()]
    assert fusions.count("bn_relu_maxpool") == 5 and fusions.count("bn_relu") == 3
    gm = models["llvm"]
    assert not any(isinstance(gm.get_submodule(n.target), nn.MaxPool2d) for n in gm.graph.nodes if n.op == "call_module")
    path, out = trains_evaluates_and_exports_as_torch(models, x, y, tmp_path)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("MaxPool") == 5
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], out.numpy(), rtol=1e-4, atol=1e-4)


def test_batchnorm_fuses_at_hardening_on_llvm_only():
    """Not before hardening (torch's convs run then, and a generated BatchNorm between them
    costs more than it saves), not when switched off, not on other targets; and with the
    convs switched to torch's (the trainer's race), the BatchNorms follow."""
    from clicktrain.runtime.pattern_conv import set_generated
    x = torch.randn(2, 3, 8, 8)
    hardened = {}
    for target, config, fused in [("llvm", ct.PruneConfig(), True), ("llvm", ct.PruneConfig(fuse_batchnorm=False), False),
                                  ("torch", ct.PruneConfig(), False)]:
        m = ct.compile_for_training(build_model("resnet20", 3, 10, width=0.25), x, target=target, config=config)
        assert not hasattr(m, "clicktrain_batchnorm") and "self.layers" in m.code
        ct.select_patterns(m)
        ct.harden(m)
        assert hasattr(m, "clicktrain_batchnorm") == fused
        hardened.setdefault(fused, m)
    m = hardened[True]
    modules = list(m.clicktrain_batchnorm.values())
    assert modules and all(b._runs_generated(x, None) for b in modules)
    set_generated(m, False)
    assert not any(b._runs_generated(x, None) for b in modules)
    set_generated(m, True)
    assert all(b.generated for b in modules)
    with pytest.raises(ct.ConfigError, match="fuse_batchnorm"):
        ct.PruneConfig(fuse_batchnorm="yes")

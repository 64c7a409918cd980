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


def reference(bn, x, residual, fusion):
    y = bn(x)
    if residual is not None:
        y = y + residual
    return F.relu(y) if fusion != "bn" else y


# (N, C, H, W): lanes' worth of pixels, a scalar tail only (7x7 = 49 = 3 x 16 + 1 on AVX-512),
# fewer pixels than a vector, one image, one pixel a channel
SHAPES = [(4, 16, 8, 8), (3, 5, 7, 7), (2, 3, 3, 5), (1, 4, 6, 6), (6, 2, 1, 1)]


@pytest.mark.parametrize("fusion", ["bn", "bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_generated_batchnorm_matches_torch(fusion, shape):
    """Output, the gradients of input, weight, bias and residual, and the running statistics
    after two steps equal torch's BatchNorm2d (+ add + ReLU) on the same values; the inputs
    carry a large mean, which a one-pass variance would cancel away."""
    torch.manual_seed(0)
    ref_bn = nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 1.5)
        ref_bn.bias.normal_()
    bn = copy.deepcopy(ref_bn)
    fused = GeneratedBatchNorm(bn, "bn", fusion, resolve_target("llvm"))
    assert fused._runs_generated(torch.randn(shape), torch.randn(shape) if fusion == "bn_add_relu" else None)
    for _ in range(2):
        x = (torch.randn(shape) * 3 + 20).requires_grad_()
        residual = torch.randn(shape, requires_grad=True) if fusion == "bn_add_relu" else None
        dy = torch.randn(shape)
        xr = x.detach().clone().requires_grad_()
        rr = residual.detach().clone().requires_grad_() if residual is not None else None
        expect = reference(ref_bn, xr, rr, fusion)
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


def test_fused_resnet_trains_evaluates_and_exports_as_torch(tmp_path):
    """A hardened ResNet-style model on llvm (generated convs and BatchNorms) gives torch's
    loss, gradients and running statistics over two SGD steps, the same outputs in eval
    mode, and an ONNX export with BatchNormalization nodes that onnxruntime agrees with."""
    import onnx
    import onnxruntime as ort
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    models = {}
    for target in ("torch", "llvm"):
        torch.manual_seed(0)
        m = ct.compile_for_training(build_model("resnet20", 3, 10, width=0.5), x[:2], target=target,
                                    config=ct.PruneConfig(connectivity=0.3),
                                    debug_dir=tmp_path / "dump" if target == "llvm" else None)
        ct.select_patterns(m)
        ct.harden(m)
        models[target] = m
    assert len(models["llvm"].clicktrain_batchnorm) == 21  # the stem, 9 blocks x 2, 2 shortcuts
    table = (tmp_path / "dump" / "010_fuse_batchnorm.txt").read_text()
    assert "## generated BatchNorm (llvm)" in table and "layers.8.bn2" in table and "bn_add_relu" in table
    # each kind of (fusion, channels, pixels) once, forward and backward: (bn_relu, bn_add_relu) at three
    # sizes, the shortcuts' bn at two
    sources = list((tmp_path / "dump").glob("010_fuse_batchnorm.ct_*.tir.py"))
    assert len(sources) == 16 and all("T.prim_func" in p.read_text() for p in sources)
    report = ct.pruning_report(models["llvm"])
    assert "layers.8.bn2 (BatchNorm)" in report.compile_seconds and "layers.8.conv2" in report.compile_seconds
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
    path = ct.export_onnx(models["llvm"], tmp_path / "m.onnx", x[:1])
    assert "BatchNormalization" in [n.op_type for n in onnx.load(str(path)).graph.node]
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

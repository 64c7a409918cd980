"""Generated CUDA kernels on a GPU: numerics against a masked dense conv and whole models
against the torch reference. Skipped where no CUDA GPU is visible (CPU machines and CI);
`tests/cuda_prebuild.py` compiles these kernels ahead on a machine with TVM's compiler."""

import copy

import pytest
import torch
import torch.nn.functional as F

import clicktrain as ct

from test_kernels import GRID, hardened_conv, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@pytest.fixture(autouse=True)
def exact_reference():
    """cuDNN's default TF32 convolutions are not a 1e-4 reference: use full float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
MODELS = ["vgg", "resnet", "mixed"]


def cuda_conv(case):
    n, c, o, h, w, stride, padding, dilation, connectivity, with_bias = case
    conv, masked_w, mask = hardened_conv(o, c, stride, padding, dilation, connectivity)
    conv.target = "cuda"
    return conv, masked_w, mask


def cuda_models(name):
    from zoo import zoo
    factory, x = zoo()[name]
    torch.manual_seed(0)
    model = factory()
    models = {}
    for target in ("torch", "cuda"):
        m = ct.compile_for_training(copy.deepcopy(model), x, target=target, config=ct.PruneConfig(connectivity=0.3))
        ct.select_patterns(m)
        ct.harden(m)
        models[target] = m
    return models, x


@cuda
@pytest.mark.parametrize("case", GRID)
def test_cuda_kernels_match_masked_dense_conv(case):
    n, c, o, h, w, stride, padding, dilation, connectivity, with_bias = case
    conv, masked_w, mask = cuda_conv(case)
    dev = torch.device("cuda")
    mask.to(dev)
    x = torch.randn(n, c, h, w, device=dev, requires_grad=True)
    weight = masked_w.to(dev).requires_grad_(True)
    bias = torch.randn(o, device=dev, requires_grad=True) if with_bias else None
    y = conv(x, weight, bias)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    b_ref = bias.detach().clone().requires_grad_(True) if with_bias else None
    y_ref = F.conv2d(x_ref, w_ref, b_ref, stride, padding, dilation)
    assert rel_err(y, y_ref) < 1e-4
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    kept = mask.mask()
    assert rel_err(x.grad, x_ref.grad) < 1e-4
    assert rel_err(weight.grad[kept], w_ref.grad[kept]) < 1e-4
    assert float(weight.grad[~kept].abs().sum()) == 0.0


@cuda
@pytest.mark.parametrize("name", MODELS)
def test_cuda_model_equals_torch_reference(name, monkeypatch):
    monkeypatch.setenv("CLICKTRAIN_AUTOTUNE", "0")
    models, x = cuda_models(name)
    results = {}
    for target, m in models.items():
        m = m.cuda()
        loss = m(x.cuda()).square().mean()
        loss.backward()
        results[target] = (loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None})
    (lt, gt), (lc, gc) = results["torch"], results["cuda"]
    assert rel_err(lc, lt) < 1e-4
    for key in gt:
        assert rel_err(gc[key], gt[key]) < 1e-4, key

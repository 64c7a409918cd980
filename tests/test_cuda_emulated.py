"""The generated CUDA kernels' numerics on a machine without a GPU: each kernel's CUDA C runs
on the CPU with its blocks' threads as real threads (tests/cuda_emulator.py), against a
masked dense conv. tests/test_cuda.py runs the same grid on a GPU where there is one."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from clicktrain.codegen.kernels import ConvGeometry, LayerKernels, kernel_sources, plan_kernels
from clicktrain.codegen.target import resolve_target
from clicktrain.runtime.pattern_conv import LayerRunner

from cuda_emulator import EmulatedKernel
from test_kernels import GRID, GRID_IDS, hardened_conv, rel_err

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("g++") is None,
                                reason="needs nvcc (TVM's CUDA build) and g++")


def emulated_runner(conv, in_hw, weight_shape):
    """A LayerRunner whose three kernels are the CUDA ones, run by the emulator."""
    target = resolve_target("cuda")
    geom = ConvGeometry.of(weight_shape, in_hw, conv.stride, conv.padding, conv.dilation)
    plan = plan_kernels(geom, conv._mask.library.cpu(), target, conv.row_groups())
    kernels = LayerKernels(plan, target, kernel_sources(plan, target))
    kernels.forward, kernels.grad_input, kernels.grad_weight = (
        EmulatedKernel(kernels.sources[spec.name], target) for spec in plan.specs)
    return LayerRunner(kernels, conv.index_for(torch.device("cpu"), kernels))


@pytest.mark.parametrize("case", GRID, ids=GRID_IDS)
def test_emulated_cuda_kernels_match_masked_dense_conv(case):
    n, c, o, h, w, stride, padding, dilation, connectivity, with_bias = case
    conv, masked_w, mask = hardened_conv(o, c, stride, padding, dilation, connectivity)
    conv.target = "cuda"
    runner = emulated_runner(conv, (h, w), masked_w.shape)
    poisoned = masked_w.masked_fill(~mask.mask(), float("nan"))  # pruned weights must never be read
    x = torch.randn(n, c, h, w, requires_grad=True)
    bias = torch.randn(o) if with_bias else None
    w_ref = masked_w.clone().requires_grad_(True)
    y_ref = F.conv2d(x, w_ref, bias, stride, padding, dilation)
    dout = torch.randn_like(y_ref)
    y_ref.backward(dout)
    y, xpad = runner.forward(x.detach(), poisoned, bias)
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(runner.grad_input(dout, poisoned, tuple(x.shape)), x.grad) < 1e-4
    grad = runner.grad_weight(dout, x.detach(), xpad, poisoned)
    kept = mask.mask()
    assert rel_err(grad[kept], w_ref.grad[kept]) < 1e-4
    assert float(grad[~kept].abs().sum()) == 0.0

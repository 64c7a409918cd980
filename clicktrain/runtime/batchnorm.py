"""A BatchNorm2d (with the ReLU after it, and a residual add before that) on generated kernels.

``GeneratedBatchNorm`` stands in the graph where ``FuseBatchNorm`` found ``bn(x)``,
``relu(bn(x))`` or ``relu(bn(x) + r)``. It has no parameters of its own: it reads the
model's ``nn.BatchNorm2d`` (still registered at its own path, so parameter names, the
state_dict and the sharing with the traced model do not change) and updates its running
statistics exactly as torch does. Only training-mode statistics run on the generated
kernels (``codegen/batchnorm.py``); evaluation (running statistics), other dtypes and
devices run torch's ops, with the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..codegen.batchnorm import BatchNormSpec, batchnorm_kernels
from .kernel_call import call_kernel


class _BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, kernels, out_hw):
        n, c = x.shape[:2]
        # detached: DLPack refuses tensors that require grad (autograd sees this function whole)
        x, weight, bias = (t.detach().contiguous() for t in (x, weight, bias))
        residual = None if residual is None else residual.detach().contiguous()
        y = x.new_empty((n, c, *out_hw))  # pooled: a quarter of x
        stats = torch.empty(5, c)  # mean, 1/sqrt(var + eps), biased var, scale, shift
        dummy = stats[0, :1]
        flat = (n, c, -1)
        call_kernel(kernels.forward, x.view(flat), weight, bias,
                    dummy if residual is None else residual.view(flat), y.view(flat), stats)
        ctx.kernels, ctx.has_residual = kernels, residual is not None
        ctx.save_for_backward(x, y if residual is not None else None, stats)  # y: the mask, behind a residual
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx, dy, _):
        x, y, stats = ctx.saved_tensors
        n, c = x.shape[:2]
        flat = (n, c, -1)
        dx = torch.empty_like(x)
        dres = torch.empty_like(x) if ctx.has_residual else None
        dparams = torch.empty(2, c)
        dummy = dparams[0, :1]
        call_kernel(ctx.kernels.backward, dy.contiguous().view(flat), x.view(flat),
                    dummy if y is None else y.view(flat), stats, dx.view(flat),
                    dummy if dres is None else dres.view(flat), dparams)
        return dx, dparams[0], dparams[1], dres, None, None


class GeneratedBatchNorm(nn.Module):
    """``fusion(bn, x[, residual])`` with ``fusion`` one of ``codegen.batchnorm.FUSIONS``;
    ``bn_relu_maxpool`` ends in ``max_pool2d(., 2, 2, ceil_mode=pool_ceil)``."""

    def __init__(self, bn: nn.BatchNorm2d, bn_target: str, fusion: str, target, pool_ceil: bool = False):
        super().__init__()
        object.__setattr__(self, "bn", bn)  # not registered: it stays the model's, at its own path
        self.bn_target, self.fusion, self.target, self.pool_ceil = bn_target, fusion, target, pool_ceil
        self.generated = True  # False: torch's ops (pattern_conv.set_generated, with the convs)

    def extra_repr(self) -> str:
        pool = f", pool ceil_mode={self.pool_ceil}" if self.pooled else ""
        return f"{self.fusion} of {self.bn_target}{pool}"

    @property
    def pooled(self) -> bool:
        return self.fusion == "bn_relu_maxpool"

    def spec(self, shape) -> BatchNormSpec:
        """The kernels' spec for an input of ``shape`` (N, C, H, W)."""
        _, c, h, w = shape
        return BatchNormSpec(c, h * w, self.fusion, float(self.bn.eps), self.target.simd_lanes,
                             width=w if self.pooled else 0, ceil=self.pool_ceil and self.pooled)

    def _uses_batch_statistics(self) -> bool:
        return self.bn.training or self.bn.running_mean is None

    def _torch(self, x, residual):
        """The same computation in torch's ops (evaluation, other devices and dtypes)."""
        bn = self.bn
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         self._uses_batch_statistics(), self._momentum(), bn.eps)
        if residual is not None:
            y = y + residual
        y = F.relu(y) if self.fusion != "bn" else y
        return F.max_pool2d(y, 2, 2, ceil_mode=self.pool_ceil) if self.pooled else y

    def _counts_batches(self) -> bool:
        bn = self.bn
        return bn.training and bn.track_running_stats and bn.num_batches_tracked is not None

    def _momentum(self) -> float:
        """torch's: with ``momentum=None`` the running statistics are a cumulative average."""
        bn = self.bn
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked) if self._counts_batches() else 0.0
        return bn.momentum

    def _runs_generated(self, x, residual) -> bool:
        return (self.generated and self._uses_batch_statistics() and x.device.type == "cpu" and x.dtype == torch.float32
                and x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] > 1  # else torch's own error
                and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype))
                and self.pool_fits(x.shape[2], x.shape[3]))

    def pool_fits(self, h: int, w: int) -> bool:
        """Whether the pool's windows cover an ``h x w`` map once each (else torch's ops run)."""
        return not self.pooled or self.pool_ceil or (h % 2 == 0 and w % 2 == 0)

    def forward(self, x, residual=None):
        bn = self.bn
        if self._counts_batches():
            bn.num_batches_tracked.add_(1)  # as nn.BatchNorm2d does, before its momentum is read
        if not self._runs_generated(x, residual):
            return self._torch(x, residual)
        n, c, h, w = x.shape
        spec = self.spec(x.shape)
        weight = bn.weight if bn.weight is not None else torch.ones(c)
        bias = bn.bias if bn.bias is not None else torch.zeros(c)
        y, stats = _BatchNormFunction.apply(x, weight, bias, residual, batchnorm_kernels(spec, self.target),
                                            spec.pooled_hw if self.pooled else (h, w))
        if bn.training and bn.running_mean is not None:
            count = n * h * w
            momentum = self._momentum()
            with torch.no_grad():
                bn.running_mean.mul_(1 - momentum).add_(stats[0], alpha=momentum)
                bn.running_var.mul_(1 - momentum).add_(stats[2], alpha=momentum * count / (count - 1))
        return y

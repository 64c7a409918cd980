"""LowerToTarget: make the prunable convs run on the chosen target.

``torch`` is the reference: the graph already computes ``conv2d(x, mask(w))`` with a
dense conv, so nothing changes. ``llvm``/``cuda`` swap in TVM-generated pattern kernels
(the codegen issue); until those exist they are refused up front by the API.
"""

from __future__ import annotations

import torch.fx as fx

from .base import ClicktrainPass, PassResult
from .insert_masks import assert_weights_masked

TARGETS = ("torch", "llvm", "cuda")


class LowerToTarget(ClicktrainPass):
    name = "lower_to_target"

    def __init__(self, target: str):
        assert target in TARGETS, target
        self.target = target

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(gm, False)

    def ensures(self, gm: fx.GraphModule) -> None:
        if self.target == "torch":
            assert_weights_masked(gm)

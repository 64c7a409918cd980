"""LowerToTarget: make the prunable convs run on the chosen target.

``torch`` is the reference: the graph already computes ``conv2d(x, mask(w))`` with a
dense conv, so nothing changes. ``llvm``/``cuda`` swap in TVM-generated pattern kernels
(the codegen issue); until those exist they are refused up front by the API.
"""

from __future__ import annotations

import torch.fx as fx

from .base import ClicktrainPass, PassResult
from .conv_sites import META_KEY, conv_args, is_conv2d_call

TARGETS = ("torch", "llvm", "cuda")


class LowerToTarget(ClicktrainPass):
    name = "lower_to_target"

    def __init__(self, target: str):
        assert target in TARGETS, target
        self.target = target

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(gm, False)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            site = node.meta.get(META_KEY) if is_conv2d_call(node) else None
            if site is not None and site.prunable:
                w = conv_args(node)["weight"]
                assert w.op == "call_module" and w.target == site.mask_target, \
                    f"{node.name}: lowered prunable conv '{site.name}' lost its PatternMask"

"""PropagateShapes: annotate every node with its output shape (``node.meta['tensor_meta']``)."""

from __future__ import annotations

import torch.fx as fx

from ..frontend.shapes import propagate_shapes
from .base import ClicktrainPass, PassResult
from .conv_sites import is_conv2d_call


class PropagateShapes(ClicktrainPass):
    name = "propagate_shapes"

    def __init__(self, example_inputs: tuple):
        self.example_inputs = example_inputs

    def call(self, gm: fx.GraphModule) -> PassResult:
        propagate_shapes(gm, self.example_inputs)
        return PassResult(gm, False)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if is_conv2d_call(node) or node.op == "call_module":
                assert "tensor_meta" in node.meta, f"{node.name}: no shape after propagation"

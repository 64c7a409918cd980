"""FunctionalizeConvs: turn every ``nn.Conv2d`` call into ``F.conv2d(x, weight, bias, ...)``.

Why: afterwards every conv in the graph has one form, and its weight is an explicit
graph value that later passes can route through a PatternMask. The ``nn.Conv2d`` stays
a submodule holding its parameters, so parameter names and the state_dict do not change.

Before::                             Expected::
    conv = self.conv(x)                  conv_weight = self.conv.weight
                                         conv_bias = self.conv.bias
                                         conv_conv = torch.conv2d(x, conv_weight, conv_bias, (1, 1), (1, 1), (1, 1), 1)

A non-zero ``padding_mode`` becomes an explicit ``F.pad`` followed by an unpadded conv.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .base import ClicktrainPass, PassResult
from .conv_sites import NAME_KEY, replace_node


class FunctionalizeConvs(ClicktrainPass):
    name = "functionalize_convs"

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if type(module) is not nn.Conv2d:  # subclasses may override forward: leave them be
                continue
            (x,) = node.args if not node.kwargs else (node.kwargs.get("input", node.args[0] if node.args else None),)
            with gm.graph.inserting_before(node):
                weight = gm.graph.get_attr(f"{node.target}.weight")
                bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
                padding = module.padding
                if module.padding_mode != "zeros":
                    x = gm.graph.call_function(
                        F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode})
                    padding = (0, 0)
                # named after the module, so the dump stays readable
                conv = gm.graph.create_node(
                    "call_function", torch.conv2d, (x, weight, bias, module.stride, padding, module.dilation, module.groups),
                    name=f"{node.target.replace('.', '_')}_conv")
            replace_node(gm, node, conv, **{NAME_KEY: node.target})
            modified = True
        gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "call_module":
                assert type(gm.get_submodule(node.target)) is not nn.Conv2d, \
                    f"{node.name}: nn.Conv2d call left after functionalize_convs"

"""What the passes know about each convolution in the graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

CONV2D_FUNCTIONS = (F.conv2d, torch.conv2d)
CONV2D_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV2D_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
META_KEY = "clicktrain.conv"      # node.meta key holding the node's ConvSite
NAME_KEY = "clicktrain.conv_name"  # node.meta key naming a conv that came from an nn.Conv2d


def is_conv2d_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CONV2D_FUNCTIONS


def conv_args(node: fx.Node) -> dict:
    """The arguments of an ``F.conv2d`` node by name, defaults filled in."""
    args = dict(CONV2D_DEFAULTS)
    args.update(zip(CONV2D_ARG_NAMES, node.args))
    args.update(node.kwargs)
    return args


def set_conv_arg(node: fx.Node, name: str, value) -> None:
    index = CONV2D_ARG_NAMES.index(name)
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs


def replace_node(gm: fx.GraphModule, old: fx.Node, new: fx.Node, **meta) -> None:
    """Make ``new`` take ``old``'s place: its meta (plus ``meta``), its users; erase ``old``."""
    new.meta = dict(old.meta, **meta)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)


def pair(v) -> tuple[int, int]:
    """A conv hyper-parameter given as an int or a pair, as a pair of ints."""
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass
class ConvSite:
    """One conv weight and how clicktrain treats it. ``reason`` says why a conv stays dense."""

    name: str
    weight_target: str | None
    weight_shape: tuple[int, ...]
    stride: tuple
    padding: tuple | str
    dilation: tuple
    groups: int
    input_shape: tuple | None
    output_shape: tuple | None
    prunable: bool = False
    reason: str = ""
    mask_target: str | None = None   # call_module target of its PatternMask, once inserted

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight_shape[2:4])

    @property
    def num_weights(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n

    def describe_shape(self) -> str:
        o, c, kh, kw = self.weight_shape
        return f"{o}x{c}x{kh}x{kw}"

    def describe_conv(self) -> str:
        pad = self.padding if isinstance(self.padding, str) else "x".join(map(str, pair(self.padding)))
        return f"s{'x'.join(map(str, pair(self.stride)))} p{pad} d{'x'.join(map(str, pair(self.dilation)))}"

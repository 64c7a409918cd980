"""FindPrunableConvs: classify every conv as prunable (3x3, groups=1, parameter weight)
or dense, with the reason, and attach a ConvSite to each conv node's meta."""

from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx
from torch import nn

from ..config import PruneConfig
from ..frontend.shapes import node_shape
from ..util import format_table
from .base import ClicktrainPass, PassResult, compile_state
from .conv_sites import META_KEY, NAME_KEY, ConvSite, conv_args, is_conv2d_call


def _attr_value(gm: fx.GraphModule, node):
    if isinstance(node, fx.Node) and node.op == "get_attr":
        owner, _, attr = node.target.rpartition(".")
        return getattr(gm.get_submodule(owner) if owner else gm, attr, None)
    return None


def _weight_shape(gm: fx.GraphModule, node) -> tuple:
    value = _attr_value(gm, node)
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return tuple((node_shape(node) if isinstance(node, fx.Node) else None) or ())


class FindPrunableConvs(ClicktrainPass):
    name = "find_prunable_convs"

    def __init__(self, config: PruneConfig):
        self.config = config

    def requires(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if is_conv2d_call(node):
                assert "tensor_meta" in node.meta, f"{node.name}: shapes not propagated"

    def call(self, gm: fx.GraphModule) -> PassResult:
        state = compile_state(gm)
        state.sites.clear()
        first = True
        for node in gm.graph.nodes:
            if not is_conv2d_call(node):
                continue
            args = conv_args(node)
            weight_target = args["weight"].target if isinstance(_attr_value(gm, args["weight"]), nn.Parameter) else None
            name = node.meta.get(NAME_KEY) or weight_target or node.name
            if name in state.sites:  # the same weight used twice: one site, one mask
                node.meta[META_KEY] = state.sites[name]
                continue
            site = ConvSite(
                name=name, weight_target=weight_target, weight_shape=_weight_shape(gm, args["weight"]),
                stride=args["stride"], padding=args["padding"], dilation=args["dilation"],
                groups=args["groups"], input_shape=node_shape(args["input"]), output_shape=node_shape(node))
            site.reason = self._dense_reason(site, first)
            site.prunable = not site.reason
            first = False
            state.sites[name] = site
            node.meta[META_KEY] = site
        return PassResult(gm, False)

    def _dense_reason(self, site: ConvSite, first: bool) -> str:
        if len(site.weight_shape) != 4:
            return "weight shape unknown"
        if site.weight_target is None:
            return "weight is computed, not a parameter"
        if site.groups != 1:
            return "depthwise conv" if site.weight_shape[1] == 1 else f"grouped conv (groups={site.groups})"
        if site.kernel_size != (3, 3):
            return f"{site.kernel_size[0]}x{site.kernel_size[1]} kernel (patterns are 3x3)"
        if first and self.config.skip_first_conv:
            return "first conv (skip_first_conv=True)"
        for pattern in self.config.skip:
            if fnmatch.fnmatchcase(site.name, pattern):
                return f"skipped by config (skip={pattern!r})"
        return ""

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if is_conv2d_call(node):
                assert META_KEY in node.meta, f"{node.name}: conv not classified"

    def describe(self, gm: fx.GraphModule) -> str:
        return sites_table(compile_state(gm).sites.values())


def sites_table(sites) -> str:
    rows = [[s.name, s.describe_shape(), s.describe_conv(),
             "x".join(map(str, s.input_shape[1:])) if s.input_shape else "?",
             "prunable" if s.prunable else f"dense: {s.reason}"] for s in sites]
    return format_table(["conv", "weight", "conv", "input CxHxW", "treatment"], rows, title="## convs")

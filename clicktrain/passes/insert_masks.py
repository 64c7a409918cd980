"""InsertPatternMasks: route each prunable conv's weight through its PatternMask.

The masks live in ``gm.clicktrain_masks`` (a ModuleDict keyed by the conv's name with
dots made underscores), so their state is part of ``state_dict()``.

Before::                                   Expected::
    w = self.conv.weight                       w = self.conv.weight
    y = torch.conv2d(x, w, None, ...)          m = self.clicktrain_masks.conv(w)
                                               y = torch.conv2d(x, m, None, ...)
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..config import PruneConfig
from ..runtime.masks import PatternMask
from .base import ClicktrainPass, PassResult, compile_state
from .conv_sites import META_KEY, conv_args, is_conv2d_call, set_conv_arg

MASKS_ATTR = "clicktrain_masks"


def mask_key(site_name: str, taken) -> str:
    key = site_name.replace(".", "_") or "conv"
    base, n = key, 1
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    return key


class InsertPatternMasks(ClicktrainPass):
    name = "insert_pattern_masks"

    def __init__(self, config: PruneConfig):
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not hasattr(gm, MASKS_ATTR):
            gm.add_module(MASKS_ATTR, nn.ModuleDict())
        masks: nn.ModuleDict = getattr(gm, MASKS_ATTR)
        modified = False
        for node in list(gm.graph.nodes):
            site = node.meta.get(META_KEY) if is_conv2d_call(node) else None
            if site is None or not site.prunable:
                continue
            if site.mask_target is None:
                o, c = site.weight_shape[:2]
                key = mask_key(site.name, masks.keys())
                masks[key] = PatternMask(site.name, o, c, self.config.pattern_nnz, self.config.num_patterns)
                site.mask_target = f"{MASKS_ATTR}.{key}"
            weight = conv_args(node)["weight"]
            with gm.graph.inserting_after(weight):
                masked = gm.graph.call_module(site.mask_target, (weight,))
            masked.meta = dict(weight.meta)
            set_conv_arg(node, "weight", masked)
            modified = True
        gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        assert_weights_masked(gm)


def assert_weights_masked(gm: fx.GraphModule) -> None:
    """Every prunable conv reads its weight through its PatternMask."""
    for node in gm.graph.nodes:
        site = node.meta.get(META_KEY) if is_conv2d_call(node) else None
        if site is not None and site.prunable:
            w = conv_args(node)["weight"]
            assert w.op == "call_module" and w.target == site.mask_target, \
                f"{node.name}: prunable conv '{site.name}' does not read its weight through a PatternMask"


class PrunableLayer:
    """A prunable conv of a compiled model: its site, its PatternMask and its weight."""

    __slots__ = ("site", "mask", "weight")

    def __init__(self, site, mask: PatternMask, weight: nn.Parameter):
        self.site, self.mask, self.weight = site, mask, weight


def prunable_layers(gm: fx.GraphModule) -> list[PrunableLayer]:
    """The prunable convs of a compiled model, in graph order."""
    layers = []
    for site in compile_state(gm).sites.values():
        if site.prunable and site.mask_target is not None:
            layers.append(PrunableLayer(site, gm.get_submodule(site.mask_target), gm.get_parameter(site.weight_target)))
    return layers

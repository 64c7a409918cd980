"""LowerToTarget: make the prunable convs run on the chosen target.

``torch`` is the reference: the graph already computes ``conv2d(x, mask(w))`` with a dense
conv, so nothing changes. ``llvm``/``cuda`` replace each prunable ``torch.conv2d`` with a
``PatternConv2d`` module (``gm.clicktrain_kernels.<name>``) taking the same
``(x, masked weight, bias)``: a dense conv until hardening, the generated kernels after.

Before (llvm)::                                   Expected::
    m = self.clicktrain_masks.conv(w)                 m = self.clicktrain_masks.conv(w)
    y = torch.conv2d(x, m, b, (1, 1), ...)            y = self.clicktrain_kernels.conv(x, m, b)

``GenerateKernels`` (harden pipeline) compiles each layer's three kernels and puts their
TVMScript (and, for cuda, CUDA C) into the dump; ``unlower_kernels`` turns the modules back
into ``torch.conv2d`` calls (for export).
"""

from __future__ import annotations

import time

import torch
import torch.fx as fx
from torch import nn

from ..util import format_table
from .base import ClicktrainPass, PassResult, compile_state
from .conv_sites import META_KEY, conv_args, is_conv2d_call, replace_node
from .insert_masks import MASKS_ATTR, assert_weights_masked, mask_key

TARGETS = ("torch", "llvm", "cuda")
KERNELS_ATTR = "clicktrain_kernels"


def _is_kernel_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    from ..runtime.pattern_conv import PatternConv2d
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), PatternConv2d)


class LowerToTarget(ClicktrainPass):
    name = "lower_to_target"

    def __init__(self, target: str):
        assert target in TARGETS, target
        self.target = target

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.target == "torch":
            return PassResult(gm, False)
        from ..runtime.pattern_conv import PatternConv2d
        if not hasattr(gm, KERNELS_ATTR):
            gm.add_module(KERNELS_ATTR, nn.ModuleDict())
        kernels: nn.ModuleDict = getattr(gm, KERNELS_ATTR)
        by_site: dict[str, str] = {}
        modified = False
        for node in list(gm.graph.nodes):
            site = node.meta.get(META_KEY) if is_conv2d_call(node) else None
            if site is None or not site.prunable:
                continue
            if site.name not in by_site:
                key = mask_key(site.name, kernels.keys())
                kernels[key] = PatternConv2d(site, gm.get_submodule(site.mask_target), self.target)
                by_site[site.name] = f"{KERNELS_ATTR}.{key}"
            args = conv_args(node)
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(by_site[site.name], (args["input"], args["weight"], args["bias"]))
            replace_node(gm, node, call)
            modified = True
        _mark_kernel_consumed_masks(gm)
        gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        if self.target == "torch":
            assert_weights_masked(gm)
            return
        for node in gm.graph.nodes:
            site = node.meta.get(META_KEY)
            if site is not None and site.prunable:
                assert _is_kernel_call(gm, node), f"{node.name}: prunable conv '{site.name}' not lowered to {self.target}"
                w = node.args[1]
                assert w.op == "call_module" and w.target == site.mask_target, \
                    f"{node.name}: lowered conv '{site.name}' does not read its weight through its PatternMask"


def _mark_kernel_consumed_masks(gm: fx.GraphModule) -> None:
    """A PatternMask whose every output feeds a PatternConv2d need not multiply: the kernels
    (and their torch fallbacks) read the kept weights only."""
    readers: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith(MASKS_ATTR + "."):
            only_kernels = all(_is_kernel_call(gm, user) and user.args[1] is node for user in node.users)
            readers[node.target] = readers.get(node.target, True) and only_kernels
    for target, only_kernels in readers.items():
        gm.get_submodule(target).consumers_mask = only_kernels


class GenerateKernels(ClicktrainPass):
    """Compile forward, grad-input and grad-weight kernels of every hardened prunable conv
    for the input size seen at compile time (other sizes compile on first use)."""

    name = "generate_kernels"

    def __init__(self, target: str):
        self.target = target
        self.sources: dict[str, str] = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.target == "torch":
            return PassResult(gm, False)
        state = compile_state(gm)
        self.sources = {}
        sites = [(node.meta[META_KEY], gm.get_submodule(node.target)) for node in gm.graph.nodes
                 if node.meta.get(META_KEY) is not None and _is_kernel_call(gm, node)
                 and node.meta[META_KEY].input_shape is not None]
        started = time.perf_counter()
        for site, module in sites:  # every layer's builds queued first: the compile workers never idle
            module.start_kernels(tuple(site.input_shape[2:]), site.weight_shape)
        for site, module in sites:  # each layer's time: what collecting it waited (adds up to the wall time)
            kernels = module.kernels_for(tuple(site.input_shape[2:]), site.weight_shape)
            state.compile_seconds[site.name] = state.compile_seconds.get(site.name, 0.0) + time.perf_counter() - started
            started = time.perf_counter()
            for name, source in kernels.sources.items():  # the three kernels and the copies around them
                self.sources[f"{name}.tir.py"] = source
            self.sources.update(kernels.device_sources())
        return PassResult(gm, False)

    def ensures(self, gm: fx.GraphModule) -> None:
        if self.target == "torch":
            return
        for node in gm.graph.nodes:
            site = node.meta.get(META_KEY)
            if site is not None and _is_kernel_call(gm, node) and site.input_shape is not None:
                module = gm.get_submodule(node.target)
                assert module.has_kernels_for(tuple(site.input_shape[2:]), site.weight_shape), \
                    f"'{site.name}': no kernels generated"

    def describe(self, gm: fx.GraphModule) -> str:
        state = compile_state(gm)
        if self.target == "torch" or not state.compile_seconds:
            return ""
        rows = [[name, f"{seconds:.2f}"] for name, seconds in state.compile_seconds.items()]
        return format_table(["conv", "compile s (waited; 0: cached or built meanwhile)"], rows, title=f"## generated kernels ({self.target})")

    def dump_files(self, gm: fx.GraphModule) -> dict[str, str]:
        return self.sources


def unlower_kernels(gm: fx.GraphModule) -> None:
    """Replace every PatternConv2d call by the equivalent ``torch.conv2d`` (in place)."""
    for node in list(gm.graph.nodes):
        if _is_kernel_call(gm, node):
            module = gm.get_submodule(node.target)
            x, w, b = node.args
            with gm.graph.inserting_before(node):
                conv = gm.graph.call_function(torch.conv2d, (x, w, b, module.stride, module.padding, module.dilation, 1))
            replace_node(gm, node, conv)
    _mark_kernel_consumed_masks(gm)  # plain convs again: masks multiply
    if hasattr(gm, KERNELS_ATTR):
        delattr(gm, KERNELS_ATTR)
    gm.recompile()

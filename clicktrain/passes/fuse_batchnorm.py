"""FuseBatchNorm (harden pipeline): on ``target="llvm"``, run each BatchNorm2d -- with the
ReLU after it, and a residual add between them -- as one ``GeneratedBatchNorm`` call on
generated kernels.

Why: once its convs are pruned, a small CNN's training step spends a third of its time in
torch's CPU BatchNorm and the ReLUs and adds around it (ResNet-20, docs/performance.md);
one kernel per direction reads each tensor about as often as BatchNorm alone did. It runs
at hardening, when the convs around it move to generated kernels too: between torch convs
the cores would change thread pools twice per BatchNorm, which cost more than it saved.

Four rules, tried longest first on every ``nn.BatchNorm2d`` call:

    bn_add_relu:      relu(bn(x) + r)             ->  self.clicktrain_batchnorm.bn(x, r)
    bn_relu_maxpool:  max_pool2d(relu(bn(x)), 2)  ->  self.clicktrain_batchnorm.bn(x)
    bn_relu:          relu(bn(x))                 ->  self.clicktrain_batchnorm.bn(x)
    bn:               bn(x)                       ->  self.clicktrain_batchnorm.bn(x)

A rule applies only where every intermediate value has that one user (nothing else reads
``bn(x)``, the sum or the ReLU's output) and ``r`` has ``bn(x)``'s shape and dtype (no
broadcasting); the pool must be 2x2 with stride 2, no padding or dilation, no indices
returned (``ceil_mode`` either way; sizes its windows do not cover once run torch's ops). The
``nn.BatchNorm2d`` stays registered at its path: parameter names and the state_dict do not
change. ``unfuse_batchnorm`` puts the plain ops back (for export).

Before::                                     Expected::
    bn2 = self.bn2(conv2)                        bn2 = self.clicktrain_batchnorm.bn2(conv2, shortcut)
    add = bn2 + shortcut
    relu = torch.nn.functional.relu(add)
"""

from __future__ import annotations

import operator
import time

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..util import format_table
from .base import ClicktrainPass, PassResult, compile_state

BATCHNORM_ATTR = "clicktrain_batchnorm"
RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu_of(gm: fx.GraphModule, node: fx.Node | None, value: fx.Node) -> bool:
    if node is None or not node.args or node.args[0] is not value or len(node.args) > 1:
        return False
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS and set(node.kwargs) <= {"inplace"}
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and not node.kwargs
    return node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.ReLU


def _residual_of_add(node: fx.Node | None, value: fx.Node) -> fx.Node | None:
    """The other operand of ``value + other`` (no alpha, no broadcasting), else None. In-place
    adds only with ``value`` first: fused, the other operand is no longer written."""
    if node is None or len(node.args) != 2 or node.kwargs:
        return None
    if not ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("add", "add_"))):
        return None
    a, b = node.args
    in_place = node.target in (operator.iadd, "add_")
    other = b if a is value else (a if b is value and not in_place else None)
    if not isinstance(other, fx.Node) or other is value:
        return None
    mine, theirs = value.meta.get("tensor_meta"), other.meta.get("tensor_meta")
    if mine is None or theirs is None or tuple(mine.shape) != tuple(theirs.shape) or mine.dtype != theirs.dtype:
        return None
    return other


POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)
POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _pool_2x2_ceil(gm: fx.GraphModule, node: fx.Node | None, value: fx.Node) -> bool | None:
    """``ceil_mode`` where ``node`` is a 2x2, stride-2 max pool of ``value`` (no padding,
    dilation or indices), else None."""
    if node is None or not node.args or node.args[0] is not value:
        return None
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.MaxPool2d and len(node.args) == 1:
        pool = gm.get_submodule(node.target)
        given = {name: getattr(pool, name) for name in POOL_ARGS}
    elif node.op == "call_function" and node.target in POOL_FUNCTIONS:
        given = dict(zip(POOL_ARGS, node.args[1:]), **node.kwargs)
        if not set(given) <= set(POOL_ARGS):
            return None
    else:
        return None

    def pair(v, default):
        v = default if v is None or (isinstance(v, (list, tuple)) and not v) else v
        return tuple(v) if isinstance(v, (list, tuple)) else (v, v)
    kernel = pair(given.get("kernel_size"), None)
    if (kernel, pair(given.get("stride"), kernel), pair(given.get("padding"), 0), pair(given.get("dilation"), 1)) \
            != ((2, 2), (2, 2), (0, 0), (1, 1)) or given.get("return_indices", False):
        return None
    return bool(given.get("ceil_mode", False))


def match_batchnorm(gm: fx.GraphModule, bn: fx.Node) -> tuple[str, list[fx.Node], fx.Node | None, bool]:
    """(fusion, the nodes it replaces, bn first and its output last, the residual or None,
    the pool's ceil_mode)."""
    user = _only_user(bn)
    residual = _residual_of_add(user, bn)
    if residual is not None and _is_relu_of(gm, _only_user(user), user):
        return "bn_add_relu", [bn, user, _only_user(user)], residual, False
    if _is_relu_of(gm, user, bn):
        ceil = _pool_2x2_ceil(gm, _only_user(user), user)
        if ceil is not None:
            return "bn_relu_maxpool", [bn, user, _only_user(user)], None, ceil
        return "bn_relu", [bn, user], None, False
    return "bn", [bn], None, False


def _is_batchnorm_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.BatchNorm2d
            and len(node.args) == 1 and not node.kwargs)


class FuseBatchNorm(ClicktrainPass):
    name = "fuse_batchnorm"

    def __init__(self, target: str, enabled: bool = True):
        self.target, self.enabled = target, enabled
        self.fused: list[tuple[str, str, float]] = []  # (BatchNorm2d, fusion, compile seconds)
        self.sources: dict[str, str] = {}

    @property
    def active(self) -> bool:
        return self.enabled and self.target == "llvm"  # cuda: cuDNN's BatchNorm is fast already

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.fused, self.sources = [], {}
        if not self.active:
            return PassResult(gm, False)
        from ..codegen.batchnorm import batchnorm_kernels, start_batchnorm_kernels
        from ..codegen.target import resolve_target
        from ..runtime.batchnorm import GeneratedBatchNorm
        target = resolve_target("llvm")
        if not hasattr(gm, BATCHNORM_ATTR):
            gm.add_module(BATCHNORM_ATTR, nn.ModuleDict())
        modules: nn.ModuleDict = getattr(gm, BATCHNORM_ATTR)

        def generated(node: fx.Node):
            """(the fusion's module, its match, its kernels' spec at the compile-time size or None:
            other sizes compile on first use)."""
            fusion, replaced, residual, ceil = match = match_batchnorm(gm, node)
            module = GeneratedBatchNorm(gm.get_submodule(node.target), node.target, fusion, target, pool_ceil=ceil)
            shape = node.meta.get("tensor_meta")
            fits = shape is not None and len(shape.shape) == 4 and module.pool_fits(*shape.shape[2:])
            return module, match, module.spec(shape.shape) if fits else None
        # every layer's builds started first (the compile workers build them side by side); the
        # loop below matches again, after the rewrites before each node (a residual may be one)
        for node in gm.graph.nodes:
            if _is_batchnorm_call(gm, node) and (spec := generated(node)[2]) is not None:
                start_batchnorm_kernels(spec, target)
        for node in list(gm.graph.nodes):
            if not _is_batchnorm_call(gm, node):
                continue
            module, (fusion, replaced, residual, ceil), spec = generated(node)
            key = node.target.replace(".", "_")
            while key in modules:
                key += "_"
            modules[key] = module
            seconds = 0.0
            if spec is not None:
                started = time.perf_counter()
                kernels = batchnorm_kernels(spec, target)
                self.sources.update({f"{name}.tir.py": src for name, src in kernels.sources.items()})
                seconds = time.perf_counter() - started
                # the pruning report's compile time counts these kernels too
                compile_state(gm).compile_seconds[f"{node.target} (BatchNorm)"] = seconds
            self.fused.append((node.target, fusion, seconds))
            last = replaced[-1]
            with gm.graph.inserting_before(last):
                args = (node.args[0],) if residual is None else (node.args[0], residual)
                call = gm.graph.call_module(f"{BATCHNORM_ATTR}.{key}", args)
            call.meta = dict(last.meta)
            last.replace_all_uses_with(call)
            for old in reversed(replaced):
                gm.graph.erase_node(old)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(self.fused))

    def ensures(self, gm: fx.GraphModule) -> None:
        if not self.active:
            return
        from ..runtime.batchnorm import GeneratedBatchNorm
        for node in gm.graph.nodes:
            assert not _is_batchnorm_call(gm, node), f"{node.name}: BatchNorm2d '{node.target}' left unfused"
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), GeneratedBatchNorm):
                module = gm.get_submodule(node.target)
                assert len(node.args) == (2 if module.fusion == "bn_add_relu" else 1), \
                    f"{node.name}: {module.fusion} called with {len(node.args)} inputs"

    def describe(self, gm: fx.GraphModule) -> str:
        if not self.fused:
            return ""
        rows = [[name, fusion, f"{seconds:.2f}"] for name, fusion, seconds in self.fused]
        return format_table(["BatchNorm2d", "fused", "compile s"], rows, title="## generated BatchNorm (llvm)")

    def dump_files(self, gm: fx.GraphModule) -> dict[str, str]:
        return self.sources


def unfuse_batchnorm(gm: fx.GraphModule) -> None:
    """Replace every GeneratedBatchNorm call by the plain ops it fused (in place)."""
    from ..runtime.batchnorm import GeneratedBatchNorm
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), GeneratedBatchNorm):
            continue
        module = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            out = gm.graph.call_module(module.bn_target, (node.args[0],))
            if module.fusion == "bn_add_relu":
                out = gm.graph.call_function(operator.add, (out, node.args[1]))
            if module.fusion != "bn":
                out = gm.graph.call_function(F.relu, (out,))
            if module.pooled:
                out = gm.graph.call_function(F.max_pool2d, (out, 2, 2), {"ceil_mode": module.pool_ceil})
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    if hasattr(gm, BATCHNORM_ATTR):
        delattr(gm, BATCHNORM_ATTR)
    gm.recompile()

"""Channel spaces of a plain CNN, and physically removing channels from it.

A *channel space* is a set of tensors whose dim 1 indexes the same channels: a conv's output,
the BatchNorm/ReLU/pooling results that follow it, and, through a residual ``add``, the
outputs of every conv feeding the same sum (PruneTrain's "channel union"). Removing channel
``j`` of a space slices every producer's output ``j`` (conv weight rows, bias, the BatchNorm
right after it), every consumer's input ``j`` (conv weight columns, or the ``j``-th block of a
Linear after a flatten), and the matching optimizer state, in place: parameters keep their
identity, so an optimizer built before keeps working.

A space is *locked* (never shrunk) when it reaches something this analysis does not know:
the model's input or output, a ``cat``, a reshape other than ``flatten(1)``, grouped convs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

# per-channel ops: output channel j depends only on input channel j
_CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                        nn.Dropout2d, nn.Identity)
_CHANNELWISE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, torch.sigmoid, torch.tanh,
                          F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout)
_ADD = (operator.add, operator.iadd, torch.add)


@dataclass
class ChannelSpace:
    producers: list[str] = field(default_factory=list)        # conv module names writing it
    norms: list[str] = field(default_factory=list)            # BatchNorm2d module names on it
    norm_after: dict[str, str] = field(default_factory=dict)  # producer conv -> the BatchNorm reading it directly
    consumers: list[str] = field(default_factory=list)        # conv module names reading it
    linears: list[tuple[str, int]] = field(default_factory=list)  # (Linear name, features per channel)
    locked: str = ""                                          # why it cannot shrink


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        self.parent[rb] = ra
        return ra


def channel_spaces(model: nn.Module, example: torch.Tensor) -> list[ChannelSpace]:
    """The channel spaces of ``model`` (plain modules, traceable by ``torch.fx``)."""
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(example)
    uf = _UnionFind()
    space_of: dict[fx.Node, int] = {}       # node -> space id (4-D channel tensors)
    flat_of: dict[fx.Node, tuple[int, int]] = {}  # node -> (space id, features per channel) after flatten(1)
    producers: dict[int, list[str]] = {}
    events: list[tuple[str, int, object]] = []  # (kind, space id, payload), resolved after unions
    next_id = [0]

    def new_space() -> int:
        next_id[0] += 1
        return next_id[0]

    def lock(sid: int, why: str) -> None:
        events.append(("lock", sid, why))

    locked_input = new_space()
    lock(locked_input, "the model input")
    for node in gm.graph.nodes:
        inputs = [a for a in node.all_input_nodes if a in space_of or a in flat_of]
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.op == "placeholder":
            space_of[node] = locked_input
            continue
        if isinstance(module, nn.Conv2d):
            sid_in = space_of.get(node.args[0])
            sid = new_space()
            space_of[node] = sid
            if module.groups != 1:
                lock(sid, f"grouped conv {node.target}")
                if sid_in is not None:
                    lock(sid_in, f"grouped conv {node.target}")
            else:
                producers.setdefault(sid, []).append(node.target)
                if sid_in is not None:
                    events.append(("consumer", sid_in, node.target))
            continue
        if isinstance(module, nn.BatchNorm2d) and node.args[0] in space_of:
            space_of[node] = space_of[node.args[0]]
            events.append(("norm", space_of[node], node.target))
            source = node.args[0]
            if source.op == "call_module" and isinstance(gm.get_submodule(source.target), nn.Conv2d) \
                    and len(source.users) == 1:
                events.append(("norm_after", space_of[node], (source.target, node.target)))
            continue
        channelwise = isinstance(module, _CHANNELWISE_MODULES) or (
            node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS)
        if channelwise and node.args and node.args[0] in space_of:
            space_of[node] = space_of[node.args[0]]
            continue
        if node.op == "call_function" and node.target in _ADD and len(inputs) == 2 and all(a in space_of for a in inputs):
            space_of[node] = uf.union(space_of[inputs[0]], space_of[inputs[1]])
            continue
        is_flatten = (node.op == "call_method" and node.target == "flatten") or \
            (node.op == "call_function" and node.target is torch.flatten)
        if is_flatten and node.args[0] in space_of and tuple(node.args[1:]) in ((1,), ()) and not node.kwargs:
            shape = node.args[0].meta["tensor_meta"].shape
            per_channel = 1
            for d in shape[2:]:
                per_channel *= int(d)
            flat_of[node] = (space_of[node.args[0]], per_channel)
            continue
        if isinstance(module, nn.Linear) and node.args[0] in flat_of:
            sid, per_channel = flat_of[node.args[0]]
            events.append(("linear", sid, (node.target, per_channel)))
            continue
        for a in inputs:  # anything else reading a channel tensor pins its channels
            sid = space_of[a] if a in space_of else flat_of[a][0]
            lock(sid, f"{node.op} {node.target}")
    spaces: dict[int, ChannelSpace] = {}
    for sid, names in producers.items():
        spaces.setdefault(uf.find(sid), ChannelSpace()).producers.extend(names)
    for kind, sid, payload in events:
        space = spaces.setdefault(uf.find(sid), ChannelSpace())
        if kind == "lock":
            space.locked = space.locked or payload
        elif kind == "norm":
            space.norms.append(payload)
        elif kind == "norm_after":
            space.norm_after[payload[0]] = payload[1]
        elif kind == "consumer":
            space.consumers.append(payload)
        else:
            space.linears.append(payload)
    return [s for s in spaces.values() if s.producers]


def _slice_param(param: torch.Tensor, index: torch.Tensor, dim: int, optimizer) -> None:
    """Keep ``index`` along ``dim`` of ``param`` and of its optimizer state, in place."""
    param.data = param.data.index_select(dim, index.to(param.device)).contiguous()
    param.grad = None
    if optimizer is not None:
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > dim:
                optimizer.state[param][key] = value.index_select(dim, index.to(value.device)).contiguous()


@torch.no_grad()
def shrink_space(model: nn.Module, space: ChannelSpace, keep: torch.Tensor, optimizer=None) -> None:
    """Keep only channels ``keep`` (sorted indices into the space's current channels)."""
    keep = keep.long()
    for name in space.producers:
        conv = model.get_submodule(name)
        _slice_param(conv.weight, keep, 0, optimizer)
        if conv.bias is not None:
            _slice_param(conv.bias, keep, 0, optimizer)
        conv.out_channels = len(keep)
    for name in space.norms:
        bn = model.get_submodule(name)
        for p in (bn.weight, bn.bias):
            if p is not None:
                _slice_param(p, keep, 0, optimizer)
        for buf in ("running_mean", "running_var"):
            if getattr(bn, buf) is not None:
                setattr(bn, buf, getattr(bn, buf).index_select(0, keep.to(getattr(bn, buf).device)))
        bn.num_features = len(keep)
    for name in space.consumers:
        conv = model.get_submodule(name)
        _slice_param(conv.weight, keep, 1, optimizer)
        conv.in_channels = len(keep)
    for name, per_channel in space.linears:
        linear = model.get_submodule(name)
        cols = (keep.unsqueeze(1) * per_channel + torch.arange(per_channel)).reshape(-1)
        _slice_param(linear.weight, cols, 1, optimizer)
        linear.in_features = len(cols)

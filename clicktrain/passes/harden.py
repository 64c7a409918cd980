"""HardenMasks: switch every selected PatternMask to HARD and zero the pruned weights.

ensures: every kept kernel has at most k non-zeros, all inside its pattern, and every
dropped kernel is all zeros.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..runtime.masks import Phase, register_hardened
from ..util import format_table
from .base import ClicktrainPass, PassResult
from .insert_masks import prunable_layers


class HardenMasks(ClicktrainPass):
    name = "harden_masks"

    def requires(self, gm: fx.GraphModule) -> None:
        for layer in prunable_layers(gm):
            assert layer.mask.phase is not Phase.DENSE, \
                f"{layer.site.name}: no patterns selected; call ct.select_patterns(model) first"

    def call(self, gm: fx.GraphModule) -> PassResult:
        for layer in prunable_layers(gm):
            layer.mask.phase = Phase.HARD
            layer.mask.apply_(layer.weight)
            register_hardened(layer.weight, layer.mask)
        return PassResult(gm, False)

    def ensures(self, gm: fx.GraphModule) -> None:
        for layer in prunable_layers(gm):
            w = layer.weight.detach()
            outside = (w != 0) & ~layer.mask.mask()
            assert not bool(outside.any()), f"{layer.site.name}: {int(outside.sum())} non-zeros outside the patterns"
            nnz = (w != 0).reshape(*w.shape[:2], 9).sum(-1)
            assert int(nnz.max()) <= layer.mask.pattern_nnz, f"{layer.site.name}: a kernel has more than k non-zeros"

    def describe(self, gm: fx.GraphModule) -> str:
        return layers_table(gm)


def layers_table(gm: fx.GraphModule) -> str:
    rows = []
    for layer in prunable_layers(gm):
        m = layer.mask
        ids = m.pattern_ids.long()
        hist = torch.bincount(ids[ids >= 0].flatten(), minlength=m.library.shape[0]).tolist()
        density = float(m.mask().sum()) / m.mask().numel()
        rows.append([layer.site.name, layer.site.describe_shape(), m.phase.name,
                     f"{m.kept_kernels}/{ids.numel()}", f"{density:.3f}", " ".join(map(str, hist))])
    return format_table(["conv", "weight", "phase", "kept kernels", "density", "pattern histogram"],
                        rows, title="## pattern layers")

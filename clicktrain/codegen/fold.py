"""Fold a compiled model back into a plain graph: masks multiplied into the weights.

Shared by the ONNX and plain-PyTorch exports so they see exactly the same weights.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.fx as fx

from ..errors import StateError
from ..passes.base import compile_state
from ..passes.insert_masks import MASKS_ATTR, prunable_layers
from ..passes.fuse_batchnorm import unfuse_batchnorm
from ..passes.lower import unlower_kernels
from ..runtime.masks import Phase


def check_exportable(gm: fx.GraphModule) -> None:
    """Refuse models whose masks are chosen but not applied, or whose weights left their patterns."""
    from ..errors import ClicktrainError
    for layer in prunable_layers(gm):
        if layer.mask.phase is Phase.SELECTED:
            raise StateError(
                f"'{layer.site.name}' has patterns selected but not applied: call ct.harden(model) before "
                f"exporting (or export before select_patterns for a dense model)")
        if layer.mask.phase is Phase.HARD:
            outside = (layer.weight.detach() != 0) & ~layer.mask.mask()
            if bool(outside.any()):
                raise ClicktrainError(
                    f"'{layer.site.name}' has {int(outside.sum())} non-zero weights outside its declared patterns; "
                    f"nothing was exported. Re-apply the masks (ct.harden) or check code that edits weights in place.")


def folded_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with every PatternMask call removed and its mask multiplied into the
    (copied) weight; hardened pruned weights become exact zeros. ``gm`` is not changed."""
    state = compile_state(gm)
    check_exportable(gm)
    plain = copy.deepcopy(gm)  # GraphModule's deepcopy keeps modules and graph, not our state
    plain._clicktrain = dataclasses.replace(state, dump=None)
    masks = {layer.site.mask_target: layer for layer in prunable_layers(plain)}
    for node in list(plain.graph.nodes):
        if node.op == "call_module" and node.target in masks:
            layer = masks[node.target]
            if layer.mask.phase is Phase.HARD:
                with torch.no_grad():
                    layer.weight.masked_fill_(~layer.mask.mask(), 0)
            node.replace_all_uses_with(node.args[0])
            plain.graph.erase_node(node)
    unlower_kernels(plain)
    unfuse_batchnorm(plain)
    if hasattr(plain, MASKS_ATTR):
        delattr(plain, MASKS_ATTR)
    plain.graph.lint()
    plain.recompile()
    return plain

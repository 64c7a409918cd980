"""Shape propagation: record every node's output shape in ``node.meta['tensor_meta']``."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import TraceError


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``gm`` once on ``example_inputs`` (no grad) and annotate node shapes."""
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # noqa: BLE001
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise TraceError(
            f"the traced model failed on the example inputs {shapes}: {type(exc).__name__}: {exc}\n"
            f"Pass example_inputs as a tuple of tensors the model accepts (e.g. (torch.randn(2, 1, 28, 28),)).",
            original=exc) from None


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

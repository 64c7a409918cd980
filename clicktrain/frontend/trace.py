"""Trace a user's model to a torch.fx GraphModule, with errors a user can act on."""

from __future__ import annotations

import traceback
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from ..errors import TraceError


class _PathTracer(fx.Tracer):
    """An fx.Tracer that remembers which submodule it is inside, to name it on failure."""

    def __init__(self, leaf_modules: Iterable[str | type] = ()):
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.failing_path: list[tuple[str, str]] = []  # (qualname, type) of modules being traced

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.failing_path.append((qualname, type(m).__name__))
        result = super().call_module(m, forward, args, kwargs)
        self.failing_path.pop()  # on an exception the path stays, naming the failing module
        return result


def _user_frame(exc: BaseException) -> str:
    """The innermost stack frame outside torch, i.e. the user's line that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and "/clicktrain/" not in path:
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return ""


def trace_model(model: nn.Module, leaf_modules: Iterable[str | type] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; on failure raise :class:`TraceError` naming the culprit."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"compile_for_training expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        return model
    leaf_modules = tuple(leaf_modules)
    tracer = _PathTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes a TraceError
        if tracer.failing_path:
            qualname, type_name = tracer.failing_path[-1]
            where = f"submodule '{qualname}' ({type_name})" if qualname else f"the model's forward ({type_name})"
            advice = (
                f"Make it a leaf so clicktrain calls it as a black box: "
                f"compile_for_training(..., leaf_modules=('{qualname}',)) "
                f"(convs inside a leaf stay dense), or rewrite its forward without "
                f"data-dependent Python control flow on tensors."
                if qualname else
                "Rewrite the model's forward without data-dependent Python control flow on "
                "tensors (if/while on tensor values, .item(), len() of a tensor), or move that "
                "part into a submodule and pass it in leaf_modules=(...)."
            )
        else:
            where = f"the model's forward ({type(model).__name__})"
            advice = ("Rewrite the forward without data-dependent control flow on tensors, or "
                      "move that part into a submodule and pass it in leaf_modules=(...).")
        line = _user_frame(exc)
        msg = (f"clicktrain could not trace {where} to a torch.fx graph: "
               f"{type(exc).__name__}: {exc}" + (f"\n  at {line}" if line else "") + f"\n{advice}")
        raise TraceError(msg, original=exc) from None
    root_name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, root_name)
    return gm

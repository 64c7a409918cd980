"""Pass infrastructure: torch.fx-style passes with pre/post-conditions, run by a PassManager
that writes a numbered debug dump after every pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import PruneConfig
from .dump import DumpWriter

__all__ = ["ClicktrainPass", "CompileState", "PassManager", "PassResult", "compile_state"]


@dataclass
class CompileState:
    """What a compiled GraphModule remembers about how it was compiled.

    ``sites`` maps a conv's name to its :class:`~clicktrain.passes.conv_sites.ConvSite`,
    in graph order, dense and prunable alike.
    """

    config: PruneConfig
    target: str
    dump: DumpWriter | None = None
    sites: dict = field(default_factory=dict)
    layouts: dict = field(default_factory=dict)
    compile_seconds: dict = field(default_factory=dict)  # per kernel-compiling pass
    original: object = None  # the nn.Module that was traced (shares parameters with the graph)


def compile_state(gm: fx.GraphModule) -> CompileState:
    state = getattr(gm, "_clicktrain", None)
    if state is None:
        from ..errors import StateError
        raise StateError(
            f"this {type(gm).__name__} was not made by clicktrain.compile_for_training; "
            f"call ct.compile_for_training(model, example_inputs) first")
    return state


class ClicktrainPass(PassBase):
    """A pass: ``call(gm) -> PassResult``; ``requires``/``ensures`` raise AssertionError
    (with a message naming the offending node or layer) when a condition does not hold.
    ``describe(gm)`` may return a table appended to the pass's dump file."""

    name: str = "pass"

    def describe(self, gm: fx.GraphModule) -> str:
        return ""

    def dump_files(self, gm: fx.GraphModule) -> dict[str, str]:
        """Extra files for the dump (suffix -> text), e.g. generated kernel sources."""
        return {}


class PassManager:
    """Runs a named list of passes in order, checking conditions and dumping after each."""

    def __init__(self, passes: Sequence[ClicktrainPass], dump: DumpWriter | None = None):
        self.passes = list(passes)
        self.dump = dump

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for p in self.passes:
            result = p(gm)
            if result is not None:
                gm = result.graph_module
                modified |= result.modified
            if self.dump is not None:
                self.dump.write(p.name, gm, p.describe(gm), modified=bool(result is not None and result.modified),
                                extra_files=p.dump_files(gm))
        return PassResult(gm, modified)

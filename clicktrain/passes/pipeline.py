"""The whole compiler pipeline, in order. Each entry is one pass; each writes one dump file."""

from __future__ import annotations

from .base import CompileState
from .find_prunable import FindPrunableConvs
from .fuse_batchnorm import FuseBatchNorm
from .functionalize import FunctionalizeConvs
from .harden import HardenMasks
from .insert_masks import InsertPatternMasks
from .lower import GenerateKernels, LowerToTarget
from .propagate_shapes import PropagateShapes
from .reorder import FilterKernelReorder


def compile_pipeline(state: CompileState, example_inputs: tuple) -> list:
    """Run by ``compile_for_training`` after tracing (dump 000_trace)."""
    return [
        PropagateShapes(example_inputs),
        FunctionalizeConvs(),
        FindPrunableConvs(state.config),
        InsertPatternMasks(state.config),
        LowerToTarget(state.target),
    ]


def harden_pipeline(state: CompileState) -> list:
    """Run by ``harden`` once patterns are selected."""
    return [
        HardenMasks(),
        FilterKernelReorder(),
        GenerateKernels(state.target),
        # here, not at compile time: while the convs run torch's conv (dense and soft phases), a
        # generated BatchNorm between them hands the cores between two thread pools twice and
        # measured up to 11 % slower steps (docs/performance.md, session 9)
        FuseBatchNorm(state.target, state.config.fuse_batchnorm),
    ]

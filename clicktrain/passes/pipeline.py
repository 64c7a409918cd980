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
        FuseBatchNorm(state.target, state.config.fuse_batchnorm),
    ]


def harden_pipeline(state: CompileState) -> list:
    """Run by ``harden`` once patterns are selected."""
    return [
        HardenMasks(),
        FilterKernelReorder(),
        GenerateKernels(state.target),
    ]

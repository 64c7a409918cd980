"""User-facing pruning configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ConfigError
from .patterns import KERNEL_POSITIONS


@dataclass(frozen=True)
class PruneConfig:
    """How clicktrain prunes the prunable (3x3, groups=1) convolutions of a model.

    pattern_nnz:     weights kept per kernel (k of 9); 9 disables pattern pruning.
    num_patterns:    size of the pattern library shared by the whole model.
    connectivity:    fraction of kernels dropped per prunable layer, in [0, 1).
    skip_first_conv: keep the model's first convolution dense (it sees raw pixels and
                     holds few weights; pruning it costs accuracy for little gain).
    skip:            qualified names (or fnmatch globs) of convs to keep dense, e.g.
                     ``("features.0", "layer3.*")``; a functional conv is named by
                     its weight parameter's qualified name.
    pattern_block:   (filters, input channels): kernels in blocks of this shape share one
                     pattern and are dropped together. (1, 1), the default, is ClickTrain's
                     per-kernel granularity; coarser blocks let the generated kernels share
                     input loads across a block's rows (forward: filters, grad-input:
                     channels), at some accuracy cost (docs/results.md, docs/performance.md).
                     Also accepted as a string, ``"2x2"``.
    fuse_batchnorm:  on target ``"llvm"``, run each BatchNorm2d in training mode -- with
                     the ReLU after it, and a residual add before that -- on generated
                     kernels (``passes/fuse_batchnorm.py``); False keeps torch's ops.
    """

    pattern_nnz: int = 4
    num_patterns: int = 8
    connectivity: float = 0.0
    skip_first_conv: bool = True
    skip: tuple[str, ...] = field(default_factory=tuple)
    pattern_block: tuple[int, int] = (1, 1)
    fuse_batchnorm: bool = True

    def __post_init__(self):
        object.__setattr__(self, "pattern_block", parse_pattern_block(self.pattern_block))
        if isinstance(self.skip, str):
            # A lone string would be iterated character by character: be explicit.
            object.__setattr__(self, "skip", (self.skip,))
        else:
            object.__setattr__(self, "skip", tuple(self.skip))
        k = self.pattern_nnz
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= KERNEL_POSITIONS:
            raise ConfigError(f"PruneConfig.pattern_nnz must be an integer in 1..9, got {k!r}")
        n_candidates = math.comb(KERNEL_POSITIONS, k)
        p = self.num_patterns
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= n_candidates:
            raise ConfigError(
                f"PruneConfig.num_patterns must be an integer in 1..{n_candidates} "
                f"(there are C(9,{k}) = {n_candidates} patterns of {k} weights), got {p!r}")
        c = self.connectivity
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c < 1.0:
            raise ConfigError(
                f"PruneConfig.connectivity is the fraction of kernels dropped per layer and "
                f"must be in [0, 1), got {c!r}")
        if not isinstance(self.fuse_batchnorm, bool):
            raise ConfigError(f"PruneConfig.fuse_batchnorm must be True or False, got {self.fuse_batchnorm!r}")
        if not all(isinstance(s, str) and s for s in self.skip):
            raise ConfigError(f"PruneConfig.skip must be a tuple of module names, got {self.skip!r}")


MAX_PATTERN_BLOCK = 64


def parse_pattern_block(block) -> tuple[int, int]:
    """``(filters, channels)`` from a pair of ints or a ``"FxC"`` string, validated."""
    text = block
    if isinstance(block, str):
        parts = block.lower().split("x")
        try:
            block = tuple(int(p) for p in parts)
        except ValueError:
            block = ()
    ok = (isinstance(block, (tuple, list)) and len(block) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_PATTERN_BLOCK for v in block))
    if not ok:
        raise ConfigError(f"PruneConfig.pattern_block must be (filters, input channels), each 1..{MAX_PATTERN_BLOCK}, "
                          f"as a pair or a string like '2x2'; got {text!r}")
    return tuple(block)

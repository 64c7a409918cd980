"""Pattern selection: from per-weight importance to a library and per-kernel pattern ids.

Importance is a non-negative score per weight, ``(O, C, 3, 3)`` per layer: ``W**2``
(magnitude) by default, or ``(W * dL/dW)**2`` accumulated during training (the
ClickTrain estimator). A pattern's score for a kernel is the importance it keeps.

Library strategies (``LIBRARIES``):
- ``generated``: the ``num_patterns`` patterns out of all C(9,k) that keep the most
  importance over the whole model, each kernel taking its best (dynamic pattern generation);
- ``frequency``: the ``num_patterns`` most frequent per-kernel top-k patterns;
- ``fixed``: a fixed library that ignores the data (``patterns.fixed_library``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..patterns import DROPPED, candidate_patterns, fixed_library, greedy_library, pattern_scores, top_k_patterns

LIBRARIES = ("generated", "frequency", "fixed")

# Library generation looks at a deterministic, evenly strided sample of at most this many
# kernels per layer (weighted back to the layer's size): the choice is a statistic of the
# population and the full score matrix of a large model would need gigabytes.
LIBRARY_SAMPLE_PER_LAYER = 65536


def _normalised(importance: torch.Tensor) -> torch.Tensor:
    """(kernels, 9) importance scaled so the mean kernel holds 1: every layer weighs by its
    number of kernels, not by the scale of its weights or gradients."""
    flat = importance.detach().reshape(-1, 9).to(torch.float64)
    mean = flat.sum(1).mean()
    return flat / mean if float(mean) > 0 else flat


def _samples(importances: Mapping[str, torch.Tensor]):
    for imp in importances.values():
        flat = _normalised(imp)
        step = max(1, -(-flat.shape[0] // LIBRARY_SAMPLE_PER_LAYER))
        sample = flat[::step]
        yield sample, torch.full((sample.shape[0],), flat.shape[0] / sample.shape[0], dtype=torch.float64)


def generate_library(importances: Mapping[str, torch.Tensor], pattern_nnz: int, num_patterns: int,
                     strategy: str = "generated") -> torch.Tensor:
    """A ``(num_patterns, 9)`` bool library chosen by ``strategy`` (see module docstring)."""
    candidates = candidate_patterns(pattern_nnz)
    if strategy == "fixed":
        return fixed_library(pattern_nnz, num_patterns)
    rows, weights = zip(*_samples(importances))
    rows, weights = torch.cat(rows), torch.cat(weights)
    if strategy == "frequency":
        counts = torch.zeros(candidates.shape[0], dtype=torch.float64)
        counts.index_add_(0, top_k_patterns(rows, pattern_nnz), weights)
        order = sorted(range(candidates.shape[0]), key=lambda i: (-float(counts[i]), i))
        return candidates[order[:num_patterns]]
    if strategy != "generated":
        raise ValueError(f"unknown library strategy {strategy!r}; choose one of {LIBRARIES}")
    chosen = greedy_library(pattern_scores(rows, candidates) * weights.unsqueeze(1), num_patterns)
    return candidates[chosen]


def assign_patterns(importance: torch.Tensor, library: torch.Tensor, connectivity: float,
                    block: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Per kernel the library pattern keeping the most importance (ties: lowest id); then
    the ``connectivity`` fraction of kernels keeping the least is marked DROPPED.

    ``block`` = (filters, input channels): kernels in blocks of that shape share one pattern,
    the one keeping the most of their summed importance, and are dropped together, the blocks
    keeping the least per kernel first, as many as fit in the ``connectivity`` fraction
    (edge blocks of a layer whose size the block does not divide are smaller)."""
    out_c, in_c = importance.shape[:2]
    bf, bc = block
    imp = importance.detach().reshape(out_c, in_c, 9)
    pad_o, pad_c = -out_c % bf, -in_c % bc
    pooled = torch.nn.functional.pad(imp, (0, 0, 0, pad_c, 0, pad_o))
    pooled = pooled.reshape((out_c + pad_o) // bf, bf, (in_c + pad_c) // bc, bc, 9).sum((1, 3))
    kernels = torch.nn.functional.pad(torch.ones(out_c, in_c), (0, pad_c, 0, pad_o))
    kernels = kernels.reshape(pooled.shape[0], bf, pooled.shape[1], bc).sum((1, 3)).reshape(-1)
    scores = pattern_scores(pooled.reshape(-1, 9), library)
    best_score, ids = scores.max(dim=1)
    n_drop = int(connectivity * out_c * in_c)
    if n_drop:
        order = torch.sort(best_score / kernels, stable=True).indices
        dropped = order[torch.cumsum(kernels[order], 0) <= n_drop]
        ids[dropped] = DROPPED
    ids = ids.view(pooled.shape[:2]).repeat_interleave(bf, 0)[:out_c].repeat_interleave(bc, 1)[:, :in_c]
    return ids.contiguous().to(torch.int16)


def retained_fraction(importance: torch.Tensor, library: torch.Tensor, pattern_ids: torch.Tensor) -> float:
    """Share of a layer's total importance that its assignment keeps."""
    from ..patterns import kernel_masks
    imp = importance.detach().double()
    kept = (imp * kernel_masks(library, pattern_ids.long())).sum()
    total = imp.sum()
    return float(kept / total) if float(total) > 0 else 1.0


def ramped_connectivity(target: float, layer_kernels: list[int]) -> list[float]:
    """Per-layer drop ratios rising linearly with depth (half the target at the first prunable
    layer, 1.5x at the last, capped at 0.95), scaled so the kernel-weighted mean equals
    ``target``: deep layers are wider and more redundant."""
    n = len(layer_kernels)
    if n <= 1 or target == 0:
        return [target] * n
    raw = [0.5 + i / (n - 1) for i in range(n)]
    total = sum(layer_kernels)
    scale = target * total / sum(r * k for r, k in zip(raw, layer_kernels))
    ratios = [min(0.95, r * scale) for r in raw]
    return ratios

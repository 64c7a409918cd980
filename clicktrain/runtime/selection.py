"""Pattern selection: from per-weight importance to a library and per-kernel pattern ids.

Importance is a non-negative score per weight, ``(O, C, 3, 3)`` per layer: ``W**2``
(magnitude) by default, or ``(W * dL/dW)**2`` accumulated during training (the
ClickTrain estimator). A pattern's score for a kernel is the importance it keeps.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..patterns import DROPPED, candidate_patterns, greedy_library, pattern_scores

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


def generate_library(importances: Mapping[str, torch.Tensor], pattern_nnz: int, num_patterns: int) -> torch.Tensor:
    """The ``num_patterns`` patterns of ``pattern_nnz`` weights that keep the most
    (normalised) importance over all layers, each kernel taking its best pattern."""
    candidates = candidate_patterns(pattern_nnz)
    rows, weights = [], []
    for imp in importances.values():
        flat = _normalised(imp)
        step = max(1, -(-flat.shape[0] // LIBRARY_SAMPLE_PER_LAYER))
        sample = flat[::step]
        rows.append(sample)
        weights.append(torch.full((sample.shape[0],), flat.shape[0] / sample.shape[0], dtype=torch.float64))
    scores = pattern_scores(torch.cat(rows), candidates) * torch.cat(weights).unsqueeze(1)
    chosen = greedy_library(scores, num_patterns)
    return candidates[chosen]


def assign_patterns(importance: torch.Tensor, library: torch.Tensor, connectivity: float) -> torch.Tensor:
    """Per kernel the library pattern keeping the most importance (ties: lowest id); then
    the ``connectivity`` fraction of kernels keeping the least is marked DROPPED."""
    out_c, in_c = importance.shape[:2]
    scores = pattern_scores(importance.detach().reshape(-1, 9), library)
    best_score, ids = scores.max(dim=1)
    n_drop = int(connectivity * ids.numel())
    if n_drop:
        order = torch.sort(best_score, stable=True).indices
        ids[order[:n_drop]] = DROPPED
    return ids.view(out_c, in_c).to(torch.int16)

"""The pattern library: the one place that knows what a 3x3 pattern is.

A *pattern* is a set of ``k`` of the 9 positions of a 3x3 kernel, stored as a bool
vector of length 9 in row-major order (position ``i`` is row ``i // 3``, column
``i % 3``). A *library* is a ``(P, 9)`` bool tensor of distinct patterns of equal
size. Per kernel, a pattern id indexes the library; ``DROPPED`` marks a kernel removed
by connectivity pruning and ``UNASSIGNED`` a kernel of a layer not selected yet.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

KERNEL_POSITIONS = 9
DROPPED = -1
UNASSIGNED = -2


@lru_cache(maxsize=None)
def candidate_patterns(k: int) -> torch.Tensor:
    """All C(9, k) patterns of ``k`` positions, in lexicographic order, as ``(N, 9)`` bool."""
    if not 1 <= k <= KERNEL_POSITIONS:
        raise ValueError(f"pattern size k must be in 1..9, got {k}")
    combos = list(itertools.combinations(range(KERNEL_POSITIONS), k))
    table = torch.zeros(len(combos), KERNEL_POSITIONS, dtype=torch.bool)
    for row, combo in enumerate(combos):
        table[row, list(combo)] = True
    return table


def pattern_offsets(pattern: torch.Tensor) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of a pattern's kept positions, in row-major order."""
    return [(int(i) // 3, int(i) % 3) for i in torch.nonzero(pattern).flatten()]


def pattern_str(pattern: torch.Tensor) -> str:
    """A pattern drawn as three rows, e.g. ``.x.|xxx|...`` for a plus without its bottom."""
    cells = ["x" if bool(v) else "." for v in pattern.flatten()]
    return "|".join("".join(cells[r * 3:(r + 1) * 3]) for r in range(3))


def kernel_masks(library: torch.Tensor, pattern_ids: torch.Tensor) -> torch.Tensor:
    """Per-kernel 3x3 masks ``(*pattern_ids.shape, 3, 3)`` for ids into ``library``.

    ``DROPPED`` (and ``UNASSIGNED``) kernels get an all-zero mask.
    """
    kept = pattern_ids >= 0
    masks = library[pattern_ids.clamp(min=0).long()] & kept.unsqueeze(-1)
    return masks.view(*pattern_ids.shape, 3, 3)


def pattern_scores(importance: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Score of every candidate pattern for every kernel: sum of importance under the pattern.

    ``importance`` is ``(..., 9)`` per-position importance; returns ``(..., N)``.
    """
    return importance.to(torch.float64) @ candidates.to(torch.float64).T


def greedy_library(scores: torch.Tensor, num_patterns: int) -> torch.Tensor:
    """Pick ``num_patterns`` candidate columns maximising the sum over rows of the best pick.

    ``scores`` is ``(kernels, N)``. Greedy on marginal gain (the objective is monotone
    submodular, so greedy is within 1 - 1/e of optimal); ties go to the lower index so
    the result is deterministic. Returns the chosen candidate indices in pick order.
    """
    n_candidates = scores.shape[1]
    if num_patterns > n_candidates:
        raise ValueError(f"asked for {num_patterns} patterns, only {n_candidates} exist")
    best = torch.zeros(scores.shape[0], dtype=scores.dtype)
    chosen: list[int] = []
    for _ in range(num_patterns):
        gain = (scores - best.unsqueeze(1)).clamp(min=0).sum(0)
        if chosen:
            gain[chosen] = -1.0
        pick = int(torch.argmax(gain))  # argmax returns the first maximum: deterministic
        chosen.append(pick)
        best = torch.maximum(best, scores[:, pick])
    return torch.tensor(chosen, dtype=torch.long)


@lru_cache(maxsize=None)
def fixed_library(k: int, size: int = 12) -> torch.Tensor:
    """A fixed, hand-style library in the spirit of PatDNN/ClickTrain: patterns that keep the
    centre weight and are most compact around it (score: sum over kept positions of
    exp(-d^2/2), d the distance to the centre), then the most orthogonally adjacent pairs,
    then lexicographic. For k=4: the four T-shapes, the four 2x2 squares around the centre,
    then four L-shapes."""
    candidates = candidate_patterns(k)
    with_centre = candidates[candidates[:, 4]]
    if with_centre.shape[0] < size:
        raise ValueError(f"only {with_centre.shape[0]} patterns of {k} weights keep the centre; asked for {size}")
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    closeness = torch.exp(-(((ys - 1) ** 2 + (xs - 1) ** 2).flatten().double()) / 2)
    scores = (with_centre.double() * closeness).sum(1)
    grid = with_centre.view(-1, 3, 3)
    adjacent = (grid[:, 1:, :] & grid[:, :-1, :]).sum((1, 2)) + (grid[:, :, 1:] & grid[:, :, :-1]).sum((1, 2))
    order = sorted(range(with_centre.shape[0]), key=lambda i: (-round(float(scores[i]), 9), -int(adjacent[i]), i))
    return with_centre[order[:size]]


def top_k_patterns(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Per kernel, the pattern of its ``k`` most important positions, as candidate indices."""
    top = torch.topk(importance.reshape(-1, KERNEL_POSITIONS).double(), k, dim=1).indices
    codes = (1 << top).sum(1)  # a 9-bit code per kernel
    cand_codes = (candidate_patterns(k).long() * (1 << torch.arange(KERNEL_POSITIONS))).sum(1)
    lookup = torch.full((1 << KERNEL_POSITIONS,), -1, dtype=torch.long)
    lookup[cand_codes] = torch.arange(cand_codes.numel())
    return lookup[codes]

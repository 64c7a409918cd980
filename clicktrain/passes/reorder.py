"""Filter-kernel reorder: the compact, pattern-grouped weight layout of a hardened conv.

Per layer, filters are permuted so that filters with the same *signature* -- the number
of kept kernels of each library pattern -- are adjacent (longest filters first, so
filters of similar work sit together, as in PatDNN). Inside each filter, kept kernels
are ordered by (pattern, input channel), so a generated kernel walks runs of one
pattern whose offsets are compile-time constants. With a ``channel_block`` the order is
(block of input channels, pattern, channel): a kernel can then finish one block of input
channels for a group of filters while that block is in cache. Kept weights are stored compactly,
``k`` values per kept kernel; dropped kernels take no space.

The layout is data, not a graph change: parameters keep their dense shape and order
(optimizers and state_dict are unaffected), kernels gather the compact weights with
``weight_index`` and write each filter's output to its original channel ``perm[i]``,
so the model's outputs do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..util import format_table
from .base import ClicktrainPass, PassResult, compile_state
from .insert_masks import prunable_layers


@dataclass
class FilterKernelLayout:
    out_channels: int
    in_channels: int
    pattern_nnz: int
    perm: torch.Tensor            # (O,) new position i computes original filter perm[i]
    signatures: list[tuple]       # per new position: kept kernels of each library pattern
    groups: list[tuple[int, int]]  # [start, end) ranges of equal signature, in new order
    kernel_ptr: torch.Tensor      # (O+1,) CSR pointers of kept kernels per new position
    kernel_channel: torch.Tensor  # (K,) input channel of each kept kernel
    kernel_pattern: torch.Tensor  # (K,) library pattern id of each kept kernel
    kernel_filter: torch.Tensor   # (K,) original filter (row of pattern_ids) of each kept kernel
    weight_index: torch.Tensor    # (K, k) flat index of each kept weight in weight.reshape(-1)
    channel_block: int = 0        # input channels per block (0: one block of all)
    row_group: int = 1            # rows come in aligned groups of this many with equal runs

    @classmethod
    def build(cls, library: torch.Tensor, pattern_ids: torch.Tensor, transposed: bool = False,
              channel_block: int = 0, row_group: int = 1) -> "FilterKernelLayout":
        """Layout over the rows of ``pattern_ids``. With ``transposed`` the rows are the input
        channels of a weight ``(O, C, 3, 3)`` whose ids are ``pattern_ids.T`` (the grad-input
        view); ``weight_index`` then still indexes that ``(O, C, 3, 3)`` weight. With
        ``channel_block`` each row's kernels are ordered by (channel // channel_block, pattern,
        channel)."""
        out_c, in_c = pattern_ids.shape
        n_patterns = library.shape[0]
        k = int(library[0].sum())
        ids = pattern_ids.long()
        kept = ids >= 0
        counts = torch.zeros(out_c, n_patterns, dtype=torch.long)
        counts.scatter_add_(1, ids.clamp(min=0), kept.long())
        signatures = [tuple(row) for row in counts.tolist()]
        if row_group_of(pattern_ids, row_group) != row_group:
            raise ValueError(f"pattern ids do not come in groups of {row_group} equal rows")
        order = [b * row_group + i for b in sorted(range(out_c // row_group), key=lambda b: (
            -sum(signatures[b * row_group]), tuple(-c for c in signatures[b * row_group]), b)) for i in range(row_group)]
        perm = torch.tensor(order, dtype=torch.long)
        new_signatures = [signatures[o] for o in order]
        groups, start = [], 0
        for i in range(1, out_c + 1):
            if i == out_c or new_signatures[i] != new_signatures[start]:
                groups.append((start, i))
                start = i
        # kept kernels of each filter ordered by (channel block, pattern, channel)
        channels = torch.arange(in_c)
        block = channels // channel_block if channel_block else torch.zeros_like(channels)
        past = (int(block[-1]) + 1) * n_patterns * in_c if in_c else 0
        sort_key = torch.where(kept, (block * n_patterns + ids) * in_c + channels, torch.full_like(ids, past))
        key_sorted, chan_sorted = torch.sort(sort_key[perm], dim=1, stable=True)
        kept_sorted = key_sorted < past
        kernel_channel = chan_sorted[kept_sorted]
        kernel_filter = perm.unsqueeze(1).expand(-1, in_c)[kept_sorted]
        kernel_pattern = ids[kernel_filter, kernel_channel]
        kernel_ptr = torch.zeros(out_c + 1, dtype=torch.long)
        kernel_ptr[1:] = torch.cumsum(kept_sorted.sum(1), 0)
        positions = torch.stack([torch.nonzero(row).flatten() for row in library]) if n_patterns else torch.zeros(0, k, dtype=torch.long)
        kernel_flat = kernel_channel * out_c + kernel_filter if transposed else kernel_filter * in_c + kernel_channel
        weight_index = (kernel_flat * 9).unsqueeze(1) + positions[kernel_pattern]
        return cls(out_c, in_c, k, perm, new_signatures, groups, kernel_ptr, kernel_channel, kernel_pattern,
                   kernel_filter, weight_index, channel_block, row_group)

    @property
    def channel_blocks(self) -> int:
        return -(-self.in_channels // self.channel_block) if self.channel_block else 1

    def pattern_ptr(self) -> torch.Tensor:
        """``(O, B * (P+1))``: kept kernels of new row ``i`` in channel block ``b`` with pattern
        ``p`` are ``[ptr[i, b*(P+1) + p], ptr[i, b*(P+1) + p + 1])`` (``B`` = 1 without blocks)."""
        n_patterns = len(self.signatures[0]) if self.signatures else 0
        B = self.channel_blocks
        block = self.kernel_channel // self.channel_block if self.channel_block else torch.zeros_like(self.kernel_channel)
        row = torch.repeat_interleave(torch.arange(self.out_channels), self.kernel_ptr.diff())
        counts = torch.zeros(self.out_channels, B, n_patterns, dtype=torch.long)
        counts.index_put_((row, block, self.kernel_pattern), torch.ones_like(row), accumulate=True)
        ends = counts.reshape(self.out_channels, -1).cumsum(1).reshape(self.out_channels, B, n_patterns)
        starts = torch.cat([torch.zeros(self.out_channels, 1, dtype=torch.long), ends.reshape(self.out_channels, -1)[:, :-1]], 1)
        ptr = torch.cat([starts.reshape(self.out_channels, B, n_patterns), ends[:, :, -1:]], 2)
        return ptr.reshape(self.out_channels, -1) + self.kernel_ptr[:-1].unsqueeze(1)

    @property
    def kept_kernels(self) -> int:
        return int(self.kernel_channel.numel())

    def group_interleaved(self) -> torch.Tensor:
        """``(K,)``: kept kernel ``a + i*G + g`` of the result is entry ``i`` of row ``g`` of a group
        of ``G = row_group`` rows whose entries start at ``a``. A group's rows have equal runs
        (same channels and patterns), so a kernel walking the first row's entries ``j`` finds
        all ``G`` rows' weights of entry ``j`` side by side at ``a + (j - a) * G``."""
        G = self.row_group
        order = torch.arange(self.kept_kernels)
        if G == 1:
            return order
        starts = self.kernel_ptr[:-1:G]
        per_row = self.kernel_ptr[1::G] - starts
        for a, n in zip(starts.tolist(), per_row.tolist()):
            order[a:a + G * n] = torch.arange(a, a + G * n).view(G, n).t().reshape(-1)
        return order

    def compact(self, weight: torch.Tensor) -> torch.Tensor:
        """Kept weights ``(K, k)`` gathered from a dense ``(O, C, 3, 3)`` weight."""
        return weight.reshape(-1)[self.weight_index]

    def expand(self, compact: torch.Tensor) -> torch.Tensor:
        """The dense ``(O, C, 3, 3)`` weight holding ``compact`` and zeros elsewhere
        (non-transposed layouts only)."""
        dense = compact.new_zeros(self.out_channels * self.in_channels * 9)
        dense[self.weight_index.reshape(-1)] = compact.reshape(-1)
        return dense.view(self.out_channels, self.in_channels, 3, 3)


def row_group_of(pattern_ids: torch.Tensor, limit: int) -> int:
    """The largest power of two ``g <= limit`` such that the rows of ``pattern_ids`` come in
    aligned groups of ``g`` equal rows (the pattern ids of a ``PruneConfig.pattern_block``
    granularity), 1 if none: the rows a generated kernel may treat as one."""
    rows = pattern_ids.shape[0]
    g = 1
    while 2 * g <= limit and rows % (2 * g) == 0:
        grouped = pattern_ids.reshape(rows // (2 * g), 2 * g, -1)
        if not bool((grouped == grouped[:, :1]).all()):
            break
        g *= 2
    return g


class FilterKernelReorder(ClicktrainPass):
    name = "filter_kernel_reorder"

    def requires(self, gm: fx.GraphModule) -> None:
        for layer in prunable_layers(gm):
            assert int(layer.mask.pattern_ids.min()) >= -1, f"{layer.site.name}: patterns not selected"

    def call(self, gm: fx.GraphModule) -> PassResult:
        state = compile_state(gm)
        state.layouts = {layer.site.name: FilterKernelLayout.build(layer.mask.library, layer.mask.pattern_ids)
                         for layer in prunable_layers(gm)}
        return PassResult(gm, False)

    def ensures(self, gm: fx.GraphModule) -> None:
        state = compile_state(gm)
        for layer in prunable_layers(gm):
            layout = state.layouts[layer.site.name]
            assert sorted(layout.perm.tolist()) == list(range(layout.out_channels)), f"{layer.site.name}: perm is not a permutation"
            masked = layer.weight.detach() * layer.mask.mask()
            assert torch.equal(layout.expand(layout.compact(masked)), masked), \
                f"{layer.site.name}: compact layout does not reproduce the masked weight"

    def describe(self, gm: fx.GraphModule) -> str:
        state = compile_state(gm)
        rows = []
        for name, layout in state.layouts.items():
            sizes = sorted((e - s for s, e in layout.groups), reverse=True)
            lengths = sorted({sum(s) for s in layout.signatures}, reverse=True)
            rows.append([name, layout.out_channels, layout.kept_kernels, len(layout.groups),
                         ",".join(map(str, sizes[:6])) + (",..." if len(sizes) > 6 else ""),
                         f"{lengths[-1]}..{lengths[0]}" if lengths else "-"])
        return format_table(["conv", "filters", "kept kernels", "signature groups", "largest groups", "kernels/filter"],
                            rows, title="## filter-kernel reorder")

"""Per-layer kernel plans and compiled kernels, and the runtime index arrays they read.

``ConvGeometry`` is a prunable conv's shape facts; ``plan_kernels`` turns it plus the pattern
library into three kernel specs (forward, grad-input, grad-weight) with padded extents and
tile sizes; ``LayerKernels`` compiles them through the cache. ``LayerIndex`` holds the
int32 arrays derived from the pattern ids (runs, channels, permutations) -- data, so a new
pattern assignment needs no recompilation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..passes.conv_sites import pair
from ..passes.reorder import FilterKernelLayout
from ..patterns import kernel_masks, pattern_offsets
from .cache import start_compile
from .target import KernelTarget, cuda_available
from .templates import (DirectConvSpec, GradWeightSpec, RelayoutSpec, direct_conv_cuda, direct_conv_llvm, gather_weights_llvm,
                        grad_weight_cuda, grad_weight_llvm, relayout_llvm)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


@dataclass(frozen=True)
class ConvGeometry:
    in_channels: int
    out_channels: int
    in_h: int
    in_w: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, weight_shape, input_hw, stride, padding, dilation) -> "ConvGeometry":
        stride, dilation = pair(stride), pair(dilation)
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            padding = (dilation[0], dilation[1])  # 3x3, stride 1: d on each side
        return cls(int(weight_shape[1]), int(weight_shape[0]), int(input_hw[0]), int(input_hw[1]),
                   stride, pair(padding), dilation)

    @property
    def out_h(self) -> int:
        return (self.in_h + 2 * self.padding[0] - 2 * self.dilation[0] - 1) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.in_w + 2 * self.padding[1] - 2 * self.dilation[1] - 1) // self.stride[1] + 1

    def tag(self) -> str:
        return (f"c{self.in_channels}o{self.out_channels}h{self.in_h}w{self.in_w}s{self.stride[0]}x{self.stride[1]}"
                f"p{self.padding[0]}x{self.padding[1]}d{self.dilation[0]}x{self.dilation[1]}")


def choose_lanes(width: int, simd_lanes: int) -> int:
    """Accumulator width along the output row: the widest (up to two SIMD registers) that pads
    the row by <= 15%, else the one that pads least. A 28-wide row takes 32 lanes on AVX-512
    (two registers per row, +14%); measured 1.6x faster than one register per row there."""
    options = [v for v in (32, 16, 8, 4) if v <= 2 * simd_lanes] or [4]
    for v in options:
        if _round_up(width, v) <= 1.15 * width:
            return v
    return min(options, key=lambda v: (_round_up(width, v), -v))


@dataclass(frozen=True)
class KernelPlan:
    geometry: ConvGeometry
    forward: DirectConvSpec
    grad_input: DirectConvSpec
    grad_weight: GradWeightSpec
    # generated copies between torch's nchw activations and the kernels' buffers, by role
    # (plan_relayouts); a role without one is copied by torch
    relayouts: dict = field(default_factory=dict)
    # strided CPU grad-input: one kernel per stride phase ((row phase, column phase), spec),
    # compiled instead of ``grad_input`` (which then only describes the layout they share)
    grad_input_phases: tuple = ()

    @property
    def specs(self):
        """The compiled kernels' specs: forward, grad-input (or its phases), grad-weight."""
        grad_input = tuple(spec for _, spec in self.grad_input_phases) or (self.grad_input,)
        return (self.forward, *grad_input, self.grad_weight)

    @property
    def gathers(self) -> bool:
        """The forward or grad-input reads its kept weights gathered (``gather_weights_llvm``)."""
        return self.forward.gathered_weight or self.grad_input.gathered_weight

    @property
    def grad_weight_reads_forward_input(self) -> bool:
        """Grad-weight can read the forward's padded input: same layout, same extent."""
        gw, fwd = self.grad_weight, self.forward
        return (gw.layout, gw.in_h, gw.in_w, gw.phases) == (fwd.layout, fwd.in_h, fwd.in_w, fwd.phases)


DIRECT_ACCUMULATORS = 8  # vector registers an nchw direct-conv tile holds (measured best: choose_rows)
# nchw grad-input per kernel, on gathered weights: output rows per task, each tile for all of them in
# turn (they read the same input rows). Measured (session 12, Zen 3, in-process A/Bs, against 1): 32->32
# 14x14 1.14-1.38x -> 1.39-1.59x of dense, 16->16 28x28 1.11-1.17x -> 1.32-1.34x, 16->16 32x32 1.27-1.36x ->
# 1.32-1.41x, 64->128 16x16 even; the forward on the dense weight and grouped rows (4x4 blocks) even or lost.
# Rows keeping fewer than NCHW_ROW_BLOCK_KERNELS kernels on average keep a row a task: with half the kernels
# dropped, 16->16 28x28 / 32x32 forward lost 2.35-2.68x -> 2.03-2.14x / 2.34-2.49x -> 2.20-2.41x (8 a row), while
# 32->32 14x14 (16 a row) stayed even.
NCHW_ROW_BLOCK = 8
NCHW_ROW_BLOCK_KERNELS = 16
# The forward per kernel gathers its weights as grad-input does (16 contiguous bytes a kept kernel instead of
# 36 apart), on layers of work enough (GATHER_WORK). chwn, 4/9 / half the kernels dropped:
# 512->512 4x4 1.48-1.56x -> 2.00-2.18x / 2.17x -> 3.34x, 256->512 4x4 1.65x -> 2.08x / 2.52x -> 3.41x,
# 256->256 7x7 / 8x8 1.38-1.57x -> 1.67-1.88x, 512->512 2x2 1.56x -> 1.88x, 64->64 7x7 +5-10 %; nchw (with
# row blocks): 32->32 14x14 1.30-1.42x -> 1.59-1.63x, 16->16 28x28 / 32x32, 64->128 16x16 even to +10 %.
# Grouped rows read theirs 36 bytes apart a row, G rows side by side: gathering them was even (two runs).
GATHER_FORWARD = True
NCHW_ALIAS_CHANNELS = 16  # nchw frames: channels whose planes must spread over the L1's sets (nchw_frame)
NCHW_ALIAS_WINDOW = 256   # ... no three of them starting within this many bytes (modulo 4 KB)


def _planes_alias(plane_bytes: int, channels: int = NCHW_ALIAS_CHANNELS) -> bool:
    """Whether ``channels`` consecutive planes of ``plane_bytes`` put three or more starts
    within ``NCHW_ALIAS_WINDOW`` bytes of each other modulo 4 KB (the span of the L1's sets)."""
    starts = sorted(c * plane_bytes % 4096 for c in range(channels))
    starts += [s + 4096 for s in starts[:2]]
    return any(starts[i + 2] - starts[i] < NCHW_ALIAS_WINDOW for i in range(channels))


def nchw_frame(height: int, width: int, widen: bool = True) -> tuple[int, int]:
    """(height, width) of a direct conv's padded input frame (``widen``: an nchw one read at
    stride 1, whose rows may be widened; else as it is): rows widened by pairs of zero
    columns until consecutive channels' planes spread over the L1's sets (``_planes_alias``).
    A task reads the same rows of every source channel in turn; planes about 4 KB apart put
    them in the same few sets of the 8-way L1, and 16 channels of one tile's window thrash
    it. The 28x28 layers' 30 x 34 frame is 4080 bytes a plane: widened (session 13, Zen 3,
    in-process A/Bs, 11 rounds, 16->16 28x28 forward / grad-input) from 1.41x / 1.33x of
    dense to 1.53x / 1.55x at 36 columns, 1.57x / 1.47x at 38 (42: 1.53x / 1.35x); frames whose
    planes spread (16->16 32x32, 32->32 16x16, 64->128 16x16) were even or lost a few per
    cent when widened anyway."""
    while widen and _planes_alias(4 * height * width):
        width += 2
    return height, width


# nchw, rows with their own kernels: where the tile's rows pad the map's height, one vector a row and
# the tallest tile (of at least NCHW_EXACT_MIN_ROWS accumulators) that divides it, if that computes fewer
# padded pixels (_tile). A 14x14 map took 4 rows of 16 lanes (16 x 16 pixels for 196); 7 rows of 8 lanes
# (AVX2: 14 x 16) measured (session 13, Zen 3, in-process A/Bs, 11 rounds, forward / grad-input of dense):
# 32->32 14x14 1.44-1.47x / 1.17-1.28x -> 1.57-1.65x / 1.37-1.46x, 16->32 14x14 1.43x / 1.23x -> 1.71x /
# 1.41x, half the kernels dropped 2.59x / 2.15x -> 2.80x / 2.42x; 16->32 28x28 stride 2 (14x14 output,
# column phases) forward 1.12-1.32x -> 1.20-1.36x, grad-input in stride phases 1.67-1.74x -> 1.77-1.83x.
# Fewer than 7 accumulators (a 30-row map's 6) leave the FMA chains' latency exposed: not taken.
NCHW_EXACT_ROWS = True
NCHW_EXACT_MIN_ROWS = 7


def choose_rows(lanes: int, simd_lanes: int) -> int:
    """Rows of the register tile: as many as make ``DIRECT_ACCUMULATORS`` vectors, at most 8.
    Measured on AVX-512 (docs/performance.md): one register per row (16 lanes) runs 7-37 %
    faster with 8 rows than with 4; two per row (32 lanes) is best at 4 rows, and 8 rows
    (16 accumulators) ran 1.6-1.9x slower."""
    return max(1, min(8, DIRECT_ACCUMULATORS * simd_lanes // lanes))


CHWN_ACCUMULATORS = 16  # vector registers the chwn tile may hold, with 32 in all (accumulators())
CHWN_DIRECT_MAX_WIDTH = 8  # forward / grad-input: chwn up to this output row width
CHWN_NARROW_ROW_KERNELS = 48  # ... and, per kernel, on padded rows narrower than 16 lanes with this many kept kernels
CHWN_NARROW_ROW_LANES = 16  # (an AVX-512 vector; two of AVX2's)
CHWN_GRAD_WEIGHT_HALF_VECTOR = True  # grad-weight: chwn on every row up to half a vector (False: padded ones or <= 4),
CHWN_GRAD_WEIGHT_MAX_WIDTH = 8  # ... and up to this width on any CPU (a whole AVX2 vector)
CHWN_GRAD_WEIGHT_PADDED = True  # grad-weight: chwn also on rows of 9 to a vector's width less one that nchw pads,
CHWN_GRAD_WEIGHT_PADDED_KERNELS = 24  # ... where filters keep this many kernels on average


def choose_layouts(geom: ConvGeometry, simd_lanes: int, cuda: bool, row_groups: tuple[int, int] = (1, 1),
                   row_kernels: tuple[float, float] | None = None) -> tuple[str, str, str]:
    """Layout of (forward, grad-input, grad-weight). ``chwn`` puts the batch in the vector
    lanes. Measured on AVX-512 (docs/performance.md, ``benchmarks/tile_variants.py``):
    forward and grad-input take it on rows of <= 8 (``--vary direct``, session 5, in one
    process: 128-256-channel 7x7 and 8x8 layers forward 1.18-1.49x against 0.93-1.13x,
    grad-input 1.16-1.28x against 0.78-1.0x; 64-channel ones about even; on rows of <= 4 an
    nchw tile fills a quarter of a vector). Before session 5's chwn fixes (per-row
    accumulators, the blocked layout) chwn lost on 7-wide rows. Grad-weight (in blocks of two
    kernels) takes it on rows up to half a vector (``--vary layout``, session 5, since its
    lanes meet in a tree: 2x2 1.2-2.0x against 0.4x, 4x4 0.8-1.5x against 0.5-0.8x, 7x7
    0.8-1.6x against 0.6-1.0x). On unpadded 8-wide rows nchw was as fast or faster in session
    5; in session 8, with the forward's chwn input shared, chwn won 15 of 16 comparisons on
    64->64, 128->256, 256->256 and 32->64 8x8 (per kernel and 4x4 blocks, 4/9 and 0.222:
    1.69-3.67x against 1.11-3.14x; ``CHWN_GRAD_WEIGHT_HALF_VECTOR``). On AVX2 (8 lanes) half
    a vector is 4, and 7- and 8-wide rows ran grad-weight in nchw, on an input copy of its own
    (the forward's is chwn there): on Zen 3 (session 11, ``--vary layout``, per kernel, 4/9)
    chwn ran 64->64 8x8 1.91x against 1.59x, 256->256 8x8 1.44x against 0.72x, 64->64 7x7
    1.82x against 1.32x, 128->256 7x7 1.42x against 0.71x: so rows up to
    ``CHWN_GRAD_WEIGHT_MAX_WIDTH`` take chwn on any CPU. Padded rows of 9 to 15 likewise
    (``CHWN_NARROW_ROW_LANES`` bounds them, not the vector): on AVX2, 14x14 grad-weight per
    kernel (session 11, Zen 3, 11 rounds in one process) 64->128 1.33x -> 1.82x, 128->64 1.43x
    -> 1.85x, 64->64 1.08x -> 1.95x, 32->32 1.10x -> 1.66x of dense.
    Session 8 (``--vary direct`` on 14x14 maps, per kernel, three runs): where each row has its
    own kernels (``row_groups`` 1) and keeps ``CHWN_NARROW_ROW_KERNELS`` or more of them on
    average (``row_kernels``: forward's rows, grad-input's; default all source channels), chwn
    also wins on rows narrower than a vector, which nchw pads (14 of 16 lanes): 64->128,
    64->64 and 128->128 14x14 forward 1.09-1.42x against 0.97-1.15x, grad-input 1.17-1.39x
    against 0.90-1.09x; 32->32 (32 kernels a row) even. With half the kernels dropped,
    128->128 (64 a row) still won in four runs of four, 64->64 (32) was even and 64->128 (32)
    lost three of four: the copies into and out of chwn cost the same, the kernel less.
    On AVX2 a 14-wide row is two vectors less two lanes, the same waste, and the same rule
    held (session 11, Zen 3, in-process A/Bs, 15 rounds, forward / grad-input): 64->128 14x14
    1.11 / 0.84x -> 1.21 / 1.12x (and 1.18 / 0.85x -> 1.15 / 1.09x), 128->64 1.00 / 0.85x ->
    1.14 / 1.08x, 64->64 even: so ``CHWN_NARROW_ROW_LANES`` (16), not the vector, bounds it;
    rows that fill vectors (8 on AVX2) stay nchw.
    Grouped rows share their input loads in nchw, which then stays ahead (4x4 blocks, one
    run: nchw forward 1.41-2.17x against chwn 1.31-1.61x, grad-input about even).
    Grad-weight also takes chwn on padded rows wider than 8 and narrower than a vector
    (``CHWN_GRAD_WEIGHT_PADDED``; session 8, ``--vary layout``, 14x14, copies included):
    per kernel 32->32, 64->64, 64->128 and 128->128 1.34-1.85x against 1.12-1.46x at 4/9
    (three runs), 1.65-3.02x against 1.77-2.38x at 0.222, with 4x4 blocks 1.47-2.46x against
    1.37-2.62x. Where filters keep fewer than ``CHWN_GRAD_WEIGHT_PADDED_KERNELS`` kernels, the
    copies into chwn outweigh it: 32->32 14x14 at 0.222 (16 a filter) read 2.14-2.61x against
    session 7's 2.47-2.89x with 4x4 blocks, 1.92-2.19x against 1.95-2.31x per kernel.
    On 28-wide rows (32 lanes) chwn won at 4/9 and lost with half the kernels dropped. Strided
    layers keep nchw, which reads the forward's column phases without a copy of its own
    (28x28 stride 2 to 14-wide rows, in one process: chwn 0.82-1.44x against 0.68-1.65x,
    either way by up to a third)."""
    if cuda:
        return "nchw", "nchw", "nchw"

    def direct(width: int, kernels: float, group: int) -> str:
        padded = width % min(simd_lanes, CHWN_NARROW_ROW_LANES) != 0
        # rows wider than a vector (AVX2's 9 to 15) at stride 1 only: a strided layer's
        # grad-input lost there (32->64 14x14 stride 2: 1.49x of dense nchw, 0.54-0.75x chwn)
        narrow_row = (group == 1 and padded and width < CHWN_NARROW_ROW_LANES and kernels >= CHWN_NARROW_ROW_KERNELS
                      and (width < simd_lanes or geom.stride == (1, 1)))
        return "chwn" if width <= CHWN_DIRECT_MAX_WIDTH or narrow_row else "nchw"
    kernels_f, kernels_g = row_kernels or (geom.in_channels, geom.out_channels)
    row_padded = _round_up(geom.out_w, choose_lanes(geom.out_w, simd_lanes)) != geom.out_w
    narrow_padded = (CHWN_GRAD_WEIGHT_PADDED and row_padded and CHWN_DIRECT_MAX_WIDTH < geom.out_w < CHWN_NARROW_ROW_LANES
                     and geom.stride == (1, 1) and kernels_f >= CHWN_GRAD_WEIGHT_PADDED_KERNELS)
    return (direct(geom.out_w, kernels_f, row_groups[0]),
            direct(geom.in_w, kernels_g, row_groups[1]),
            "chwn" if geom.out_w <= max(simd_lanes // 2, CHWN_GRAD_WEIGHT_MAX_WIDTH)
            and (CHWN_GRAD_WEIGHT_HALF_VECTOR or row_padded or geom.out_w <= 4) or narrow_padded else "nchw")


def accumulators(budget: int, registers: int) -> int:
    """A tile's accumulator budget (``budget``: measured on AVX-512's 32 vector registers)
    on a CPU with ``registers``: the same share of them. On AVX2's 16, a grouped tile of 16
    accumulators left none for the loaded inputs and weights, and spilled: 4x4 blocks' median
    layer fell below per kernel's (1.32x against 1.40x of dense); with 8, 16->16 32x32 nchw
    forward / grad-input rose from 1.06 / 1.02x to 2.14 / 1.85x (session 10, ``kernels.py
    --isa avx2`` and in-process A/Bs; 12 accumulators 1.26x, 6 1.64x)."""
    return max(1, budget * registers // 32)


def choose_chwn_rows(height: int, width: int, group: int = 1, budget: int = CHWN_ACCUMULATORS) -> int:
    """Whole rows per chwn tile (of each of ``group`` layout rows): as many as ``budget``
    accumulators hold, padding <= 15 %."""
    best = 1
    for r in range(1, max(1, min(height, budget // (width * group))) + 1):
        if _round_up(height, r) <= 1.15 * height:
            best = r
    return best


def chwn_tile(height: int, width: int, block: int, registers: int) -> tuple[int, int, int]:
    """(row group, rows, columns) of a chwn output tile. The accumulator budget follows the
    register file (``accumulators``), except where ``CHWN_ACCUMULATORS`` itself holds the
    whole map: a whole-map tile skips the taps on the zero border (``SKIP_ZERO_TAPS``), and
    that outweighs some spilling. Measured on AVX2 (``kernels.py --isa avx2`` and A/Bs,
    session 10, forward / grad-input of dense): 256->512 4x4 per kernel 1.74x / 1.47x with the
    whole map, 1.29x / 1.33x in halves; 512->512 2x2 in 4x4 blocks 2.26x / 1.39x against
    1.90x / 1.18x; where the map does not fit either way, the halved budget won (64->64 8x8
    1.26x -> 1.46x, 4x4 blocks on 128->256 8x8 0.60x -> 1.79x). Where a group's whole map
    does not fit but one row's does (a 4x4 map in 4x4 blocks), the whole map ungrouped beat
    the group's halved tile on AVX2 (``CHWN_WHOLE_MAP_UNGROUPED``, session 12, in-process
    A/Bs, forward / grad-input, three runs): 512->512 4x4 1.68-1.70x / 1.38-1.52x -> 2.17x /
    1.59-1.65x, 256->512 4x4 1.77-2.05x / 1.27-1.70x -> 1.66-2.41x / 1.42-1.68x, 128->128 4x4
    2.06x / 1.53x -> 2.42x / 1.70x (it also gathers the forward's weights, per kernel); with
    half the kernels dropped 256->512 forward 3.15x -> 4.17x, the others even."""
    def tile(budget: int) -> tuple[int, int, int]:
        group = 1  # a power of two (as ``block`` is) with a tile's row of accumulators each
        columns = chwn_x_tile(width, block) or width
        if CHWN_SPLIT_WIDE_ROWS and columns > budget:  # a row wider than the budget: the widest divisor that fits
            columns = max(d for d in range(1, budget + 1) if width % d == 0)
            columns = columns if 2 * columns > budget else width
        while 2 * group <= min(block, MAX_ROW_GROUP, budget // columns):
            group *= 2
        return group, choose_chwn_rows(height, columns, group, budget), columns
    group, rows, columns = tile(CHWN_ACCUMULATORS)
    if rows >= height and columns == width:
        return group, rows, columns
    budget = accumulators(CHWN_ACCUMULATORS, registers)
    if CHWN_WHOLE_MAP_UNGROUPED and budget < CHWN_ACCUMULATORS and height * width <= CHWN_ACCUMULATORS:
        return 1, height, width  # rather than a group's tile shrunk to the registers
    return tile(budget)


CHWN_BLOCK_BYTES = 96 * 1024  # a chwn task's block of source channels (one batch block's input), kept in L2
CHWN_TASKS_PER_BATCH_BLOCK = 8  # output-row groups per batch block: tasks for the cores, each a run of rows
CHWN_WEIGHT_L2_SHARE = 0.75  # a row group's weights beyond this share of a core's L2: tasks walk the batch blocks first
# CPU grad-input reads its kept weights gathered in its own order (grouped rows' side by side:
# FilterKernelLayout.group_interleaved), one pass a call; a stride phase reads the dense weight.
# Measured: 256->256 8x8 1.44x -> 1.54x of dense, 512->512 4x4 0.98x -> 1.34x (session 7, Zen 4, per
# kernel); session 12 (Zen 3, in-process A/Bs, dense weight -> gathered): 4x4 blocks 512->512 4x4
# 1.21x -> 1.75x, 512->512 2x2 1.60x -> 1.93x, 256->256 7x7 1.24x -> 1.36x, 128->256 8x8 / 7x7
# 1.07-1.20x -> 1.22-1.27x / 1.13-1.22x -> 1.36-1.45x, per kernel 128->256 1.13-1.15x -> 1.33-1.47x;
# on 16- to 64-channel layers even to 14 % faster (64->64 7x7 in 4x4 blocks 1.28x -> 1.48x). The gather
# is one more call: on layers of little work (in x out channels x pixels under GATHER_WORK) it
# cost more than it saved (64->64 4x4 1.86-2.03x -> 1.63-1.79x, 32->32 8x8 2.23-2.66x -> 2.22-2.38x;
# 16->16 28x28, 64->64 7x7 and 128->128 4x4, 2-4 times the work, even or faster)
GATHER_GRAD_INPUT = True
GATHER_WORK = 1 << 17
# chwn_blocks counts a grouped, gathered kernel's weights as this many bytes (read one filter apart: a cache
# line). Measured (session 12, Zen 3, in-process A/Bs, grad-input, 4x4 blocks): 256->256 8x8 then walks rows
# first, 1.12-1.22x -> 1.29-1.46x of dense in four runs. Per kernel, gathered rows keep the cache line: 16 bytes
# moved 256->512 4x4 rows-first, 1.20-1.33x -> 1.04-1.15x in three runs, 256->256 8x8 even
GROUPED_GATHERED_WEIGHT_BYTES = 36


def chwn_blocks(src_channels: int, dst_channels: int, in_h: int, in_w: int, lanes: int,
                weight_bytes: int = 36, group: int = 1, l2_bytes: int = 1 << 20) -> tuple[int, int, bool]:
    """(source channels per block, output rows per task, batch blocks innermost) of a chwn
    direct conv. Measured on a 512-channel 4x4 layer (docs/performance.md): unblocked, each
    output row re-read its images' whole input (~1 MB, from memory), and the kernel ran at a
    third of dense. A task group's weights (a 3x3 kernel each: 36 bytes, or a cache line
    where the kernel reads them one filter apart, as grad-input does) that outgrow L2 are
    better reused across the blocks of images than the input across the groups: 512-channel
    4x4 grad-input 0.54x -> 0.83x of dense, 2x2 forward 0.52x -> 0.78x, while layers with
    small groups lost a little that way (128-channel 4x4 forward 1.39x -> 1.25x). That was on
    Zen 4 (1 MiB L2: 768 KiB of weights); the threshold is a share of the core's L2
    (``CHWN_WEIGHT_L2_SHARE``): on Zen 3 (512 KiB) 256->512 4x4 forward (590 KiB of weights
    a group) ran 0.97-1.07x of dense under 768 KiB and 1.61-1.65x under 384 KiB, 2x2 layers and
    those over both thresholds even (session 11, in-process A/Bs)."""
    per_channel = in_h * in_w * lanes * 4
    block = max(1, CHWN_BLOCK_BYTES // per_channel)
    rows = _round_up(-(-dst_channels // CHWN_TASKS_PER_BATCH_BLOCK), group)  # whole groups of rows
    weights = rows * src_channels * weight_bytes
    return (0 if block >= src_channels else block), rows, weights > CHWN_WEIGHT_L2_SHARE * l2_bytes


MAX_ROW_GROUP = 4  # rows of the layout one task may compute together (choose_row_group, _tile)
GROUPED_ACCUMULATORS = 16  # vector registers a grouped nchw tile holds (all its rows' accumulators)


def choose_row_group(block: int, lanes: int, simd_lanes: int, registers: int = 32) -> tuple[int, int]:
    """(rows of the layout per task, tile rows) of an nchw direct conv whose layout rows come
    in groups of ``block`` equal rows (``row_group_of``). Grouped rows share every input load,
    so the tile grows to ``GROUPED_ACCUMULATORS`` vectors (half of AVX-512's 32 registers,
    of AVX2's 16: ``accumulators``). Measured on AVX-512 (forward,
    4/9, docs/performance.md): one register per row, 4 rows of a group x 4 tile rows
    (64->128 16x16 2.64x of dense, against 1.80x ungrouped), 2 x 8 about as fast as 2 x 4;
    two registers per row (32 lanes), 2 x 4 (3.56x) beat 4 x 2 (2.93x)."""
    vectors = max(1, lanes // simd_lanes)
    group = min(block, max(1, 4 // vectors))
    if group == 1:
        return 1, choose_rows(lanes, simd_lanes)
    return group, max(1, min(8, accumulators(GROUPED_ACCUMULATORS, registers) // (group * vectors)))


CHWN_TILES_OUTER = True  # chwn: a task's tiles outer, its output rows inner (DirectConvSpec.tiles_outer)
CHWN_WHOLE_MAP_UNGROUPED = True  # chwn_tile: one row's whole map rather than a group's shrunk tile (AVX2)
# chwn_tile: a row wider than the accumulator budget (AVX2's 8: rows of 9-15, chwn per kernel where they keep
# 48+ kernels) is tiled by its widest divisor that fits, not spilled as a whole. Session 12, Zen 3, in-process
# A/Bs, forward / grad-input, 14x14, 4/9: 64->128 1.19 / 0.96x -> 1.40 / 1.29x, 128->128 1.26 / 1.10x -> 1.37 /
# 1.35x, 128->64 1.37 / 0.95x -> 1.47 / 1.27x, 64->64 1.41 / 1.05x -> 1.46 / 1.15x; half the kernels dropped
# even to +20 % (128->64 grad-input 2.12x -> 2.01x the one loss)
CHWN_SPLIT_WIDE_ROWS = True
CHWN_X_TILE = 4  # chwn: output columns per tile on wider rows where ids come in groups of 4 (0: whole rows)


def chwn_x_tile(width: int, block: int) -> int:
    """Columns per chwn tile (0: whole rows). With ids in groups of 4 (``block``), rows that
    split into tiles of ``CHWN_X_TILE`` take 4 layout rows x 4 columns instead of 2 x whole
    8-wide rows: a row of taps needs 6 loaded input vectors instead of 10, and a weight
    broadcast feeds half the FMAs. Measured (session 7, three A/Bs in one process, 4/9, 4x4
    blocks, forward / grad-input): 64->64 8x8 1.72-1.90x -> 1.76-1.98x / 1.63-1.91x ->
    1.79-1.88x, 128->256 8x8 1.55-1.60x -> 1.62-1.65x / 1.35-1.47x -> 1.52-1.54x, 256->256
    8x8 1.48-1.54x -> 1.56-1.60x / 1.41-1.49x -> 1.43-1.53x: a few per cent, in 17 of 18;
    ``benchmarks/tile_variants.py --vary xtile --pattern-block 4x4`` afterwards: forward
    even, grad-input 5-12 % faster."""
    return CHWN_X_TILE if CHWN_X_TILE and width > CHWN_X_TILE and width % CHWN_X_TILE == 0 and block >= 4 else 0


def _tile(layout: str, height: int, width: int, target: KernelTarget, cuda: bool,
          block: int = 1) -> tuple[int, int, int, int, int, int]:
    """(row group, rows, lanes, padded height, padded width, columns where a chwn tile splits
    its rows, else 0: ``DirectConvSpec.x_tile``) of a direct-conv output tile."""
    if layout == "chwn":  # lanes along the batch; the tile is whole output rows, or tiles of them (chwn_tile)
        group, rows, columns = chwn_tile(height, width, block, target.vector_registers)
        return group, rows, target.simd_lanes, _round_up(height, rows), width, columns if columns < width else 0
    if cuda:
        return 1, 1, 1, height, width, 0
    lanes = choose_lanes(width, target.simd_lanes)
    group, rows = choose_row_group(block, lanes, target.simd_lanes, target.vector_registers)
    if group == 1 and height % rows and NCHW_EXACT_ROWS:
        exact = max(r for r in range(1, choose_rows(target.simd_lanes, target.simd_lanes) + 1) if height % r == 0)
        if exact >= NCHW_EXACT_MIN_ROWS and \
                _round_up(width, target.simd_lanes) * height < _round_up(width, lanes) * _round_up(height, rows):
            lanes, rows = target.simd_lanes, exact
    return group, rows, lanes, _round_up(height, rows), _round_up(width, lanes), 0


GRAD_WEIGHT_GROUP = 2  # measured on AVX-512 (docs/performance.md): 2 beats 1 by 6-30 %
GRAD_WEIGHT_WIDE_GROUP = 4  # with 32 vector registers: chwn, and nchw maps of <= 16x16 pixels,
GRAD_WEIGHT_WIDE_PIXELS = 256  # where blocks of four fill up (grad_weight_group)
GRAD_WEIGHT_WIDE_FILTERS = 128


def grad_weight_group(target: KernelTarget, layout: str = "nchw", pixels: int = 0, full: bool = True) -> int:
    """Kept kernels per grad-weight block (sharing an input channel and a pattern). Two:
    ``2 x k`` accumulators and ``k + 2`` loaded vectors fit even AVX2's 16 registers. Four
    on a CPU with 32 vector registers (AVX-512), in chwn and on nchw maps of at most
    ``GRAD_WEIGHT_WIDE_PIXELS`` output pixels, where blocks of four fill up (``full``: the
    ids come in groups of 4 filters, or the layer has ``GRAD_WEIGHT_WIDE_FILTERS`` filters or
    more, so that a channel and pattern have several kept kernels). Measured (session 6,
    ``tile_variants.py --vary group`` and A/Bs per kernel and on 4x4 blocks): chwn 256->256
    4x4 1.46x -> 1.73x of dense, 128->128 4x4 1.85x -> 2.10x, 128->256 7x7 3-5 % slower;
    nchw 8x8 +2-17 % (128->256 1.04x -> 1.21x), 14x14 and 16x16 -3 to +9 %, but 16->16 28x28
    1.31x -> 0.99x and 32x32 1.41x -> 1.24x; at 75 % of kernels dropped 16->32 14x14 2.73x ->
    2.07x and 64->64 7x7 3.21x -> 2.83x (half-empty blocks). (Session 3 measured four 2-3x
    slower: its accumulators, 1 KB in one buffer, lived on TVM's heap.) CUDA takes one kernel
    per thread."""
    if target.name == "cuda":
        return 1
    wide = full and (layout == "chwn" or 0 < pixels <= GRAD_WEIGHT_WIDE_PIXELS)
    return GRAD_WEIGHT_WIDE_GROUP if wide and target.vector_registers >= 32 else GRAD_WEIGHT_GROUP


GRAD_WEIGHT_SLICES = True  # CPU grad-weight: by slices of the batch whose output gradient and input fill a core's L2
CHWN_GRAD_WEIGHT_SLICES = True  # chwn grad-weight: by slices of the batch blocks too (grad_weight_slice)
CHWN_GRAD_WEIGHT_SLICE_PIXELS = 32  # ... where a slice holds this many pixels of its batch blocks or more


def grad_weight_slice(geom: ConvGeometry, layout: str, out_h: int, out_w: int, in_h: int, in_w: int,
                      cuda: bool, l2_bytes: int, lanes: int = 1) -> int:
    """Images (chwn: batch blocks of ``lanes`` images) per batch slice of a CPU grad-weight
    (0: the whole batch at once): as many as keep the slice's output gradient and input
    within a core's L2 (``l2_bytes``). Each block of kernels re-reads its filters' output
    gradient and its channel's input, so a layer with many kernels reads its data hundreds of
    times (64->128 16x16 at batch 64: ~700 MB of reads of 14 MB), and a block's own data over
    the batch outgrows L2 on large maps (16->16 28x28 at batch 64: 720 KB a block of two
    kernels); whole-batch passes fetched it from beyond L2 every time. Measured (session 7,
    AVX-512, 1 MB L2, ``benchmarks/tile_variants.py --vary slice``, 4/9, 4x4 blocks; per
    kernel in brackets): 64->128 16x16 1.50x -> 2.03x of dense (1.22x -> 1.72x), 128->128
    16x16 1.13x -> 1.74x, 64->128 14x14 1.28x -> 1.55x, 256->256 8x8 1.41x -> 1.61x; there,
    on layers of 1024 kernels or fewer it was even or lost (32->32 16x16 per kernel 1.79x ->
    1.46x in one A/B), so only layers of 64 x 128 kernels or more took slices. Session 13 on
    Zen 3 (512 KB L2, today's kernels, in-process A/Bs, per kernel, 11-15 rounds) found slices
    winning on every nchw layer tried, so every nchw layer takes them: 16->16 28x28 1.42x ->
    1.61x, 16->16 32x32 2.25x -> 2.52x, 16->32 28x28 / 32x32 stride 2 1.10x / 1.15x -> 1.26x /
    1.51x, 32->32 16x16 2.31x / 1.42x / 2.07x -> 2.76x / 1.86x / 2.58x (three A/Bs; one earlier
    read 1.70x -> 1.60x), 16->16 16x16 1.51x -> 2.03x; in 4x4 blocks 16->16 28x28 1.64x ->
    2.07x, 16->32 32x32 stride 2 1.37x -> 1.60x, 32->32 16x16 3.22x -> 3.61x; with half the
    kernels dropped 16->16 28x28 1.59x -> 1.86x, 32->32 16x16 3.01x -> 3.39x, 32->32 14x14
    2.19x -> 2.49x, 16->16 16x16 2.46x -> 3.22x, 64->64 12x12 1.54x -> 1.66x. Slices of a 512 KB
    L2 rather than the 1 MB session 7 used beat 1 MB there (16->16 28x28 1.75x -> 1.91x,
    64->128 16x16 1.69x -> 1.76x).
    chwn (batch blocks of ``lanes`` images) likewise, where one batch block's output gradient
    and input fit L2 and a slice still holds ``CHWN_GRAD_WEIGHT_SLICE_PIXELS`` pixels of its
    blocks: each block's tree reduction and gradient update come once a slice, and a 512->512
    4x4 layer in slices of one batch block (16 pixels) fell from 1.73x to 0.53x of dense.
    Measured (session 13, Zen 3, in-process A/Bs, 4/9 per kernel): 64->64 7x7 1.55x / 1.65x /
    1.74x -> 1.67x / 1.74x / 1.70x, 64->64 8x8 2.06x -> 2.16x, 32->32 14x14 1.74x -> 1.95x,
    128->128 4x4 (slices of two blocks) 1.80x -> 1.93x, 64->64 4x4 2.60x -> 3.11x, 32->64 7x7
    1.82x -> 2.15x, 32->64 16x16 stride 2 1.94x -> 2.20x; in 4x4 blocks 32->32 14x14 1.97x ->
    2.31x, 64->64 8x8 1.39x -> 1.50x; with half the kernels dropped 64->64 8x8 3.13x -> 3.67x,
    64->64 7x7 1.41x -> 1.53x. Where one batch block's data outgrows L2 (256->256 7x7 / 8x8,
    128->256 7x7 / 8x8, 1-1.3 MB) the slices do not fit either and the A/Bs went both ways
    (256->256 7x7 1.39x -> 1.50x, 1.59x -> 1.16x, 1.66x -> 1.69x; 128->256 8x8 1.64x -> 2.05x,
    1.86x -> 1.77x, 2.05x -> 2.21x): those take the whole batch. (The same code read 1.85x and
    1.47x in one A/B of an unchanged plan: single figures move by up to a quarter.)"""
    chwn = layout == "chwn"
    if cuda or not GRAD_WEIGHT_SLICES or (chwn and not CHWN_GRAD_WEIGHT_SLICES):
        return 0
    images = lanes if chwn else 1  # a slice's unit: an image, in chwn a batch block
    units = l2_bytes // (4 * images * (geom.out_channels * out_h * out_w + geom.in_channels * in_h * in_w))
    if chwn:
        return units if units * out_h * out_w >= CHWN_GRAD_WEIGHT_SLICE_PIXELS else 0
    return max(1, units)


def grad_weight_blocks(fwd: FilterKernelLayout, num_patterns: int, group: int):
    """Blocks of up to ``group`` kept kernels sharing an input channel and a pattern, ordered
    by pattern: (filters ``(B, group)``, channel ``(B,)``, weight positions ``(B, group, k)``,
    block pointer per pattern ``(P + 1,)``). A short block repeats its first kernel, written to
    the scratch slots past the dense weight (``numel + t``)."""
    K, k = fwd.weight_index.shape
    numel = fwd.out_channels * fwd.in_channels * 9
    pattern = fwd.kernel_pattern.long()
    key, order = torch.sort(pattern * fwd.in_channels + fwd.kernel_channel.long(), stable=True)
    _, counts = torch.unique_consecutive(key, return_counts=True)
    run_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    blocks_per_run = -(-counts // group)
    run_block = torch.repeat_interleave(torch.cumsum(blocks_per_run, 0) - blocks_per_run, counts)
    rank = torch.arange(K) - run_start
    block, slot = run_block + rank // group, rank % group
    B = int(blocks_per_run.sum())
    first = torch.zeros(B, dtype=torch.long)
    first[block[slot == 0]] = order[slot == 0]
    filters = fwd.kernel_filter[first].unsqueeze(1).repeat(1, group)
    positions = (numel + torch.arange(k)).repeat(B, group, 1)
    filters[block, slot] = fwd.kernel_filter[order]
    positions[block, slot] = fwd.weight_index[order]
    blocks_per_pattern = torch.bincount(pattern[first], minlength=num_patterns)
    pointer = torch.cat([torch.zeros(1, dtype=torch.long), blocks_per_pattern.cumsum(0)])
    return filters, fwd.kernel_channel[first], positions, pointer


STRIDE_PHASES = True  # strided CPU grad-input by stride phases (False: on the zero-inserted gradient)
WEAVE_PHASES = True   # ... their gradients woven by a generated copy (False: torch's strided assignments)


def _phase_taps(phase: int, stride: int, padding: int, dilation: int) -> dict[int, int]:
    """One axis of a strided conv's grad-input: input index ``stride * q + phase`` receives
    from tap ``t`` (0..2) exactly the output gradient at ``q + offset``; the taps of other
    phases miss it. Returns {tap: offset} for the taps that reach this phase."""
    return {t: (phase + padding - t * dilation) // stride for t in range(3)
            if (phase + padding - t * dilation) % stride == 0}


def plan_grad_input_phases(geom: ConvGeometry, library: torch.Tensor, target: KernelTarget, template: DirectConvSpec
                           ) -> tuple[tuple, tuple[int, int], tuple[int, int]]:
    """The stride-phase decomposition of a strided conv's grad-input: per phase ``(ry, rx)``
    of the input, a stride-1 direct conv over the (padded, not zero-inserted) output gradient
    with only the taps that reach that phase (each tap reaches exactly one): a quarter of the
    work of the zero-inserted gradient at stride 2. Returns (((ry, rx), spec), ...), the
    output gradient's padding (top, left) and its frame (H, W), shared by every phase."""
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
    found = []
    for ry in range(sh):
        for rx in range(sw):
            q = (-(-(geom.in_h - ry) // sh), -(-(geom.in_w - rx) // sw))
            if min(q) <= 0:
                continue
            taps = (_phase_taps(ry, sh, ph, dh), _phase_taps(rx, sw, pw, dw))
            # the template's row group at most: the phases share its layout
            tile = _tile("nchw", q[0], q[1], target, False, template.row_group)
            found.append(((ry, rx), q, taps, tile))
    offsets_y = [o for _, _, (ty, _), _ in found for o in ty.values()] or [0]
    offsets_x = [o for _, _, (_, tx), _ in found for o in tx.values()] or [0]
    top, left = max(0, -min(offsets_y)), max(0, -min(offsets_x))
    frame = (max(t[3] for *_, t in found) + max(offsets_y) + top, max(t[4] for *_, t in found) + max(offsets_x) + left)
    phases = []
    for (ry, rx), q, (ty, tx), (group, rows, lanes, qh, qw, _) in found:
        kept = [[(3 * dy + dx, (ty[dy] + top, tx[dx] + left)) for dy, dx in pattern_offsets(p) if dy in ty and dx in tx]
                for p in library]
        phases.append(((ry, rx), dataclasses.replace(
            template, name=f"{template.name}_ph{ry}{rx}", in_h=frame[0], in_w=frame[1], out_h=qh, out_w=qw,
            offsets=tuple(tuple(o for _, o in taps) for taps in kept), rows=rows, lanes=lanes, stored=q,
            positions=tuple(tuple(pos for pos, _ in taps) for taps in kept), row_group=group, kept=template.k)))
    return tuple(phases), (top, left), frame


def plan_kernels(geom: ConvGeometry, library: torch.Tensor, target: KernelTarget,
                 row_groups: tuple[int, int] = (1, 1), row_kernels: tuple[float, float] | None = None) -> KernelPlan:
    """``row_groups``: (filters, input channels) that come in groups of equal pattern ids
    (``row_group_of`` of the ids and of their transpose); 1 where kernels have their own.
    ``row_kernels``: the kept kernels of a filter and of an input channel, on average
    (``choose_layouts``; default: none dropped)."""
    (sh, sw), (dh, dw), (ph, pw) = geom.stride, geom.dilation, geom.padding
    fwd_offsets = tuple(tuple((dy * dh, dx * dw) for dy, dx in pattern_offsets(p)) for p in library)
    flipped = tuple(tuple(((2 - dy) * dh, (2 - dx) * dw) for dy, dx in pattern_offsets(p)) for p in library)
    cuda = target.name == "cuda"
    fwd_layout, gi_layout, gw_layout = choose_layouts(geom, target.simd_lanes, cuda, row_groups, row_kernels)
    kernels_f, kernels_g = row_kernels or (geom.in_channels, geom.out_channels)
    group_f, rows_f, lanes_f, oh, ow, columns_f = _tile(fwd_layout, geom.out_h, geom.out_w, target, cuda, row_groups[0])
    group_g, rows_g, lanes_g, ih, iw, columns_g = _tile(gi_layout, geom.in_h, geom.in_w, target, cuda, row_groups[1])
    # CPU nchw frames read at stride 1 get wider rows where channel planes alias in L1 (CUDA's as they are)
    fwd_in = nchw_frame((oh - 1) * sh + 2 * dh + 1, (ow - 1) * sw + 2 * dw + 1, not cuda and fwd_layout == "nchw" and sw == 1)
    gi_in = nchw_frame(ih - 1 + 2 * dh + 1, iw - 1 + 2 * dw + 1, not cuda and gi_layout == "nchw")
    tag = f"{geom.tag()}_{abs(hash(fwd_offsets)) % 10**8}"
    fwd_tag, gi_tag = (tag + (f"_g{g}" if g > 1 else "") for g in (group_f, group_g))
    # strided CPU grad-input: one stride-1 kernel per stride phase (plan_grad_input_phases)
    phased = STRIDE_PHASES and not cuda and gi_layout == "nchw" and geom.stride != (1, 1)
    # nchw outputs are stored at their true size (a tile overhanging it stores narrower vectors)
    fwd_stored = (geom.out_h, geom.out_w) if fwd_layout == "nchw" else None
    gi_stored = (geom.in_h, geom.in_w) if gi_layout == "nchw" else None
    # CPU kernels compute each weight's address (measured 5-25 % faster than loading it from
    # widx, docs/performance.md); fwd rows are filters (stride C*9), grad-input rows channels
    positions = () if cuda else tuple(tuple(3 * dy + dx for dy, dx in pattern_offsets(p)) for p in library)
    C9 = geom.in_channels * 9
    fwd_blocks = chwn_blocks(geom.in_channels, geom.out_channels, *fwd_in, lanes_f, group=group_f,
                             l2_bytes=target.l2_bytes) if fwd_layout == "chwn" else (0, 1, False)
    work_enough = not cuda and geom.in_channels * geom.out_channels * geom.in_h * geom.in_w >= GATHER_WORK
    gathers = GATHER_GRAD_INPUT and work_enough and not phased
    fwd_gathers = GATHER_FORWARD and work_enough and group_f == 1

    def task_order(gathered: bool, layout: str, group: int, kernels: float) -> dict:
        """Rows with their own kernels: an nchw task takes a block of them on gathered weights
        (where they keep enough kernels), a chwn task walks its tiles outer."""
        own = group == 1
        return dict(row_block=NCHW_ROW_BLOCK if own and gathered and layout == "nchw"
                    and kernels >= NCHW_ROW_BLOCK_KERNELS else 1,
                    tiles_outer=own and CHWN_TILES_OUTER and layout == "chwn")
    gi_weight_bytes = GROUPED_GATHERED_WEIGHT_BYTES if gathers and group_g > 1 else 64
    gi_blocks = chwn_blocks(geom.out_channels, geom.in_channels, *gi_in, lanes_g, gi_weight_bytes,
                            group=group_g, l2_bytes=target.l2_bytes) if gi_layout == "chwn" else (0, 1, False)
    forward = DirectConvSpec(f"ct_fwd_{fwd_layout}_{fwd_tag}", geom.in_channels, geom.out_channels, fwd_in[0], fwd_in[1],
                             oh, ow, geom.stride, fwd_offsets, rows_f, lanes_f, bias=True, layout=fwd_layout,
                             stored=fwd_stored, positions=positions, strides=(C9, 9),
                             # strided rows read column phases: measured 1.4-2.3x faster forward
                             phases=sw if fwd_layout == "nchw" and not cuda else 1,
                             channel_block=fwd_blocks[0], filter_block=fwd_blocks[1], batch_inner=fwd_blocks[2],
                             row_group=group_f, gathered_weight=fwd_gathers, x_tile=columns_f,
                             **task_order(fwd_gathers, fwd_layout, group_f, kernels_f),
                             valid=(ph, ph + geom.in_h, pw, pw + geom.in_w) if fwd_layout == "chwn" else ())
    grad_input = DirectConvSpec(f"ct_dgrad_{gi_layout}_{gi_tag}", geom.out_channels, geom.in_channels, gi_in[0], gi_in[1],
                                ih, iw, (1, 1), flipped, rows_g, lanes_g, bias=False, layout=gi_layout,
                                stored=gi_stored, positions=positions, strides=(9, C9),
                                gathered_weight=gathers,
                                channel_block=gi_blocks[0], filter_block=gi_blocks[1], batch_inner=gi_blocks[2],
                                row_group=group_g, x_tile=columns_g,
                                **task_order(gathers, gi_layout, group_g, kernels_g),
                                # stride 1: the output gradient at (2d - p) in its frame, zeros around
                                valid=(2 * dh - ph, 2 * dh - ph + geom.out_h, 2 * dw - pw, 2 * dw - pw + geom.out_w)
                                if gi_layout == "chwn" and geom.stride == (1, 1) else ())
    # grad-weight reads the forward's padded input when their layouts agree; otherwise its own copy
    if gw_layout == "chwn":
        gw_lanes, gw_w = target.simd_lanes, geom.out_w
    elif fwd_layout == "nchw":  # the forward's padded input serves as is
        gw_lanes, gw_w = (1 if cuda else min(lanes_f, target.simd_lanes)), ow
    else:  # a chwn forward's row is not an nchw tile: grad-weight tiles its own and pads its own input
        _, _, lanes_n, _, gw_w, _ = _tile("nchw", geom.out_h, geom.out_w, target, cuda)
        gw_lanes = min(lanes_n, target.simd_lanes)
    gw_in_w = max(fwd_in[1], (gw_w - 1) * sw + 2 * dw + 1)
    grad_weight = GradWeightSpec(f"ct_wgrad_{gw_layout}_{tag}", geom.in_channels, geom.out_channels,
                                 fwd_in[0], gw_in_w, geom.out_h, geom.out_h, gw_w, geom.stride, fwd_offsets,
                                 gw_lanes, gw_layout,
                                 group=grad_weight_group(target, gw_layout, geom.out_h * geom.out_w,
                                                         full=row_groups[0] >= GRAD_WEIGHT_WIDE_GROUP
                                                         or geom.out_channels >= GRAD_WEIGHT_WIDE_FILTERS),
                                 # strided rows read column phases (contiguous vectors), as the forward
                                 phases=sw if gw_layout == "nchw" and not cuda else 1,
                                 batch_slice=grad_weight_slice(geom, gw_layout, geom.out_h, gw_w, fwd_in[0], gw_in_w,
                                                               cuda, target.l2_bytes, gw_lanes))
    if not phased:
        plan = KernelPlan(geom, forward, grad_input, grad_weight)
        return plan if cuda else dataclasses.replace(plan, relayouts=plan_relayouts(plan))
    phases, at, frame = plan_grad_input_phases(geom, library, target, grad_input)
    plan = KernelPlan(geom, forward, grad_input, grad_weight, grad_input_phases=phases)
    return dataclasses.replace(plan, relayouts=plan_relayouts(plan, (at, frame)))


def _relayout(kind: str, spec, channels: int, src_hw: tuple[int, int], frame: tuple[int, int],
              at: tuple[int, int] = (0, 0), spread: tuple[int, int] = (1, 1), phases: int = 1) -> RelayoutSpec:
    parts = (f"ct_{kind}_{spec.layout}_c{channels}", *src_hw, *frame, *at, f"v{spec.lanes}")
    if spread != (1, 1):
        parts += (f"s{spread[0]}x{spread[1]}",)
    if phases > 1:
        parts += (f"ph{phases}",)
    name = "_".join(f"{v}".replace("-", "m") for v in parts)
    return RelayoutSpec(name, kind, spec.layout, channels, *src_hw, *frame, *at, spec.lanes, tuple(spread), phases)


def plan_relayouts(plan: KernelPlan, phase_frame=None) -> dict[str, RelayoutSpec]:
    """The copies around the three kernels, by role: each kernel's input frame (the padded
    input, the output gradient zero-inserted (where strided) and padded, grad-weight's output
    gradient and, where it cannot share the forward's, its own padded input) and the chwn
    kernels' outputs back to nchw. A strided nchw forward's input comes split into its column
    phases, in the same copy. An nchw grad-weight whose tile fits the output gradient reads
    it as it is: no role, no copy (a full pass over the gradient, per call, before session 6).
    Strided grad-input by stride phases gets their interleave into the gradient."""
    g, fwd, gi, gw = plan.geometry, plan.forward, plan.grad_input, plan.grad_weight
    (sh, sw), (dh, dw), (ph, pw) = g.stride, g.dilation, g.padding
    out_hw, in_hw = (g.out_h, g.out_w), (g.in_h, g.in_w)
    # the output gradient spread by the stride (zero insertion) and padded, in one copy
    if phase_frame:  # the stride phases read the output gradient padded, not spread
        (top, left), frame = phase_frame
        grad_input_in = _relayout("pad", gi, g.out_channels, out_hw, frame, (top, left))
    else:
        grad_input_in = _relayout("pad", gi, g.out_channels, out_hw, (gi.in_h, gi.in_w), (2 * dh - ph, 2 * dw - pw),
                                  (sh, sw))
    roles = {"grad_input_in": grad_input_in}
    if gw.layout == "chwn" or (gw.out_h, gw.out_w) != out_hw:  # else dout serves as it is: no copy
        roles["grad_weight_dout"] = _relayout("pad", gw, g.out_channels, out_hw, (gw.out_h, gw.out_w))
    roles["forward_in"] = _relayout("pad", fwd, g.in_channels, in_hw, (fwd.in_h, fwd.in_w), (ph, pw),
                                    phases=fwd.phases)
    if not plan.grad_weight_reads_forward_input:
        roles["grad_weight_in"] = _relayout("pad", gw, g.in_channels, in_hw, (gw.in_h, gw.in_w), (ph, pw),
                                            phases=gw.phases)
    if fwd.layout == "chwn":
        roles["forward_out"] = _relayout("unpad", fwd, g.out_channels, out_hw, (fwd.out_h, fwd.out_w))
    if gi.layout == "chwn":
        roles["grad_input_out"] = _relayout("unpad", gi, g.in_channels, in_hw, (gi.out_h, gi.out_w))
    elif phase_frame and WEAVE_PHASES:  # the stride phases' gradients woven into one
        roles["grad_input_out"] = _relayout("interleave", gi, g.in_channels, in_hw, in_hw, spread=(sh, sw))
    return roles


def kernel_sources(plan: KernelPlan, target: KernelTarget) -> dict[str, str]:
    """TVMScript of the three kernels (each llvm template serves both layouts) and the copies
    around them."""
    cuda = target.name == "cuda"
    direct, wgrad = (direct_conv_cuda, grad_weight_cuda) if cuda else (direct_conv_llvm, grad_weight_llvm)
    sources = {spec.name: (wgrad if spec is plan.grad_weight else direct)(spec) for spec in plan.specs}
    sources.update({spec.name: relayout_llvm(spec) for spec in plan.relayouts.values()})
    if plan.gathers:
        sources[gather_name(plan.grad_input.k)] = gather_weights_llvm(gather_name(plan.grad_input.k), plan.grad_input.k)
    return sources


def gather_name(k: int) -> str:
    return f"ct_gather_weights_k{k}"


@dataclass
class LayerKernels:
    plan: KernelPlan
    target: KernelTarget
    sources: dict[str, str]
    forward: object = None
    grad_input: object = None
    grad_weight: object = None
    compile_seconds: float = 0.0
    cache_hits: int = 0
    relayouts: dict = field(default_factory=dict)  # role -> compiled copy (plan.relayouts)
    gather_weights: object = None  # the weight gather, where plan.gathers
    grad_input_phases: tuple = ()  # compiled plan.grad_input_phases (grad_input is then None)

    @classmethod
    def build(cls, geom: ConvGeometry, library: torch.Tensor, target: KernelTarget,
              row_groups: tuple[int, int] = (1, 1), row_kernels: tuple[float, float] | None = None) -> "LayerKernels":
        return cls.start(geom, library, target, row_groups, row_kernels)()

    @classmethod
    def start(cls, geom: ConvGeometry, library: torch.Tensor, target: KernelTarget,
              row_groups: tuple[int, int] = (1, 1), row_kernels: tuple[float, float] | None = None):
        """Start building the layer's kernels (``cache.start_compile``) and return a function
        that collects them: start several layers, then collect, and the compile workers stay busy."""
        plan = plan_kernels(geom, library, target, row_groups, row_kernels)
        sources = kernel_sources(plan, target)
        runnable = target.name != "cuda" or cuda_available()
        # start every build, then collect: they build side by side (and link while the next builds)
        started = [start_compile(spec.name, sources[spec.name], target, load=runnable) for spec in plan.specs]
        copies = {role: start_compile(spec.name, sources[spec.name], target) for role, spec in plan.relayouts.items()}
        gather = gather_name(plan.grad_input.k)
        if plan.gathers:
            copies[gather] = start_compile(gather, sources[gather], target)

        def collect() -> "LayerKernels":
            kernels = cls(plan, target, sources)
            funcs, modules = [], []
            for spec, result in zip(plan.specs, started):
                module, seconds, hit = result()
                kernels.compile_seconds += seconds
                kernels.cache_hits += int(hit)
                modules.append(module)
                funcs.append(module[spec.name] if runnable else None)
            kernels.forward, *grad_input, kernels.grad_weight = funcs
            if plan.grad_input_phases:
                kernels.grad_input_phases = tuple(grad_input)
            else:
                kernels.grad_input = grad_input[0]
            kernels._modules = modules
            for role, result in copies.items():
                module, seconds, hit = result()
                kernels.compile_seconds += seconds
                kernels.cache_hits += int(hit)
                if role == gather:
                    kernels.gather_weights = module[gather]
                else:
                    kernels.relayouts[role] = module[plan.relayouts[role].name]
            return kernels
        return collect

    def source_hash(self) -> str:
        """Short hash of the kernels' sources: changes whenever the generated code does."""
        import hashlib
        return hashlib.sha256("\n".join(self.sources[k] for k in sorted(self.sources)).encode()).hexdigest()[:12]

    def device_sources(self) -> dict[str, str]:
        """For cuda: the generated CUDA C of each kernel, keyed by dump-file suffix."""
        out = {}
        if self.target.name == "cuda":
            for spec, module in zip(self.plan.specs, self._modules):
                runtime_module = getattr(module, "mod", module)  # an Executable wraps its module
                for imported in runtime_module.imports:
                    try:
                        out[f"{spec.name}.cu"] = imported.inspect_source()
                    except Exception:  # noqa: BLE001 - a loaded binary may carry no source
                        pass
        return out


@dataclass
class LayerIndex:
    """Runtime index arrays of one hardened layer, derived from its pattern ids."""

    fwd_layout: FilterKernelLayout
    bwd_layout: FilterKernelLayout
    fwd_ptr: torch.Tensor
    fwd_src: torch.Tensor
    fwd_perm: torch.Tensor
    bwd_ptr: torch.Tensor
    bwd_src: torch.Tensor
    bwd_perm: torch.Tensor
    gw_filter: torch.Tensor          # grad-weight blocks (grad_weight_blocks): (B, group) filters
    gw_channel: torch.Tensor         # (B,) input channel
    gw_weight_index: torch.Tensor    # (B, group, k) int32 flat weight positions (scratch past the end)
    gw_pattern_ptr: torch.Tensor     # (P + 1,) blocks per pattern
    fwd_widx: torch.Tensor           # (K, k) int32 flat weight positions in forward run order
    bwd_widx: torch.Tensor           # the same in grad-input (transposed) run order
    pruned: torch.Tensor             # bool (O, C, 3, 3): the pruned weights (zeroed where torch's conv runs)
    zero_bias: dict = field(default_factory=dict)
    _handles: dict = field(default_factory=dict)

    @classmethod
    def build(cls, library: torch.Tensor, pattern_ids: torch.Tensor, device, plan: KernelPlan) -> "LayerIndex":
        """The arrays ``plan``'s kernels read (their channel blocks and grad-weight group)."""
        fwd = FilterKernelLayout.build(library, pattern_ids, channel_block=plan.forward.channel_block,
                                       row_group=plan.forward.row_group)
        bwd = FilterKernelLayout.build(library, pattern_ids.t(), transposed=True,
                                       channel_block=plan.grad_input.channel_block, row_group=plan.grad_input.row_group)
        blocks = grad_weight_blocks(fwd, library.shape[0], plan.grad_weight.group)

        def i32(t):
            return t.to(device=device, dtype=torch.int32).contiguous()
        return cls(fwd, bwd, i32(fwd.pattern_ptr()), i32(fwd.kernel_channel), i32(fwd.perm),
                   i32(bwd.pattern_ptr()), i32(bwd.kernel_channel), i32(bwd.perm), *map(i32, blocks),
                   # a gathering kernel reads a group's rows' weights side by side
                   *(i32(layout.weight_index[layout.group_interleaved()] if spec.gathered_weight else layout.weight_index)
                     for layout, spec in ((fwd, plan.forward), (bwd, plan.grad_input))),
                   ~kernel_masks(library, pattern_ids).to(device))

    def handle(self, name: str):
        """TVM's DLPack view of index array ``name``, made once: the arrays never change, and
        converting eight tensors on every kernel call is measurable on small layers."""
        if name not in self._handles:
            import tvm
            t = getattr(self, name)
            if t.data_ptr() % 64:  # TVM rejects buffers not 64-byte aligned; a fresh allocation is
                t = t.clone()
            self._handles[name] = (t, tvm.runtime.from_dlpack(t))  # t: keeps the memory alive
        return self._handles[name][1]

    def bias_zeros(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        key = (channels, like.device)
        if key not in self.zero_bias:
            self.zero_bias[key] = torch.zeros(channels, dtype=torch.float32, device=like.device)
        return self.zero_bias[key]

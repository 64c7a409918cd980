"""Generated pattern-conv kernels (llvm): numerics against a masked dense conv, whole models
against the torch reference, training, the compile cache, and cuda generation."""

import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clicktrain as ct
from clicktrain.codegen import cache as kernel_cache
from clicktrain.codegen.target import _cpu_flags, resolve_target, vector_registers
from clicktrain.passes.conv_sites import ConvSite
from clicktrain.passes.insert_masks import prunable_layers
from clicktrain.runtime.masks import PatternMask, Phase
from clicktrain.runtime.pattern_conv import LayerRunner, PatternConv2d
from clicktrain.runtime.selection import assign_patterns, generate_library

from test_zoo import assert_pattern_invariant


def hardened_conv(out_c, in_c, stride, padding, dilation, connectivity, seed=0, k=4, n_patterns=8, block=(1, 1)):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_c, in_c, 3, 3, generator=g)
    library = generate_library({"w": weight ** 2}, k, n_patterns)
    mask = PatternMask("w", out_c, in_c, k, n_patterns)
    mask.assign(library, assign_patterns(weight ** 2, library, connectivity, block))
    mask.phase = Phase.HARD
    site = ConvSite("w", "w.weight", (out_c, in_c, 3, 3), stride, padding, dilation, 1, None, None)
    conv = PatternConv2d(site, mask, "llvm")
    conv.autotune = False  # these tests are about the generated kernels themselves
    return conv, (weight * mask.mask()), mask


@pytest.fixture
def avx512_plans(monkeypatch):
    """Plans made as on an AVX-512 CPU (16 lanes, 32 vector registers), whatever CPU runs the
    tests: the plan expectations below are AVX-512's, and the kernels still run anywhere
    (compiled for this CPU, LLVM splits a 16-lane vector into what it has)."""
    import dataclasses
    import sys
    import clicktrain.codegen.target as target_module
    real, original = target_module.resolve_target("llvm"), target_module.resolve_target
    wide = real if real.simd_lanes == 16 else dataclasses.replace(
        real, simd_lanes=16, vector_registers=32, description=f"{real.description} planned as AVX-512")

    def resolve(name):
        return wide if name == "llvm" else original(name)
    monkeypatch.setattr(target_module, "resolve_target", resolve)
    monkeypatch.setattr(sys.modules[__name__], "resolve_target", resolve)
    return wide


def planned(in_c, out_c, hw, stride, target_name):
    """The kernel plan and generated sources of a 3x3 conv (padding 1) over a fixed library."""
    from clicktrain.codegen.kernels import ConvGeometry, kernel_sources, plan_kernels
    target = resolve_target(target_name)
    plan = plan_kernels(ConvGeometry(in_c, out_c, hw, hw, (stride, stride), (1, 1), (1, 1)),
                        ct.patterns.fixed_library(4, 4), target)
    return plan, kernel_sources(plan, target)


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


GRID = [
    # batch, in_c, out_c, h, w, stride, padding, dilation, connectivity, bias
    (2, 8, 16, 12, 12, 1, 1, 1, 0.0, True),
    (1, 5, 7, 13, 11, 2, 1, 1, 0.3, True),      # batch 1, odd sizes and channels, stride 2
    (3, 16, 8, 9, 10, 1, 2, 2, 0.5, False),     # dilation 2, half the kernels dropped
    (2, 4, 4, 7, 7, (2, 1), (0, 1), (1, 2), 0.25, True),  # per-axis stride/padding/dilation
    (2, 17, 24, 28, 28, 1, 1, 1, 0.0, False),   # 28-wide rows, 17 channels
    (2, 12, 10, 6, 5, 1, 0, 1, 0.9, True),      # no padding, almost everything dropped
    (4, 32, 32, 7, 7, 1, 1, 1, 0.5, True),      # narrow maps: all three kinds chwn
    (2, 12, 20, 8, 8, 1, 1, 1, 0.3, True),      # all chwn on AVX-512; on AVX2 grad-weight nchw (its own input copy)
    (2, 6, 10, 16, 16, 2, 1, 1, 0.3, True),     # forward chwn (8x8 out), grad-input nchw (16x16)
    (3, 16, 24, 4, 4, 1, 1, 1, 0.5, True),      # tiny maps: all three kinds chwn
    (17, 6, 10, 2, 3, 1, 1, 1, 0.0, False),     # batch not a multiple of the vector width
    (2, 8, 16, 8, 8, 2, 1, 1, 0.25, True),      # stride 2, all chwn (4x4 out, 8x8 in)
    (20, 8, 8, 1, 1, 1, 1, 1, 0.0, True),       # a one-pixel map (its copies one pixel wide)
    (2, 8, 12, 2, 2, 2, 1, 1, 0.0, False),      # stride 2 down to one pixel
    (3, 128, 16, 2, 3, 1, 1, 1, 0.3, True),     # many channels, tiny map: CUDA splits forward's runs in 4
    (3, 96, 128, 3, 3, 1, 1, 1, 0.5, False),    # CUDA splits forward's runs in 2, grad-input's in 4
    (2, 64, 72, 14, 13, 1, 1, 1, 0.2, True),    # rows narrower than a vector, 48+ kept kernels a row: chwn
    (2, 32, 16, 14, 14, 1, 1, 1, 0.0, False),   # 14-wide rows, 32 kernels a filter: grad-weight chwn, the rest nchw
    (2, 64, 16, 28, 28, 2, 1, 1, 0.0, False),   # stride 2 to 14-wide rows: forward chwn, grad-weight nchw (own copy)
]


GRID_IDS = [f"n{c[0]}c{c[1]}o{c[2]}_{c[3]}x{c[4]}_s{c[5]}p{c[6]}d{c[7]}_c{c[8]}" for c in GRID]


@pytest.mark.parametrize("case", GRID, ids=GRID_IDS)
def test_forward_and_gradients_match_masked_dense_conv(case):
    check_against_masked_dense_conv(case)


def check_against_masked_dense_conv(case, block=(1, 1)):
    n, c, o, h, w, stride, padding, dilation, connectivity, with_bias = case
    conv, masked_w, mask = hardened_conv(o, c, stride, padding, dilation, connectivity, block=block)
    x = torch.randn(n, c, h, w, requires_grad=True)
    weight = masked_w.clone().requires_grad_(True)
    bias = torch.randn(o, requires_grad=True) if with_bias else None
    y = conv(x, weight, bias)

    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = masked_w.clone().requires_grad_(True)
    b_ref = bias.detach().clone().requires_grad_(True) if with_bias else None
    y_ref = F.conv2d(x_ref, w_ref, b_ref, stride, padding, dilation)
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) < 1e-4
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    assert rel_err(x.grad, x_ref.grad) < 1e-4
    kept = mask.mask()
    assert rel_err(weight.grad[kept], w_ref.grad[kept]) < 1e-4
    assert float(weight.grad[~kept].abs().sum()) == 0.0  # only kept weights get gradients
    if with_bias:
        assert rel_err(bias.grad, b_ref.grad) < 1e-4
    return conv


GROUPED = [  # case as in GRID, pattern block, expected (forward, grad-input) row groups
    ((2, 8, 16, 16, 16, 1, 1, 1, 0.5, True), (2, 2), (2, 2)),     # 16-lane rows, both directions grouped
    ((2, 12, 8, 28, 28, 1, 1, 1, 0.3, False), (4, 1), (2, 1)),    # 32-lane rows take groups of 2 (choose_row_group)
    ((3, 16, 16, 17, 17, 1, 1, 1, 0.25, True), (4, 4), (4, 4)),   # rows and columns overhang the tile
    ((2, 8, 8, 32, 30, 2, 1, 1, 0.5, True), (1, 2), (1, 2)),      # strided: forward on column phases, ungrouped
    ((2, 6, 12, 16, 16, 1, 1, 1, 0.0, False), (3, 2), (1, 2)),    # blocks of 3 filters: not a power of two
    ((3, 16, 16, 8, 8, 1, 1, 1, 0.5, True), (2, 2), (2, 2)),      # chwn (batch in lanes), 8-wide rows
    ((3, 16, 16, 8, 8, 1, 1, 1, 0.5, True), (4, 4), (4, 4)),      # chwn 8-wide rows in tiles of 4 columns
    ((2, 8, 18, 4, 4, 1, 1, 1, 0.3, False), (2, 4), (2, 4)),      # chwn 4x4; 18 rows: the last task's group partial
    ((17, 12, 8, 2, 2, 1, 1, 1, 0.0, True), (4, 4), (4, 4)),      # chwn 2x2, batch not a multiple of the lanes
    ((2, 8, 16, 12, 12, 1, 1, 1, 0.3, True), (4, 4), (4, 4)),     # nchw, grad-weight in blocks of 4 kernels
]


@pytest.mark.parametrize("case,block,groups", GROUPED, ids=[f"{g[1][0]}x{g[1][1]}_{g[0][3]}x{g[0][4]}" for g in GROUPED])
def test_grouped_rows_match_masked_dense_conv(case, block, groups, avx512_plans):
    """Coarser pattern granularity: rows of a block share their runs and one task computes
    them together; every kind still equals the masked dense conv, and the plan really groups."""
    conv = check_against_masked_dense_conv(case, block)
    plan = conv.kernels_for(case[3:5], (case[2], case[1], 3, 3)).plan
    assert (plan.forward.row_group, plan.grad_input.row_group) == groups


def test_chwn_tiles_of_columns_for_groups_of_four(avx512_plans):
    """Before: a chwn tile was whole output rows, so 8-wide rows held groups of 2 (16
    accumulators). Expected: with ids in groups of 4, 4 rows of the layout x 4 columns (the
    loaded input vectors a tile needs fall from 10 to 6 per row of taps); numerics as the
    masked conv, also for a stride-2 forward down to 8x8 and for rows that do not split."""
    from clicktrain.codegen.kernels import CHWN_X_TILE, ConvGeometry, plan_kernels
    library = ct.patterns.fixed_library(4, 8)
    plan = plan_kernels(ConvGeometry.of((64, 64, 3, 3), (8, 8), 1, 1, 1), library, resolve_target("llvm"), (4, 4))
    assert CHWN_X_TILE == 4 and plan.forward.layout == plan.grad_input.layout == "chwn"
    assert [(spec.row_group, spec.x_tile, spec.out_w) for spec in (plan.forward, plan.grad_input)] == [(4, 4, 8)] * 2
    whole = plan_kernels(ConvGeometry.of((64, 64, 3, 3), (8, 8), 1, 1, 1), library, resolve_target("llvm"), (2, 2))
    assert (whole.forward.row_group, whole.forward.x_tile) == (2, 0)  # groups of 2: whole rows
    conv = check_against_masked_dense_conv((3, 8, 16, 16, 16, 2, 1, 1, 0.3, True), block=(4, 4))
    assert next(iter(conv._kernels.values())).plan.forward.x_tile == 4
    check_against_masked_dense_conv((2, 8, 8, 7, 7, 1, 1, 1, 0.0, False), block=(4, 4))  # 7 wide: whole rows


def test_strided_grad_input_runs_one_kernel_per_stride_phase():
    """Before: a stride-2 conv's grad-input ran on the zero-inserted output gradient (four
    times the work, three quarters of it on zeros). Expected: one stride-1 kernel per input
    phase, each with only the taps that reach it (some patterns with none), every tap in
    exactly one phase, reading the gradient padded, not spread, their gradients woven into
    one by a generated interleave; numerics as the masked conv."""
    from clicktrain.patterns import pattern_offsets
    plan, sources = planned(6, 8, 15, 2, "llvm")
    phases = plan.grad_input_phases
    assert [phase for phase, _ in phases] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    library = ct.patterns.fixed_library(4, 4)
    for p in range(len(library)):
        split = sorted(pos for _, spec in phases for pos in spec.positions[p])
        assert split == sorted(3 * dy + dx for dy, dx in pattern_offsets(library[p]))
    assert any(not spec.offsets[p] for _, spec in phases for p in range(len(library)))
    assert plan.grad_input.name not in sources and all(spec.name in sources for _, spec in phases)
    assert plan.relayouts["grad_input_in"].spread == (1, 1)
    weave = plan.relayouts["grad_input_out"]
    assert (weave.kind, weave.spread, (weave.h, weave.w)) == ("interleave", (2, 2), (15, 15))
    assert [(ry, rx) for ry, rx, _, _ in weave.stride_phases] == [phase for phase, _ in phases]
    assert [(qh, qw) for _, _, qh, qw in weave.stride_phases] == [spec.stored for _, spec in phases]
    check_against_masked_dense_conv((3, 6, 8, 15, 15, 2, 1, 1, 0.3, True))
    check_against_masked_dense_conv((2, 5, 6, 14, 17, (2, 3), (0, 2), (2, 1), 0.0, False))  # 6 phases, dilation
    check_against_masked_dense_conv((2, 8, 8, 16, 16, 2, 1, 1, 0.5, False), block=(2, 4))  # grouped phases


def test_strided_grad_input_woven_by_torch_without_the_generated_interleave(monkeypatch):
    """``WEAVE_PHASES = False`` (the measured alternative, ``tile_variants.py --vary weave``):
    no interleave planned, torch's strided assignments weave the phases; same numerics."""
    import clicktrain.codegen.kernels as K
    monkeypatch.setattr(K, "WEAVE_PHASES", False)
    conv = check_against_masked_dense_conv((3, 6, 8, 15, 15, 2, 1, 1, 0.3, True))
    plan = next(iter(conv._kernels.values())).plan
    assert plan.grad_input_phases and "grad_input_out" not in plan.relayouts


@pytest.mark.parametrize("shape", [(7, 13, 2, 2), (32, 32, 2, 2), (28, 28, 2, 2), (9, 10, 3, 2), (1, 5, 2, 2),
                                   (5, 1, 2, 2), (6, 40, 1, 3)],
                         ids=["odd", "32-wide", "28-wide", "stride-3x2", "one-row", "one-column", "stride-1x3"])
def test_generated_interleave_of_stride_phases_equals_torchs(shape):
    """The stride phases' gradients (one buffer each, those with pixels) woven into one by the
    generated interleave (shuffled vector pieces, the columns where phases differ in width one
    by one) equal torch's strided assignments; every element is written."""
    import tvm
    from clicktrain.codegen.templates import RelayoutSpec, relayout_llvm
    h, w, sy, sx = shape
    spec = RelayoutSpec("weave", "interleave", "nchw", 3, h, w, h, w, spread=(sy, sx))
    expected = torch.randn(5, 3, h, w)
    phases = [expected[:, :, ry::sy, rx::sx].contiguous() for ry, rx, _, _ in spec.stride_phases]
    assert [p.shape[-2:] for p in phases] == [(qh, qw) for _, _, qh, qw in spec.stride_phases]
    func = tvm.compile(tvm.script.from_source(relayout_llvm(spec)), target=resolve_target("llvm").tvm_target)
    out = torch.full(spec.out_shape(5), float("nan"))
    func["weave"](*map(tvm.runtime.from_dlpack, phases), tvm.runtime.from_dlpack(out))
    assert torch.equal(out, expected)


def test_grad_weight_reads_an_output_gradient_that_fits_its_tile_without_a_copy():
    """Before: grad-weight's output gradient always went through a generated copy. Expected:
    an nchw tile that fits the gradient reads it as it is (no role planned); a padded row
    (30 wide in 32 lanes) or the chwn layout still gets its copy (measured, session 7: reading
    an overhung row in pieces of 8, 4 and 2 lanes instead ran grad-weight 1.3-2.2x slower)."""
    assert "grad_weight_dout" not in planned(16, 16, 32, 1, "llvm")[0].relayouts
    assert "grad_weight_dout" in planned(16, 16, 30, 1, "llvm")[0].relayouts
    small = planned(16, 16, 4, 1, "llvm")[0]
    assert small.grad_weight.layout == "chwn" and "grad_weight_dout" in small.relayouts
    check_against_masked_dense_conv((3, 16, 16, 32, 32, 1, 1, 1, 0.3, True))


@pytest.mark.parametrize("simd", [8, 16])
def test_grad_weight_block_size_per_layer(simd):
    """Blocks of 4 kernels on 32-register CPUs where they fill up (ids in blocks of 4 filters,
    or 128 filters and more) and the map is chwn or small; 2 elsewhere, and always on AVX2."""
    import dataclasses
    from clicktrain.codegen.kernels import ConvGeometry, plan_kernels
    cpu = dataclasses.replace(resolve_target("llvm"), simd_lanes=simd, vector_registers=vector_registers(simd))
    lib = ct.patterns.fixed_library(4, 4)

    def group(c, o, hw, row_groups=(1, 1)):
        return plan_kernels(ConvGeometry(c, o, hw, hw, (1, 1), (1, 1), (1, 1)), lib, cpu, row_groups).grad_weight.group
    wide = 4 if simd == 16 else 2
    assert group(128, 128, 4) == wide and group(64, 64, 4, (4, 4)) == wide and group(16, 16, 12, (4, 4)) == wide
    assert group(64, 64, 4) == 2 and group(16, 32, 14) == 2  # few filters: half-empty blocks
    assert group(128, 128, 28) == 2  # a long reduction over a large map


def test_row_groups_are_found_only_where_ids_repeat():
    from clicktrain.passes.reorder import FilterKernelLayout, row_group_of
    lib = ct.patterns.fixed_library(4, 4)
    ids = assign_patterns(torch.rand(8, 6, 3, 3), lib, 0.3, (4, 2))
    assert (row_group_of(ids, 4), row_group_of(ids.t(), 4), row_group_of(ids, 2)) == (4, 2, 2)
    ids[5, 0] = (ids[5, 0] + 1) % 4  # one kernel breaks its block: groups of 4 and 2 end there
    assert row_group_of(ids, 4) == 1
    # Before: filters in id order. Expected: each group of 2 adjacent and aligned in the new order
    layout = FilterKernelLayout.build(lib, ids[:4], row_group=1)
    grouped = FilterKernelLayout.build(lib, assign_patterns(torch.rand(8, 6, 3, 3), lib, 0.5, (2, 1)), row_group=2)
    pairs = grouped.perm.view(-1, 2)
    assert bool((pairs[:, 0] % 2 == 0).all()) and bool((pairs[:, 1] == pairs[:, 0] + 1).all())
    assert layout.row_group == 1
    with pytest.raises(ValueError, match="groups of 2"):
        FilterKernelLayout.build(lib, ids, row_group=2)


@pytest.fixture
def llvm_cpu(monkeypatch):
    """``llvm_cpu(name)`` sets ``$CLICKTRAIN_LLVM_CPU`` for this test; ``resolve_target``'s
    cached answer is dropped then and again afterwards, so no other test sees that CPU."""
    def use(cpu: str) -> None:
        monkeypatch.setenv("CLICKTRAIN_LLVM_CPU", cpu)
        resolve_target.cache_clear()
    yield use
    monkeypatch.delenv("CLICKTRAIN_LLVM_CPU", raising=False)
    resolve_target.cache_clear()


@pytest.mark.parametrize("cpu,lanes,isa", [("x86-64-v3", 8, "avx2"), ("x86-64-v2", 4, "sse4_2")], ids=["avx2", "sse4.2"])
def test_older_cpus_kernels_match_masked_dense_conv(cpu, lanes, isa, llvm_cpu):
    """Machines differ (AVX2-only ones have 8 float lanes and 16 vector registers):
    ``$CLICKTRAIN_LLVM_CPU`` makes LLVM generate for an older CPU, which this one executes.
    The kernels planned for it (other tiles, chwn blocks of 8 or 4 images, other layout
    choices) compiled with its instructions only, still equal the masked dense conv."""
    if isa not in _cpu_flags():
        pytest.skip(f"this CPU lacks {isa}")
    llvm_cpu(cpu)
    target = resolve_target("llvm")
    assert (target.simd_lanes, target.description) == (lanes, f"llvm -mcpu={cpu}")
    for case, block in [(GROUPED[0][0], (4, 4)), (GROUPED[8][0], (4, 4))]:  # grouped nchw, whole-map chwn
        check_against_masked_dense_conv(case, block)
    for case in [GRID[1], GRID[6], GRID[8], GRID[9], (3, 12, 20, 8, 8, 1, 1, 1, 0.3, True)]:
        conv = check_against_masked_dense_conv(case)
    plan = conv.kernels_for((8, 8), (20, 12, 3, 3)).plan
    assert plan.forward.lanes == lanes  # planned for the older CPU's vectors
    import tvm
    from clicktrain.codegen.kernels import kernel_sources
    asm = tvm.compile(tvm.script.from_source(kernel_sources(plan, target)[plan.forward.name]),
                      target=target.tvm_target).mod.inspect_source("asm")
    assert "vfmadd" in asm or lanes == 4  # FMA: AVX2's; SSE4.2 multiplies and adds
    assert "zmm" not in asm and ("ymm" in asm) == (lanes == 8)  # its vectors, none wider


def test_tiles_follow_the_register_file():
    """Before: tiles sized for AVX-512's 32 vector registers everywhere, so AVX2's 16 spilled
    (a grouped nchw tile of 16 accumulators; 4x4 blocks ran 1.0-1.2x of dense where the
    halved tile runs 1.5-2.1x). Expected: half the register file for accumulators, except a
    chwn tile that holds the whole map within AVX-512's budget (it skips the zero border)."""
    from clicktrain.codegen.kernels import chwn_tile, choose_row_group, grad_weight_group
    from clicktrain.codegen.target import KernelTarget
    assert choose_row_group(4, 16, 16, registers=32) == (4, 4)  # AVX-512: 16-lane rows, 4 x 4 accumulators
    assert choose_row_group(4, 16, 8, registers=16) == (2, 2)   # AVX2: two vectors a row, 2 x 2 x 2 (was 2 x 4 x 2)
    assert choose_row_group(1, 8, 8, registers=16) == (1, 8)    # ungrouped: 8 rows of one vector either way
    # chwn (row group, rows, columns): AVX-512 / AVX2
    assert chwn_tile(8, 8, 1, 32) == (1, 2, 8) and chwn_tile(8, 8, 1, 16) == (1, 1, 8)
    assert chwn_tile(4, 4, 1, 16) == (1, 4, 4)  # the whole 4x4 map: 16 accumulators even on AVX2
    # a group of 4 rows' 4x4 maps: 4 x 4 columns on AVX-512; on AVX2 one row's whole map rather
    # than 2 rows' halved tile (session 12: 512->512 4x4 in 4x4 blocks 1.68x -> 2.17x forward)
    assert chwn_tile(4, 4, 4, 32) == (4, 1, 4) and chwn_tile(4, 4, 4, 16) == (1, 4, 4)
    assert chwn_tile(2, 2, 4, 16) == (4, 2, 2)  # the whole 2x2 map for 4 grouped rows
    assert grad_weight_group(KernelTarget("llvm", (), "t", 8, 16), "chwn") == 2
    assert grad_weight_group(KernelTarget("llvm", (), "t", 16, 32), "chwn") == 4


def test_chwn_task_order_follows_the_l2_cache():
    """Before: a row group's weights walked the images first beyond 768 KiB, Zen 4's 1 MiB L2
    in mind; on Zen 3 (512 KiB) 256->512 4x4 forward (590 KiB a group) ran 0.97-1.07x of
    dense rows-first and 1.61-1.65x images-first. Expected: the threshold follows the core's
    L2 (three quarters of it); the machine's own is read from sysfs."""
    import dataclasses
    from clicktrain.codegen.kernels import ConvGeometry, plan_kernels
    from clicktrain.codegen.target import _l2_bytes
    avx2 = dataclasses.replace(resolve_target("llvm"), simd_lanes=8, vector_registers=16)
    library = ct.patterns.fixed_library(4, 8)

    def images_first(l2: int, c: int, o: int, hw: int, groups=(1, 1)) -> tuple[bool, bool]:
        plan = plan_kernels(ConvGeometry.of((o, c, 3, 3), (hw, hw), 1, 1, 1), library,
                            dataclasses.replace(avx2, l2_bytes=l2), groups)
        assert plan.forward.layout == plan.grad_input.layout == "chwn"
        return plan.forward.batch_inner, plan.grad_input.batch_inner
    assert images_first(1 << 20, 256, 512, 4) == (False, True)   # 590 KiB of forward weights a group
    assert images_first(512 << 10, 256, 512, 4) == (True, True)
    assert images_first(512 << 10, 128, 256, 4) == (False, False)  # 147 KiB: rows first either way
    # grad-input of grouped rows, gathered: 36 bytes a kernel (not a cache line), 288 KiB a group
    assert images_first(512 << 10, 256, 256, 8) == (False, True)
    assert images_first(512 << 10, 256, 256, 8, (4, 4)) == (False, False)
    assert 64 << 10 <= _l2_bytes() <= 64 << 20


@pytest.mark.parametrize("cpu,error", [("bogus-cpu", "not a CPU LLVM knows"),
                                       ("sapphirerapids", "which this CPU lacks")])
def test_llvm_cpu_override_refuses_what_cannot_run_here(cpu, error, llvm_cpu):
    """A misspelt CPU, or one whose instructions this machine lacks (its kernels would die on
    an illegal instruction), is refused before anything compiles, naming the variable."""
    if cpu == "sapphirerapids" and "avx512_fp16" in _cpu_flags():
        pytest.skip("this CPU runs Sapphire Rapids code")
    llvm_cpu(cpu)
    with pytest.raises(ct.TargetError, match=f"CLICKTRAIN_LLVM_CPU='{cpu}'.*{error}"):
        resolve_target("llvm")


@pytest.mark.parametrize("work", [0, 1 << 40], ids=["gathered", "dense-weight"])
def test_kernels_on_gathered_or_dense_weights_match_masked_dense_conv(work, monkeypatch):
    """CPU grad-input (and the forward per kernel) reads its kept weights gathered in its
    own order where the layer has work enough (``GATHER_WORK``), else in the dense
    weight, as a stride phase does. Either way, on small layers (nchw, chwn, strided), the
    kernels equal the masked dense conv."""
    import clicktrain.codegen.kernels as K
    monkeypatch.setattr(K, "GATHER_WORK", work)
    plan = K.plan_kernels(K.ConvGeometry(5, 7, 9, 9, (1, 1), (1, 1), (1, 1)), ct.patterns.fixed_library(4, 4),
                          resolve_target("llvm"))
    assert plan.grad_input.gathered_weight == plan.forward.gathered_weight == (work == 0)
    for case in [GRID[1], GRID[6], GRID[10], (2, 9, 6, 12, 12, 1, 1, 1, 0.5, False)]:
        check_against_masked_dense_conv(case)


@pytest.mark.parametrize("case", [(2, 8, 12, 12, 12, 1, 1, 1, 0.3, True), (3, 16, 24, 2, 2, 1, 1, 1, 0.5, True)],
                         ids=["nchw", "chwn"])
def test_grouped_grad_input_on_gathered_weights_matches_masked_dense_conv(case, monkeypatch):
    """With 4x4 pattern blocks a grad-input task takes a group of input channels that share
    their runs; gathered, each run entry's weights of the whole group lie side by side.
    Forced on small layers (nchw and chwn), it equals the masked dense conv."""
    import clicktrain.codegen.kernels as K
    monkeypatch.setattr(K, "GATHER_WORK", 0)
    conv = check_against_masked_dense_conv(case, (4, 4))
    n, c, o, h, w = case[:5]
    spec = conv.kernels_for((h, w), (o, c, 3, 3)).plan.grad_input
    assert spec.gathered_weight and spec.row_group > 1 and spec.layout == ("nchw" if h == 12 else "chwn")


@pytest.mark.parametrize("batch_inner,block", [(False, (1, 1)), (True, (1, 1)), (True, (2, 2))],
                         ids=["rows-first", "images-first", "images-first-2x2"])
def test_chwn_kernels_in_channel_blocks_match_masked_dense_conv(batch_inner, block, monkeypatch):
    """Channel blocks of 1-2 channels (the budget shrunk to force them), a last block short,
    filter groups not dividing the rows, three blocks of images taken in either task order,
    with and without grouped rows: forward and grad-input (both chwn) still equal the masked
    dense conv."""
    import clicktrain.codegen.kernels as K
    monkeypatch.setattr(K, "CHWN_BLOCK_BYTES", 2 * 6 * 6 * 16 * 4)
    monkeypatch.setattr(K, "CHWN_WEIGHT_L2_SHARE", 0 if batch_inner else 1 << 40)
    plan = K.plan_kernels(K.ConvGeometry(5, 11, 4, 4, (1, 1), (1, 1), (1, 1)), ct.patterns.fixed_library(4, 4),
                          resolve_target("llvm"))
    assert plan.forward.layout == plan.grad_input.layout == "chwn"
    assert plan.forward.channel_blocks > 1 and plan.grad_input.channel_blocks > 1
    assert plan.forward.dst_channels % plan.forward.filter_block
    assert plan.forward.batch_inner == plan.grad_input.batch_inner == batch_inner
    if block == (1, 1):
        check_against_masked_dense_conv((33, 5, 11, 4, 4, 1, 1, 1, 0.3, True))
        return
    monkeypatch.setattr(K, "CHWN_WHOLE_MAP_UNGROUPED", False)  # AVX2 would take one row's whole map
    conv = check_against_masked_dense_conv((33, 6, 18, 4, 4, 1, 1, 1, 0.3, True), block)
    plan = conv.kernels_for((4, 4), (18, 6, 3, 3)).plan
    assert (plan.forward.row_group, plan.grad_input.row_group) == (2, 2) and plan.forward.channel_blocks > 1
    assert plan.forward.dst_channels % plan.forward.filter_block


def test_channel_blocks_order_each_rows_kernels_by_block_then_pattern():
    """Before: a row's kept kernels (channel: pattern) 0:1, 1:0, 2:1, 3:0, 4:-1 (dropped).
    Expected with blocks of two channels: block 0 = [1 (p0), 0 (p1)], block 1 = [3 (p0), 2 (p1)],
    block 2 empty; ptr holds each (block, pattern) run and each block's end."""
    from clicktrain.passes.reorder import FilterKernelLayout
    library = torch.zeros(2, 9, dtype=torch.bool)
    library[0, [0, 1, 3, 4]] = True
    library[1, [4, 5, 7, 8]] = True
    ids = torch.tensor([[1, 0, 1, 0, -1]], dtype=torch.int16)
    layout = FilterKernelLayout.build(library, ids, channel_block=2)
    assert layout.kernel_channel.tolist() == [1, 0, 3, 2]
    assert layout.pattern_ptr().tolist() == [[0, 1, 2, 2, 3, 4, 4, 4, 4]]
    assert FilterKernelLayout.build(library, ids).pattern_ptr().tolist() == [[0, 2, 4]]


def test_group_interleaved_puts_a_groups_weights_of_one_entry_side_by_side():
    """Before: rows in groups of two with equal runs, kept kernels (row: entries) 0: [0, 1, 2],
    1: [3, 4, 5] (the same three channels), 2: [6], 3: [7]. Expected: the group's entries
    interleaved, row 0's entry i at 2i and row 1's at 2i + 1: [0, 3, 1, 4, 2, 5, 6, 7]."""
    from clicktrain.passes.reorder import FilterKernelLayout
    library = torch.zeros(2, 9, dtype=torch.bool)
    library[0, [0, 1, 3, 4]] = True
    library[1, [4, 5, 7, 8]] = True
    ids = torch.tensor([[0, 1, -1, 1], [0, 1, -1, 1], [-1, -1, 0, -1], [-1, -1, 0, -1]], dtype=torch.int16)
    layout = FilterKernelLayout.build(library, ids, row_group=2)
    assert layout.kernel_ptr.tolist() == [0, 3, 6, 7, 8]
    assert layout.group_interleaved().tolist() == [0, 3, 1, 4, 2, 5, 6, 7]
    assert FilterKernelLayout.build(library, ids).group_interleaved().tolist() == list(range(8))


def test_grad_weight_blocks_group_kernels_by_channel_and_pattern():
    """Before: kept kernels (filter, channel, pattern) of a 3x2 layer. Expected: blocks of two
    kernels sharing (channel, pattern), ordered by pattern; a short block repeats its first
    kernel and writes to the scratch slots past the weight (3 * 2 * 9 = 54 + t)."""
    from clicktrain.codegen.kernels import grad_weight_blocks
    from clicktrain.passes.reorder import FilterKernelLayout
    library = torch.zeros(2, 9, dtype=torch.bool)
    library[0, [0, 1, 3, 4]] = True
    library[1, [4, 5, 7, 8]] = True
    ids = torch.tensor([[0, 1], [0, -1], [0, 1]], dtype=torch.int16)  # (filter, channel) -> pattern
    layout = FilterKernelLayout.build(library, ids)
    filters, channel, positions, pointer = grad_weight_blocks(layout, 2, group=2)
    blocks = sorted((int(c), sorted(int(f) for f in set(fs.tolist()))) for fs, c in zip(filters, channel))
    # pattern 0 on channel 0: filters 0, 1, 2 -> a block of two and one of one (pairing in layout order)
    assert [c for c, _ in blocks] == [0, 0, 1] and sorted(len(f) for _, f in blocks[:2]) == [1, 2]
    assert sorted(blocks[0][1] + blocks[1][1]) == [0, 1, 2] and blocks[2] == (1, [0, 2])
    assert pointer.tolist() == [0, 2, 3]
    scratch = positions[positions >= 54]
    assert sorted(scratch.tolist()) == [54, 55, 56, 57]       # the one padded slot: k = 4 scratch writes
    kept = positions[positions < 54].reshape(-1, 4)
    assert sorted(map(tuple, kept.tolist())) == sorted(map(tuple, layout.weight_index.tolist()))


@pytest.mark.parametrize("simd", [8, 16])
def test_layout_choice_per_kernel_kind(simd):
    """Expected layouts: batch-in-lanes (chwn) forward/grad-input on rows of <= 8 (wider ones:
    test_narrow_rows_...), grad-weight on rows up to 8 (session 8: unpadded 8-wide rows too).
    Before session 11 grad-weight's limit was half a vector, 4 on AVX2, whose 7- and 8-wide
    rows then ran nchw on an input copy of their own (0.71-0.77x of dense on Zen 3 against
    chwn's 1.42-1.70x). The grid above covers each mix."""
    from clicktrain.codegen.kernels import ConvGeometry, plan_kernels
    from clicktrain.codegen.target import KernelTarget
    cpu = KernelTarget("llvm", (), "test", simd, vector_registers(simd))
    library = generate_library({"w": torch.rand(8, 8, 3, 3)}, 4, 8)

    def layouts(h, stride):
        plan = plan_kernels(ConvGeometry.of((8, 8, 3, 3), (h, h), stride, 1, 1), library, cpu)
        return tuple(spec.layout for spec in (plan.forward, plan.grad_input, plan.grad_weight))
    assert layouts(4, 1) == ("chwn", "chwn", "chwn")
    assert layouts(8, 2) == ("chwn", "chwn", "chwn")
    assert layouts(16, 2) == ("chwn", "nchw", "chwn")  # 8-wide output rows
    assert layouts(7, 1) == ("chwn", "chwn", "chwn")
    assert layouts(8, 1) == ("chwn", "chwn", "chwn")
    assert layouts(28, 1) == ("nchw", "nchw", "nchw")
    plan = plan_kernels(ConvGeometry.of((8, 8, 3, 3), (4, 4), 1, 1, 1), library, cpu)
    assert plan.forward.lanes == simd and plan.forward.out_w == 4 and plan.forward.out_h % plan.forward.rows == 0


@pytest.fixture(autouse=True)
def generated_kernels_only(monkeypatch):
    """Whole-model tests check the generated kernels, not the measured fallback to torch."""
    monkeypatch.setenv("CLICKTRAIN_AUTOTUNE", "0")


@pytest.mark.parametrize("use", [dict(zip(("forward", "grad_input", "grad_weight"), bits))
                                 for bits in ((0, 0, 0), (1, 0, 1), (0, 1, 0), (1, 1, 1))])
def test_every_mix_of_generated_and_torch_kernels_agrees(use):
    from clicktrain.runtime.pattern_conv import LayerRunner
    conv, masked_w, mask = hardened_conv(12, 10, 2, 1, 1, 0.3)
    x = torch.randn(3, 10, 11, 9)
    kernels = conv.kernels_for((11, 9), masked_w.shape)
    runner = LayerRunner(kernels, conv.index_for(x.device, kernels), {k: bool(v) for k, v in use.items()})
    # the runner gets the weight unmasked (PatternMask skips the multiply before kernels):
    # whatever the pruned entries hold, every path must compute with them as zeros
    poisoned = masked_w.masked_fill(~mask.mask(), 1e3)
    poisoned.view(-1)[int((~mask.mask()).view(-1).nonzero()[0])] = float("nan")
    out, xpad = runner.forward(x, poisoned, None)
    ref = F.conv2d(x, masked_w, None, 2, 1, 1)
    assert rel_err(out, ref) < 1e-4
    dout = torch.randn_like(ref)
    x_ref, w_ref = x.clone().requires_grad_(True), masked_w.clone().requires_grad_(True)
    F.conv2d(x_ref, w_ref, None, 2, 1, 1).backward(dout)
    assert rel_err(runner.grad_input(dout, poisoned, tuple(x.shape)), x_ref.grad) < 1e-4
    dw = runner.grad_weight(dout, x, xpad, poisoned)
    assert rel_err(dw, w_ref.grad * mask.mask()) < 1e-4
    assert bool((dw[~mask.mask()] == 0).all())  # exact zeros: the optimizer keeps pruned weights at zero


def test_a_conv_that_runs_torch_everywhere_is_the_torch_target_conv():
    """With every kind on torch (KernelRace chose torch, or autotune did for each kind), the
    conv skips the autograd bridge: a plain masked conv, numerically the masked dense conv."""
    conv, masked_w, mask = hardened_conv(12, 10, 1, 1, 1, 0.3)
    conv.generated = False
    x = torch.randn(2, 10, 9, 9, requires_grad=True)
    poisoned = masked_w.masked_fill(~mask.mask(), 1e3).requires_grad_(True)
    out = conv(x, poisoned, None)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"
    assert rel_err(out, F.conv2d(x, masked_w, None, 1, 1, 1)) < 1e-5
    out.square().sum().backward()
    assert bool((poisoned.grad[~mask.mask()] == 0).all())


def test_autotune_measures_once_and_remembers(tmp_path, monkeypatch):
    monkeypatch.setenv("CLICKTRAIN_CACHE", str(tmp_path))
    conv, masked_w, _ = hardened_conv(8, 8, 1, 1, 1, 0.0, seed=5)
    conv.autotune = True
    x = torch.randn(4, 8, 9, 9)
    torch.testing.assert_close(conv(x, masked_w, None), F.conv2d(x, masked_w, None, 1, 1), rtol=1e-4, atol=1e-4)
    choice = conv._use[((4, 8, 9, 9), 64)]  # (input shape, kept kernels): 8x8, none dropped
    assert set(choice) == {"forward", "grad_input", "grad_weight"}
    assert (tmp_path / "tuning.json").is_file()
    again, _, _ = hardened_conv(8, 8, 1, 1, 1, 0.0, seed=5)
    again.autotune = True
    monkeypatch.setattr("clicktrain.runtime.pattern_conv.LayerRunner.tune",
                        lambda *a, **k: pytest.fail("a remembered choice was measured again"))
    again(x, masked_w, None)
    assert again._use[((4, 8, 9, 9), 64)] == choice
    # another density is another choice: measured, not taken from the first
    sparser, sparse_w, _ = hardened_conv(8, 8, 1, 1, 1, 0.5, seed=5)
    sparser.autotune = True
    with pytest.raises(pytest.fail.Exception, match="measured again"):
        sparser(x, sparse_w, None)


def test_tuning_warms_the_generated_kernels_before_timing(monkeypatch):
    """Before: one warm-up call, and the first layer tuned in a process (its first TVM calls)
    sometimes lost to torch by its cold start. Expected: each generated kind runs
    ``WARMUP_CALLS`` times before the first timed round."""
    import clicktrain.machine as machine
    import clicktrain.runtime.pattern_conv as pc
    conv, masked_w, _ = hardened_conv(8, 8, 1, 1, 1, 0.0, seed=5)
    kernels = conv.kernels_for((9, 9), masked_w.shape)
    runner = pc.LayerRunner(kernels, conv.index_for(masked_w.device, kernels))
    calls, seen = [], []
    real_forward, real_timing = pc.LayerRunner.forward, machine.fastest_alternating

    def counting(self, *args):
        if self.use.get("forward"):
            calls.append("generated forward")
        return real_forward(self, *args)

    def timing(fns, rounds=9):
        seen.append(len(calls))
        return real_timing(fns, rounds)
    monkeypatch.setattr(pc.LayerRunner, "forward", counting)
    monkeypatch.setattr(machine, "fastest_alternating", timing)
    timings = runner.tune((4, 8, 9, 9), masked_w, None)
    assert seen and seen[0] == pc.WARMUP_CALLS >= 3  # every warm-up call came before the first timing
    assert set(timings) == {"forward", "grad_input", "grad_weight"}


def compiled_pair(name, connectivity=0.3, block=(1, 1)):
    from zoo import zoo
    factory, x = zoo()[name]
    torch.manual_seed(0)
    model = factory()
    pair = {}
    for target in ("torch", "llvm"):
        m = ct.compile_for_training(copy.deepcopy(model), x, target=target,
                                    config=ct.PruneConfig(connectivity=connectivity, pattern_block=block))
        ct.select_patterns(m)
        ct.harden(m)
        pair[target] = m
    return pair, x


@pytest.mark.parametrize("name,block", [("vgg", (1, 1)), ("resnet", (1, 1)), ("mixed", (1, 1)), ("vgg", (2, 2))])
def test_whole_model_loss_and_gradients_equal_torch_reference(name, block):
    pair, x = compiled_pair(name, block=block)
    results = {}
    for target, m in pair.items():
        loss = m(x).square().mean()
        loss.backward()
        results[target] = (loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    (loss_t, grads_t), (loss_l, grads_l) = results["torch"], results["llvm"]
    assert rel_err(loss_l, loss_t) < 1e-4
    assert grads_t.keys() == grads_l.keys()
    for key in grads_t:
        assert rel_err(grads_l[key], grads_t[key]) < 1e-4, key
    assert any("clicktrain_kernels" in n for n, _ in pair["llvm"].named_modules())
    convs = [mod for mod in pair["llvm"].modules() if isinstance(mod, PatternConv2d)]
    assert all(conv.row_groups() == block for conv in convs)  # the zoo's channel counts divide by 2
    report = ct.pruning_report(pair["llvm"])
    assert report.as_dict()["pattern_block"] == list(block)
    assert ("pattern block: 2x2 (filters x input channels" in str(report)) == (block == (2, 2))


def test_masks_before_generated_kernels_skip_the_multiply():
    """Before: conv(x, mask(w)) with mask(w) = w * M. Expected on llvm: mask(w) = w (the
    kernels read kept weights only), and unlowering for export multiplies again."""
    from clicktrain.passes.lower import unlower_kernels
    pair, x = compiled_pair("vgg")
    assert all(layer.mask.consumers_mask for layer in prunable_layers(pair["llvm"]))
    assert not any(layer.mask.consumers_mask for layer in prunable_layers(pair["torch"]))
    layer = prunable_layers(pair["llvm"])[0]
    assert layer.mask(layer.weight) is layer.weight
    unlower_kernels(pair["llvm"])
    assert not any(layer.mask.consumers_mask for layer in prunable_layers(pair["llvm"]))


@pytest.mark.parametrize("generated_faster", [True, False])
def test_kernel_race_alternates_then_keeps_the_faster(generated_faster):
    from clicktrain.runtime.pattern_conv import KernelRace
    pair, x = compiled_pair("vgg")
    m = pair["llvm"]
    convs = [mod for mod in m.modules() if isinstance(mod, PatternConv2d)]
    race = KernelRace(m, steps=3, warmup=1)
    seen = []
    while not race.decided:
        race.before_step()
        modes = {conv.generated for conv in convs}
        assert len(modes) == 1  # the whole model switches together
        generated = modes.pop()
        seen.append(generated)
        race.after_step(1.0 if generated == generated_faster else 2.0)
    assert seen == [True, False] * 4  # alternating; one warm-up step each is not timed
    assert race.winner is generated_faster and all(conv.generated is generated_faster for conv in convs)
    assert race.summary()["chosen"] == ("generated" if generated_faster else "torch")
    race.before_step()  # decided: nothing switches any more
    assert all(conv.generated is generated_faster for conv in convs)
    # either way the model computes what the torch target computes
    torch.testing.assert_close(m(x), pair["torch"](x), rtol=1e-4, atol=1e-4)


def test_training_on_llvm_learns_and_keeps_patterns():
    torch.manual_seed(0)
    pair, _ = compiled_pair("vgg", connectivity=0.5)
    m = pair["llvm"]
    x = torch.randn(16, 3, 15, 15)
    y = (x.mean((1, 2, 3)) > 0).long()  # a learnable rule
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(m(x)[:, :2], y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert_pattern_invariant(m)
    assert losses[-1] < 0.5 * losses[0]


def test_state_dict_round_trip_on_llvm():
    pair, x = compiled_pair("resnet")
    m = pair["llvm"].eval()
    expected = m(x)
    fresh, _ = compiled_pair("resnet")
    f = fresh["llvm"].eval()
    with torch.no_grad():
        for layer in prunable_layers(f):  # scramble, so only load_state_dict can restore it
            layer.mask.pattern_ids.fill_(-1)
    f.load_state_dict(m.state_dict())
    torch.testing.assert_close(f(x), expected, rtol=1e-5, atol=1e-5)


def test_a_cached_kernel_that_does_not_load_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    """A cache file that exists but does not load (truncated, or built elsewhere) is compiled
    again -- and said so once, since the time it costs would otherwise go unexplained."""
    built, broken = tmp_path / "built", tmp_path / "broken"
    monkeypatch.setenv("CLICKTRAIN_CACHE", str(built))
    monkeypatch.setattr(kernel_cache, "_loaded", {})
    monkeypatch.setattr(kernel_cache, "_warned", set())
    conv, masked_w, _ = hardened_conv(8, 8, 1, 1, 1, 0.0, seed=5)
    conv.kernels_for((6, 6), masked_w.shape)
    # the same file names in another folder (a library loaded from its path once is not read again)
    broken.mkdir()
    for f in built.glob("*.so"):
        (broken / f.name).write_bytes(b"not a shared library")
    monkeypatch.setenv("CLICKTRAIN_CACHE", str(broken))
    monkeypatch.setattr(kernel_cache, "_loaded", {})
    again, _, _ = hardened_conv(8, 8, 1, 1, 1, 0.0, seed=5)
    with pytest.warns(RuntimeWarning, match="did not load and is compiled again") as caught:
        again.kernels_for((6, 6), masked_w.shape)
    assert len(caught) == 1  # once, however many files
    assert all(f.stat().st_size > 1000 for f in broken.glob("*.so"))  # each rebuilt over its broken file
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(again(x, masked_w, None), F.conv2d(x, masked_w, None, 1, 1), rtol=1e-4, atol=1e-4)


def test_compile_cache_reuses_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("CLICKTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_cache, "_loaded", {})
    conv, masked_w, mask = hardened_conv(8, 8, 1, 1, 1, 0.0, seed=3)
    x = torch.randn(2, 8, 9, 9)
    conv(x, masked_w, None)
    copies = {spec.name for spec in conv.kernels_for((9, 9), (8, 8, 3, 3)).plan.relayouts.values()}
    # padded input (grad-weight shares it) and padded output gradient are one copy here (8 channels
    # either way, the same frame); grad-weight's output gradient is another
    assert len(copies) == 2
    built = 3 + len(copies)
    assert conv.compile_seconds > 0 and len(list(tmp_path.glob("*.so"))) == built
    # a fresh process would load from disk: simulate by forgetting the in-memory modules
    monkeypatch.setattr(kernel_cache, "_loaded", {})
    again, _, _ = hardened_conv(8, 8, 1, 1, 1, 0.0, seed=3)
    kernels = again.kernels_for((9, 9), (8, 8, 3, 3))
    assert kernels.cache_hits == 3 + len(kernels.plan.relayouts) and len(list(tmp_path.glob("*.so"))) == built
    # new pattern ids over the same library: no new kernel, just new index arrays
    mask.assign(mask.library, torch.where(mask.pattern_ids == 0, torch.full_like(mask.pattern_ids, -1), mask.pattern_ids))
    torch.testing.assert_close(conv(x, masked_w * mask.mask(), None), F.conv2d(x, masked_w * mask.mask(), None, 1, 1),
                               rtol=1e-4, atol=1e-4)
    assert len(list(tmp_path.glob("*.so"))) == built
    # a different library is a different kernel (the copies do not depend on it)
    other, _, _ = hardened_conv(8, 8, 1, 1, 1, 0.0, seed=4, n_patterns=6)
    other.kernels_for((9, 9), (8, 8, 3, 3))
    assert len(list(tmp_path.glob("*.so"))) == built + 3


BROKEN_KERNEL = """
@T.prim_func
def ct_broken(a: T.handle):
    A = T.match_buffer(a, (4,), "float32")
    for i in range(4):
        A[i] = B[i]
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_compile_workers_build_what_this_process_would(tmp_path, monkeypatch, workers):
    """Kernels built by the compile workers (the default, one per core) or here (0) load and
    compute the same; a kernel TVM rejects is a ClicktrainError naming it either way, its
    source saved, and no library is left in the cache."""
    monkeypatch.setenv("CLICKTRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CLICKTRAIN_COMPILE_WORKERS", workers)
    monkeypatch.setattr(kernel_cache, "_loaded", {})
    conv, masked_w, _ = hardened_conv(12, 10, 1, 1, 1, 0.3, seed=7)
    x = torch.randn(3, 10, 11, 9)
    torch.testing.assert_close(conv(x, masked_w, None), F.conv2d(x, masked_w, None, 1, 1), rtol=1e-4, atol=1e-4)
    assert (kernel_cache._pool is None) == (workers == "0")
    with pytest.raises(ct.ClicktrainError, match="TVM failed to compile kernel ct_broken .*saved in") as caught:
        kernel_cache.compile_cached("ct_broken", BROKEN_KERNEL, resolve_target("llvm"))
    assert "\n" not in str(caught.value)
    assert (tmp_path / "failed" / "ct_broken.tir.py").read_text() == BROKEN_KERNEL
    assert not list(tmp_path.glob("ct_broken*")) and not list(tmp_path.glob(".*"))


def test_a_compile_worker_that_dies_is_replaced_by_building_here(tmp_path, monkeypatch):
    """Workers that cannot start (or die) cost speed, not the build; a bad worker count is a
    clear error."""
    monkeypatch.setenv("CLICKTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_cache, "_loaded", {})
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(kernel_cache, "_WORKER_SCRIPT", str(exits))
    monkeypatch.setenv("CLICKTRAIN_COMPILE_WORKERS", "3")  # a new pool, with the dying script
    monkeypatch.setattr(kernel_cache, "_warned", set())
    conv, masked_w, _ = hardened_conv(8, 8, 2, 1, 1, 0.0, seed=2)
    x = torch.randn(2, 8, 10, 10)
    with pytest.warns(RuntimeWarning, match="compile worker failed .*exit status 3.*building in this process") as caught:
        out = conv(x, masked_w, None)
    assert len(caught) == 1
    torch.testing.assert_close(out, F.conv2d(x, masked_w, None, 2, 1), rtol=1e-4, atol=1e-4)
    assert len(list(tmp_path.glob("*.so"))) >= 3
    monkeypatch.setenv("CLICKTRAIN_COMPILE_WORKERS", "two")
    with pytest.raises(ct.ConfigError, match="CLICKTRAIN_COMPILE_WORKERS='two'"):
        kernel_cache.compile_workers()


def test_report_and_dump_show_generated_kernels(tmp_path):
    from zoo import BranchNet
    m = ct.compile_for_training(BranchNet(), torch.randn(2, 3, 10, 10), target="llvm", debug_dir=tmp_path)
    ct.select_patterns(m)
    ct.harden(m)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "009_generate_kernels.txt" in names
    tir = [n for n in names if n.endswith(".tir.py")]
    kernels = [n for n in tir if n.split(".")[1].startswith(("ct_fwd", "ct_dgrad", "ct_wgrad"))]
    assert len(kernels) == 9  # three prunable convs x (forward, grad-input, grad-weight)
    assert any(".ct_pad_" in n for n in tir)  # and the copies around them
    assert all("T.prim_func" in (tmp_path / n).read_text() for n in tir)
    report = ct.pruning_report(m)
    assert set(report.compile_seconds) == {"left", "right", "merge"}
    assert "kernel compile" in str(report)


def test_export_of_an_llvm_model(tmp_path):
    pair, x = compiled_pair("vgg")
    m = pair["llvm"].eval()
    path = ct.export_onnx(m, tmp_path / "m.onnx", x)
    assert path.exists()


def test_unaligned_inputs_are_copied_before_tvm_sees_them():
    """TVM takes only 64-byte aligned buffers (``from_dlpack`` raises otherwise): a view that
    starts one float into its storage is copied first and gives the same numbers."""
    conv, masked_w, _ = hardened_conv(16, 8, 1, 1, 1, 0.3)
    kernels = conv.kernels_for((9, 9), masked_w.shape)
    runner = LayerRunner(kernels, conv.index_for(torch.device("cpu"), kernels))
    x = torch.randn(3 * 8 * 81 + 1)[1:].view(3, 8, 9, 9)
    assert x.data_ptr() % 64 != 0
    y, _ = runner.forward(x, masked_w, None)
    torch.testing.assert_close(y, F.conv2d(x, masked_w, None, 1, 1), rtol=1e-4, atol=1e-4)


def test_wrong_device_and_dtype_are_clear_errors():
    pair, x = compiled_pair("vgg")
    with pytest.raises(ct.TargetError, match="float32"):
        pair["llvm"].double()(x.double())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_kernels_generate_and_compile_without_a_gpu(tmp_path):
    from zoo import BranchNet
    x = torch.randn(2, 3, 10, 10)
    m = ct.compile_for_training(BranchNet(), x, target="cuda", debug_dir=tmp_path)
    ct.select_patterns(m)
    ct.harden(m)
    cu = sorted(tmp_path.glob("*.cu"))
    assert len(cu) == 9
    assert "__global__" in cu[0].read_text()
    if not torch.cuda.is_available():
        with pytest.raises(ct.TargetError, match="no CUDA GPU is visible"):
            m(x)


def test_cuda_grad_weight_reduces_across_threads():
    """Grad-weight on CUDA shares each kept kernel's reduction among a block's threads (one
    warp for tiny maps, up to 256), then sums the partials in a synced shared-memory tree."""
    from clicktrain.codegen.templates import cuda_reduce_threads
    assert [cuda_reduce_threads(p) for p in (4, 16, 64, 196, 784)] == [32, 32, 32, 128, 256]
    plan, sources = planned(8, 8, 14, 1, "cuda")
    source = sources[plan.grad_weight.name]
    assert 'thread_binding(128, thread="threadIdx.x")' in source
    steps = [line.strip() for line in source.splitlines() if line.strip().startswith("if tx <")]
    assert steps == [f"if tx < {h}:" for h in (64, 32, 16, 8, 4, 2, 1)] + ["if tx < 4 and j < kk:"]


def test_chwn_tasks_walk_tiles_outer_where_rows_have_their_own_kernels():
    """Before: a chwn task walked its output rows, each over all its tiles. Expected (per
    kernel): tiles outer, rows inner, so consecutive rows read the same few input rows from
    L1; grouped rows (4x4 blocks), whose tiles already share each input load, keep rows outer."""
    import dataclasses
    from clicktrain.codegen.kernels import ConvGeometry, plan_kernels
    from clicktrain.codegen.templates import direct_conv_llvm
    avx2 = dataclasses.replace(resolve_target("llvm"), simd_lanes=8, vector_registers=16)
    library = ct.patterns.fixed_library(4, 8)

    def loop_order(groups):
        plan = plan_kernels(ConvGeometry.of((64, 64, 3, 3), (8, 8), 1, 1, 1), library, avx2, groups)
        spec = plan.forward
        assert spec.layout == "chwn" and plan.grad_input.tiles_outer == spec.tiles_outer
        loops = [line.split()[1] for line in direct_conv_llvm(spec).splitlines()
                 if line.strip().startswith("for ") and line.split()[1] in ("fi", "yt", "xt")]
        return spec.row_group, loops[:len(loops) // (2 if spec.channel_blocks > 1 else 1)]
    assert loop_order((1, 1)) == (1, ["yt", "fi"])
    assert loop_order((4, 4)) == (2, ["fi", "yt", "xt"])


def test_nchw_tasks_take_blocks_of_rows_on_gathered_weights():
    """Before: an nchw grad-input task was one output row (an input channel), each tile of it
    reading a few input rows of every source channel. Expected per kernel, on gathered weights:
    a task of ``NCHW_ROW_BLOCK`` rows walks its tiles outer and its rows inner (a 28-row layer:
    the last block guarded), the forward likewise; grouped rows keep a group a task."""
    import dataclasses
    from clicktrain.codegen.kernels import NCHW_ROW_BLOCK, ConvGeometry, plan_kernels
    from clicktrain.codegen.templates import direct_conv_llvm
    avx2 = dataclasses.replace(resolve_target("llvm"), simd_lanes=8, vector_registers=16)
    library = ct.patterns.fixed_library(4, 8)

    def plan(groups, channels=28):
        return plan_kernels(ConvGeometry.of((32, channels, 3, 3), (14, 14), 1, 1, 1), library, avx2, groups,
                            (channels, 32))
    spec = plan((1, 1)).grad_input
    assert (spec.layout, spec.gathered_weight, spec.row_block) == ("nchw", True, NCHW_ROW_BLOCK)
    source = direct_conv_llvm(spec)
    assert f"for bf in T.parallel(n * {-(-28 // NCHW_ROW_BLOCK)}):" in source
    assert source.index("for yt, xt in T.grid") < source.index(f"for fi in range({NCHW_ROW_BLOCK}):")
    assert f"if bf % 4 * {NCHW_ROW_BLOCK} + fi < 28:" in source
    forward = plan((1, 1)).forward
    assert (forward.layout, forward.gathered_weight, forward.row_block) == ("nchw", True, NCHW_ROW_BLOCK)
    grouped = plan((4, 4), 32)
    assert grouped.grad_input.row_block == grouped.forward.row_block == 1 < grouped.grad_input.row_group


def test_chwn_rows_wider_than_the_registers_split_into_column_tiles(llvm_cpu):
    """Before: on AVX2 (8 accumulators) a 14-wide chwn row was one tile of 14 accumulators,
    spilled. Expected: the widest divisor of the row that fits (7); AVX-512 (16) keeps whole
    rows; a row with no such divisor (13) stays whole. Numerics as the masked dense conv."""
    from clicktrain.codegen.kernels import chwn_tile
    assert chwn_tile(14, 14, 1, 16) == (1, 1, 7) and chwn_tile(14, 14, 1, 32) == (1, 1, 14)
    assert chwn_tile(12, 12, 1, 16) == (1, 1, 6) and chwn_tile(13, 13, 1, 16) == (1, 1, 13)
    if "avx2" not in _cpu_flags():
        pytest.skip("this CPU lacks avx2")
    llvm_cpu("x86-64-v3")
    conv = check_against_masked_dense_conv((3, 48, 56, 14, 14, 1, 1, 1, 0.0, True))
    plan = conv.kernels_for((14, 14), (56, 48, 3, 3)).plan
    assert (plan.forward.layout, plan.forward.x_tile, plan.grad_input.layout, plan.grad_input.x_tile) == \
        ("chwn", 7, "chwn", 7)


def test_narrow_rows_of_many_kernels_take_chwn_per_kernel(avx512_plans):
    """Rows narrower than a vector (14 of 16 lanes) take the batch-in-lanes layout where each
    row has its own kernels and keeps 48+ of them on average; nchw keeps rows of fewer kept
    kernels, rows that fill vectors, and rows in groups of equal patterns (they share loads
    in nchw). A layer's kept kernels come from its pattern ids (dropped kernels: -1)."""
    from clicktrain.codegen.kernels import ConvGeometry, choose_layouts

    def layouts(c, o, hw, groups=(1, 1), lanes=16, kept=None):
        return choose_layouts(ConvGeometry(c, o, hw, hw, (1, 1), (1, 1), (1, 1)), lanes, False, groups, kept)[:2]
    assert layouts(64, 128, 14) == ("chwn", "chwn")
    assert layouts(32, 128, 14) == ("nchw", "chwn")      # a filter keeps 32 kernels, an input channel 128
    assert layouts(64, 128, 14, kept=(32.0, 64.0)) == ("nchw", "chwn")  # half of them dropped
    assert layouts(64, 128, 14, groups=(4, 4)) == ("nchw", "nchw")
    assert layouts(64, 128, 16) == ("nchw", "nchw")      # a row fills the vector
    assert layouts(64, 128, 14, lanes=8) == ("chwn", "chwn")  # AVX2: two vectors less two lanes, as well
    assert layouts(64, 128, 16, lanes=8) == ("nchw", "nchw")  # ... while 16 fills two
    strided = ConvGeometry(32, 64, 14, 14, (2, 2), (1, 1), (1, 1))  # grad-input: 14-wide rows of 64 kernels
    assert choose_layouts(strided, 8, False)[1] == "nchw" and choose_layouts(strided, 16, False)[1] == "chwn"
    assert layouts(16, 16, 7) == ("chwn", "chwn")        # small maps: chwn whatever the kernels
    plan, _ = planned(64, 128, 14, 1, "llvm")
    assert (plan.forward.layout, plan.grad_input.layout) == ("chwn", "chwn")
    conv, masked_w, _ = hardened_conv(128, 64, 1, 1, 1, connectivity=0.5)
    assert conv._rows()[1] == (32.0, 64.0)
    kernels = conv.kernels_for((14, 14), masked_w.shape)
    assert (kernels.plan.forward.layout, kernels.plan.grad_input.layout) == ("nchw", "chwn")


def test_whole_map_chwn_tiles_skip_the_zero_border():
    """Before: every pixel of a chwn tile took all k taps of its kernels, padding included (on
    a 2x2 map 5 of 9 tap positions per pixel read zeros). Expected, where the tile is the
    whole map: each pixel's statement has only the taps inside the data, so a one-pixel map
    reads the centre tap alone (frame position (1, 1), weight position 4)."""
    import re
    plan, sources = planned(8, 8, 1, 1, "llvm")
    fwd = plan.forward
    assert fwd.layout == "chwn" and fwd.out_h == fwd.rows == 1 and fwd.valid == (1, 2, 1, 2)
    source = sources[fwd.name]
    assert set(re.findall(r"src\[j\], ([^\]]*)\]", source)) == {"(0) * 1 + 1, (0) * 1 + 1, v"}
    assert set(re.findall(r"src\[j\] \* 9 \+ (\d)\]", source)) == {"4"}
    two, sources2 = planned(8, 8, 2, 1, "llvm")
    statements = [line for line in sources2[two.forward.name].splitlines() if "] = acc0[" in line]
    taps = sum(line.count(" * inp[") for line in statements)
    assert 0 < taps < 4 * 4 * len(two.forward.offsets)  # fewer than k taps x 4 pixels per pattern


def test_grad_weight_takes_chwn_on_padded_rows_narrower_than_a_vector():
    """nchw pads a 14-wide row to 16 lanes; grad-weight reads it batch-in-lanes instead, as it
    does every row up to half a vector. Rows that fill vectors stay nchw, 28-wide ones too (32
    lanes, measured mixed), strided layers too, and layers whose filters keep fewer than 24
    kernels (the copies cost more than they save); on AVX2 (8 lanes) the same since session
    11 (a 14-wide row is two vectors less two lanes there), 16-wide rows fill two."""
    from clicktrain.codegen.kernels import ConvGeometry, choose_layouts

    def layout(hw, lanes=16):
        return choose_layouts(ConvGeometry(32, 32, hw, hw, (1, 1), (1, 1), (1, 1)), lanes, False)[2]
    assert [layout(hw) for hw in (4, 7, 8, 13, 14, 16, 28, 32)] == \
        ["chwn", "chwn", "chwn", "chwn", "chwn", "nchw", "nchw", "nchw"]
    assert [layout(hw, lanes=8) for hw in (4, 7, 8, 14, 16)] == ["chwn", "chwn", "chwn", "chwn", "nchw"]
    strided = ConvGeometry(16, 16, 28, 28, (2, 2), (1, 1), (1, 1))  # 14-wide output rows
    assert choose_layouts(strided, 16, False)[2] == "nchw"  # reads the forward's column phases
    sparse = ConvGeometry(32, 32, 14, 14, (1, 1), (1, 1), (1, 1))
    assert [choose_layouts(sparse, 16, False, (1, 1), (kept, kept))[2] for kept in (32.0, 16.0)] == ["chwn", "nchw"]


def test_cuda_direct_conv_splits_long_runs_of_small_maps():
    """Where a CUDA direct conv's grid would be small (few pixels, batch 64) and its rows'
    runs long (many source channels), S threads share each work item, each summing every S-th
    kept kernel, and the item's first thread adds the S partial sums from shared memory (a
    barrier between). Large maps and narrow layers keep one thread per item."""
    from clicktrain.codegen.templates import cuda_kernel_slices
    slices = {shape: cuda_kernel_slices(planned(*shape, 1, "cuda")[0].forward)
              for shape in [(512, 512, 2), (512, 512, 4), (256, 256, 8), (64, 64, 8), (16, 16, 32), (64, 128, 16)]}
    assert slices == {(512, 512, 2): 8, (512, 512, 4): 4, (256, 256, 8): 2, (64, 64, 8): 2, (16, 16, 32): 1,
                      (64, 128, 16): 1}
    plan, sources = planned(128, 96, 3, 1, "cuda")
    assert (cuda_kernel_slices(plan.forward), cuda_kernel_slices(plan.grad_input)) == (4, 2)
    forward = sources[plan.forward.name]
    item = "(blk // 96 * 32 + tx % 32)"
    assert 'red = T.alloc_buffer((4, 4, 32), "float32", scope="shared")' in forward
    assert f"for blk in T.thread_binding(((n + 3) // 4 * 9 + 31) // 32 * 96" in forward
    assert "for i in range((ptr[blk % 96, 1] - ptr[blk % 96, 0] - tx // 32 + 3) // 4):" in forward
    assert "j = ptr[blk % 96, 0] + tx // 32 + i * 4" in forward
    assert "red[tx // 32, r, tx % 32] = acc[r]" in forward
    assert f"if tx < 32 and {item} < (n + 3) // 4 * 9:" in forward
    assert "= bias[perm[blk % 96]] + red[0, r, tx] + red[1, r, tx] + red[2, r, tx] + red[3, r, tx]" in forward
    unsplit = planned(16, 16, 32, 1, "cuda")
    assert "red" not in unsplit[1][unsplit[0].forward.name]


def test_direct_conv_stores_the_true_output_size(avx512_plans):
    """An nchw tile grid that overhangs the output stores straight into the true-size output
    (no crop copy afterwards): rows past the height are skipped, the overhanging column tile
    stores its 30 valid lanes of 32 as vectors of 16, 8, 4 and 2 (before session 6: lane by
    lane), the others whole vectors."""
    plan, sources = planned(16, 16, 30, 1, "llvm")
    fwd = plan.forward
    assert fwd.layout == "nchw" and fwd.out_extent == (30, 30) and fwd.out_w > 30
    source = sources[fwd.name]
    assert "out = T.match_buffer(out_h, (n, 16, 30, 30)" in source
    assert fwd.lanes == 32 and "if xt * 32 + 32 <= 30:" in source and "if xt * 32 + v < 30:" not in source
    for piece, start in [(16, 0), (8, 16), (4, 24), (2, 28)]:
        assert f"for v in T.vectorized({piece}):" in source and f"xt * 32 + v + {start}] = acc[r, v + {start}]" in source
    if fwd.out_h > 30:
        assert f"if yt * {fwd.rows} + r < 30:" in source


def test_timing_alternates_in_snake_order():
    """Each contender also runs right after itself (every other round reversed): what a
    runtime leaves spinning after its call must not always land on the other contender."""
    from clicktrain.machine import fastest_alternating
    calls = []
    best = fastest_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a b | b a | a b
    assert set(best) == {"a", "b"} and all(t >= 0 for t in best.values())


def test_strided_forward_reads_column_phases():
    """A stride-2 nchw forward reads its input split into two column phases: offset dx comes
    from phase dx % 2 at column x + dx // 2, a contiguous vector. Grad-weight reads the same
    buffer the same way (before session 6 it padded its own input and loaded every other
    column)."""
    plan, sources = planned(8, 16, 28, 2, "llvm")
    fwd, gw = plan.forward, plan.grad_weight
    assert fwd.layout == "nchw" and fwd.phases == 2 and gw.phases == 2 and plan.grad_weight_reads_forward_input
    source = sources[fwd.name]
    assert f"inp = T.match_buffer(inp_h, (2, n, 8, {fwd.in_h}, {-(-fwd.in_w // 2)})" in source
    assert "inp[1, bf // 16, src[j], (yt" in source and f"xt * {fwd.lanes} + v + 1]" in source
    assert f"inp = T.match_buffer(inp_h, (2, n, 8, {fwd.in_h}, {-(-fwd.in_w // 2)})" in sources[gw.name]
    assert "grad_weight_in" not in plan.relayouts


def expected_chwn(x: torch.Tensor, top: int, left: int, rows: int, cols: int, lanes: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(ceil(N / lanes), C, rows, cols, lanes)`` with ``x`` at (top, left)
    (cropped where it overhangs), zeros around it and past the batch: the chwn kernels' layout
    (``templates._activation``), written with torch: what the generated copy must give."""
    n, c, h, w = x.shape
    full, rest = divmod(n, lanes)
    buf = x.new_zeros(full + bool(rest), c, rows, cols, lanes, dtype=torch.float32)
    ys, ye, xs, xe = max(0, -top), min(h, rows - top), max(0, -left), min(w, cols - left)
    src, window = x[:, :, ys:ye, xs:xe], (slice(None), slice(top + ys, top + ye), slice(left + xs, left + xe))
    if full:
        buf[(slice(0, full), *window)] = src[:full * lanes].reshape(full, lanes, c, ye - ys, xe - xs).permute(0, 2, 3, 4, 1)
    if rest:
        buf[(full, *window, slice(0, rest))] = src[full * lanes:].permute(1, 2, 3, 0)
    return buf


def expected_column_phases(xpad: torch.Tensor, phases: int) -> torch.Tensor:
    """``(phases, N, C, H, ceil(W / phases))``: phase ``p`` holds columns ``p, p + phases, ...``
    (zero past the end), so a strided conv's row reads contiguous memory."""
    width = -(-xpad.shape[-1] // phases)
    buf = xpad.new_zeros(phases, *xpad.shape[:-1], width)
    for p in range(phases):
        cols = xpad[..., p::phases]
        buf[p, ..., :cols.shape[-1]] = cols
    return buf


def expected_from_chwn(buf: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """The first ``n`` images of a chwn buffer, cropped to ``h x w``, as ``(n, C, h, w)``."""
    blocks, c, _, _, lanes = buf.shape
    return buf[:, :, :h, :w].permute(0, 4, 1, 2, 3).reshape(blocks * lanes, c, h, w)[:n]


@pytest.mark.parametrize("case", [(17, 5, 3, 2, 5, 4, 1, 1, "chwn"), (3, 4, 5, 6, 4, 4, -1, -1, "nchw"),
                                  (2, 3, 7, 7, 9, 16, 1, 1, "nchw"), (5, 3, 4, 4, 4, 4, 0, 0, "chwn"),
                                  (2, 3, 2, 2, 3, 3, 3, 3, "nchw"), (2, 3, 4, 3, 10, 8, 1, -1, "nchw", (2, 3)),
                                  (3, 2, 4, 4, 9, 9, 1, 1, "chwn", (2, 2)), (33, 3, 8, 8, 10, 10, 1, 1, "chwn"),
                                  (40, 2, 6, 7, 8, 9, 1, 1, "chwn"), (32, 2, 1, 1, 3, 3, 1, 1, "chwn")],
                         ids=["chwn-partial-block", "nchw-crop", "nchw-pad-to-lanes", "chwn-no-pad", "nchw-outside",
                              "nchw-spread", "chwn-spread", "chwn-8-wide-shuffled", "chwn-7-wide-shuffled",
                              "chwn-1x1-map"])
def test_generated_copies_equal_torchs(case):
    """The generated copies around the kernels (padding into a frame, to and from chwn, spread
    by a stride) give exactly what torch's zero insertion, pad and permutes give, including a
    crop, a frame the image misses entirely and a batch that leaves its last block of lanes
    part empty (rows of 7 and 8 leave chwn by in-register shuffles, a part-empty block element
    by element)."""
    import tvm
    from clicktrain.codegen.templates import RelayoutSpec, relayout_llvm
    from clicktrain.runtime.pattern_conv import _pad_to
    n, c, h, w, rows, cols, top, left, layout, *spread = case
    spread = tuple(spread[0]) if spread else (1, 1)
    x = torch.randn(n, c, h, w)
    up = torch.zeros(n, c, (h - 1) * spread[0] + 1, (w - 1) * spread[1] + 1)  # torch's zero insertion
    up[:, :, ::spread[0], ::spread[1]] = x

    def run(spec, src, batch):
        func = tvm.compile(tvm.script.from_source(relayout_llvm(spec)), target=resolve_target("llvm").tvm_target)
        out = torch.full(spec.out_shape(batch), float("nan"))  # every element must be written
        func[spec.name](tvm.runtime.from_dlpack(src), tvm.runtime.from_dlpack(out))
        return out
    pad = RelayoutSpec("pad", "pad", layout, c, h, w, rows, cols, top, left, 16, spread)
    if layout == "chwn":
        assert torch.equal(run(pad, x, n), expected_chwn(up, top, left, rows, cols, 16))
        buf = torch.randn(pad.out_shape(n))
        assert torch.equal(run(RelayoutSpec("unpad", "unpad", "chwn", c, h, w, rows, cols, lanes=16), buf, n),
                           expected_from_chwn(buf, n, h, w))
    else:
        expected = torch.zeros(n, c, rows, cols)  # the frame, and the part of x that lands in it
        uh, uw = up.shape[-2:]
        ys, xs = max(0, -top), max(0, -left)
        ye, xe = max(ys, min(uh, rows - top)), max(xs, min(uw, cols - left))
        expected[:, :, top + ys:top + ye, left + xs:left + xe] = up[:, :, ys:ye, xs:xe]
        assert torch.equal(run(pad, x, n), expected)
        if top >= 0 and left >= 0 and top + uh <= rows and left + uw <= cols:
            assert torch.equal(expected, _pad_to(up, top, left, rows, cols))


@pytest.mark.parametrize("frame", [(13, 9, 17, 1, 1, 2), (13, 8, 16, 1, 2, 2), (9, 7, 9, 0, 0, 2),
                                   (32, 33, 34, 1, 1, 2), (28, 29, 34, 1, 1, 2), (30, 31, 30, 1, 1, 2),
                                   (40, 33, 45, 1, 1, 3), (16, 17, 18, 0, 2, 3)],
                         ids=["odd-frame", "left-2", "no-pad", "32-wide", "28-wide-overhang", "crop",
                              "stride-3", "stride-3-left-2"])
def test_generated_column_phases_equal_torchs(frame):
    """A strided forward's input: padded into the frame and split into its column phases in
    one generated copy (vector pieces of 16, 8 and 4 lanes, shuffled out of contiguous loads,
    and scalar ends), exactly as torch's pad followed by the phase split."""
    import tvm
    from clicktrain.codegen.templates import RelayoutSpec, relayout_llvm
    from clicktrain.runtime.pattern_conv import _pad_to
    w, rows, cols, top, left, phases = frame
    x = torch.randn(3, 4, 7, w)
    spec = RelayoutSpec("phases", "pad", "nchw", 4, *x.shape[-2:], rows, cols, top, left, phases=phases)
    func = tvm.compile(tvm.script.from_source(relayout_llvm(spec)), target=resolve_target("llvm").tvm_target)
    out = torch.full(spec.out_shape(3), float("nan"))
    func["phases"](tvm.runtime.from_dlpack(x), tvm.runtime.from_dlpack(out))
    assert torch.equal(out, expected_column_phases(_pad_to(x, top, left, rows, cols), phases))


def test_harden_on_llvm_warns_once_when_openmp_spins(monkeypatch):
    """A script that loaded torch without an OpenMP wait setting gets one warning naming the
    fix when it hardens for llvm, and TVM's pool spin turned off; with a setting, or on
    target torch, neither."""
    import warnings

    from clicktrain import machine

    def hardened(target):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        m = ct.compile_for_training(model, torch.randn(2, 3, 8, 8), target=target)
        ct.select_patterns(m)
        ct.harden(m)

    for var in (*machine.OPENMP_WAIT_VARS, "TVM_THREAD_POOL_SPIN_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(machine, "_openmp_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hardened("torch")
        assert not caught and "TVM_THREAD_POOL_SPIN_COUNT" not in os.environ
        hardened("llvm")
        hardened("llvm")
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert "GOMP_SPINCOUNT=2000" in str(caught[0].message) and os.environ["TVM_THREAD_POOL_SPIN_COUNT"] == "0"
    monkeypatch.delenv("TVM_THREAD_POOL_SPIN_COUNT")
    monkeypatch.setattr(machine, "_openmp_warned", False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hardened("llvm")
    assert not caught and "TVM_THREAD_POOL_SPIN_COUNT" not in os.environ


@pytest.mark.parametrize("case,block", [((7, 8, 12, 12, 12, 1, 1, 1, 0.3, True), (1, 1)),
                                        ((7, 8, 12, 34, 33, 2, 1, 1, 0.3, False), (1, 1)),
                                        ((5, 8, 16, 12, 12, 1, 1, 1, 0.0, True), (4, 4)),
                                        ((33, 8, 8, 7, 7, 1, 1, 1, 0.3, True), (1, 1)),
                                        ((20, 8, 16, 4, 4, 1, 1, 1, 0.0, False), (4, 4))],
                         ids=["per-kernel", "strided", "4x4-blocks", "chwn", "chwn-4x4-blocks"])
def test_grad_weight_by_batch_slices(monkeypatch, case, block):
    """Before: grad-weight reduced the whole batch in one pass per block of kernels. Expected,
    on layers with many kernels: slices of images, every block adding its part of each slice
    (a batch of 7 or 5 in slices of 3, the last one short; in chwn, 33 or 20 images in 5 or 3
    blocks of 8 lanes, in slices of 2 blocks); gradients as the masked conv's."""
    import clicktrain.codegen.kernels as K
    monkeypatch.setattr(K, "grad_weight_slice", lambda geom, layout, *args: 3 if layout == "nchw" else 2)
    conv = check_against_masked_dense_conv(case, block)
    assert [k.plan.grad_weight.batch_slice for k in conv._kernels.values()] == [3 if case[3] > 8 else 2]


def test_nchw_grad_weight_slices_the_batch():
    """Every nchw CPU grad-weight reduces the batch by slices whose output gradient and input
    fit a core's L2 (at least one image); CUDA's takes the whole batch."""
    l2_bytes = resolve_target("llvm").l2_bytes
    for hw, c, o in ((16, 64, 128), (28, 16, 16), (32, 16, 32), (16, 32, 32)):
        gw = planned(c, o, hw, 1, "llvm")[0].grad_weight
        per_image = 4 * (o * gw.true_out_h * gw.out_w + c * gw.in_h * gw.in_w)
        assert gw.layout == "nchw" and gw.batch_slice == max(1, l2_bytes // per_image) > 1, (c, o, hw)
    assert planned(64, 128, 16, 1, "cuda")[0].grad_weight.batch_slice == 0


def test_chwn_grad_weight_slices_the_batch_blocks():
    """chwn grad-weight slices its batch blocks as nchw its images, a slice's output gradient
    and input within a core's L2, where one block fits and a slice still holds
    CHWN_GRAD_WEIGHT_SLICE_PIXELS pixels of them (a block's tree reduction and gradient
    update come once per slice)."""
    from clicktrain.codegen.kernels import CHWN_GRAD_WEIGHT_SLICE_PIXELS
    target = resolve_target("llvm")
    for c, o, hw in ((64, 64, 7), (128, 128, 4), (512, 512, 4), (256, 256, 7)):
        gw = planned(c, o, hw, 1, "llvm")[0].grad_weight
        per_block = 4 * target.simd_lanes * (o * hw * hw + c * gw.in_h * gw.in_w)
        blocks = target.l2_bytes // per_block
        expected = blocks if blocks * hw * hw >= CHWN_GRAD_WEIGHT_SLICE_PIXELS else 0
        assert gw.layout == "chwn" and gw.batch_slice == expected, (c, o, hw)
    assert planned(64, 64, 7, 1, "llvm")[0].grad_weight.batch_slice >= 1
    assert planned(512, 512, 4, 1, "llvm")[0].grad_weight.batch_slice == 0  # 16 pixels a batch block
    assert planned(256, 256, 7, 1, "llvm")[0].grad_weight.batch_slice == 0  # a batch block outgrows L2
    assert planned(64, 64, 7, 1, "cuda")[0].grad_weight.batch_slice == 0
    assert planned(64, 128, 16, 1, "cuda")[0].grad_weight.batch_slice == 0


def test_nchw_frames_spread_channel_planes_over_the_l1_sets():
    """Before: a 28x28 layer's padded frame was 30 x 34 floats, 4080 bytes a channel plane, so
    consecutive channels' rows fell into the same few L1 sets. Expected: its rows widened by
    zero columns to 36 (planes 4320 bytes apart) for forward and grad-input (and the
    grad-weight that reads the forward's copy); frames whose planes already spread keep their
    width; strided forwards (column phases) keep theirs."""
    from clicktrain.codegen.kernels import _planes_alias, nchw_frame
    assert _planes_alias(4 * 30 * 34) and not _planes_alias(4 * 30 * 36)
    assert nchw_frame(30, 34) == (30, 36) and nchw_frame(34, 34) == (34, 34) and nchw_frame(18, 18) == (18, 18)
    plan, sources = planned(16, 16, 28, 1, "llvm")
    assert (plan.forward.in_h, plan.forward.in_w) == (plan.grad_input.in_h, plan.grad_input.in_w) == (30, 36)
    assert plan.grad_weight_reads_forward_input and plan.relayouts["forward_in"].cols == 36
    assert "(n, 16, 30, 36)" in sources[plan.forward.name]
    assert (planned(16, 16, 32, 1, "llvm")[0].forward.in_w, planned(16, 32, 28, 2, "llvm")[0].forward.in_w) == (34, 33)
    assert planned(16, 16, 28, 1, "cuda")[0].forward.in_w == 30  # CUDA's frames as they are


@pytest.mark.parametrize("case", [(3, 16, 16, 28, 28, 1, 1, 1, 0.0, True), (2, 16, 8, 28, 28, 1, 1, 1, 0.5, False)])
def test_widened_frames_match_masked_dense_conv(case):
    conv = check_against_masked_dense_conv(case)
    (kernels,) = conv._kernels.values()
    assert kernels.plan.forward.in_w == kernels.plan.grad_input.in_w == 36


def test_nchw_tiles_divide_the_maps_height_where_that_pads_less():
    """Before: a 14x14 map took tiles of 4 rows of two vectors (16 x 16 pixels computed for
    196). Expected: 7 rows of one vector (14 x 16), for forward, grad-input and a strided
    layer's 14x14 output; maps whose height the tile divides (28x28) or whose exact tile would
    hold too few accumulators (30 rows: 6) keep theirs."""
    from clicktrain.codegen.kernels import NCHW_EXACT_MIN_ROWS
    simd = resolve_target("llvm").simd_lanes
    for plan in (planned(32, 32, 14, 1, "llvm")[0], planned(16, 32, 28, 2, "llvm")[0]):
        assert (plan.forward.layout, plan.forward.rows, plan.forward.lanes, plan.forward.out_h) == ("nchw", 7, simd, 14)
    gi = planned(32, 32, 14, 1, "llvm")[0].grad_input
    assert (gi.rows, gi.lanes, gi.out_h) == (7, simd, 14)
    assert planned(16, 16, 28, 1, "llvm")[0].forward.out_h == 28 and NCHW_EXACT_MIN_ROWS > 6
    assert planned(16, 16, 30, 1, "llvm")[0].forward.out_h > 30


@pytest.mark.parametrize("case", [(3, 8, 16, 14, 14, 1, 1, 1, 0.0, True), (5, 8, 8, 28, 28, 2, 1, 1, 0.3, False),
                                  (2, 8, 8, 14, 15, 1, 1, 1, 0.3, False)])
def test_exact_row_tiles_match_masked_dense_conv(case):
    conv = check_against_masked_dense_conv(case)
    (kernels,) = conv._kernels.values()
    assert kernels.plan.forward.rows == 7

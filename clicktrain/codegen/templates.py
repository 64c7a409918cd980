"""TVMScript sources of the pattern-conv kernels, with each pattern's offsets as constants.

Two kernel shapes cover forward, grad-input and grad-weight:

``direct_conv`` -- for every output row ``f`` (a filter; for grad-input an input channel)
and every library pattern ``p``, walk the run of kept kernels ``j`` in
``[ptr[f, p], ptr[f, p + 1])``, reading source channel ``src[j]`` at the pattern's
*constant* offsets. The python loop over patterns unrolls at generation time, so there is
no per-weight branching and no offset table in the inner loop; dropped kernels are simply
absent from the runs. Weights are read from the dense weight tensor, not from a compact copy
gathered on every call: on CPU at a computed address (the row's filter, ``src[j]`` and the
pattern's constant position of weight ``t``), on CUDA through ``widx[j, t]`` (the flat
position of kept weight ``t`` of kernel ``j``). The output
tile is ``rows x lanes`` accumulators (vectorised along the output width on CPU; on CUDA a
thread holds one output pixel of ``CUDA_IMAGES`` images).

``grad_weight`` -- for every block of ``group`` kept kernels that share an input channel
``c`` and a pattern (blocks grouped by pattern, again with constant offsets), reduce
``dout[b, f_g, y, x] * inp[b, c, y*s + oy, x*s + ox]`` over batch and space, straight into
the kept positions ``gidx[blk, g, t]`` of the dense gradient (the caller zeroes it: pruned
weights get an exact zero). The block is what makes it fast: each shifted input vector is
loaded once for all ``group`` kernels and each ``dout`` vector once for all ``k`` weights
(``group * k`` FMAs per ``group + k`` loads, against ``k`` per ``k + 1`` kernel by kernel).
A block short of ``group`` kernels is padded with copies writing to a scratch slot past the
gradient's end.

Small maps (rows narrower than a SIMD register) run the same two kernel shapes in the
``chwn`` layout: activations as ``(batch blocks, channels, H, W, lanes)``, vectorised along the batch, the
register tile a block of whole output rows. A 4x4 map then fills 16-lane vectors instead of
a quarter of one, and nothing is padded but the batch.

Generated source is kept in the debug dump; sizes not known until run time (batch, number
of kept kernels) are symbolic, so one compiled kernel serves every batch size and every
pattern assignment over the same library and layer geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

Offsets = tuple[tuple[tuple[int, int], ...], ...]  # per pattern, per kept position: (dy, dx), dilation applied


@dataclass(frozen=True)
class DirectConvSpec:
    name: str
    src_channels: int   # channels of the input buffer
    dst_channels: int   # output channels (rows of ptr)
    in_h: int           # padded input extent
    in_w: int
    out_h: int          # padded output extent (multiple of rows)
    out_w: int          # padded output extent (multiple of lanes)
    stride: tuple[int, int]
    offsets: Offsets
    rows: int
    lanes: int
    bias: bool
    layout: str = "nchw"  # or "chwn": (batch blocks, channels, H, W, lanes), vectorised along the batch
    stored: tuple[int, int] | None = None  # nchw: the output buffer's extent, where the tile overhangs it
    # weight t of kept kernel j (pattern p) of row f is at perm[f] * strides[0] + src[j] * strides[1]
    # + positions[p][t] in the dense weight: a computed address instead of a widx load (CPU; empty
    # on CUDA, whose threads load each kernel's weights once through widx for several images)
    positions: tuple[tuple[int, ...], ...] = ()
    strides: tuple[int, int] = (0, 0)
    # nchw, column stride s > 1: the padded input split into its s column phases, so that an
    # output row's vector reads contiguous input (phase dx % s, from column x + dx // s)
    phases: int = 1
    # chwn: source channels per block (0: one block) and output rows per task. A task walks one
    # block of source channels for all its rows, accumulating in the output, then the next: the
    # block of a batch block's input stays in cache for all the task's rows
    channel_block: int = 0
    filter_block: int = 1
    # chwn: consecutive tasks take the same output rows for the next block of images (instead
    # of the next rows for the same images), so a group's weights are reused from cache
    batch_inner: bool = False
    # CPU grad-input (its rows' weights are one filter apart in the dense weight) and the
    # forward per kernel, on layers of work enough: the kept weights come gathered in the
    # kernel's own order, (kept kernels, k), by ``gather_weights_llvm``; a group's rows'
    # weights of one run entry side by side (``FilterKernelLayout.group_interleaved``)
    gathered_weight: bool = False
    # nchw: output rows per task that share their runs of kept kernels (the layout's rows come
    # in groups of this many with equal source channels and patterns: block granularity)
    row_group: int = 1
    # weights per kept kernel, where ``offsets`` hold fewer: one stride phase's taps of each
    # pattern (a pattern may have none), ``positions`` the same taps' weight positions
    kept: int = 0
    # chwn: output columns per tile (0: the whole row)
    x_tile: int = 0
    # nchw: output rows per task (whole groups), each tile of the task for all of them in turn
    row_block: int = 1
    # chwn: a task walks its tiles, each for all its output rows (else its rows, each for all tiles)
    tiles_outer: bool = False
    # chwn: (first row, end row, first column, end column) of the input frame that holds data
    # (zeros around it): a tile that covers the whole map skips the taps that read only zeros
    valid: tuple[int, int, int, int] = ()

    @property
    def channel_blocks(self) -> int:
        return -(-self.src_channels // self.channel_block) if self.channel_block else 1

    @property
    def input_shape(self) -> str:
        """The input buffer's shape (``n``: the batch)."""
        return _input_shape(self)

    @property
    def k(self) -> int:
        return self.kept or len(self.offsets[0])

    @property
    def out_extent(self) -> tuple[int, int]:
        """(H, W) of the output buffer: the true output where the kernel stores only that
        (no crop copy afterwards), else the padded tile grid."""
        return self.stored or (self.out_h, self.out_w)

    @property
    def weight_size(self) -> int:
        """Floats of the dense weight the kernel reads (``src x dst`` 3x3 kernels, either direction)."""
        return self.src_channels * self.dst_channels * 9


@dataclass(frozen=True)
class GradWeightSpec:
    name: str
    src_channels: int
    dst_channels: int
    in_h: int
    in_w: int
    true_out_h: int     # rows of dout that hold data (the rest is padding)
    out_h: int
    out_w: int          # padded; columns past the true width hold zeros
    stride: tuple[int, int]
    offsets: Offsets
    lanes: int
    layout: str = "nchw"
    group: int = 1      # kept kernels per block (same input channel and pattern)
    phases: int = 1     # nchw, column stride > 1: the input split into its column phases, as the forward's
    # nchw: images per slice of the batch (0: the whole batch at once). Every block reduces
    # one slice (its data kept in cache) before any block goes on to the next, adding into
    # the gradient
    batch_slice: int = 0

    @property
    def input_shape(self) -> str:
        return _input_shape(self)

    @property
    def k(self) -> int:
        return len(self.offsets[0])

    @property
    def gradient_size(self) -> int:
        """Floats of the gradient buffer: the dense weight plus ``k`` scratch slots."""
        return self.src_channels * self.dst_channels * 9 + self.k


DIRECT_PARAMS = ["inp_h", "w_h", "widx_h", "ptr_h", "src_h", "perm_h", "bias_h", "out_h"]
GRAD_WEIGHT_PARAMS = ["dout_h", "inp_h", "bf_h", "bc_h", "gidx_h", "pptr_h", "g_h"]


def prim_func_header(name: str, params: list[str], sizes: tuple[str, ...] = ("n", "kk")) -> list[str]:
    """The first lines of every generated kernel and copy: handle parameters ``params`` and the
    symbolic sizes ``sizes`` (run-time extents: the batch, the number of kept kernels, ...)."""
    return ["@T.prim_func",
            f"def {name}({', '.join(p + ': T.handle' for p in params)}):",
            f'    T.func_attr({{"global_symbol": "{name}", "tir.noalias": True}})'] + \
        [f"    {size} = T.int32()" for size in sizes]


def _input_shape(s) -> str:
    """The shape of a kernel's input buffer (``n``: the batch): with column phases
    ``(phases, n, C, H, ceil(W / phases))``, else the activation layout."""
    if s.phases > 1:
        return f"({s.phases}, n, {s.src_channels}, {s.in_h}, {-(-s.in_w // s.phases)})"
    return _activation(s.src_channels, s.in_h, s.in_w, s.layout, s.lanes)


def _activation(channels: int, h: int, w: int, layout: str, lanes: int) -> str:
    """The shape of an activation buffer; ``n`` is the batch, in chwn the number of blocks of
    ``lanes`` images (the batch padded): ``(blocks, C, H, W, lanes)``. With the lanes innermost
    and every other extent but the blocks a constant, each read of a kernel's tile is a
    constant offset from the block and channel (a symbolic batch stride made LLVM compute
    every address in vector registers and extract it lane by lane)."""
    return f"(n, {channels}, {h}, {w}, {lanes})" if layout == "chwn" else f"(n, {channels}, {h}, {w})"


def _direct_buffers(s: DirectConvSpec) -> list[str]:
    P = len(s.offsets)
    return [
        f'    inp = T.match_buffer(inp_h, {s.input_shape}, "float32")',
        f'    w = T.match_buffer(w_h, {f"(kk, {s.k})" if s.gathered_weight else f"({s.weight_size},)"}, "float32")',
        f'    widx = T.match_buffer(widx_h, (kk, {s.k}), "int32")',
        f'    ptr = T.match_buffer(ptr_h, ({s.dst_channels}, {s.channel_blocks * (P + 1)}), "int32")',
        f'    src = T.match_buffer(src_h, (kk,), "int32")',
        f'    perm = T.match_buffer(perm_h, ({s.dst_channels},), "int32")',
        f'    bias = T.match_buffer(bias_h, ({s.dst_channels},), "float32")',
        f'    out = T.match_buffer(out_h, {_activation(s.dst_channels, *s.out_extent, s.layout, s.lanes)}, "float32")',
    ]


def _weight(s: DirectConvSpec, p: int, t: int, row: str) -> str:
    """Weight ``t`` of kept kernel ``j`` (pattern ``p``) of output row ``row``: gathered in the
    kernel's order, or at a computed address where the spec has the patterns' positions, else
    through ``widx``."""
    if s.gathered_weight:
        return f"w[j, {t}]"  # one row (grouped rows: _group_weight)
    if s.positions:
        return f"w[perm[{row}] * {s.strides[0]} + src[j] * {s.strides[1]} + {s.positions[p][t]}]"
    return f"w[widx[j, {t}]]"


def _group_weight(s: DirectConvSpec, leader: str, g: int) -> str | None:
    """How row ``g`` of a group reads weight ``{t}`` of run entry ``j`` (``leader``: the group's
    first row, whose entries ``j`` walk): gathered, the group's weights of an entry are side by
    side from ``a + (j - a) * G``, ``a`` the leader's first entry; else ``_weight``'s address."""
    G = s.row_group
    if not s.gathered_weight or G == 1:
        return None
    return f"w[j * {G} - ptr[{leader}, 0] * {G - 1} + {g}, {{t}}]"


def _fma_chain(acc: str, s, p: int, b: str, y: str, x: str, weight: str | None = None, row: str = "",
               taps=None) -> str:
    """``acc += sum_t w[j, t] * input at pattern p's offset t`` (``b``: the batch index, or in
    the chwn layout the batch block, lane ``v``; ``weight``: how weight ``t`` is read, default
    ``_weight`` of output row ``row``; ``taps``: the weights to add, default all)."""
    sh, sw = s.stride

    def at(dy, dx):
        if s.phases > 1:
            return f"inp[{dx % sw}, {b}, src[j], ({y}) * {sh} + {dy}, {x} + {dx // sw}]"
        pos = f"({y}) * {sh} + {dy}, ({x}) * {sw} + {dx}"
        return f"inp[{b}, src[j], {pos}, v]" if s.layout == "chwn" else f"inp[{b}, src[j], {pos}]"
    terms = [f"{weight.format(t=t) if weight else _weight(s, p, t, row)} * {at(dy, dx)}"
             for t, (dy, dx) in enumerate(s.offsets[p]) if taps is None or t in taps]
    return f"{acc} = {acc} + " + " + ".join(terms)


def _vector_tile(loops, V: int, indent: int, body: str) -> list[str]:
    """Unrolled tile loops ``loops`` ((var, extent), ...) and the vector loop around ``body``."""
    out = [" " * (indent + 4 * i) + f"for {var} in T.unroll({extent}):" for i, (var, extent) in enumerate(loops)]
    pad = " " * (indent + 4 * len(loops))
    return out + [pad + f"for v in T.vectorized({V}):", pad + "    " + body]


def direct_conv_llvm(s: DirectConvSpec) -> str:
    """nchw: one parallel task per (image, group of ``row_group`` output rows) holding a
    register tile of ``row_group x rows x lanes`` output pixels, vectorised along the row.
    The rows of a group share their runs of kept kernels (same source channels and
    patterns: block granularity), so each shifted input vector is loaded once for all of
    them. With a ``row_block`` a task takes that many rows, each tile for all of them in turn.
    chwn: ``direct_conv_chwn_llvm``."""
    if s.layout == "chwn":
        return direct_conv_chwn_llvm(s)
    O, R, V, G = s.dst_channels, s.rows, s.lanes, s.row_group
    RB = max(G, s.row_block)  # rows per task
    assert O % G == 0 and RB % G == 0, "a group's rows share runs"
    blocks = -(-O // RB)
    loops = [("r", R)]
    batch, y, x = f"bf // {blocks}", f"yt * {R} + r", f"xt * {V} + v"

    def row(g: int) -> str:
        first = f"bf % {blocks}" + (f" * {RB}" if RB > 1 else "")
        if RB > G:  # the task's groups of rows, fi
            first += " + fi" + (f" * {G}" if G > 1 else "")
        return first if G == 1 else f"{first} + {g}"

    def buffer(g: int) -> str:
        return f"acc{g}" if G > 1 else "acc"

    def acc(g: int, lane: str = "v") -> str:
        return f"{buffer(g)}[r, {lane}]"
    lines = prim_func_header(s.name, DIRECT_PARAMS) + _direct_buffers(s)
    lines += [f"    for bf in T.parallel(n * {blocks}):"]
    # one buffer per row of the group: a buffer of 1 KB or more goes to TVM's heap workspace,
    # where LLVM cannot keep it in registers
    lines += [f'        {buffer(g)} = T.alloc_buffer(({R}, {V}), "float32", scope="global")' for g in range(G)]
    lines += [f"        for yt, xt in T.grid({s.out_h // R}, {s.out_w // V}):"]
    ind = 12
    if RB > G:  # the task's rows inner: each reads the same input rows as the one before
        lines.append(" " * ind + f"for fi in range({RB // G}):")
        ind += 4
        if O % RB:
            lines.append(" " * ind + f"if {row(0)} < {O}:")
            ind += 4
    for g in range(G):
        lines += _vector_tile(loops, V, ind, f"{acc(g)} = {f'bias[perm[{row(g)}]]' if s.bias else 'T.float32(0)'}")
    for p in range(len(s.offsets)):
        if not s.offsets[p]:  # a stride phase holding none of the pattern's taps
            continue
        lines.append(" " * ind + f"for j in range(ptr[{row(0)}, {p}], ptr[{row(0)}, {p + 1}]):")
        for g in range(G):
            lines += _vector_tile(loops, V, ind + 4, _fma_chain(acc(g), s, p, batch, y, x, _group_weight(s, row(0), g),
                                                                row=row(g)))
    for g in range(G):
        def store(lane: str, g=g) -> str:
            return f"out[{batch}, perm[{row(g)}], yt * {R} + r, xt * {V} + {lane}]"
        if s.out_extent == (s.out_h, s.out_w):
            lines += _vector_tile(loops, V, ind, f"{store('v')} = {acc(g)}")
        else:
            lines += _clipped_store(s, store, lambda lane, g=g: acc(g, lane), ind)
    return "\n".join(lines) + "\n"


SKIP_ZERO_TAPS = True  # chwn tiles that cover the whole map leave out taps on the frame's zero border


def direct_conv_chwn_llvm(s: DirectConvSpec) -> str:
    """chwn: one parallel task per (block of ``lanes`` images, block of ``filter_block`` output
    rows), the register tile ``rows`` whole output rows (or ``x_tile`` columns of them)
    vectorised along the batch, for each of ``row_group`` layout rows that share their runs
    (each input vector loaded once for the group). The task walks the source channels block
    by block (``channel_block``), each block for all its output rows, adding into the output:
    that block of its images' input (a few dozen KB) stays in cache while every row reads it. Without blocks every row streamed the
    whole input of its images (a 512-channel 4x4 layer: about 1 MB per row, from memory)."""
    O, R, V, FB, G = s.dst_channels, s.rows, s.lanes, s.filter_block, s.row_group
    P, B = len(s.offsets), s.channel_blocks
    XW = s.x_tile or s.out_w
    assert FB % G == 0 and O % G == 0 and s.out_w % XW == 0
    column = f"xt * {XW} + x" if XW < s.out_w else "x"
    groups = -(-O // FB)
    if s.batch_inner:  # n: blocks of images
        task, images = f"bf // n * {FB}", "bf % n"
    else:
        task, images = f"bf % {groups} * {FB}", f"bf // {groups}"

    def f(g: int) -> str:
        """Output row ``g`` of the task's group ``fi``."""
        return f"{task} + fi" if G == 1 else f"{task} + fi * {G} + {g}"

    def buffer(g: int, r: int) -> str:
        return f"acc{r}" if G == 1 else f"acc{g}_{r}"

    def acc(g: int, r: int) -> str:
        return f"{buffer(g, r)}[x, v]"

    def init(g: int) -> str:
        return f"bias[perm[{f(g)}]]" if s.bias else "T.float32(0)"

    def out(g: int, r: int) -> str:
        return f"out[{images}, perm[{f(g)}], yt * {R} + {r}, {column}, v]"

    def tile(indent: int, body) -> list[str]:
        """``body(g, r)`` over the tile: the group's rows and the tile rows unrolled here, each
        row's x unrolled, lanes vectorised."""
        lines = []
        for g in range(G):
            for r in range(R):
                lines += _vector_tile([("x", XW)], V, indent, body(g, r))
        return lines
    lines = prim_func_header(s.name, DIRECT_PARAMS) + _direct_buffers(s)
    # one accumulator buffer per row: TVM puts a buffer of 1 KB or more (16 AVX-512 vectors)
    # on the heap, where LLVM cannot keep it in registers (measured: 3-4x slower)
    lines += [f"    for bf in T.parallel(n * {groups}):"]
    lines += [f'        {buffer(g, r)} = T.alloc_buffer(({XW}, {V}), "float32", scope="global")'
              for g in range(G) for r in range(R)]
    def rows_of_task(indent: int, body) -> list[str]:
        """``body(indent)`` for each of the task's (groups of) output rows and tiles: tiles
        inner, or with ``tiles_outer`` the rows inner (they read the same input rows)."""
        rows = [f"for fi in range({FB // G}):"] + ([f"if {f(0)} < {O}:"] if O % FB else [])
        tiles = [f"for yt in range({s.out_h // R}):"] + ([f"for xt in range({s.out_w // XW}):"] if XW < s.out_w else [])
        loops = tiles + rows if s.tiles_outer else rows + tiles
        return [" " * (indent + 4 * i) + loop for i, loop in enumerate(loops)] + body(indent + 4 * len(loops))

    # a tile that is the whole map knows each pixel's position: a tap that reads the frame's
    # zero border is left out (a 2x2 map keeps 4 of 9 tap positions per pixel, 4x4 about 7)
    whole_map = SKIP_ZERO_TAPS and bool(s.valid) and s.out_h == R and XW == s.out_w and s.phases == 1

    def skipping_zeros(indent: int, p: int) -> list[str]:
        (sh, sw), (row0, row1, col0, col1) = s.stride, s.valid
        lines = []
        for g in range(G):
            for r in range(R):
                for x in range(XW):
                    taps = [t for t, (dy, dx) in enumerate(s.offsets[p])
                            if row0 <= r * sh + dy < row1 and col0 <= x * sw + dx < col1]
                    if taps:
                        lines += [" " * indent + f"for v in T.vectorized({V}):",
                                  " " * (indent + 4) + _fma_chain(f"{buffer(g, r)}[{x}, v]", s, p, images, str(r),
                                                                  str(x), _group_weight(s, f(0), g), row=f(g),
                                                                  taps=taps)]
        return lines

    def block(cb: str, start: bool):
        """One block of source channels into the tile: from the bias (the only block) or from
        the output so far."""
        def body(indent: int) -> list[str]:
            lines = tile(indent, lambda g, r: f"{acc(g, r)} = {init(g) if start else out(g, r)}")
            for p in range(P):
                if whole_map:
                    run = skipping_zeros(indent + 4, p)
                else:
                    run = tile(indent + 4, lambda g, r: _fma_chain(acc(g, r), s, p, images, f"yt * {R} + {r}", column,
                                                                    _group_weight(s, f(0), g), row=f(g)))
                if run:  # empty where every tap of the pattern reads zeros: its kernels cost nothing
                    lines += [" " * indent + f"for j in range(ptr[{f(0)}, {cb} * {P + 1} + {p}], "
                              f"ptr[{f(0)}, {cb} * {P + 1} + {p + 1}]):"] + run
            return lines + tile(indent, lambda g, r: f"{out(g, r)} = {acc(g, r)}")
        return body
    if B == 1:
        lines += rows_of_task(8, block("0", True))
    else:  # the output starts as the bias; each block adds to it (one copy of the block's code)
        lines += rows_of_task(8, lambda indent: tile(indent, lambda g, r: f"{out(g, r)} = {init(g)}"))
        lines.append(f"        for cb in range({B}):")
        lines += rows_of_task(12, block("cb", False))
    return "\n".join(lines) + "\n"


def _clipped_store(s: DirectConvSpec, store, acc, indent: int = 12) -> list[str]:
    """Store an nchw tile into the true-size output (``store(lane)`` / ``acc(lane)``: the
    output and accumulator elements of a lane expression): rows past its height are skipped,
    and the one tile that overhangs its width stores its valid lanes as vectors of
    power-of-two widths (28 valid of 32: 16 + 8 + 4). Lane-by-lane stores there cost a
    16-channel 28x28 forward about a quarter of its time."""
    R, V = s.rows, s.lanes
    (height, width), pad = s.out_extent, " " * (indent + 4)
    lines = [" " * indent + f"for r in T.unroll({R}):"]
    if height != s.out_h:
        lines.append(f"{pad}if yt * {R} + r < {height}:")
        pad += "    "
    full = [f"{pad}for v in T.vectorized({V}):", f"{pad}    {store('v')} = {acc('v')}"]
    if width == s.out_w:
        return lines + full
    lines += [f"{pad}if xt * {V} + {V} <= {width}:"] + ["    " + line for line in full] + [f"{pad}else:"]
    valid, start = width % V, 0  # the last tile's (the only one overhanging)
    for piece in (p for p in (32, 16, 8, 4, 2, 1) if valid & p):
        lane = f"v + {start}"
        lines += [f"{pad}    for v in T.vectorized({piece}):", f"{pad}        {store(lane)} = {acc(lane)}"]
        start += piece
    return lines


CUDA_THREADS = 128      # threads per direct-conv block
CUDA_IMAGES = 4         # images per direct-conv thread: one weight load feeds this many FMAs
CUDA_SPLIT_THREADS = 1 << 19  # threads a direct conv aims for at batch 64 when it splits rows' runs
CUDA_MAX_SPLIT = 8      # slices of a row's kept kernels, at most
CUDA_MIN_SLICE = 32     # source channels per slice, at least


def cuda_kernel_slices(s: DirectConvSpec) -> int:
    """Threads sharing one work item, each walking every ``S``-th kept kernel of the row's
    runs. Small maps of many channels (VGG's 512->512 2x2) give few items (batch 64: 16 per
    pixel) and long runs, so a grid of one thread per item leaves the GPU mostly idle behind
    each thread's serial chain of dependent loads: split the runs until the grid reaches
    about ``CUDA_SPLIT_THREADS`` threads, keeping at least ``CUDA_MIN_SLICE`` source channels
    per slice."""
    base = -(-64 // CUDA_IMAGES) * s.out_h * s.out_w * s.dst_channels  # threads without a split
    slices = 1
    while (slices < CUDA_MAX_SPLIT and base * slices * 2 <= CUDA_SPLIT_THREADS
           and s.src_channels // (slices * 2) >= CUDA_MIN_SLICE):
        slices *= 2
    return slices


def direct_conv_cuda(s: DirectConvSpec) -> str:
    """One block per (output row ``f``, slice of work items); a work item is one output pixel
    of ``CUDA_IMAGES`` images, neighbouring threads on neighbouring pixels (coalesced loads).
    The whole block walks the same runs of ``f``, so there is no divergence, and each kept
    weight is loaded once per thread for all its images. Images past the batch read the last
    image (a valid address) and are not stored. Where ``cuda_kernel_slices`` splits the runs
    into ``S`` slices, ``S`` threads share an item, each summing every ``S``-th kept kernel of
    each run, and their sums meet in shared memory."""
    O, T, R, S = s.dst_channels, CUDA_THREADS, CUDA_IMAGES, cuda_kernel_slices(s)
    items_per_block = T // S
    pixels = s.out_h * s.out_w
    items = f"(n + {R - 1}) // {R} * {pixels}"
    lines = prim_func_header(s.name, DIRECT_PARAMS) + _direct_buffers(s)
    init = f"bias[perm[blk % {O}]]" if s.bias else "T.float32(0)"
    e = f"(blk // {O} * {items_per_block} + tx % {items_per_block})" if S > 1 else f"(blk // {O} * {T} + tx)"
    lines += [
        f'    for blk in T.thread_binding(({items} + {items_per_block - 1}) // {items_per_block} * {O}, '
        'thread="blockIdx.x"):',
        f'        for tx in T.thread_binding({T}, thread="threadIdx.x"):',
        f'            acc = T.alloc_buffer(({R},), "float32", scope="local")',
        f'            wk = T.alloc_buffer(({s.k},), "float32", scope="local")',
    ]
    if S > 1:
        lines += [f'            red = T.alloc_buffer(({S}, {R}, {items_per_block}), "float32", scope="shared")']
    lines += [f"            for r in T.unroll({R}):",
              f"                acc[r] = {init if S == 1 else 'T.float32(0)'}",
              f"            if {e} < {items}:"]
    image = f"T.min({e} // {pixels} * {R} + r, n - 1)"
    y, x = f"{e} % {pixels} // {s.out_w}", f"{e} % {s.out_w}"
    for p in range(len(s.offsets)):
        run = f"ptr[blk % {O}, {p}]", f"ptr[blk % {O}, {p + 1}]"
        if S == 1:
            lines += [f"                for j in range({run[0]}, {run[1]}):"]
        else:  # this thread's kernels of the run: every S-th from its slice's
            sl = f"tx // {items_per_block}"
            lines += [f"                for i in range(({run[1]} - {run[0]} - {sl} + {S - 1}) // {S}):",
                      f"                    j = {run[0]} + {sl} + i * {S}"]
        lines += [f"                    for t in T.unroll({s.k}):",
                  "                        wk[t] = w[widx[j, t]]",
                  f"                    for r in T.unroll({R}):",
                  "                        " + _fma_chain("acc[r]", s, p, image, y, x, weight="wk[{t}]")]
    valid = f"{e} // {pixels} * {R} + r < n"
    store = f"out[{e} // {pixels} * {R} + r, perm[blk % {O}], {y}, {x}]"
    if S == 1:
        return "\n".join(lines + [f"                for r in T.unroll({R}):", f"                    if {valid}:",
                                  f"                        {store} = acc[r]"]) + "\n"
    # every thread writes its partial sums (zeros past the items) before the barrier TVM puts
    # between these writes and the reads of the item's first thread
    total = " + ".join(f"red[{q}, r, tx]" for q in range(S))
    lines += [f"            for r in T.unroll({R}):",
              f"                red[tx // {items_per_block}, r, tx % {items_per_block}] = acc[r]",
              f"            if tx < {items_per_block} and {e} < {items}:",
              f"                for r in T.unroll({R}):",
              f"                    if {valid}:",
              f"                        {store} = {init} + {total}"]
    return "\n".join(lines) + "\n"


def _grad_weight_buffers(s: GradWeightSpec) -> list[str]:
    P = len(s.offsets)
    return [
        f'    dout = T.match_buffer(dout_h, {_activation(s.dst_channels, s.out_h, s.out_w, s.layout, s.lanes)}, "float32")',
        f'    inp = T.match_buffer(inp_h, {s.input_shape}, "float32")',
        f'    bf = T.match_buffer(bf_h, (kk, {s.group}), "int32")',
        f'    bc = T.match_buffer(bc_h, (kk,), "int32")',
        f'    gidx = T.match_buffer(gidx_h, (kk, {s.group}, {s.k}), "int32")',
        f'    pptr = T.match_buffer(pptr_h, ({P + 1},), "int32")',
        f'    g = T.match_buffer(g_h, ({s.gradient_size},), "float32")',
    ]


def _gw_term(s: GradWeightSpec, gi: int, t: int, p: int, x: str, b: str = "b", y: str = "y") -> str:
    """``dout * shifted input`` of kernel ``gi`` of block ``j``, weight ``t`` (chwn: ``b`` is
    the batch block, the lane ``v``)."""
    dy, dx = s.offsets[p][t]
    sh, sw = s.stride
    if s.layout == "chwn":
        return f"dout[{b}, bf[j, {gi}], {y}, {x}, v] * inp[{b}, bc[j], ({y}) * {sh} + {dy}, ({x}) * {sw} + {dx}, v]"
    if s.phases > 1:  # contiguous along the row: column phase dx % s, from column x + dx // s
        return f"dout[{b}, bf[j, {gi}], {y}, {x}] * inp[{dx % sw}, {b}, bc[j], ({y}) * {sh} + {dy}, {x} + {dx // sw}]"
    return f"dout[{b}, bf[j, {gi}], {y}, {x}] * inp[{b}, bc[j], ({y}) * {sh} + {dy}, ({x}) * {sw} + {dx}]"


def grad_weight_llvm(s: GradWeightSpec) -> str:
    """One parallel task per block of kernels, reducing over batch and space into
    ``group x k`` vector accumulators: vectorised along the row (nchw) or the batch (chwn).
    With ``batch_slice``, one parallel pass per slice of images (chwn: of batch blocks) over
    every block, each adding its sums into the zeroed gradient: the slice's data stays in
    cache for all blocks."""
    V, k, G, S = s.lanes, s.k, s.group, s.batch_slice
    # by slices: image (chwn: batch block) ``bs * S + b`` of the slice's ``min(S, rest)``
    images, b = (f"T.min({S}, n - bs * {S})", f"bs * {S} + b") if S else ("n", "b")
    if s.layout == "chwn":
        reduce, x = f"b, y, x in T.grid({images}, {s.true_out_h}, {s.out_w})", "x"
    else:
        reduce, x = f"b, y, xt in T.grid({images}, {s.true_out_h}, {s.out_w // V})", f"xt * {V} + v"
    # accumulators: one buffer, or one per kernel of the block where one would reach 1 KB (4
    # kernels x 4 weights x 16 lanes): TVM puts a buffer of 1 KB or more on its heap
    # workspace, out of LLVM's registers (blocks of 4 then ran 0.4x of dense, against 1.8x
    # with a buffer per kernel); below that one buffer measured a few per cent faster in nchw
    split = G * k * V * 4 >= 1024

    def acc(gi, t, v: str) -> str:
        return f"acc{gi}[{t}, {v}]" if split else f"acc[{gi}, {t}, {v}]"

    def each_weight(indent: int, body) -> list[str]:
        """``body(gi, t)`` (lines) for every accumulator vector of the block."""
        pad = " " * indent
        if not split:
            return [f"{pad}for gi, t in T.grid({G}, {k}):"] + body("gi", "t")
        return [line for gi in range(G) for line in [f"{pad}for t in range({k}):"] + body(gi, "t")]
    alloc = ([f'acc{gi} = T.alloc_buffer(({k}, {V}), "float32", scope="global")' for gi in range(G)] if split
             else [f'acc = T.alloc_buffer(({G}, {k}, {V}), "float32", scope="global")'])

    def block(p: int, indent: int) -> list[str]:
        """Block ``j`` (of pattern ``p``): its accumulators zeroed, the reduction, the lanes'
        sum stored (or, by slices, added) at its kept weights."""
        pad = " " * indent
        lines = each_weight(indent, lambda gi, t: [f"{pad}    for v in T.vectorized({V}):",
                                                   f"{pad}        {acc(gi, t, 'v')} = T.float32(0)"])
        lines.append(f"{pad}for {reduce}:")
        for gi in range(G):
            for t in range(k):
                lines += [f"{pad}    for v in T.vectorized({V}):",
                          f"{pad}        {acc(gi, t, 'v')} = {acc(gi, t, 'v')} + " + _gw_term(s, gi, t, p, x, b)]
        assert V & (V - 1) == 0, "lanes meet in a halving tree"
        # lanes meet in a tree of vector adds (halving in place), not a serial scalar chain:
        # on small maps that chain cost about as much as the reduction over the map
        half = V // 2
        while half >= 1:
            lines += each_weight(indent, lambda gi, t, h=half: [
                f"{pad}    for v in T.vectorized({h}):",
                f"{pad}        {acc(gi, t, 'v')} = {acc(gi, t, 'v')} + {acc(gi, t, f'v + {h}')}"])
            half //= 2
        total = (lambda gi, t: f"g[gidx[j, {gi}, {t}]] + {acc(gi, t, '0')}") if S else (lambda gi, t: acc(gi, t, "0"))
        return lines + each_weight(indent, lambda gi, t: [f"{pad}    g[gidx[j, {gi}, {t}]] = {total(gi, t)}"])
    lines = prim_func_header(s.name, GRAD_WEIGHT_PARAMS) + _grad_weight_buffers(s)
    if S:  # one parallel pass per slice over every block, each task branching to its pattern
        lines += [f"    for bs in range((n + {S - 1}) // {S}):",
                  f"        for j in T.parallel(pptr[{len(s.offsets)}]):"] + ["            " + a for a in alloc]
        for p in range(len(s.offsets)):
            lines.append(f"            if pptr[{p}] <= j and j < pptr[{p + 1}]:")
            lines += block(p, 16)
        return "\n".join(lines) + "\n"
    for p in range(len(s.offsets)):
        lines += [f"    for j in T.parallel(pptr[{p}], pptr[{p + 1}]):"] + ["        " + a for a in alloc]
        lines += block(p, 8)
    return "\n".join(lines) + "\n"


def cuda_reduce_threads(pixels: int) -> int:
    """Threads reducing one kept kernel's gradient: about one per two output pixels of an
    image, a power of two from one warp to 256 (the batch makes up the rest of the work)."""
    t = 32
    while t < 256 and t < pixels // 2:
        t *= 2
    return t


def grad_weight_cuda(s: GradWeightSpec) -> str:
    """One block per kept kernel: its threads share the reduction over batch and space
    (neighbouring threads on neighbouring pixels, so loads coalesce), then add their ``k``
    partial sums in a shared-memory tree. Kernels are pattern-major and a block holds one, so
    the pattern branch is uniform per block. Blocks are single kernels here (``group`` 1)."""
    assert s.group == 1, "the cuda grad-weight kernel takes one kernel per block"
    k, W = s.k, s.out_w
    pixels = s.true_out_h * W
    T = cuda_reduce_threads(pixels)
    steps = f"(n * {pixels} + {T - 1}) // {T}"
    lines = prim_func_header(s.name, GRAD_WEIGHT_PARAMS) + _grad_weight_buffers(s)
    lines += [
        f'    for j in T.thread_binding(T.max(kk, 1), thread="blockIdx.x"):',
        f'        for tx in T.thread_binding({T}, thread="threadIdx.x"):',
        f'            acc = T.alloc_buffer(({k},), "float32", scope="local")',
        f'            red0 = T.alloc_buffer(({k}, {T}), "float32", scope="shared")',
        f'            red1 = T.alloc_buffer(({k}, {T}), "float32", scope="shared")',
        f"            for t in T.unroll({k}):",
        "                acc[t] = T.float32(0)",
    ]
    e = f"(it * {T} + tx)"
    for p in range(len(s.offsets)):
        lines += [f"            if pptr[{p}] <= j and j < pptr[{p + 1}]:",
                  f"                for it in range({steps}):",
                  f"                    if {e} < n * {pixels}:"]
        lines += [f"                        acc[{t}] = acc[{t}] + "
                  + _gw_term(s, 0, t, p, f"{e} % {W}", b=f"{e} // {pixels}", y=f"{e} % {pixels} // {W}")
                  for t in range(k)]
    # partial sums meet in a shared-memory tree; ping-pong buffers keep each step's reads and
    # writes apart, so TVM's sync planner puts barriers between steps only
    lines += [f"            for t in T.unroll({k}):",
              "                red0[t, tx] = acc[t]"]
    half, buf = T // 2, 0
    while half >= 1:
        lines += [f"            if tx < {half}:",
                  f"                for t in T.unroll({k}):",
                  f"                    red{1 - buf}[t, tx] = red{buf}[t, tx] + red{buf}[t, tx + {half}]"]
        half, buf = half // 2, 1 - buf
    lines += [f"            if tx < {k} and j < kk:",
              f"                g[gidx[j, 0, tx]] = red{buf}[tx, 0]"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RelayoutSpec:
    """A copy between an nchw activation ``(n, C, h, w)`` and a kernel's buffer: ``x`` placed at
    (``top``, ``left``) of a zero ``rows x cols`` frame (cropped where it overhangs), in the
    nchw or chwn layout (``pad``), or a chwn buffer's first ``h x w`` back to nchw (``unpad``).
    With a ``spread`` (sy, sx), pixel (i, j) lands at (top + i*sy, left + j*sx), zeros between:
    the zero insertion a strided conv's grad-input needs, in the same pass. With ``phases`` P
    (nchw), the frame is stored split into its P column phases, ``(P, n, C, rows, ceil(cols /
    P))``, phase p holding frame columns p, p + P, ... (a strided forward's input).
    ``interleave`` is the inverse of a split into phases, in both axes: the ``spread[0] x
    spread[1]`` stride phases of a strided conv's grad-input, each its own nchw buffer (those
    with pixels, row phase major), woven into the ``(n, C, h, w)`` gradient
    (``interleave_phases_llvm``).
    One generated pass: torch's pad fills the frame, then copies with a strided iterator, and a
    permute to or from chwn copies element by element (measured 0.1-0.3 ms per call on the
    main job's layers, more than their kernels)."""
    name: str
    kind: str           # "pad", "unpad" or "interleave"
    layout: str         # the kernel buffer's layout
    channels: int
    h: int              # the nchw activation's extent
    w: int
    rows: int           # the kernel buffer's extent
    cols: int
    top: int = 0
    left: int = 0
    lanes: int = 1      # chwn: images per block
    spread: tuple[int, int] = (1, 1)
    phases: int = 1

    def out_shape(self, n: int) -> tuple[int, ...]:
        """The destination's shape for a batch of ``n``."""
        if self.kind in ("unpad", "interleave"):
            return (n, self.channels, self.h, self.w)
        if self.layout == "chwn":
            return (-(-n // self.lanes), self.channels, self.rows, self.cols, self.lanes)
        if self.phases > 1:
            return (self.phases, n, self.channels, self.rows, -(-self.cols // self.phases))
        return (n, self.channels, self.rows, self.cols)

    @property
    def window(self) -> tuple[int, int, int, int]:
        """(first row, rows, first column, columns) of ``x`` that land inside the frame."""
        def span(start: int, size: int, frame: int, step: int) -> tuple[int, int]:
            first = max(0, -(start // step))  # the first pixel at or past the frame's edge
            last = min(size, (frame - 1 - start) // step + 1) if frame > start else 0
            return first, max(0, last - first)
        (ys, nh), (xs, nw) = span(self.top, self.h, self.rows, self.spread[0]), span(self.left, self.w, self.cols, self.spread[1])
        return ys, nh, xs, nw

    @property
    def stride_phases(self) -> list[tuple[int, int, int, int]]:
        """``interleave``: (row phase, column phase, rows, columns) of each phase with pixels,
        row phase major: pixel (i, j) of phase (ry, rx) is pixel (ry + i * sy, rx + j * sx)."""
        (sy, sx) = self.spread
        return [(ry, rx, -(-(self.h - ry) // sy), -(-(self.w - rx) // sx))
                for ry in range(sy) for rx in range(sx) if ry < self.h and rx < self.w]


def _zero_fill(dst: str, extents: list[tuple[str, int]], vector: tuple[str, int] | None, indent: int) -> list[str]:
    """``dst = 0`` over the (var, extent) loops, skipping empty ones; ``vector``: the innermost
    loop, vectorised."""
    if any(extent <= 0 for _, extent in extents) or (vector and vector[1] <= 0):
        return []
    pad = " " * indent
    lines = [pad + f"for {', '.join(v for v, _ in extents)} in T.grid({', '.join(str(e) for _, e in extents)}):"] if extents else []
    inner = pad + ("    " if extents else "")
    if vector:
        lines += [inner + f"for {vector[0]} in T.vectorized({vector[1]}):", inner + "    " + f"{dst} = T.float32(0)"]
    else:
        lines.append(inner + f"{dst} = T.float32(0)")
    return lines


def relayout_llvm(s: RelayoutSpec) -> str:
    """One parallel task per (image or block of images, channel). Loops all start at 0 (a loop
    from a constant start lost its offset in one TVM pass); the frame's zeros are written
    around the copied window, each element once."""
    C, R, W, V = s.channels, s.rows, s.cols, s.lanes
    ys, nh, xs, nw = s.window
    (sy, sx) = s.spread
    y0, x0 = s.top + ys * sy, s.left + xs * sx
    head = prim_func_header(s.name, ["inp_h", "out_h"], ("n", "m") if s.layout == "chwn" else ("n",))
    if s.kind == "unpad":  # chwn (m, C, R, W, V) -> nchw (n, C, h, w)
        return "\n".join(head + _unpad_chwn_llvm(s)) + "\n"
    if s.kind == "interleave":
        return interleave_phases_llvm(s)
    lines = head + [f'    inp = T.match_buffer(inp_h, (n, {C}, {s.h}, {s.w}), "float32")']
    if s.layout == "chwn":  # nchw -> (m, C, R, W, V): zero the frame, then copy the window into it
        lines += [f'    out = T.match_buffer(out_h, (m, {C}, {R}, {W}, {V}), "float32")',
                  f"    for bc in T.parallel(m * {C}):"]
        lines += _zero_fill(f"out[bc // {C}, bc % {C}, y, x, v]", [("y", R), ("x", W)], ("v", V), 8)
        if nh and nw:
            lines += _pad_chwn_window_llvm(s)
        return "\n".join(lines) + "\n"
    # nchw -> nchw (n, C, R, W): zero rows above, the window's rows (zero, copy, zero), zero rows below
    if s.phases > 1:
        return "\n".join(lines + _column_phases_llvm(s)) + "\n"
    o = f"out[bc // {C}, bc % {C}"
    lines += [f'    out = T.match_buffer(out_h, (n, {C}, {R}, {W}), "float32")',
              f"    for bc in T.parallel(n * {C}):"]
    if not (nh and nw) or s.spread != (1, 1):  # zero the frame, then scatter the window into it
        lines += _zero_fill(f"{o}, y, x]", [("y", R)], ("x", W), 8)
        if nh and nw:
            lines += [f"        for y, x in T.grid({nh}, {nw}):",
                      f"            {o}, y * {sy} + {y0}, x * {sx} + {x0}] = inp[bc // {C}, bc % {C}, y + {ys}, x + {xs}]"]
        return "\n".join(lines) + "\n"
    lines += _zero_fill(f"{o}, y, x]", [("y", y0)], ("x", W), 8)
    lines.append(f"        for y in range({nh}):")
    lines += _zero_fill(f"{o}, y + {y0}, x]", [], ("x", x0), 12)
    lines += [f"            for x in T.vectorized({nw}):",
              f"                {o}, y + {y0}, x + {x0}] = inp[bc // {C}, bc % {C}, y + {ys}, x + {xs}]"]
    lines += _zero_fill(f"{o}, y + {y0}, x + {x0 + nw}]", [], ("x", W - x0 - nw), 12)
    lines += _zero_fill(f"{o}, y + {y0 + nh}, x]", [("y", R - y0 - nh)], ("x", W), 8)
    return "\n".join(lines) + "\n"


PHASE_CHUNKS = (16, 8, 4)  # lanes of a phase copy's vector pieces, widest first


def _phase_pieces(first: int, end: int, src0: int, P: int, width: int) -> list[tuple[int, int, int]]:
    """The phase columns ``[first, end)`` (column t reads source column ``t * P + src0``) cut
    into (t, lanes, window start) pieces: each loads ``P * lanes`` contiguous source columns
    from the window start, all inside the row, and keeps every P-th. Pieces may overlap; a
    piece with 1 lane is a scalar copy (where no window fits). With ``P = 1`` and ``width =
    end`` it cuts a plain row into vector pieces (``interleave_phases_llvm``)."""
    def window(t: int, lanes: int) -> int | None:
        start = min(t * P + src0, width - P * lanes)  # the window may start up to P - 1 early
        return start if start >= max(0, t * P + src0 - (P - 1)) else None

    pieces, t = [], first
    while t < end:
        # a piece that fits from t, else one ending at ``end`` that rewrites some columns
        # already copied (the same values), else one scalar column
        fits = [(t, lanes) for lanes in PHASE_CHUNKS if t + lanes <= end and window(t, lanes) is not None]
        fits += [(end - lanes, lanes) for lanes in PHASE_CHUNKS
                 if first <= end - lanes < t and window(end - lanes, lanes) is not None]
        at, lanes = max(fits, key=lambda piece: piece[1]) if fits else (t, 1)
        pieces.append((at, lanes, window(at, lanes) if lanes > 1 else at * P + src0))
        t = at + lanes
    return pieces


CHWN_PAD_IMAGES = 4  # images per shuffled piece of the copy into chwn (_pad_chwn_window_llvm)


def _pad_chwn_window_llvm(s: RelayoutSpec) -> list[str]:
    """The window of a copy into chwn, in a zeroed frame: per source row of ``CHWN_PAD_IMAGES``
    images, one load each, shuffled into that many lanes of every pixel's vector. Measured
    against element by element (batch 64, ``V=16``, in one process): 64x8x8 0.07-0.11 ->
    0.05-0.08 ms, 128x8x8 0.11-0.14 -> 0.08-0.09, 256x8x8 0.36 -> 0.31, 512x2x2 even; all 16
    images at once was slower than element by element (16 rows 16 KB apart thrash L1 sets),
    2 about as fast as 4. A last block of fewer than ``V`` images, and a window one pixel
    wide, go element by element."""
    C, V, G = s.channels, s.lanes, CHWN_PAD_IMAGES
    assert V % G == 0, "whole pieces of lanes"
    ys, nh, xs, nw = s.window
    (sy, sx) = s.spread
    y0, x0 = s.top + ys * sy, s.left + xs * sx
    b, c = f"bc // {C}", f"bc % {C}"
    by_element = [f"for v in range({V}):",
                  f"    if {b} * {V} + v < n:",
                  f"        for y, x in T.grid({nh}, {nw}):",
                  f"            out[{b}, {c}, y * {sy} + {y0}, x * {sx} + {x0}, v] = inp[{b} * {V} + v, {c}, y + {ys}, x + {xs}]"]
    if nw == 1:  # a vector needs two lanes or more
        return ["        " + line for line in by_element]
    rows = ", ".join(f"inp[{b} * {V} + vg * {G} + {g}, {c}, y + {ys}, T.ramp({xs}, 1, {nw})]" for g in range(G))
    lines = [f"        if {b} * {V} + {V} <= n:",
             f"            for vg, y in T.grid({V // G}, {nh}):"]
    lines += [f"                out[{b}, {c}, y * {sy} + {y0}, {x * sx + x0}, T.ramp(vg * {G}, 1, {G})] = "
              f"T.Shuffle([{rows}], [{', '.join(str(g * nw + x) for g in range(G))}])" for x in range(nw)]
    return lines + ["        else:"] + ["            " + line for line in by_element]


UNPAD_SHUFFLE_MIN_WIDTH = 7  # rows this wide leave chwn by in-register transposes (_unpad_chwn_llvm)


def _unpad_chwn_llvm(s: RelayoutSpec) -> list[str]:
    """chwn ``(m, C, R, W, V)`` back to nchw. Rows of at least ``UNPAD_SHUFFLE_MIN_WIDTH``:
    one task per (block of images, channel) loads each output row's ``w`` vectors (one per
    pixel, lanes = images) and shuffles out each image's row, stored whole; measured
    (``V=16``, batch 64) 64x8x8 0.09-0.18 -> 0.06-0.11 ms, 256x8x8 0.45-0.57 -> 0.21-0.30 ms,
    64x7x7 about 2x, 256x4x4 even and 512x2x2 slower (0.05-0.06 -> 0.09 ms), so narrower rows
    (and a last block of fewer than ``V`` images) copy element by element."""
    C, R, W, V, h, w = s.channels, s.rows, s.cols, s.lanes, s.h, s.w
    lines = [f'    inp = T.match_buffer(inp_h, (m, {C}, {R}, {W}, {V}), "float32")',
             f'    out = T.match_buffer(out_h, (n, {C}, {h}, {w}), "float32")']
    if w < UNPAD_SHUFFLE_MIN_WIDTH:
        return lines + [f"    for ic in T.parallel(n * {C}):",
                        f"        for y, x in T.grid({h}, {w}):",
                        f"            out[ic // {C}, ic % {C}, y, x] = inp[ic // {C} // {V}, ic % {C}, y, x, ic // {C} % {V}]"]
    b, c = f"bc // {C}", f"bc % {C}"
    pixels = ", ".join(f"inp[{b}, {c}, y, {x}, T.ramp(0, 1, {V})]" for x in range(w))
    lines += [f"    for bc in T.parallel(m * {C}):",
              f"        if {b} * {V} + {V} <= n:",
              f"            for y in range({h}):"]
    lines += [f"                out[{b} * {V} + {v}, {c}, y, T.ramp(0, 1, {w})] = "
              f"T.Shuffle([{pixels}], [{', '.join(str(x * V + v) for x in range(w))}])" for v in range(V)]
    return lines + [f"        else:",
                    f"            for v in range({V}):",
                    f"                if {b} * {V} + v < n:",
                    f"                    for y, x in T.grid({h}, {w}):",
                    f"                        out[{b} * {V} + v, {c}, y, x] = inp[{b}, {c}, y, x, v]"]


def interleave_phases_llvm(s: RelayoutSpec) -> str:
    """The stride phases of a strided conv's grad-input (one nchw buffer each, ``s.stride_phases``)
    woven into the gradient: one task per (image, channel); each output row of row phase ry
    takes, per piece of ``L`` phase columns, one contiguous load from each of its column
    phases and one shuffle interleaving them into ``sx * L`` contiguous columns. Columns no
    piece covers (each phase's last ones, where the phases differ in width) are copied one by
    one. Torch's four strided assignments at stride 2 cost 27-60 % of such a grad-input
    (0.36-1.05 ms on ResNet-20's stride-2 layers at batch 64)."""
    C, (sy, sx), h, w = s.channels, s.spread, s.h, s.w
    phases = s.stride_phases
    names = {(ry, rx): f"ph{ry}{rx}" for ry, rx, _, _ in phases}
    lines = prim_func_header(s.name, [f"{names[ry, rx]}_h" for ry, rx, _, _ in phases] + ["out_h"], ("n",))
    lines += [f'    {names[ry, rx]} = T.match_buffer({names[ry, rx]}_h, (n, {C}, {qh}, {qw}), "float32")'
              for ry, rx, qh, qw in phases]
    lines += [f'    out = T.match_buffer(out_h, (n, {C}, {h}, {w}), "float32")',
              f"    for bc in T.parallel(n * {C}):"]
    b, c = f"bc // {C}", f"bc % {C}"
    for ry in range(min(sy, h)):
        row = [(rx, qw) for py, rx, _, qw in phases if py == ry]
        lines.append(f"        for q in range({-(-(h - ry) // sy)}):")
        common = min(qw for _, qw in row) if len(row) == sx else 0  # phase columns every phase has
        covered = 0
        # vector pieces over the columns every phase has (a row read in place: one phase, the
        # window its own); narrower rows and the rest go column by column below
        for t, lanes, _ in _phase_pieces(0, common, 0, 1, common):
            if lanes == 1:
                continue
            loads = ", ".join(f"{names[ry, rx]}[{b}, {c}, q, T.ramp({t}, 1, {lanes})]" for rx, _ in row)
            order = ", ".join(str(rx * lanes + i) for i in range(lanes) for rx in range(sx))
            lines.append(f"            out[{b}, {c}, q * {sy} + {ry}, T.ramp({t * sx}, 1, {sx * lanes})] = "
                         f"T.Shuffle([{loads}], [{order}])")
            covered = max(covered, t + lanes)
        for x in range(covered * sx, w):  # the rest, column by column
            lines.append(f"            out[{b}, {c}, q * {sy} + {ry}, {x}] = {names[ry, x % sx]}[{b}, {c}, q, {x // sx}]")
    return "\n".join(lines) + "\n"


def _column_phases_llvm(s: RelayoutSpec) -> list[str]:
    """The body of a ``phases`` copy: zero every phase's frame, then per phase p copy the source
    columns that land on frame columns p, p + P, ... Each piece of a phase row is one
    contiguous load of P vectors' worth of the source row and a shuffle keeping every P-th
    lane (one ``vpermt2ps`` per vector on AVX-512): the strided read lane by lane made this copy
    cost 10x a plain pad (0.75 against 0.07 ms on a 16-channel 32x32 batch of 64) and more
    than half a stride-2 forward."""
    C, R, P = s.channels, s.rows, s.phases
    width = -(-s.cols // P)
    ys, nh, _, _ = s.window
    y0 = s.top + ys
    lines = [f'    out = T.match_buffer(out_h, ({P}, n, {C}, {R}, {width}), "float32")',
             f"    for bc in T.parallel(n * {C}):"]
    lines += _zero_fill(f"out[p, bc // {C}, bc % {C}, y, x]", [("p", P), ("y", R)], ("x", width), 8)
    if not nh:
        return lines
    lines.append(f"        for y in range({nh}):")
    row_in, row_out = f"bc // {C}, bc % {C}, y + {ys}", f"bc // {C}, bc % {C}, y + {y0}"
    for p in range(P):
        first = max(0, -(-(s.left - p) // P))  # phase column t holds frame column t*P + p = source t*P + p - left
        end = min((s.w - 1 + s.left - p) // P + 1, (s.cols - 1 - p) // P + 1)
        for t, lanes, start in _phase_pieces(first, end, p - s.left, P, s.w):
            if lanes == 1:
                lines.append(f"            out[{p}, {row_out}, {t}] = inp[{row_in}, {start}]")
                continue
            keep = ", ".join(str(t * P + p - s.left - start + P * i) for i in range(lanes))
            lines.append(f"            out[{p}, {row_out}, T.ramp({t}, 1, {lanes})] = "
                         f"T.Shuffle([inp[{row_in}, T.ramp({start}, 1, {P * lanes})]], [{keep}])")
    return lines


def gather_weights_llvm(name: str, k: int) -> str:
    """``out[j, t] = w[widx[j, t]]``: the kept weights of a layer in a kernel's order, one pass."""
    return "\n".join(prim_func_header(name, ["w_h", "widx_h", "out_h"], ("kk", "m")) + [
        '    w = T.match_buffer(w_h, (m,), "float32")',
        f'    widx = T.match_buffer(widx_h, (kk, {k}), "int32")',
        f'    out = T.match_buffer(out_h, (kk, {k}), "float32")',
        "    for j in T.parallel(kk):",
        f"        for t in T.unroll({k}):",
        "            out[j, t] = w[widx[j, t]]"]) + "\n"

"""Generated BatchNorm kernels for training (CPU): statistics, normalisation and the ReLU
(and a residual add before it) in one pass per channel, forward and backward.

Why: after pattern pruning the convs of a small CNN no longer dominate its training step.
torch's CPU BatchNorm in training mode takes about 1 ns per element (64x16x32x32: 1.2 ms
forward, 2.3 ms with its backward, where copying the tensor takes 0.06 ms), and the ReLU and
the residual add after it each walk the tensor again, forward and backward. Here one task
per channel reads its slice (a few hundred KB at most, so it stays in L2 between passes):

forward  -- mean (pass 1), biased variance around it (pass 2: two passes, not E[x^2] - m^2,
            so a large mean does not cancel the variance away), then
            ``y = relu(x * scale + shift [+ residual])`` (pass 3). It also stores per channel
            (mean, 1/sqrt(var + eps), var, scale, shift) for the backward and the running
            statistics.
backward -- ``g = dy`` where the ReLU passed (else 0) [and the residual's gradient, which is
            g]; pass 1 sums g and g * (x - mean), pass 2 writes
            ``dx = gamma * invstd * (g - mean(g) - (x - mean) * invstd^2 * mean(g * (x - mean)))``
            and the weight's and bias's gradients are the two sums. Without a residual the
            ReLU's mask is recomputed from x (the forward's own expression, so the same bits),
            and with one pass 2 reads g back from the residual's gradient: each pass reads
            two tensors besides dy, not three. In a training step these tensors come from
            memory, not cache (64x16x32x32 with its backward: 1.9 ms cold against 0.7 ms hot).

``bn_relu_maxpool`` also takes the 2x2, stride-2 max pool after the ReLU (VGG's blocks):
the forward writes only the pooled output, a quarter of the tensor, and the backward
recomputes each window's winner from x (torch's rule: the first largest in row-major order)
instead of reading saved indices, routing the pooled gradient to it in dx (one scalar pass
over the windows); the sums and dx then run over dx in place, vectorised. Windows cover
every element once (a ``ceil_mode`` pool on odd sizes has partial windows at the last row
and column; without ``ceil_mode`` the sizes must be even). Measured (session 10, VGG-11/4's blocks): torch's
``max_pool2d`` in training mode took 3 ns an element, more than its BatchNorm.

The batch is symbolic (one kernel serves every batch size); channels, pixels per channel,
eps and the fused ops are constants. Each pass is vectorised along a channel's pixels of one
image: ``pixels // lanes`` full vectors and a scalar tail into the first lanes; the pooled
passes walk the windows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .templates import prim_func_header

FUSIONS = ("bn", "bn_relu", "bn_add_relu", "bn_relu_maxpool")  # what follows the BatchNorm inside the kernel


@dataclass(frozen=True)
class BatchNormSpec:
    channels: int
    pixels: int      # H * W
    fusion: str      # one of FUSIONS
    eps: float
    lanes: int
    width: int = 0   # W, for the pool (bn_relu_maxpool)
    ceil: bool = False  # the pool's ceil_mode: partial windows at an odd last row / column

    def __post_init__(self):
        assert self.fusion in FUSIONS, self.fusion
        if self.pooled:
            assert self.width and self.pixels % self.width == 0, "a pool needs the map's width"
            assert self.ceil or (self.height % 2 == 0 and self.width % 2 == 0), "floor mode: even sizes only"

    @property
    def relu(self) -> bool:
        return self.fusion != "bn"

    @property
    def residual(self) -> bool:
        return self.fusion == "bn_add_relu"

    @property
    def pooled(self) -> bool:
        return self.fusion == "bn_relu_maxpool"

    @property
    def height(self) -> int:
        return self.pixels // self.width

    @property
    def pooled_hw(self) -> tuple[int, int]:
        """(H, W) of the pooled output (``ceil_mode``, or even sizes: one formula)."""
        return -(-self.height // 2), -(-self.width // 2)

    @property
    def out_pixels(self) -> int:
        """Pixels per channel of the output: the pooled map's, or the input's."""
        if not self.pooled:
            return self.pixels
        oh, ow = self.pooled_hw
        return oh * ow

    def name(self, kind: str) -> str:
        eps = f"{self.eps:.3g}".replace(".", "p").replace("-", "m")
        pool = f"_w{self.width}{'c' if self.ceil else 'f'}" if self.pooled else ""
        return f"ct_{self.fusion}_{kind}_c{self.channels}_p{self.pixels}{pool}_e{eps}_v{self.lanes}"


def _head(name: str, params: list[str]) -> list[str]:
    return prim_func_header(name, [p + "_h" for p in params], ("n",))


def _buffer(name: str, shape: str, present: bool = True) -> str:
    """A parameter's buffer; an absent optional one (no residual, no ReLU mask) is a dummy of one float."""
    return f'    {name} = T.match_buffer({name}_h, {shape if present else "(1,)"}, "float32")'


def _over_channel(s: BatchNormSpec, indent: int, body) -> list[str]:
    """``body(b, i, lane)`` (lines) for every pixel ``i`` of image ``b`` of channel ``c``:
    full vectors, then the tail (``lane``: the accumulator lane the pixel adds into)."""
    V, P = s.lanes, s.pixels
    pad = " " * indent
    lines = []
    if P // V:
        lines += [f"{pad}for b, i in T.grid(n, {P // V}):", f"{pad}    for v in T.vectorized({V}):"]
        lines += [f"{pad}        {line}" for line in body("b", f"i * {V} + v", "v")]
    if P % V:
        lines += [f"{pad}for b, i in T.grid(n, {P % V}):"]
        lines += [f"{pad}    {line}" for line in body("b", f"{P // V * V} + i", "i")]
    return lines


def _sum_lanes(s: BatchNormSpec, accs: list[tuple[str, str]], indent: int) -> list[str]:
    """``target = sum of acc's lanes`` for each (target, acc)."""
    pad = " " * indent
    lines = [f"{pad}{target} = T.float32(0)" for target, _ in accs]
    lines.append(f"{pad}for v in range({s.lanes}):")
    lines += [f"{pad}    {target} = {target} + {acc}[v]" for target, acc in accs]
    return lines


def _zero(accs: list[str], s: BatchNormSpec, indent: int) -> list[str]:
    pad = " " * indent
    return [f"{pad}for v in T.vectorized({s.lanes}):"] + [f"{pad}    {a}[v] = T.float32(0)" for a in accs]


def _over_windows(s: BatchNormSpec, indent: int, body) -> list[str]:
    """``body(b, o, taps)`` (lines) for every 2x2 pool window of image ``b`` of channel ``c``:
    ``o`` its pooled pixel, ``taps`` the flat input pixels it covers in row-major order (one
    or two in the partial windows of an odd last row or column)."""
    H, W = s.height, s.width
    OW = -(-W // 2)
    pad = " " * indent
    regions = [(H // 2, "oy", (0, 1)), (H % 2, f"{H // 2}", (0,))]
    columns = [(W // 2, "ox", (0, 1)), (W % 2, f"{W // 2}", (0,))]
    lines = []
    for rows, oy, dys in regions:
        for cols, ox, dxs in columns:
            if not rows or not cols:
                continue
            loops = ["b"] + (["oy"] if oy == "oy" else []) + (["ox"] if ox == "ox" else [])
            extents = ["n"] + ([str(rows)] if oy == "oy" else []) + ([str(cols)] if ox == "ox" else [])
            lines.append(f"{pad}for {', '.join(loops)} in T.grid({', '.join(extents)}):")
            taps = [f"({oy} * 2 + {dy}) * {W} + {ox} * 2 + {dx}" for dy in dys for dx in dxs]
            lines += [f"{pad}    {line}" for line in body("b", f"{oy} * {OW} + {ox}", taps)]
    return lines


def _window_winner(b: str, taps: list[str], scale: str, shift: str, gradient: str = "") -> list[str]:
    """Lines putting the ReLU's output at each tap in ``r``, the window's maximum in ``win[0]``
    and its winning tap in ``arg``, as torch's max_pool2d picks it: the first largest in
    row-major order. (Its rule also lets a NaN win; after a BatchNorm a NaN in x makes its
    channel's statistics NaN, hence every value of the channel, and the first tap wins either
    way.) The backward's pooled ``gradient`` goes to ``win[1]`` first, loaded unconditionally:
    under a select, the load made LLVM emit a branch per tap, mispredicted on random data
    (backward 4.3 ms against 1.0-1.3 for 64x16x28x28)."""
    lines = [f"win[1] = {gradient}"] if gradient else []
    lines += [f"r[{k}] = {_relu(_normalised(b, tap, scale, shift))}" for k, tap in enumerate(taps)]
    # the winning tap as a float, so that every select of the window is a float select
    lines += ["win[0] = r[0]", "arg[0] = T.float32(0)"]
    for k in range(1, len(taps)):
        takes = f"r[{k}] > win[0]"
        lines += [f"arg[0] = T.Select({takes}, T.float32({k}), arg[0])", f"win[0] = T.Select({takes}, r[{k}], win[0])"]
    return lines


def _relu(value: str) -> str:
    """Zero where negative, as a select that keeps a NaN (a max would turn it into 0, hiding
    divergence)."""
    return f"T.Select({value} < T.float32(0), T.float32(0), {value})"


def _normalised(b: str, i: str, scale: str, shift: str) -> str:
    """``x * scale + shift``: one expression for the forward's output and the backward's mask."""
    return f"x[{b}, c, {i}] * {scale} + {shift}"


def batchnorm_forward_llvm(s: BatchNormSpec) -> str:
    """(x, gamma, beta, residual, y, stats): ``stats`` (5, C) gets mean, invstd, biased var,
    scale and shift."""
    C, P = s.channels, s.pixels
    count = f"T.Cast('float32', n * {P})"
    lines = _head(s.name("fwd"), ["x", "gamma", "beta", "res", "y", "stats"]) + [
        _buffer("x", f"(n, {C}, {P})"),
        _buffer("gamma", f"({C},)"),
        _buffer("beta", f"({C},)"),
        _buffer("res", f"(n, {C}, {P})", s.residual),
        _buffer("y", f"(n, {C}, {s.out_pixels})"),
        _buffer("stats", f"(5, {C})"),
        f"    for c in T.parallel({C}):",
        f'        acc = T.alloc_buffer(({s.lanes},), "float32", scope="global")',
        # mean, invstd, scale, shift, var
        '        m = T.alloc_buffer((5,), "float32", scope="global")'] + _window_buffers(s)
    lines += _zero(["acc"], s, 8)
    lines += _over_channel(s, 8, lambda b, i, v: [f"acc[{v}] = acc[{v}] + x[{b}, c, {i}]"])
    lines += _sum_lanes(s, [("m[0]", "acc")], 8) + [f"        m[0] = m[0] / {count}"]
    lines += _zero(["acc"], s, 8)
    lines += _over_channel(s, 8, lambda b, i, v: [
        f"acc[{v}] = acc[{v}] + (x[{b}, c, {i}] - m[0]) * (x[{b}, c, {i}] - m[0])"])
    lines += _sum_lanes(s, [("m[4]", "acc")], 8) + [
        f"        m[4] = m[4] / {count}",
        f"        m[1] = T.float32(1) / T.sqrt(m[4] + T.float32({s.eps!r}))",
        "        m[2] = gamma[c] * m[1]",
        "        m[3] = beta[c] - m[0] * m[2]",
        "        stats[0, c] = m[0]",
        "        stats[1, c] = m[1]",
        "        stats[2, c] = m[4]",
        "        stats[3, c] = m[2]",
        "        stats[4, c] = m[3]"]

    def out(b, i, v):
        value = _normalised(b, i, "m[2]", "m[3]") + (f" + res[{b}, c, {i}]" if s.residual else "")
        return [f"y[{b}, c, {i}] = " + (_relu(value) if s.relu else value)]
    if s.pooled:
        lines += _over_windows(s, 8, lambda b, o, taps: _window_winner(b, taps, "m[2]", "m[3]") +
                               [f"y[{b}, c, {o}] = win[0]"])
    else:
        lines += _over_channel(s, 8, out)
    return "\n".join(lines) + "\n"


def _window_buffers(s: BatchNormSpec) -> list[str]:
    """A pool window's ReLU outputs (``r``), its maximum (``win[0]``; ``win[1]``: the backward's
    pooled gradient) and its winning tap (``arg``): scalars LLVM keeps in registers."""
    if not s.pooled:
        return []
    return ['        r = T.alloc_buffer((4,), "float32", scope="global")',
            '        win = T.alloc_buffer((2,), "float32", scope="global")',
            '        arg = T.alloc_buffer((1,), "float32", scope="global")']


def batchnorm_backward_llvm(s: BatchNormSpec) -> str:
    """(dy, x, y, stats, dx, dres, dparams): ``dparams`` (2, C) gets the gradients of gamma
    and beta; ``dres`` the residual's (``g``); ``y`` is read for the ReLU's mask where there
    is a residual."""
    C, P = s.channels, s.pixels
    count = f"T.Cast('float32', n * {P})"
    lines = _head(s.name("bwd"), ["dy", "x", "y", "stats", "dx", "dres", "dparams"]) + [
        _buffer("dy", f"(n, {C}, {s.out_pixels})"),
        _buffer("x", f"(n, {C}, {P})"),
        _buffer("y", f"(n, {C}, {P})", s.residual),
        _buffer("stats", f"(5, {C})"),
        _buffer("dx", f"(n, {C}, {P})"),
        _buffer("dres", f"(n, {C}, {P})", s.residual),
        _buffer("dparams", f"(2, {C})"),
        f"    for c in T.parallel({C}):",
        f'        sg = T.alloc_buffer(({s.lanes},), "float32", scope="global")',
        f'        sgx = T.alloc_buffer(({s.lanes},), "float32", scope="global")',
        # mean, invstd, sum g, sum g(x - mean), mean g, the centred term's factor, scale, shift
        '        m = T.alloc_buffer((8,), "float32", scope="global")',
        "        m[0] = stats[0, c]",
        "        m[1] = stats[1, c]",
        "        m[6] = stats[3, c]",
        "        m[7] = stats[4, c]"] + _window_buffers(s)

    def g(b, i):
        """dy where the ReLU passed: torch's mask (no gradient where y <= 0), as a select (TVM
        lowers if_then_else to a branch per element: 8x slower). Pooled: what the windows'
        pass routed into ``dx``."""
        if s.pooled:
            return f"dx[{b}, c, {i}]"
        if not s.relu:
            return f"dy[{b}, c, {i}]"
        before = f"y[{b}, c, {i}]" if s.residual else _normalised(b, i, "m[6]", "m[7]")
        return f"T.Select({before} <= T.float32(0), T.float32(0), dy[{b}, c, {i}])"

    def sums(b, i, v):
        lines = [f"sg[{v}] = sg[{v}] + {g(b, i)}", f"sgx[{v}] = sgx[{v}] + {g(b, i)} * (x[{b}, c, {i}] - m[0])"]
        return lines + ([f"dres[{b}, c, {i}] = {g(b, i)}"] if s.residual else [])
    if s.pooled:
        # each window routes its pooled gradient to its winner, into dx (pass 0, scalar);
        # the sums and dx then run vectorised over dx in place, as without the pool
        lines += _over_windows(s, 8, lambda b, o, taps: _window_winner(b, taps, "m[6]", "m[7]", f"dy[{b}, c, {o}]") + [
            f"dx[{b}, c, {tap}] = {_pooled_g(b, o, k)}" for k, tap in enumerate(taps)])
    lines += _zero(["sg", "sgx"], s, 8)
    lines += _over_channel(s, 8, sums)
    lines += _sum_lanes(s, [("m[2]", "sg"), ("m[3]", "sgx")], 8) + [
        "        dparams[0, c] = m[3] * m[1]",
        "        dparams[1, c] = m[2]",
        f"        m[4] = m[2] / {count}",
        f"        m[5] = m[1] * m[1] * m[3] / {count}"]
    lines += _over_channel(s, 8, lambda b, i, v: [
        f"dx[{b}, c, {i}] = m[6] * ({f'dres[{b}, c, {i}]' if s.residual else g(b, i)} - m[4]"
        f" - (x[{b}, c, {i}] - m[0]) * m[5])"])
    return "\n".join(lines) + "\n"


def _pooled_g(b: str, o: str, k: int) -> str:
    """The gradient reaching tap ``k`` of window ``o``: the pooled gradient (``win[1]``, loaded
    by ``_window_winner``'s caller) where the tap won and the ReLU passed (torch's masks: no
    gradient where its output is <= 0)."""
    return f"T.Select(arg[0] == T.float32({k}), T.Select(r[{k}] <= T.float32(0), T.float32(0), win[1]), T.float32(0))"


@dataclass
class BatchNormKernels:
    forward: object
    backward: object
    sources: dict  # name -> TVMScript, for the dump


_built: dict[tuple, BatchNormKernels] = {}
_starting: dict[tuple, object] = {}  # the same keys -> a function that collects kernels being built


def start_batchnorm_kernels(spec: BatchNormSpec, target) -> None:
    """Start compiling the spec's two kernels, to be collected by ``batchnorm_kernels``: start
    every layer's first, and the compile workers build them side by side."""
    from .cache import start_compile
    key = (spec, target.description)
    if key not in _built and key not in _starting:
        sources = {spec.name("fwd"): batchnorm_forward_llvm(spec), spec.name("bwd"): batchnorm_backward_llvm(spec)}
        started = {name: start_compile(name, source, target) for name, source in sources.items()}
        _starting[key] = lambda: BatchNormKernels(*[result()[0][name] for name, result in started.items()],
                                                  sources=sources)


def batchnorm_kernels(spec: BatchNormSpec, target) -> BatchNormKernels:
    """The spec's two kernels, compiled (or loaded from the compile cache) once per process."""
    key = (spec, target.description)
    if key not in _built:
        start_batchnorm_kernels(spec, target)
        _built[key] = _starting.pop(key)()
    return _built[key]

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

The batch is symbolic (one kernel serves every batch size); channels, pixels per channel,
eps and the fused ops are constants. Each pass is vectorised along a channel's pixels of one
image: ``pixels // lanes`` full vectors and a scalar tail into the first lanes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .templates import prim_func_header

FUSIONS = ("bn", "bn_relu", "bn_add_relu")  # what follows the BatchNorm inside the kernel


@dataclass(frozen=True)
class BatchNormSpec:
    channels: int
    pixels: int      # H * W
    fusion: str      # one of FUSIONS
    eps: float
    lanes: int

    def __post_init__(self):
        assert self.fusion in FUSIONS, self.fusion

    @property
    def relu(self) -> bool:
        return self.fusion != "bn"

    @property
    def residual(self) -> bool:
        return self.fusion == "bn_add_relu"

    def name(self, kind: str) -> str:
        eps = f"{self.eps:.3g}".replace(".", "p").replace("-", "m")
        return f"ct_{self.fusion}_{kind}_c{self.channels}_p{self.pixels}_e{eps}_v{self.lanes}"


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
        _buffer("y", f"(n, {C}, {P})"),
        _buffer("stats", f"(5, {C})"),
        f"    for c in T.parallel({C}):",
        f'        acc = T.alloc_buffer(({s.lanes},), "float32", scope="global")',
        # mean, invstd, scale, shift, var
        '        m = T.alloc_buffer((5,), "float32", scope="global")']
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
        # zero where negative, as a select that keeps a NaN (a max would turn it into 0, hiding divergence)
        relu = f"T.Select({value} < T.float32(0), T.float32(0), {value})"
        return [f"y[{b}, c, {i}] = " + (relu if s.relu else value)]
    lines += _over_channel(s, 8, out)
    return "\n".join(lines) + "\n"


def batchnorm_backward_llvm(s: BatchNormSpec) -> str:
    """(dy, x, y, stats, dx, dres, dparams): ``dparams`` (2, C) gets the gradients of gamma
    and beta; ``dres`` the residual's (``g``); ``y`` is read for the ReLU's mask where there
    is a residual."""
    C, P = s.channels, s.pixels
    count = f"T.Cast('float32', n * {P})"
    lines = _head(s.name("bwd"), ["dy", "x", "y", "stats", "dx", "dres", "dparams"]) + [
        _buffer("dy", f"(n, {C}, {P})"),
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
        "        m[7] = stats[4, c]"]

    def g(b, i):
        """dy where the ReLU passed: torch's mask (no gradient where y <= 0), as a select (TVM
        lowers if_then_else to a branch per element: 8x slower)."""
        if not s.relu:
            return f"dy[{b}, c, {i}]"
        before = f"y[{b}, c, {i}]" if s.residual else _normalised(b, i, "m[6]", "m[7]")
        return f"T.Select({before} <= T.float32(0), T.float32(0), dy[{b}, c, {i}])"

    def sums(b, i, v):
        lines = [f"sg[{v}] = sg[{v}] + {g(b, i)}", f"sgx[{v}] = sgx[{v}] + {g(b, i)} * (x[{b}, c, {i}] - m[0])"]
        return lines + ([f"dres[{b}, c, {i}] = {g(b, i)}"] if s.residual else [])
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


@dataclass
class BatchNormKernels:
    forward: object
    backward: object
    sources: dict  # name -> TVMScript, for the dump


_built: dict[tuple, BatchNormKernels] = {}


def batchnorm_kernels(spec: BatchNormSpec, target) -> BatchNormKernels:
    """The spec's two kernels, compiled (or loaded from the compile cache) once per process."""
    from .cache import start_compile
    key = (spec, target.description)
    if key not in _built:
        sources = {spec.name("fwd"): batchnorm_forward_llvm(spec), spec.name("bwd"): batchnorm_backward_llvm(spec)}
        started = {name: start_compile(name, source, target) for name, source in sources.items()}
        funcs = [result()[0][name] for name, result in started.items()]
        _built[key] = BatchNormKernels(*funcs, sources=sources)
    return _built[key]

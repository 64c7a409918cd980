"""The autograd bridge from a hardened prunable conv to its generated kernels.

``PatternConv2d`` replaces ``torch.conv2d`` for a prunable conv when the target is llvm or
cuda. It takes the dense weight, so optimizers and state_dict keep the dense parameter
API: the kernels read the kept weights straight from it (no compact copy per call: on CPU at
addresses computed from the layout's runs, on CUDA through ``K x k`` flat positions), and
grad-weight writes the kept weights' gradients into a zeroed dense gradient, so pruned
entries get exact zeros. Tensors cross to TVM through DLPack without copies. The weight arrives unmasked (its PatternMask
skips the multiply, ``consumers_mask``): the generated kernels read kept weights only, and
where torch's conv runs a kind instead it gets the weight with the pruned entries zeroed here.
"""

from __future__ import annotations

import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetError
from ..patterns import DROPPED
from .kernel_call import call_kernel as _call
from .masks import PatternMask, Phase


def _pad_to(x: torch.Tensor, top: int, left: int, rows: int, cols: int) -> torch.Tensor:
    """Pad (or crop, where negative) so the result is ``rows x cols`` with ``x`` at (top, left)."""
    h, w = x.shape[-2:]
    pads = (left, cols - w - left, top, rows - h - top)
    return x.contiguous() if not any(pads) else F.pad(x, pads).contiguous()  # F.pad would copy even then


KINDS = ("forward", "grad_input", "grad_weight")
# the LayerIndex arrays each kernel takes, in its parameter order (templates.DIRECT_PARAMS, GRAD_WEIGHT_PARAMS);
# widx is read by the CUDA kernels only (CPU kernels compute each weight's address)
FWD_INDEX = ("fwd_widx", "fwd_ptr", "fwd_src", "fwd_perm")
BWD_INDEX = ("bwd_widx", "bwd_ptr", "bwd_src", "bwd_perm")
GRAD_WEIGHT_INDEX = ("gw_filter", "gw_channel", "gw_weight_index", "gw_pattern_ptr")
TUNING_METHOD = "glue-min-snake-warm3x9"  # part of the tuning key: choices made by an older LayerRunner.tune are not reused
WARMUP_CALLS = 3  # per generated kernel before LayerRunner.tune times it


class LayerRunner:
    """Compiled kernels + index arrays of one layer for one input size, and, per kernel kind,
    whether the generated kernel or torch's dense conv on the masked weight runs it
    (``use``: kind -> True for generated). Both compute the same numbers."""

    def __init__(self, kernels, index, use: dict | None = None):
        self.kernels, self.index = kernels, index
        self.geometry = kernels.plan.geometry
        self.use = use or {kind: True for kind in KINDS}

    def masked(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as torch's dense conv must see it: pruned entries exactly zero (a fill,
        not a multiply: a non-finite pruned entry must not leak in)."""
        return weight.detach().masked_fill(self.index.pruned, 0)

    # -- generated kernels -----------------------------------------------------------------
    def _relayout(self, role: str, x: torch.Tensor, batch: int) -> torch.Tensor | None:
        """``x`` copied by the generated copy of ``role`` (``plan_relayouts``), or None where
        the plan has none (torch copies it)."""
        spec = self.kernels.plan.relayouts.get(role)
        if spec is None:
            return None
        out = torch.empty(spec.out_shape(batch), device=x.device)
        _call(self.kernels.relayouts[role], x.float().contiguous(), out)
        return out

    def _padded(self, spec, x, top, left, extent, role: str = ""):
        """A kernel's input buffer: ``x`` padded to ``extent``, in the kernel's layout, by the
        generated copy of ``role`` (every llvm plan has one for each role); CUDA's plans have
        none and their nchw frames are padded by torch."""
        copied = self._relayout(role, x, x.shape[0]) if role else None
        if copied is not None:
            return copied
        assert spec.layout == "nchw" and getattr(spec, "phases", 1) == 1, "chwn and phases are llvm-only"
        return _pad_to(x.float(), top, left, *extent)

    def pad_input(self, x, spec=None):
        """The padded input of the forward kernel (or of ``spec``: its layout and extent)."""
        g = self.geometry
        plan = self.kernels.plan
        role = "forward_in" if spec is None or plan.grad_weight_reads_forward_input else "grad_weight_in"
        spec = spec or plan.forward
        return self._padded(spec, x, g.padding[0], g.padding[1], (spec.in_h, spec.in_w), role)

    def _run_direct(self, func, spec, role, xpad, weight, widx, ptr, src, perm, bias, channels: int, batch: int,
                    h: int, w: int):
        """Run a direct-conv kernel (forward or grad-input) on its padded input, reading the
        dense ``weight``; the result as ``(batch, channels, h, w)``, whatever the kernel's
        layout (a chwn result copied back by the generated copy of ``role``)."""
        weight = weight.detach()
        if spec.gathered_weight:  # the kept weights in this kernel's order, (kept kernels, k)
            gathered = torch.empty(widx.shape[0], spec.k, device=weight.device)
            _call(self.kernels.gather_weights, weight.reshape(-1), widx, gathered)
            weight = gathered
        else:
            weight = weight.reshape(-1)
        if spec.layout == "chwn":
            out = torch.empty(xpad.shape[0], channels, spec.out_h, spec.out_w, spec.lanes, device=xpad.device)
            _call(func, xpad, weight, widx, ptr, src, perm, bias, out)
            return self._relayout(role, out, batch)  # chwn is llvm-only: its plan has the copy back
        assert spec.out_extent == (h, w), "an nchw kernel stores the true-size output (plan_kernels)"
        out = torch.empty(batch, channels, h, w, device=xpad.device)
        _call(func, xpad, weight, widx, ptr, src, perm, bias, out)
        return out

    def forward_generated(self, xpad, weight, bias, batch: int):
        g, plan, idx = self.geometry, self.kernels.plan, self.index
        b = bias.detach().float().contiguous() if bias is not None else idx.bias_zeros(g.out_channels, xpad)
        return self._run_direct(self.kernels.forward, plan.forward, "forward_out", xpad, weight,
                                *map(idx.handle, FWD_INDEX), b,
                                g.out_channels, batch, g.out_h, g.out_w)

    def forward(self, x, weight, bias):
        """(output, padded input for grad-weight or None)."""
        if self.use["forward"]:
            xpad = self.pad_input(x)
            return self.forward_generated(xpad, weight, bias, x.shape[0]), xpad
        g = self.geometry
        return F.conv2d(x, self.masked(weight), None if bias is None else bias.detach(), g.stride, g.padding,
                        g.dilation), None

    def grad_input(self, dout, weight, x_shape=None):
        g, plan, idx = self.geometry, self.kernels.plan, self.index
        if not self.use["grad_input"]:
            return torch.ops.aten.convolution_backward(
                dout, torch.empty(x_shape or (dout.shape[0], g.in_channels, g.in_h, g.in_w), device=dout.device),
                self.masked(weight), None, list(g.stride), list(g.padding), list(g.dilation), False, [0, 0], 1,
                [True, False, False])[0]
        (sh, sw), (dh, dw) = g.stride, g.dilation
        gi = plan.grad_input
        # zero insertion turns the strided conv's gradient into a stride-1 one (the generated
        # copy spreads and pads in one pass)
        upad = self._relayout("grad_input_in", dout, dout.shape[0])
        if upad is None:
            if (sh, sw) != (1, 1):
                up = dout.new_zeros(*dout.shape[:2], (g.out_h - 1) * sh + 1, (g.out_w - 1) * sw + 1)
                up[:, :, ::sh, ::sw] = dout
            else:
                up = dout
            upad = self._padded(gi, up, 2 * dh - g.padding[0], 2 * dw - g.padding[1], (gi.in_h, gi.in_w))
        index = (*map(idx.handle, BWD_INDEX), idx.bias_zeros(g.in_channels, dout))
        if plan.grad_input_phases:  # one stride-1 kernel per stride phase of the input, interleaved
            phases = [self._run_direct(func, spec, "", upad, weight, *index, g.in_channels, dout.shape[0], *spec.stored)
                      for (_, spec), func in zip(plan.grad_input_phases, self.kernels.grad_input_phases)]
            grad = torch.empty(dout.shape[0], g.in_channels, g.in_h, g.in_w, device=dout.device)
            if "grad_input_out" in self.kernels.relayouts:  # the generated interleave
                _call(self.kernels.relayouts["grad_input_out"], *phases, grad)
            else:
                for ((ry, rx), _), phase in zip(plan.grad_input_phases, phases):
                    grad[:, :, ry::sh, rx::sw] = phase
            return grad
        return self._run_direct(self.kernels.grad_input, plan.grad_input, "grad_input_out", upad, weight, *index,
                                g.in_channels, dout.shape[0], g.in_h, g.in_w)

    def grad_weight(self, dout, x, xpad, weight):
        """Dense gradient holding the kept weights' gradients and exact zeros elsewhere."""
        plan, idx, g = self.kernels.plan, self.index, self.geometry
        if not self.use["grad_weight"]:
            full = torch.ops.aten.convolution_backward(
                dout, x, weight.detach(), None, list(g.stride), list(g.padding), list(g.dilation), False, [0, 0], 1,
                [False, True, False])[1]
            return full.masked_fill_(idx.pruned, 0)  # the kept weights' gradients and exact zeros, as the kernel's
        if xpad is None or not plan.grad_weight_reads_forward_input:
            xpad = self.pad_input(x, plan.grad_weight)
        dpad = self._relayout("grad_weight_dout", dout, dout.shape[0])
        if dpad is None:  # nchw at the gradient's own extent (no copy planned), or CUDA's plan (torch pads)
            dpad = _pad_to(dout.float(), 0, 0, plan.grad_weight.out_h, plan.grad_weight.out_w)
        grad = torch.zeros(plan.grad_weight.gradient_size, device=weight.device)  # + scratch for short blocks
        _call(self.kernels.grad_weight, dpad, xpad, *map(idx.handle, GRAD_WEIGHT_INDEX), grad)
        return grad[:weight.numel()].view_as(weight).to(weight.dtype)

    # -- measured choice -------------------------------------------------------------------
    def tune(self, x_shape, weight, bias, repeats: int = 9) -> dict:
        """Time each kind both ways on random data of the real batch size, glue included
        (padding, layout changes, zeroing the pruned weights for torch), and keep the faster. The two
        ways run alternately and compare by their fastest run: on a shared machine a burst
        of load elsewhere then cannot decide the choice. Each generated kernel first runs
        ``WARMUP_CALLS`` times: the first layer tuned makes the process's first TVM calls
        (its thread pool starting, the new kernels' pages faulting in), and with one warm-up
        call the main job's first prunable layer read its forward 0.70 against torch's 0.64
        ms, then 0.39 against 0.66 ms in every later tuning (session 10)."""
        from ..machine import fastest_alternating
        w, g = weight.detach(), self.geometry
        x = torch.randn(x_shape, device=weight.device)
        dout = torch.randn_like(F.conv2d(x, w, None, g.stride, g.padding, g.dilation))
        generated, dense = self._with(**dict.fromkeys(KINDS, True)), self._with(**dict.fromkeys(KINDS, False))

        def fastest(a, b):
            best = fastest_alternating({"generated": a, "dense": b}, repeats)
            return best["generated"], best["dense"]
        calls = {"forward": [lambda r=r: r.forward(x, w, bias) for r in (generated, dense)],
                 "grad_input": [lambda r=r: r.grad_input(dout, w, tuple(x.shape)) for r in (generated, dense)]}
        for _ in range(WARMUP_CALLS):
            calls["forward"][0](), calls["grad_input"][0](), generated.grad_weight(dout, x, None, w)
        timings = {kind: fastest(*pair) for kind, pair in calls.items()}
        # grad-weight reuses the forward's padded input only if the generated forward runs
        shared = timings["forward"][0] < timings["forward"][1] and self.kernels.plan.grad_weight_reads_forward_input
        xpad = self.pad_input(x) if shared else None
        timings["grad_weight"] = fastest(lambda: generated.grad_weight(dout, x, xpad, w),
                                         lambda: dense.grad_weight(dout, x, None, w))
        self.use = {kind: t[0] < t[1] for kind, t in timings.items()}
        return timings

    def _with(self, **use) -> "LayerRunner":
        return LayerRunner(self.kernels, self.index, dict(self.use, **use))


class _PatternConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, runner):
        out, xpad = runner.forward(x, weight, bias)
        ctx.runner = runner
        ctx.has_bias = bias is not None
        ctx.x_shape = tuple(x.shape)
        ctx.xpad = xpad  # the padded copy the generated forward made, reused by grad-weight
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        dout = dout.contiguous().float()
        dx = ctx.runner.grad_input(dout, weight, ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = ctx.runner.grad_weight(dout, x, ctx.xpad, weight) if ctx.needs_input_grad[1] else None
        db = dout.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        ctx.xpad = None
        return dx, dw, db, None


class PatternConv2d(nn.Module):
    """One prunable conv on a kernel target: generated kernels once hardened, a dense conv before."""

    def __init__(self, site, mask: PatternMask, target: str):
        super().__init__()
        self.site_name = site.name
        self.stride, self.padding, self.dilation = site.stride, site.padding, site.dilation
        self.target = target
        object.__setattr__(self, "_mask", mask)  # not a submodule: it lives in clicktrain_masks
        self._kernels: dict = {}   # ((H, W), row groups) -> LayerKernels
        self._starting: dict = {}  # the same keys -> a function that collects kernels being built
        self._index = None         # (state key, device, LayerIndex)
        self._groups = None        # (state key, row_groups())
        self._use: dict = {}       # (input shape, kept kernels) -> {kind: generated?}, measured on first use
        self.compile_seconds = 0.0
        # measured choice between generated kernel and torch per kind; CLICKTRAIN_AUTOTUNE=0
        # (or autotune = False) always runs the generated kernels
        self.autotune = os.environ.get("CLICKTRAIN_AUTOTUNE", "1") != "0"
        # False: torch's dense conv (on the masked weight) runs every kind, e.g. because whole
        # training steps were measured faster that way (KernelRace)
        self.generated = True

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, target={self.target!r}"

    def __getstate__(self):
        # compiled kernels and index arrays are caches: copies and pickles rebuild them lazily
        state = dict(self.__dict__)
        state["_kernels"], state["_starting"], state["_index"], state["_use"], state["_groups"] = {}, {}, None, {}, None
        return state

    def _rows(self) -> tuple[tuple[int, int], tuple[float, float]]:
        """((filters, input channels) in groups of equal pattern ids, kept kernels of a filter
        and of an input channel on average), from the current pattern ids."""
        from ..codegen.kernels import MAX_ROW_GROUP
        from ..passes.reorder import row_group_of
        key = self._mask.state_key()
        if self._groups is None or self._groups[0] != key:
            ids = self._mask.pattern_ids.cpu()
            kept = (ids != DROPPED).float()
            self._groups = (key, ((row_group_of(ids, MAX_ROW_GROUP), row_group_of(ids.t(), MAX_ROW_GROUP)),
                                  (float(kept.sum(1).mean()), float(kept.sum(0).mean()))))
        return self._groups[1]

    def row_groups(self) -> tuple[int, int]:
        """(filters, input channels) in groups of equal pattern ids (a ``pattern_block``
        granularity): the rows the generated forward and grad-input tiles share."""
        return self._rows()[0]

    def _kernels_key(self, in_hw: tuple[int, int], weight_shape):
        """(key of the kernels for this input size and the current patterns, geometry, target)."""
        from ..codegen.kernels import ConvGeometry, choose_layouts
        from ..codegen.target import resolve_target
        (groups, row_kernels), target = self._rows(), resolve_target(self.target)
        geom = ConvGeometry.of(weight_shape, in_hw, self.stride, self.padding, self.dilation)
        # the kept kernels per row matter only through the layouts they choose
        layouts = choose_layouts(geom, target.simd_lanes, target.name == "cuda", groups, row_kernels)
        return (tuple(in_hw), groups, layouts), geom, target

    def has_kernels_for(self, in_hw: tuple[int, int], weight_shape) -> bool:
        return self._kernels_key(in_hw, weight_shape)[0] in self._kernels

    def start_kernels(self, in_hw: tuple[int, int], weight_shape) -> None:
        """Start compiling the kernels for this input size, to be collected by ``kernels_for``:
        start every layer first, and the compile workers build several layers at once."""
        from ..codegen.kernels import LayerKernels
        key, geom, target = self._kernels_key(in_hw, weight_shape)
        if key not in self._kernels and key not in self._starting:
            groups, row_kernels = self._rows()
            self._starting[key] = LayerKernels.start(geom, self._mask.library.cpu(), target, groups, row_kernels)

    def kernels_for(self, in_hw: tuple[int, int], weight_shape):
        key = self._kernels_key(in_hw, weight_shape)[0]
        if key not in self._kernels:
            self.start_kernels(in_hw, weight_shape)
            kernels = self._starting.pop(key)()
            self.compile_seconds += kernels.compile_seconds
            self._kernels[key] = kernels
        return self._kernels[key]

    def index_for(self, device, kernels):
        """The index arrays ``kernels`` read, rebuilt when the patterns (or the kernels' channel
        blocks, which change with the input size) change."""
        from ..codegen.kernels import LayerIndex
        plan = kernels.plan
        key = (self._mask.state_key(), device, plan.forward.channel_block, plan.grad_input.channel_block,
               plan.grad_weight.group, plan.forward.row_group, plan.grad_input.row_group)
        if self._index is None or self._index[0] != key:
            self._index = (key, LayerIndex.build(self._mask.library.cpu(), self._mask.pattern_ids.cpu(), device, plan))
        return self._index[1]

    def forward(self, x, weight, bias=None):
        if self._mask.phase is not Phase.HARD:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        if self.target == "cuda" and not x.is_cuda:
            raise TargetError(
                f"'{self.site_name}' was compiled for target='cuda', but its input is on {x.device}"
                + ("" if torch.cuda.is_available() else " and no CUDA GPU is visible")
                + ": move the model and data to a GPU, or compile with target='llvm' (CPU) or 'torch'")
        if self.target == "llvm" and x.device.type != "cpu":
            raise TargetError(f"'{self.site_name}' was compiled for target='llvm' (CPU), but its input is on "
                              f"{x.device}: use target='cuda' for GPU tensors")
        if x.dtype != torch.float32:
            raise TargetError(f"'{self.site_name}': generated kernels are float32, got {x.dtype}")
        if not self.generated:
            return self._torch_conv(x, weight, bias)
        kernels = self.kernels_for(tuple(x.shape[-2:]), weight.shape)
        runner = LayerRunner(kernels, self.index_for(x.device, kernels))
        if self.autotune:
            runner.use = self.choice_for(runner, tuple(x.shape), weight, bias)
            if not any(runner.use.values()):
                return self._torch_conv(x, weight, bias)
        return _PatternConvFunction.apply(x, weight, bias, runner)

    def _torch_conv(self, x, weight, bias):
        """Where torch runs every kind, exactly what ``target="torch"`` runs: no autograd
        bridge, no gather or scatter (measured on an H100: VGG-11 with every layer on torch
        through the bridge took 9.4 ms a step, 5.7 ms on target="torch")."""
        return F.conv2d(x, self._mask.masked(weight), bias, self.stride, self.padding, self.dilation)

    def choice_for(self, runner: LayerRunner, x_shape: tuple, weight, bias) -> dict:
        """Generated kernel or torch, per kind, for this input shape and number of kept
        kernels: measured once, then remembered (in memory and in the kernel cache directory)."""
        from ..codegen.cache import load_tuning, save_tuning
        kept = runner.index.fwd_layout.kept_kernels
        if (x_shape, kept) not in self._use:
            # the winner depends on how many kernels are kept, not only on the layer's shape
            # the kernels' source hash too: a new tile or block size is a different contender
            key = (f"{runner.kernels.plan.forward.name}|{runner.kernels.source_hash()}|"
                   f"{runner.kernels.target.description}|{x_shape}|{torch.get_num_threads()}|kept{kept}|"
                   f"{TUNING_METHOD}")
            use = load_tuning(key)
            if use is None:
                with torch.no_grad():
                    runner.tune(x_shape, weight, bias)
                use = runner.use
                save_tuning(key, use)
            self._use[(x_shape, kept)] = use
        return self._use[(x_shape, kept)]


def set_generated(model: nn.Module, enabled: bool) -> None:
    """Run every hardened prunable conv of ``model`` on its generated kernels (the per-layer
    measured choice) or, with ``enabled=False``, on torch's dense conv of the masked weight;
    the generated BatchNorms follow (between torch convs they cost more than they save)."""
    from .batchnorm import GeneratedBatchNorm
    for module in model.modules():
        if isinstance(module, (PatternConv2d, GeneratedBatchNorm)):
            module.generated = enabled


class KernelRace:
    """Generated kernels against torch's conv, decided on the training steps themselves.

    Each layer's kernel choice is measured in isolation; a training step adds what isolation
    does not show: TVM's thread pool and torch's OpenMP workers handing the cores to each
    other around every call, caches shared with BatchNorm, pooling and the optimizer. Measured
    on VGG-11/4 (docs/performance.md), steps whose every layer chose its generated kernels ran
    slower than torch's. So the first ``2 * (warmup + steps)`` steps after hardening alternate
    between the two (they compute the same numbers, so these are ordinary training steps), and
    the faster by median step time runs from then on.

        race = KernelRace(model)
        for x, y in loader:
            race.before_step()
            started = time.perf_counter(); train_step(x, y); race.after_step(time.perf_counter() - started)
    """

    def __init__(self, model: nn.Module, steps: int = 12, warmup: int = 2):
        self.model, self.steps, self.warmup = model, steps, warmup
        self.times: dict[bool, list[float]] = {True: [], False: []}
        self._step = 0
        self.winner: bool | None = None   # True: generated kernels

    @property
    def decided(self) -> bool:
        return self.winner is not None

    def _generated_now(self) -> bool:
        return self._step % 2 == 0

    def before_step(self) -> None:
        if not self.decided:
            set_generated(self.model, self._generated_now())

    def after_step(self, seconds: float) -> None:
        if self.decided:
            return
        if self._step // 2 >= self.warmup:  # the first steps of each compile, tune, warm caches
            self.times[self._generated_now()].append(seconds)
        self._step += 1
        if all(len(t) >= self.steps for t in self.times.values()):
            generated, dense = (statistics.median(self.times[k]) for k in (True, False))
            self.winner = generated <= dense
            set_generated(self.model, self.winner)

    def summary(self) -> dict:
        medians = {("generated_ms" if k else "torch_ms"): round(statistics.median(t) * 1e3, 2)
                   for k, t in self.times.items() if t}
        chosen = None if not self.decided else ("generated" if self.winner else "torch")
        return {**medians, "chosen": chosen}

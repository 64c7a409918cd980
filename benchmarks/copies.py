"""The generated copies around the kernels (``plan_relayouts``), each against the same copy
done by torch, at batch 64: a stride-2 forward's input padded and split into its two column
phases, and activations into and out of the batch-in-lanes (chwn) layout. A plain padded
copy (nchw into its frame) is timed too, as the floor a copy of that size can reach here.
Each copy and its torch twin take turns, fastest of ``--repeats`` rounds. ``--against
COMMIT`` also generates every copy with that commit's ``templates.py`` and times both
generators' copies in turn in this one process (separate runs on a shared VM differ by
more than what is measured).

    .venv/bin/python benchmarks/copies.py [--repeats 30] [--against 2872a86]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, fastest_alternating, header  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clicktrain.codegen.cache import compile_cached  # noqa: E402
from clicktrain.codegen.target import resolve_target  # noqa: E402
from clicktrain.codegen.templates import RelayoutSpec, relayout_llvm  # noqa: E402
from clicktrain.machine import set_threads  # noqa: E402

BATCH = 64
PHASES = [(16, 32, 32), (32, 16, 16), (16, 28, 28), (32, 14, 14)]   # ResNet-20's stride-2 inputs
CHWN = [(64, 8, 8), (64, 7, 7), (128, 8, 8), (256, 8, 8), (256, 4, 4), (512, 2, 2)]  # its and VGG-11's small maps


def compiled(spec: RelayoutSpec, target, templates=None):
    """The generated copy of ``spec``, by this checkout's generator or by ``templates`` (an
    older ``templates`` module, whose copy gets its own name)."""
    if templates is None:
        return compile_cached(spec.name, relayout_llvm(spec), target)[0][spec.name]
    old = templates.RelayoutSpec(**{**dataclasses.asdict(spec), "name": spec.name + "_old"})
    return compile_cached(old.name, templates.relayout_llvm(old), target)[0][old.name]


def templates_at(commit: str):
    """``clicktrain/codegen/templates.py`` as it was at ``commit``, imported as its own module."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{commit}:clicktrain/codegen/templates.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "templates_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("templates_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["templates_old"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def was(best: dict, key: str) -> str:
    return f", was {best[key] * 1e3:.3f}" if key in best else ""


def main() -> None:
    import tvm
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--against", default=None, help="also time the copies generated at this git commit")
    args = parse_args(parser)
    old = templates_at(args.against) if args.against else None
    threads = set_threads(None)
    target = resolve_target("llvm")
    print(header(threads))
    print(f"batch {BATCH}; ms, fastest of {args.repeats} rounds; ratio = torch / generated"
          + (f"; 'was': generated at {args.against}, timed in turn" if old else ""))

    def dl(t):
        return tvm.runtime.from_dlpack(t)
    print("\nstride-2 input, padded by 1 and split into 2 column phases (forward_in of a strided layer)")
    for c, h, w in PHASES:
        rows, cols = h + 1, w + 2  # a frame one pixel wider on each side (and one row shorter)
        x = torch.randn(BATCH, c, h, w)
        split = RelayoutSpec(f"bench_phases_c{c}_{h}x{w}", "pad", "nchw", c, h, w, rows, cols, 1, 1, phases=2)
        plain = RelayoutSpec(f"bench_pad_c{c}_{h}x{w}", "pad", "nchw", c, h, w, rows, cols, 1, 1)
        out, out_plain = torch.empty(split.out_shape(BATCH)), torch.empty(plain.out_shape(BATCH))
        f_split, f_plain = compiled(split, target), compiled(plain, target)
        args_split, args_plain = (dl(x), dl(out)), (dl(x), dl(out_plain))
        fns = {"gen": lambda: f_split(*args_split), "plain": lambda: f_plain(*args_plain)}
        if old:
            f_was = compiled(split, target, old)
            fns["was"] = lambda: f_was(*args_split)

        def torch_split():
            framed = F.pad(x, (1, cols - w - 1, 1, rows - h - 1))
            return torch.stack([framed[..., 0::2], framed[..., 1::2]])
        f_split(*args_split)
        assert torch.equal(out, torch_split())
        best = fastest_alternating({**fns, "torch": torch_split}, args.repeats)
        print(f"  {c}x{h}x{w}: generated {best['gen'] * 1e3:.3f}{was(best, 'was')}  torch {best['torch'] * 1e3:.3f}  "
              f"({best['torch'] / best['gen']:.1f}x)  plain pad {best['plain'] * 1e3:.3f}")
    print("\nnchw -> chwn padded by 1 (forward_in, grad_input_in) and chwn -> nchw (forward_out, grad_input_out)")
    for c, h, w in CHWN:
        lanes = target.simd_lanes
        x = torch.randn(BATCH, c, h, w)
        pad = RelayoutSpec(f"bench_chwn_c{c}_{h}x{w}", "pad", "chwn", c, h, w, h + 2, w + 2, 1, 1, lanes)
        unpad = RelayoutSpec(f"bench_unchwn_c{c}_{h}x{w}", "unpad", "chwn", c, h, w, h, w, lanes=lanes)
        padded, back = torch.empty(pad.out_shape(BATCH)), torch.empty(BATCH, c, h, w)
        chwn = torch.randn(BATCH // lanes, c, h, w, lanes)
        f_pad, f_unpad = compiled(pad, target), compiled(unpad, target)
        args_pad, args_unpad = (dl(x), dl(padded)), (dl(chwn), dl(back))
        fns = {"pad": lambda: f_pad(*args_pad), "unpad": lambda: f_unpad(*args_unpad)}
        if old:
            f_pad_was, f_unpad_was = compiled(pad, target, old), compiled(unpad, target, old)
            fns["pad_was"], fns["unpad_was"] = lambda: f_pad_was(*args_pad), lambda: f_unpad_was(*args_unpad)

        def torch_pad():
            return F.pad(x, (1, 1, 1, 1)).reshape(BATCH // lanes, lanes, c, h + 2, w + 2).permute(0, 2, 3, 4, 1) \
                .contiguous()

        def torch_unpad():
            return chwn.permute(0, 4, 1, 2, 3).reshape(BATCH, c, h, w)  # reshape copies: not contiguous
        f_pad(*args_pad)
        f_unpad(*args_unpad)
        assert torch.equal(padded, torch_pad()) and torch.equal(back, torch_unpad())
        best = fastest_alternating({**fns, "torch_pad": torch_pad, "torch_unpad": torch_unpad}, args.repeats)
        print(f"  {c}x{h}x{w}: into chwn {best['pad'] * 1e3:.3f}{was(best, 'pad_was')} (torch "
              f"{best['torch_pad'] * 1e3:.3f}, {best['torch_pad'] / best['pad']:.1f}x)  back "
              f"{best['unpad'] * 1e3:.3f}{was(best, 'unpad_was')} (torch {best['torch_unpad'] * 1e3:.3f}, "
              f"{best['torch_unpad'] / best['unpad']:.1f}x)")


if __name__ == "__main__":
    main()

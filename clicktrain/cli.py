"""The ``clicktrain`` command line."""

from __future__ import annotations

import argparse
import sys

from .errors import ClicktrainError


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(args)
    return 0


def _inspect(args) -> int:
    from pathlib import Path
    path = Path(args.path)
    if path.is_dir():
        from .passes.dump import summarize_dump
        print(summarize_dump(path))
        return 0
    if path.suffix == ".onnx" and path.is_file():
        from .codegen.onnx_inspect import inspect_onnx
        text, ok = inspect_onnx(path)
        print(text)
        return 0 if ok else 1
    raise ClicktrainError(f"{path}: expected a debug-dump directory (written by compile_for_training(debug_dir=...)) "
                          f"or an .onnx file")


def _export(args) -> int:
    from .codegen.export import export_onnx, load_checkpoint
    model, example = load_checkpoint(args.checkpoint, args.model, args.input_shape)
    out = export_onnx(model, args.onnx, example, opset=args.opset, fold_batchnorm=args.fold_batchnorm)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clicktrain", description="Pattern-prune CNNs while they train.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="prune-train a small CNN on Fashion-MNIST and report the result")
    demo.add_argument("--data", default=None, help="Fashion-MNIST IDX directory (default $CLICKTRAIN_DATA or "
                                                   "/usr/share/datasets/fashion-mnist)")
    demo.add_argument("--out", default="runs/demo", help="output directory (metrics, plot, dump)")
    demo.add_argument("--model", default="vgg_small", help="vgg_small, vgg11, vgg13, resnet20, resnet32")
    demo.add_argument("--dense-steps", type=int, default=400)
    demo.add_argument("--finetune-steps", type=int, default=400)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--lr", type=float, default=0.05)
    demo.add_argument("--connectivity", type=float, default=0.5, help="fraction of kernels dropped per layer")
    demo.add_argument("--pattern-nnz", type=int, default=4)
    demo.add_argument("--num-patterns", type=int, default=8)
    demo.add_argument("--target", default="torch", choices=["torch", "llvm", "cuda"])
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    exp = sub.add_parser("export", help="export a checkpoint (from ct.export_torch) to ONNX")
    exp.add_argument("checkpoint", help="file written by ct.export_torch, or a plain state_dict of --model")
    exp.add_argument("--onnx", required=True, help="output .onnx path (written atomically)")
    exp.add_argument("--model", required=True, help="vgg_small, vgg11, vgg13, resnet20, resnet32")
    exp.add_argument("--input-shape", default="1,28,28", help="C,H,W of one input (default 1,28,28)")
    exp.add_argument("--num-classes", type=int, default=10)
    exp.add_argument("--opset", type=int, default=None)
    exp.add_argument("--fold-batchnorm", action="store_true")
    exp.set_defaults(func=_export)

    insp = sub.add_parser("inspect", help="summarise a debug dump directory or check an .onnx file")
    insp.add_argument("path")
    insp.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ClicktrainError as exc:
        print(f"clicktrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clicktrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

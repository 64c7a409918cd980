"""The ``clicktrain`` command line."""

from __future__ import annotations

import argparse
import sys

from .errors import ClicktrainError
from .machine import restart_with_llvm_openmp


def _train(args) -> int:
    from dataclasses import fields

    from .runtime.trainer import TrainConfig, Trainer
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    Trainer(cfg).run()
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
    model, example = load_checkpoint(args.checkpoint, args.model, args.input_shape, args.num_classes)
    out = export_onnx(model, args.onnx, example, opset=args.opset, fold_batchnorm=args.fold_batchnorm)
    print(f"wrote {out}")
    return 0


def _lam(text: str):
    return text if text == "auto" else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clicktrain", description="Pattern-prune CNNs while they train.")
    sub = parser.add_subparsers(dest="command", required=True)

    from .runtime.trainer import TrainConfig
    d = TrainConfig()
    train = sub.add_parser("train", help="prune-train a CNN with the ClickTrain schedule (no arguments: the README's main job)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--model", default=d.model, help="vgg_small, vgg11, vgg13, resnet20, resnet32, or module:callable")
    train.add_argument("--width", type=float, default=d.width, help="channel multiplier of the built-in models")
    train.add_argument("--data", default=None, help="IDX (Fashion-MNIST/MNIST), CIFAR-10 python or image-folder directory "
                                                    "(default $CLICKTRAIN_DATA or /usr/share/datasets/fashion-mnist)")
    train.add_argument("--epochs", type=int, default=d.epochs)
    train.add_argument("--batch-size", type=int, default=d.batch_size)
    train.add_argument("--lr", type=float, default=d.lr)
    train.add_argument("--train-subset", type=int, default=None, help="train on N random training images")
    train.add_argument("--target", default="auto", choices=["auto", "torch", "llvm", "cuda"],
                       help="auto: llvm (generated kernels after hardening) for --method clicktrain, torch for the "
                            "baselines")
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--out", default=d.out)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--threads", type=int, default=None)
    from .runtime.trainer import METHODS
    train.add_argument("--method", default=d.method, choices=sorted(METHODS),
                       help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    train.add_argument("--dense", dest="method", action="store_const", const="dense",
                       help="same as --method dense: train without pruning (the baseline)")
    train.add_argument("--choose", type=float, default=d.choose, help="epoch (or fraction) where patterns are selected")
    train.add_argument("--hard", type=float, default=d.hard, help="epoch (or fraction) where masks are applied")
    train.add_argument("--lam", type=_lam, default=d.lam,
                       help="group-lasso weight, or 'auto': reach zero by the end of the soft phase")
    train.add_argument("--auto-lam", type=float, default=d.auto_lam,
                       help="instead: keep the penalty this fraction of the loss (PruneTrain-style)")
    train.add_argument("--importance", default=d.importance, choices=["accumulated", "batch", "magnitude"])
    train.add_argument("--window", type=int, default=d.window, help="mini-batches averaged for importance")
    train.add_argument("--library", default=d.library, choices=["generated", "frequency", "fixed"])
    train.add_argument("--pattern-nnz", type=int, default=d.pattern_nnz)
    train.add_argument("--num-patterns", type=int, default=d.num_patterns)
    train.add_argument("--connectivity", type=float, default=d.connectivity, help="fraction of kernels dropped per layer")
    train.add_argument("--connectivity-ramp", default=d.connectivity_ramp, choices=["none", "layers", "epochs"])
    train.add_argument("--pattern-block", default=d.pattern_block,
                       help="FxC: blocks of F filters x C input channels share a pattern and are dropped together "
                            "(default 1x1: per kernel; 4x4 makes the llvm kernels faster, docs/performance.md)")
    train.add_argument("--mixup", type=float, default=d.mixup, help="mixup alpha (0: off)")
    train.add_argument("--admm-split", default=d.admm_split, help="ADMM: pretrain:admm:retrain epoch ratio")
    train.add_argument("--admm-rho", default=d.admm_rho, help="ADMM: rho start:end (geometric over the ADMM stage)")
    train.add_argument("--finetune-lr", type=float, default=d.finetune_lr,
                       help="ADMM: peak lr of the ADMM and retrain stages, times --lr")
    train.add_argument("--penalty-ratio", type=float, default=d.penalty_ratio,
                       help="PruneTrain: group-lasso penalty as a fraction of the initial loss")
    train.add_argument("--reconfigure-every", type=int, default=d.reconfigure_every,
                       help="PruneTrain: epochs between channel removals (0: epochs // 10)")
    train.add_argument("--kernel-race", action=argparse.BooleanOptionalAction, default=d.kernel_race,
                       help="--target llvm/cuda: after hardening, alternate training steps on the generated kernels "
                            "and on torch's conv, and keep the faster")
    train.set_defaults(func=_train)

    exp = sub.add_parser("export", help="export a checkpoint to ONNX")
    exp.add_argument("checkpoint", help="checkpoint.pt of `clicktrain train`, a file written by ct.export_torch, "
                                        "or a plain state_dict of --model")
    exp.add_argument("--onnx", required=True, help="output .onnx path (written atomically)")
    exp.add_argument("--model", default=None, help="vgg_small, vgg11, vgg13, resnet20, resnet32 "
                                                  "(not needed for a `clicktrain train` checkpoint)")
    exp.add_argument("--input-shape", default="1,28,28", help="C,H,W of one input (default 1,28,28)")
    exp.add_argument("--num-classes", type=int, default=10)
    exp.add_argument("--opset", type=int, default=None)
    exp.add_argument("--fold-batchnorm", action="store_true")
    exp.set_defaults(func=_export)

    insp = sub.add_parser("inspect", help="summarise a debug dump directory or check an .onnx file")
    insp.add_argument("path")
    insp.set_defaults(func=_inspect)
    return parser


def _resolve_target(args) -> None:
    """``--target auto``: the ClickTrain method trains on the generated CPU kernels once
    hardened (measured on the main job: total time 0.82-1.01x of dense training's over eight
    pairs, docs/results.md, where torch's masked convs cost dense's time plus masking); the
    baselines train plain or channel-pruned models (dense, PruneTrain) or, ADMM, keep torch's
    convs as PatDNN's training did."""
    if getattr(args, "target", None) == "auto":
        args.target = "llvm" if args.method == "clicktrain" else "torch"


def _openmp_for_llvm(args, argv) -> None:
    # OpenMP reads its wait setting when torch loads: the command restarts itself once
    if argv is None and getattr(args, "target", None) == "llvm":
        restart_with_llvm_openmp(["-m", "clicktrain.cli", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _resolve_target(args)
    _openmp_for_llvm(args, argv)
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

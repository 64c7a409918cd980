"""The trainer and `clicktrain train`: learning, pruning, outputs, resume, data formats."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import clicktrain as ct
from clicktrain.data import load_dataset
from clicktrain.runtime import trainer as trainer_module
from clicktrain.runtime.trainer import TrainConfig, Trainer

SMALL = dict(model="vgg_small", width=1.0, epochs=3, batch_size=64, train_subset=2000, choose=1, hard=2,
             connectivity=0.5, threads=2)


@pytest.mark.slow
def test_train_learns_prunes_and_writes_outputs(tmp_path, fashion_dir):
    final = Trainer(TrainConfig(data=str(fashion_dir), out=str(tmp_path), **SMALL)).run()
    assert final["phase"] == "hard"
    assert final["test_accuracy"] > 0.6            # 10 classes: chance is 0.1
    assert final["compression_ratio"] > 4.0
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,phase,phase_after,loss")
    assert [r.split(",")[1] for r in rows[1:]] == ["dense", "soft", "hard"]  # the phase each epoch trained in
    header = rows[0].split(",")
    density = [float(r.split(",")[header.index("conv_density")]) for r in rows[1:]]
    planned = [float(r.split(",")[header.index("planned_density")]) for r in rows[1:]]
    assert density[0] == 1.0 and density[1] == density[2] == planned[0] < 0.3  # masks count once applied
    saved = json.loads((tmp_path / "final.json").read_text())
    assert {"test_accuracy", "compression_ratio", "conv_density", "wall_time_s"} <= saved.keys()
    assert saved["test_accuracy"] == final["test_accuracy"]
    assert (tmp_path / "plot.png").stat().st_size > 1000


@pytest.mark.slow
def test_llvm_training_races_generated_kernels_against_torch(tmp_path, fashion_dir):
    cfg = dict(SMALL, epochs=2, choose=0, hard=1, data=str(fashion_dir), target="llvm")
    final = Trainer(TrainConfig(out=str(tmp_path), **cfg)).run()
    race = final["kernel_race"]  # 32 steps in the hard epoch: 2 x (2 warm-up + 12 timed) decide it
    assert race["chosen"] in ("generated", "torch") and race["generated_ms"] > 0 and race["torch_ms"] > 0
    assert final["test_accuracy"] > 0.5 and final["compression_ratio"] > 4.0
    # without the race, and patterns shared by blocks of 2 filters x 2 channels (--pattern-block)
    off = Trainer(TrainConfig(out=str(tmp_path / "off"), kernel_race=False, pattern_block="2x2", **cfg)).run()
    assert "kernel_race" not in off and off["test_accuracy"] > 0.5
    model = torch.load(tmp_path / "off" / "checkpoint.pt", weights_only=False)["model"]
    ids = [v for k, v in model.items() if k.endswith("pattern_ids")]
    assert ids and all(torch.equal(i, i[::2, ::2].repeat_interleave(2, 0).repeat_interleave(2, 1)) for i in ids)


@pytest.mark.slow
def test_main_job_trains_on_generated_kernels_by_default(tmp_path, fashion_dir):
    """`clicktrain train` (the README's main job) with no --target: the ClickTrain method runs
    its hardened convs on the generated llvm kernels, in a process restarted with the short
    OpenMP spin; the baselines stay on torch."""
    proc = subprocess.run([sys.executable, "-m", "clicktrain.cli", "train", "--data", str(fashion_dir), "--model",
                           "vgg_small", "--width", "1.0", "--epochs", "2", "--choose", "0", "--hard", "1",
                           "--train-subset", "600", "--threads", "2", "--no-kernel-race", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["target"] == "llvm" and final["phase"] == "hard" and final["compression_ratio"] > 4.0
    assert "| target llvm |" in proc.stdout and "kernel compile:" in proc.stdout
    assert "GOMP_SPINCOUNT" not in proc.stderr  # restarted with it: no warning about a missing wait setting
    from clicktrain.cli import _resolve_target, build_parser
    for method, target in [("clicktrain", "llvm"), ("admm", "torch"), ("dense", "torch"), ("prunetrain", "torch")]:
        args = build_parser().parse_args(["train", "--method", method])
        _resolve_target(args)
        assert args.target == target
    args = build_parser().parse_args(["train", "--target", "torch"])
    _resolve_target(args)
    assert args.target == "torch"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["clicktrain", "admm", "prunetrain"])
def test_resume_continues_the_same_run(tmp_path, fashion_dir, monkeypatch, method):
    cfg = dict(SMALL, train_subset=600, data=str(fashion_dir), method=method)
    full = Trainer(TrainConfig(out=str(tmp_path / "full"), **cfg)).run()

    original = Trainer._train_epoch

    def crash_in_third_epoch(self, m, opt, sched, pruner, x, y, epoch, race=None):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, m, opt, sched, pruner, x, y, epoch, race)

    monkeypatch.setattr(Trainer, "_train_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(TrainConfig(out=str(tmp_path / "split"), **cfg)).run()
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    resumed = Trainer(TrainConfig(out=str(tmp_path / "split"), resume=True, **cfg)).run()
    assert resumed["test_accuracy"] == full["test_accuracy"]
    full_rows = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    split_rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    strip = lambda rows: [r.split(",")[:6] for r in rows]  # noqa: E731 - timings differ
    assert strip(split_rows) == strip(full_rows)
    with pytest.raises(ct.StateError, match="different settings"):
        Trainer(TrainConfig(out=str(tmp_path / "split"), resume=True, **dict(cfg, lr=0.1))).run()


def test_cifar10_and_image_folder_formats(tmp_path):
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, f)
    x, y, xt, yt, fmt = load_dataset(cifar)
    assert fmt == "cifar10" and x.shape == (20, 3, 32, 32) and xt.shape == (4, 3, 32, 32) and float(x.max()) <= 1

    from PIL import Image
    folder = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(folder / split / cls / f"{i}.png")
    x, y, xt, yt, fmt = load_dataset(folder)
    assert fmt == "image-folder" and x.shape == (4, 1, 10, 12) and y.tolist() == [0, 0, 1, 1]

    (folder / "train" / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ct.DataError, match="cannot read image"):
        load_dataset(folder)
    (cifar / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ct.DataError, match="not a CIFAR-10 python batch"):
        load_dataset(cifar)
    with pytest.raises(ct.DataError, match="no known data set format"):
        load_dataset(tmp_path)


def test_user_model_by_module_and_callable(tmp_path, monkeypatch):
    model = trainer_module._build_user_model("zoo:BranchNet", in_channels=3, num_classes=5)
    assert type(model).__name__ == "BranchNet"
    with pytest.raises(ct.ConfigError, match="cannot import 'Nope' from module 'zoo'"):
        trainer_module._build_user_model("zoo:Nope", 3, 5)


def test_cli_train_reports_bad_input_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clicktrain.cli", "train", "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "clicktrain.cli", "train", "--data", str(tmp_path), "--choose", "5",
                           "--hard", "2", "--epochs", "6", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_bad_method_settings_are_clear_errors(tmp_path):
    with pytest.raises(ct.ConfigError, match="choose one of"):
        Trainer(TrainConfig(method="magic", data=str(tmp_path), out=str(tmp_path / "o"))).run()
    with pytest.raises(ct.ConfigError, match="--target llvm .* does not apply"):
        Trainer(TrainConfig(method="prunetrain", target="llvm", data=str(tmp_path), out=str(tmp_path / "o"))).run()
    with pytest.raises(ct.ConfigError, match="pattern_block"):  # before the (missing) data is read
        Trainer(TrainConfig(pattern_block="4", data=str(tmp_path / "none"), out=str(tmp_path / "o"))).run()
    with pytest.raises(ct.ConfigError, match="admm_split"):
        trainer_module._ratio("1:2", "admm_split", 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_target_without_gpu_fails_fast(tmp_path):
    with pytest.raises(ct.TargetError, match="needs a CUDA GPU"):
        Trainer(TrainConfig(target="cuda", data=str(tmp_path), out=str(tmp_path / "o"))).run()

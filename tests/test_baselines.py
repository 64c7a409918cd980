"""The baselines: ADMM pruning after training, PruneTrain-style channel pruning, and the
head-to-head comparison script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import clicktrain as ct
from clicktrain.baselines import ADMM, PruneTrain
from clicktrain.baselines.admm import split_epochs
from clicktrain.baselines.channels import channel_spaces, shrink_space
from clicktrain.models import ResNet, build_model
from clicktrain.patterns import DROPPED
from zoo import BranchNet

ROOT = Path(__file__).resolve().parent.parent


def test_admm_epoch_split_follows_patdnn_ratio():
    assert split_epochs(370) == (190, 310)
    assert split_epochs(10) == (5, 8)       # 5 pretrain, 3 ADMM, 2 retrain
    assert split_epochs(3) == (1, 2)        # every stage keeps an epoch
    with pytest.raises(ct.ConfigError, match="at least 3 epochs"):
        split_epochs(2)
    with pytest.raises(ct.ConfigError, match="three positive numbers"):
        split_epochs(10, (1, 0, 1))


def test_channel_spaces_of_a_resnet_union_residual_outputs():
    spaces = channel_spaces(ResNet(8, in_channels=3, num_classes=5), torch.randn(2, 3, 16, 16))
    by_first = {s.producers[0]: s for s in spaces}
    # Expected: the stem and the first stage's second conv write one space (identity shortcut)
    stem = by_first["conv1"]
    assert stem.producers == ["conv1", "layers.0.conv2"]
    assert stem.norms == ["bn1", "layers.0.bn2"]
    assert stem.consumers == ["layers.0.conv1", "layers.1.conv1", "layers.1.shortcut.0"]
    assert stem.norm_after == {"conv1": "bn1", "layers.0.conv2": "layers.0.bn2"}
    # a projection shortcut joins its block's output space; the last space feeds the classifier
    last = by_first["layers.2.conv2"]
    assert last.producers == ["layers.2.conv2", "layers.2.shortcut.0"] and last.linears == [("fc", 1)]
    inner = by_first["layers.0.conv1"]
    assert inner.producers == ["layers.0.conv1"] and inner.consumers == ["layers.0.conv2"] and not inner.locked


def test_channel_spaces_lock_what_they_do_not_understand():
    spaces = {s.producers[0]: s for s in channel_spaces(BranchNet(), torch.randn(2, 3, 12, 12))}
    assert spaces["left"].locked.startswith("call_function") and "cat" in spaces["left"].locked


@torch.no_grad()
def test_removing_a_dead_channel_is_exact_and_keeps_the_optimizer():
    torch.manual_seed(0)
    model = ResNet(8, in_channels=3, num_classes=5).eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 16, 16)
    spaces = {s.producers[0]: s for s in channel_spaces(model, x)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.enable_grad():
        model(x).sum().backward()
    opt.step()
    # channel 3 of the stem space dies in every producer (conv rows and the BatchNorm after it)
    stem = spaces["conv1"]
    for conv in stem.producers:
        model.get_submodule(conv).weight[3] = 0
    for bn in stem.norms:
        model.get_submodule(bn).weight[3] = 0
        model.get_submodule(bn).bias[3] = 0
    before = model(x)
    keep = torch.tensor([c for c in range(model.conv1.out_channels) if c != 3])
    shrink_space(model, stem, keep, opt)
    assert model.conv1.weight.shape[0] == len(keep) and model.layers[0].conv1.weight.shape[1] == len(keep)
    assert model.bn1.running_mean.shape == (len(keep),) and model.layers[1].shortcut[0].in_channels == len(keep)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for p in model.parameters():
        assert opt.state[p]["momentum_buffer"].shape == p.shape
    with torch.enable_grad():
        model.train()
        model(x).sum().backward()
    opt.step()  # trains on


def test_prunetrain_zeroes_groups_and_removes_channels_physically():
    torch.manual_seed(0)
    model = build_model("vgg_small", in_channels=1, num_classes=10)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = PruneTrain(model, opt, epochs=2, example=x[:2], penalty_ratio=0.5, lr_steps=0.05 * 4)
    channels_before = [len(k) for k in pruner.kept]
    params_before = sum(p.numel() for p in model.parameters())
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step(loss.detach())
    assert pruner.lam > 0
    pruner.epoch_end()
    assert pruner.removed_channels > 0
    channels = [len(k) for k in pruner.kept]
    assert all(1 <= c for c in channels) and sum(channels) < sum(channels_before)
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert model(x).shape == (16, 10)  # a smaller dense model that still runs
    # resume: a fresh model shrinks to the saved channels, then takes the weights
    fresh = build_model("vgg_small", in_channels=1, num_classes=10)
    restored = PruneTrain(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05), epochs=2, example=x[:2])
    restored.load_state_dict(pruner.state_dict())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_admm_reaches_the_pattern_set_then_prunes_hard():
    torch.manual_seed(0)
    model = ct.compile_for_training(build_model("vgg_small", in_channels=1, num_classes=10), torch.randn(2, 1, 16, 16),
                                    config=ct.PruneConfig(connectivity=0.5))
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    admm = ADMM(model, opt, epochs=4, split=(1, 2, 1), rho=(0.5, 5.0))
    assert admm.admm_start == 1 and admm.retrain_start == 3
    distances = []
    for epoch in range(4):
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            admm.step(loss)
        admm.epoch_end()
        if admm.phase == "admm":
            distances.append(sum(float((layer.weight.detach() - admm.Z[layer.site.name]).norm()) for layer in admm.layers))
        assert admm.applied == (admm.phase == "retrain")
    assert distances[-1] < distances[0]  # W is pulled towards its projection
    assert admm.rho == 5.0
    for layer in admm.layers:
        assert layer.mask.phase is ct.Phase.HARD
        nnz = (layer.weight.detach() != 0).reshape(-1, 9).sum(1)
        assert int(nnz.max()) <= 4
        assert int((layer.mask.pattern_ids == DROPPED).sum()) == int(0.5 * layer.mask.pattern_ids.numel())


@pytest.mark.slow
def test_compare_quick_runs_every_method_and_resumes(tmp_path, fashion_dir):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--data", str(fashion_dir),
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (tmp_path / "compare.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["dense", "admm", "prunetrain", "clicktrain-torch", "clicktrain-llvm"]
    summary = json.loads((tmp_path / "compare.json").read_text())
    by = {r["method"]: r for r in summary["rows"]}
    assert by["dense"]["compression_ratio"] == 1.0 and by["dense"]["test_accuracy"] > 0.3
    for name in ("admm", "clicktrain-torch", "clicktrain-llvm"):  # the same pattern + connectivity set
        assert by[name]["compression_ratio"] > 4
        assert float(by[name]["train_flops"]) < float(by["dense"]["train_flops"])
    assert by["prunetrain"]["compression_ratio"] > 1  # channels physically removed
    assert set(summary["methods"]["admm"]["final"]["phase_seconds"]) == {"pretrain", "admm", "retrain"}
    assert (tmp_path / "compare.png").stat().st_size > 5000
    # a finished method is not rerun
    again = subprocess.run(cmd + ["--methods", "dense,admm"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("not rerun") == 2


def test_model_costs_count_flops_like_torch_and_shrink_with_pruning():
    from torch.utils.flop_counter import FlopCounterMode

    from clicktrain.runtime.report import conv_positions, model_costs
    torch.manual_seed(0)
    model = build_model("vgg_small", in_channels=1, num_classes=10)
    x = torch.randn(1, 1, 16, 16)
    with FlopCounterMode(display=False) as counter:
        model(x)
    plain = model_costs(model, positions=conv_positions(model, x))
    assert plain.flops == counter.get_total_flops()  # convs + linear; torch counts 2 per multiply-add
    m = ct.compile_for_training(model, x)
    assert model_costs(m).flops == plain.flops and model_costs(m).conv_weights == plain.conv_weights
    ct.select_patterns(m)
    assert model_costs(m, applied=False).flops == plain.flops  # selected, not yet applied
    ct.harden(m)
    pruned = model_costs(m)
    assert pruned.kept_conv_weights < plain.kept_conv_weights and pruned.flops < plain.flops
    assert pruned.parameters == plain.parameters - (plain.conv_weights - pruned.kept_conv_weights)
    assert pruned.compression_ratio == pytest.approx(pruned.conv_weights / pruned.kept_conv_weights)

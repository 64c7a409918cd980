"""The ClickTrain schedule: importance, library strategies, phases, group lasso, ramps."""

import pytest
import torch
import torch.nn.functional as F

import clicktrain as ct
from clicktrain.models import build_model
from clicktrain.passes.insert_masks import prunable_layers
from clicktrain.patterns import fixed_library, pattern_str
from clicktrain.runtime.selection import generate_library, ramped_connectivity, retained_fraction

from test_zoo import assert_pattern_invariant


def setup(connectivity=0.5, **kwargs):
    torch.manual_seed(0)
    model = build_model("vgg_small", in_channels=1, num_classes=4)
    x = torch.randn(32, 1, 12, 12)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :6].mean((1, 2, 3)) > 0).long()
    m = ct.compile_for_training(model, x[:2], config=ct.PruneConfig(connectivity=connectivity))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    return m, opt, x, y


def train_steps(m, opt, pruner, x, y, n):
    for i in range(n):
        xb, yb = x[(i % 4) * 8:(i % 4) * 8 + 8], y[(i % 4) * 8:(i % 4) * 8 + 8]
        loss = F.cross_entropy(m(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step(loss.detach())
    return loss.item()


def test_phases_follow_the_schedule():
    m, opt, x, y = setup()
    pruner = ct.ClickTrain(m, opt, epochs=4, choose=1, hard=0.5, window=8)
    seen = []
    for _ in range(4):
        seen.append(pruner.phase)
        train_steps(m, opt, pruner, x, y, 6)
        pruner.epoch_end()
    seen.append(pruner.phase)
    assert seen == ["dense", "soft", "hard", "hard", "hard"]
    assert_pattern_invariant(m)
    assert ct.pruning_report(m).compression_ratio > 3


def test_importance_is_the_running_mean_of_w_times_grad_squared():
    m, opt, x, y = setup()
    pruner = ct.ClickTrain(m, opt, epochs=3, choose=1, hard=2, window=4)
    layer = prunable_layers(m)[0]
    samples = []
    for i in range(6):
        loss = F.cross_entropy(m(x[:8]), y[:8])
        opt.zero_grad()
        loss.backward()
        opt.step()
        samples.append((layer.weight * layer.weight.grad).square().detach().clone())
        pruner.step(loss)
    # a running mean over a window of 4: the first 4 averaged equally, then exponential with 1/4
    expected = sum(samples[:4]) / 4
    for s in samples[4:]:
        expected = expected + (s - expected) / 4
    torch.testing.assert_close(pruner._scores[layer.site.name], expected, rtol=1e-5, atol=1e-12)
    assert pruner.importance_seconds > 0


def test_no_importance_work_outside_the_window_before_selection():
    m, opt, x, y = setup()
    pruner = ct.ClickTrain(m, opt, epochs=6, choose=3, hard=4)
    train_steps(m, opt, pruner, x, y, 3)  # epoch 0: two epochs before selection -> nothing collected
    assert pruner._score_steps == 0 and pruner.importance_seconds == 0


def test_group_lasso_pulls_to_be_pruned_weights_down():
    norms = {}
    for lam in (0.0, 0.05):
        m, opt, x, y = setup(connectivity=0.5)
        pruner = ct.ClickTrain(m, opt, epochs=2, choose=0, hard=2, lam=lam, auto_lam=None)
        assert pruner.phase == "soft"
        train_steps(m, opt, pruner, x, y, 30)
        norms[lam] = sum(float((layer.weight.detach() * ~layer.mask.mask()).norm()) for layer in prunable_layers(m))
    assert norms[0.05] < 0.5 * norms[0.0]


def test_auto_lambda_keeps_the_penalty_a_fixed_fraction_of_the_loss():
    m, opt, x, y = setup()
    pruner = ct.ClickTrain(m, opt, epochs=2, choose=0, hard=2, auto_lam=0.2)
    loss = F.cross_entropy(m(x[:8]), y[:8])
    opt.zero_grad()
    loss.backward()
    opt.step()
    pruner.step(loss.detach())
    assert pruner.last_penalty == pytest.approx(0.2 * loss.item(), rel=1e-4)


def test_library_strategies_before_expected():
    # importance concentrated on the top row and the centre: kernels "want" xxx|.x.|...
    imp = torch.full((20, 3, 9), 0.01)
    imp[:, :, [0, 1, 2, 4]] = 1.0
    imp[:10, 0, [0, 1, 2, 4]] = 0.01
    imp[:10, 0, [4, 6, 7, 8]] = 1.0  # a few kernels want the bottom row and the centre
    imps = {"a": imp.view(20, 3, 3, 3)}
    assert [pattern_str(p) for p in generate_library(imps, 4, 2, "frequency")] == ["xxx|.x.|...", "...|.x.|xxx"]
    assert [pattern_str(p) for p in generate_library(imps, 4, 2, "generated")] == ["xxx|.x.|...", "...|.x.|xxx"]
    assert torch.equal(generate_library(imps, 4, 12, "fixed"), fixed_library(4, 12))
    assert [pattern_str(p) for p in fixed_library(4)[:4]] == [".x.|xxx|...", ".x.|xx.|.x.", ".x.|.xx|.x.", "...|xxx|.x."]


def test_generated_library_keeps_more_importance_than_fixed():
    torch.manual_seed(1)
    imp = torch.rand(64, 32, 3, 3) ** 4
    from clicktrain.runtime.selection import assign_patterns
    kept = {}
    for strategy in ("generated", "frequency", "fixed"):
        lib = generate_library({"a": imp}, 4, 8, strategy)
        kept[strategy] = retained_fraction(imp, lib, assign_patterns(imp, lib, 0.0))
    assert kept["generated"] > kept["fixed"]
    assert kept["generated"] >= kept["frequency"] - 1e-9


def test_pattern_blocks_share_one_pattern_and_drop_together():
    """Before: each kernel takes its own best pattern. Expected with blocks of 2 filters x 3
    channels: every block one pattern, the one keeping most of the block's importance;
    whole blocks dropped, the weakest per kernel first, no more than the connectivity allows
    (the edge blocks of 5 filters are 1 x 3); (1, 1) is exactly the per-kernel selection."""
    from clicktrain.runtime.selection import assign_patterns
    torch.manual_seed(0)
    imp = torch.rand(5, 6, 3, 3) ** 4
    lib = generate_library({"a": imp}, 4, 4)
    assert torch.equal(assign_patterns(imp, lib, 0.3, (1, 1)), assign_patterns(imp, lib, 0.3))
    ids = assign_patterns(imp, lib, 0.3, (2, 3))
    blocks = [(slice(f, f + 2), slice(c, c + 3)) for f in (0, 2, 4) for c in (0, 3)]
    for rows, cols in blocks:
        block = ids[rows, cols]
        assert bool((block == block.flatten()[0]).all())
        if int(block.flatten()[0]) >= 0:  # the block's best pattern on its summed importance
            pooled = imp[rows, cols].reshape(-1, 9).sum(0)
            scores = (lib.float() * pooled).sum(1)
            assert int(block.flatten()[0]) == int(scores.argmax())
    dropped = int((ids < 0).sum())
    assert 0 < dropped <= 0.3 * 30

    def kept_per_kernel(rows, cols):  # importance the block's best pattern keeps, per kernel
        pooled = imp[rows, cols].reshape(-1, 9)
        return float((lib.float() @ pooled.sum(0)).max()) / pooled.shape[0]
    dropped_scores = [kept_per_kernel(r, c) for r, c in blocks if int(ids[r, c].flatten()[0]) < 0]
    kept_scores = [kept_per_kernel(r, c) for r, c in blocks if int(ids[r, c].flatten()[0]) >= 0]
    assert dropped_scores and max(dropped_scores) <= min(kept_scores)


def test_connectivity_ramp_over_layers_keeps_the_target_on_average():
    kernels = [512, 2048, 4096, 4096]
    ratios = ramped_connectivity(0.6, kernels)
    assert ratios == sorted(ratios) and ratios[0] < 0.6 < ratios[-1]
    assert sum(r * k for r, k in zip(ratios, kernels)) / sum(kernels) == pytest.approx(0.6)
    m, opt, x, y = setup(connectivity=0.6)
    ct.ClickTrain(m, opt, epochs=2, choose=0, hard=0, connectivity_ramp="layers")
    dropped = [float((layer.mask.pattern_ids == -1).float().mean()) for layer in prunable_layers(m)]
    assert dropped == sorted(dropped) and dropped[0] < dropped[-1]


def test_connectivity_ramp_over_epochs_drops_more_each_epoch():
    m, opt, x, y = setup(connectivity=0.6)
    pruner = ct.ClickTrain(m, opt, epochs=5, choose=1, hard=4, connectivity_ramp="epochs", window=4)
    fractions = []
    for _ in range(5):
        train_steps(m, opt, pruner, x, y, 4)
        pruner.epoch_end()
        fractions.append(sum(int((layer.mask.pattern_ids == -1).sum()) for layer in prunable_layers(m)))
    assert fractions[0] < fractions[1] < fractions[2] <= fractions[3]
    assert pruner.phase == "hard"


@pytest.mark.parametrize("kwargs, match", [
    ({"choose": 3, "hard": 2}, "choose <= hard"),
    ({"choose": 1.5}, "choose=1.5"),
    ({"importance": "oracle"}, "importance='oracle'"),
    ({"library": "magic"}, "library='magic'"),
    ({"connectivity_ramp": "up"}, "connectivity_ramp='up'"),
    ({"window": 0}, "window"),
    ({"epochs": 0}, "epochs"),
])
def test_bad_schedules_are_config_errors(kwargs, match):
    m, opt, _, _ = setup()
    args = {"epochs": 4} | kwargs
    with pytest.raises(ct.ConfigError, match=match):
        ct.ClickTrain(m, opt, **args)


def test_auto_lambda_shrinks_to_be_pruned_weights_during_the_soft_phase():
    shares = {}
    for lam in (0.0, "auto"):
        m, opt, x, y = setup(connectivity=0.5)
        pruner = ct.ClickTrain(m, opt, epochs=6, choose=1, hard=5, window=4, lam=lam)
        for _ in range(4):
            train_steps(m, opt, pruner, x, y, 12)
            pruner.epoch_end()
        assert pruner.phase == "soft"
        assert (pruner.lam > 0) == (lam == "auto")
        shares[lam] = sum(float((layer.weight.detach() * ~layer.mask.mask()).norm() / layer.weight.detach().norm())
                          for layer in prunable_layers(m)) / len(prunable_layers(m))
    assert shares["auto"] < 0.6 * shares[0.0]

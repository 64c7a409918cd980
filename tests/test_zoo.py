"""End-to-end behaviour of compile/select/harden on a zoo of model shapes."""

import copy

import pytest
import torch
import torch.nn.functional as F

import clicktrain as ct
from clicktrain.passes.insert_masks import prunable_layers

EXPECTED_PRUNABLE = {
    "vgg": ["features.3", "features.7", "features.10"],
    "resnet": ["layers.0.conv1", "layers.0.conv2", "layers.1.conv1", "layers.1.conv2", "layers.2.conv1", "layers.2.conv2"],
    "functional": ["w1", "shared"],
    "branches": ["left", "right", "merge"],
    "mixed": ["dilated", "reflect", "strided"],
}


def compiled(model, example, **cfg):
    return ct.compile_for_training(model, example, config=ct.PruneConfig(**cfg))


def kernel_nnz(w):
    return (w != 0).reshape(*w.shape[:2], 9).sum(-1)


def assert_pattern_invariant(m):
    for layer in prunable_layers(m):
        w, mask = layer.weight.detach(), layer.mask.mask()
        assert not bool(((w != 0) & ~mask).any()), f"{layer.site.name}: weight outside its pattern"
        assert int(kernel_nnz(w).max()) <= layer.mask.pattern_nnz
        dropped = layer.mask.pattern_ids == -1
        assert int(kernel_nnz(w)[dropped].sum()) == 0, f"{layer.site.name}: dropped kernel not zero"


def test_finds_expected_prunable_convs(zoo_case):
    name, model, x = zoo_case
    m = compiled(model, x)
    assert [layer.site.name for layer in prunable_layers(m)] == EXPECTED_PRUNABLE[name]


def test_equivalent_before_selection(zoo_case):
    _, model, x = zoo_case
    model.eval()
    m = compiled(model, x)
    m.eval()
    torch.testing.assert_close(m(x), model(x), atol=1e-5, rtol=0)
    # still equivalent after patterns are selected but not hardened (the soft phase)
    ct.select_patterns(m)
    torch.testing.assert_close(m(x), model(x), atol=1e-5, rtol=0)


def test_harden_equals_masked_dense_model(zoo_case):
    """After harden, the compiled model computes the original model with masked weights."""
    _, model, x = zoo_case
    model.eval()
    reference = copy.deepcopy(model)
    m = compiled(model, x, connectivity=0.25)
    m.eval()
    ct.select_patterns(m)
    ct.harden(m)
    with torch.no_grad():
        for layer in prunable_layers(m):
            reference.get_parameter(layer.site.weight_target).mul_(layer.mask.mask())
    torch.testing.assert_close(m(x), reference(x), atol=1e-5, rtol=1e-5)
    assert_pattern_invariant(m)


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
def test_invariant_survives_optimizer_steps(zoo_case, optimizer):
    _, model, x = zoo_case
    m = compiled(model, x, connectivity=0.3)
    opt = (torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd_momentum"
           else torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2))
    target = torch.randint(0, 5, (x.shape[0],))
    for _ in range(3):  # build up momentum / Adam moments on the dense weights first
        opt.zero_grad()
        F.cross_entropy(m(x)[:, :5], target).backward()
        opt.step()
    ct.select_patterns(m)
    ct.harden(m)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(m(x)[:, :5], target).backward()
        opt.step()
        assert_pattern_invariant(m)


def test_gradients_flow_to_kept_weights_only(zoo_case):
    _, model, x = zoo_case
    m = compiled(model, x, connectivity=0.25)
    ct.select_patterns(m)
    ct.harden(m)
    m(x).square().sum().backward()
    for layer in prunable_layers(m):
        g, mask = layer.weight.grad, layer.mask.mask()
        assert g is not None
        assert float(g[~mask].abs().max()) == 0.0
        assert float(g[mask].abs().sum()) > 0.0
    for p in m.parameters():
        if p.requires_grad and p.grad is None:
            pytest.fail("a parameter received no gradient")


def test_state_dict_round_trip(zoo_case):
    name, model, x = zoo_case
    model.eval()
    m = compiled(model, x, connectivity=0.4)
    m.eval()
    ct.select_patterns(m)
    ct.harden(m)
    with torch.no_grad():  # move weights so a stale copy would show
        for p in m.parameters():
            p.add_(0.01)
    state = copy.deepcopy(m.state_dict())
    expected = m(x)

    fresh_model = type(model)() if name not in ("vgg", "resnet") else copy.deepcopy(model)
    fresh = compiled(fresh_model, x, connectivity=0.4)
    fresh.eval()
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), expected)
    for a, b in zip(prunable_layers(m), prunable_layers(fresh)):
        assert b.mask.phase is ct.Phase.HARD
        assert torch.equal(a.mask.pattern_ids, b.mask.pattern_ids)
        assert torch.equal(a.mask.library, b.mask.library)


def test_selection_is_deterministic(zoo_case):
    _, model, x = zoo_case
    m1 = compiled(model, x, connectivity=0.5)
    lib1 = ct.select_patterns(m1)
    ids1 = [layer.mask.pattern_ids.clone() for layer in prunable_layers(m1)]
    m2 = compiled(copy.deepcopy(model), x, connectivity=0.5)
    lib2 = ct.select_patterns(m2)
    assert torch.equal(lib1, lib2)
    for a, layer in zip(ids1, prunable_layers(m2)):
        assert torch.equal(a, layer.mask.pattern_ids)


def test_report_counts_all_conv_weights(zoo_case):
    _, model, x = zoo_case
    m = compiled(model, x, connectivity=0.5)
    ct.select_patterns(m)
    ct.harden(m)
    report = ct.pruning_report(m)
    all_conv = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Conv2d))
    all_conv += sum(p.numel() for n, p in model.named_parameters() if p.dim() == 4 and "." not in n)
    assert report.conv_weights == all_conv
    kept = sum(int(layer.mask.mask().sum()) for layer in prunable_layers(m))
    kept += sum(r.weights for r in report.layers if r.treatment != "pattern")
    assert report.kept_conv_weights == kept
    assert report.compression_ratio == pytest.approx(all_conv / kept)
    text = str(report)
    for layer in prunable_layers(m):
        assert layer.site.name in text


def test_invariant_holds_across_the_guard_interval():
    """The optimizer hook does a full pass only every REAPPLY_EVERY steps: zeros must hold in between."""
    from clicktrain.runtime.masks import REAPPLY_EVERY
    from zoo import BranchNet
    x = torch.randn(4, 3, 10, 10)
    m = compiled(BranchNet(), x, connectivity=0.3)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    ct.select_patterns(m)
    ct.harden(m)
    for _ in range(REAPPLY_EVERY + 5):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
        assert_pattern_invariant(m)

"""Deployment: ONNX export checked with onnxruntime, pattern metadata, plain-PyTorch export."""

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import clicktrain as ct
from clicktrain.cli import main
from clicktrain.codegen.export import METADATA_KEY, decode_ids, decode_library
from clicktrain.codegen.onnx_inspect import inspect_onnx
from clicktrain.models import build_model
from clicktrain.passes.insert_masks import prunable_layers


def hardened(model, x, connectivity=0.3):
    model.eval()
    m = ct.compile_for_training(model, x, config=ct.PruneConfig(connectivity=connectivity))
    ct.select_patterns(m)
    ct.harden(m)
    return m.eval()


def ort_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("harden_first", [False, True])
def test_zoo_exports_match_onnxruntime(zoo_case, tmp_path, harden_first):
    _, model, x = zoo_case
    m = hardened(model, x) if harden_first else ct.compile_for_training(model.eval(), x).eval()
    path = ct.export_onnx(m, tmp_path / "m.onnx", x)
    onnx.checker.check_model(onnx.load(str(path)))
    for batch in (1, 5):
        xb = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            expected = m(xb).numpy()
        np.testing.assert_allclose(ort_run(path, xb), expected, atol=1e-4, rtol=1e-4)
    text, ok = inspect_onnx(path)
    assert ok, text


def test_pruned_weights_are_exact_zeros_and_metadata_round_trips(tmp_path):
    x = torch.randn(2, 1, 28, 28)
    m = hardened(build_model("vgg_small", 1, 10), x, connectivity=0.5)
    path = ct.export_onnx(m, tmp_path / "m.onnx", x)
    proto = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert meta["version"] == 1
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    layers = {layer.site.name: layer for layer in prunable_layers(m)}
    pattern_entries = [e for e in meta["layers"] if "library" in e]
    assert [e["conv"] for e in pattern_entries] == list(layers)
    assert meta["layers"][0]["dense"] == "first conv (skip_first_conv=True)"
    for entry in pattern_entries:
        layer = layers[entry["conv"]]
        assert entry["k"] == 4
        np.testing.assert_array_equal(decode_library(entry["library"]), layer.mask.library.numpy())
        ids = decode_ids(entry["pattern_ids"], entry["shape"][:2])
        np.testing.assert_array_equal(ids, layer.mask.pattern_ids.numpy())
        w = weights[entry["weight"]]
        np.testing.assert_array_equal(w != 0, layer.mask.mask().numpy() & (layer.weight.detach().numpy() != 0))
        assert entry["density"] == pytest.approx(float(layer.mask.mask().float().mean()))


def test_batchnorm_folding_keeps_zeros(tmp_path):
    x = torch.randn(2, 1, 28, 28)
    m = hardened(build_model("vgg_small", 1, 10), x)
    path = ct.export_onnx(m, tmp_path / "folded.onnx", x, fold_batchnorm=True)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in ops
    text, ok = inspect_onnx(path)
    assert ok, text
    unfolded = ct.export_onnx(m, tmp_path / "plain.onnx", x)
    assert "BatchNormalization" in [n.op_type for n in onnx.load(str(unfolded)).graph.node]


def test_inspect_catches_a_tampered_model(tmp_path, capsys):
    x = torch.randn(2, 1, 28, 28)
    m = hardened(build_model("vgg_small", 1, 10), x)
    path = ct.export_onnx(m, tmp_path / "m.onnx", x)
    assert main(["inspect", str(path)]) == 0
    proto = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    victim = next(e for e in meta["layers"] if "library" in e)
    for init in proto.graph.initializer:
        if init.name == victim["weight"]:
            w = numpy_helper.to_array(init).copy()
            w.reshape(-1)[np.flatnonzero(w.reshape(-1) == 0)[0]] = 0.5  # a weight outside the pattern
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    capsys.readouterr()
    assert main(["inspect", str(tampered)]) == 1
    out = capsys.readouterr().out
    assert "VIOLATED" in out and "outside the declared patterns" in out and victim["conv"] in out


def test_export_refuses_bad_states_and_writes_nothing(tmp_path):
    x = torch.randn(2, 1, 28, 28)
    model = build_model("vgg_small", 1, 10).eval()
    with pytest.raises(ct.StateError, match="compile_for_training"):
        ct.export_onnx(model, tmp_path / "a.onnx", x)
    m = ct.compile_for_training(model, x)
    ct.select_patterns(m)
    with pytest.raises(ct.StateError, match="harden"):
        ct.export_onnx(m, tmp_path / "b.onnx", x)
    ct.harden(m)
    layer = prunable_layers(m)[0]
    with torch.no_grad():
        layer.weight[~layer.mask.mask()] = 0.1  # edited behind clicktrain's back
    with pytest.raises(ct.ClicktrainError, match="outside its declared patterns; nothing was exported"):
        ct.export_onnx(m, tmp_path / "c.onnx", x)
    with pytest.raises(ct.ClicktrainError, match="outside its declared patterns"):
        ct.export_torch(m, tmp_path / "c.pt")
    layer.mask.apply_(layer.weight)
    with pytest.raises(ct.ExportError, match="is a directory"):
        ct.export_onnx(m, tmp_path, x)
    with pytest.raises(ct.ExportError, match="does not exist"):
        ct.export_onnx(m, tmp_path / "no" / "d.onnx", x)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial or temp files


def test_export_torch_loads_without_clicktrain(tmp_path):
    x = torch.randn(3, 1, 28, 28)
    model = build_model("vgg_small", 1, 10)
    m = hardened(model, x)
    path = ct.export_torch(m, tmp_path / "m.pt")
    ckpt = torch.load(path, weights_only=True)
    fresh = build_model("vgg_small", 1, 10).eval()
    fresh.load_state_dict(ckpt["state_dict"])  # strict: exactly the original model's keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x))
    for name, mask in ckpt["masks"].items():
        assert not bool((fresh.get_parameter(name)[~mask] != 0).any())


def test_cli_export_round_trip(tmp_path, capsys):
    x = torch.randn(2, 1, 28, 28)
    m = hardened(build_model("vgg_small", 1, 10), x, connectivity=0.5)
    ckpt = ct.export_torch(m, tmp_path / "m.pt")
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--onnx", str(out), "--model", "vgg_small"]) == 0
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(out, x), m(x).numpy(), atol=1e-4, rtol=1e-4)
    text, ok = inspect_onnx(out)
    assert ok and "pattern k=4" in text
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "r.onnx"), "--model", "resnet20"]) == 2
    assert "does not fit --model resnet20" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none.pt"), "--onnx", str(tmp_path / "r.onnx"), "--model", "vgg_small"]) == 2
    assert not (tmp_path / "r.onnx").exists()


def test_cli_exports_a_trainer_checkpoint(tmp_path, capsys):
    """`clicktrain export` takes `clicktrain train`'s checkpoint.pt as it is."""
    from clicktrain.runtime.trainer import TrainConfig, Trainer
    from clicktrain.runtime import trainer as trainer_module

    x = torch.rand(256, 1, 12, 12)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    data = (x[:200], y[:200], x[200:], y[200:], "synthetic")
    cfg = TrainConfig(model="vgg_small", width=1.0, epochs=2, choose=1, hard=1, out=str(tmp_path / "run"), threads=1)
    trainer = Trainer(cfg)
    trainer._data = lambda: data
    trainer.run()
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "run" / "checkpoint.pt"), "--onnx", str(out), "--input-shape", "1,12,12",
                 "--num-classes", "2"]) == 0
    text, ok = inspect_onnx(out)
    assert ok and "pattern k=4" in text
    assert trainer_module.CHECKPOINT == "checkpoint.pt"

"""Leaving clicktrain: a standard ONNX model with pattern metadata, or a plain PyTorch state.

ONNX: the compiled model is folded (masks multiplied into the weights, so pruned weights are
exact zeros) and exported with torch's TorchScript-based exporter through a thin wrapper
module -- deliberately: it needs no onnxscript/dynamo machinery, keeps ordinary ``Conv``
nodes, and the wrapper sidesteps the exporter's failure on a bare GraphModule. Parameters are
never re-laid out (the filter-kernel reorder is kernel-internal data), so nothing needs
undoing. The pattern metadata travels in ``metadata_props`` (encoding in docs/deployment.md).
"""

from __future__ import annotations

import base64
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import ClicktrainError
from ..passes.base import compile_state
from ..passes.conv_sites import META_KEY
from ..passes.insert_masks import prunable_layers
from ..runtime.masks import Phase
from ..util import atomic_write
from .fold import check_exportable, folded_graph

METADATA_KEY = "clicktrain.patterns"
METADATA_VERSION = 1


class ExportError(ClicktrainError):
    """The model cannot be exported as asked; nothing was written."""


class _Wrapped(nn.Module):
    """The TorchScript exporter cannot take a GraphModule directly; a plain parent can."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args):
        return self.graph_module(*args)


def encode_library(library: torch.Tensor) -> list[int]:
    """Each pattern as a 9-bit integer, bit i = kernel position i (row-major)."""
    weights = 1 << torch.arange(9)
    return [int(v) for v in (library.long() * weights).sum(1)]


def decode_library(codes: list[int]) -> np.ndarray:
    return np.array([[(c >> i) & 1 for i in range(9)] for c in codes], dtype=bool).reshape(-1, 9)


def encode_ids(pattern_ids: torch.Tensor) -> str:
    return base64.b64encode(pattern_ids.to(torch.int8).contiguous().numpy().tobytes()).decode("ascii")


def decode_ids(text: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.int8).reshape(shape)


def _conv_sites_in_order(gm: fx.GraphModule) -> list:
    # conv2d calls, or the PatternConv2d calls they were lowered to (both carry the site)
    return [node.meta[META_KEY] for node in gm.graph.nodes if META_KEY in node.meta]


def pattern_metadata(gm: fx.GraphModule, onnx_convs: list) -> list[dict]:
    """Per ONNX Conv node (in graph order) the pattern facts of the conv it came from."""
    sites = _conv_sites_in_order(gm)
    if len(sites) != len(onnx_convs):
        raise ExportError(f"the exported graph has {len(onnx_convs)} Conv nodes but the model has {len(sites)} convs; "
                          f"cannot attach pattern metadata")
    masks = {layer.site.name: layer.mask for layer in prunable_layers(gm)}
    entries = []
    for site, (node_name, weight_name, shape) in zip(sites, onnx_convs):
        if tuple(shape) != tuple(site.weight_shape):
            raise ExportError(f"ONNX Conv {node_name} has weight shape {tuple(shape)}, expected {site.weight_shape} "
                              f"for '{site.name}'")
        entry = {"node": node_name, "weight": weight_name, "conv": site.name, "shape": list(site.weight_shape)}
        mask = masks.get(site.name)
        if mask is not None and mask.phase is Phase.HARD:
            m = mask.mask()
            entry.update(k=mask.pattern_nnz, library=encode_library(mask.library),
                         pattern_ids=encode_ids(mask.pattern_ids), density=float(m.sum()) / m.numel())
        else:
            entry.update(dense=site.reason or "not hardened", density=1.0)
        entries.append(entry)
    return entries


def export_onnx(model: fx.GraphModule, path: str | os.PathLike, example_inputs, opset: int | None = None,
                dynamic_batch: bool = True, fold_batchnorm: bool = False, verify: bool = True) -> Path:
    """Export a compiled (dense or hardened) model to a standard ONNX file with pattern metadata.

    ``fold_batchnorm`` folds BatchNorm into the preceding convs (pruned zeros stay zero).
    With ``verify`` the file is checked with ``onnx.checker`` and onnxruntime's output compared
    with the model's in eval mode (1e-4) before it is written. The file is written atomically.
    """
    import onnx

    compile_state(model)
    check_exportable(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give a file path such as {path / 'model.onnx'}")
    if not path.parent.exists():
        raise ExportError(f"directory {path.parent} does not exist; create it first")

    plain = folded_graph(model).eval()
    input_names = [f"input{i}" if len(example_inputs) > 1 else "input" for i in range(len(example_inputs))]
    with torch.no_grad():
        reference = plain(*example_inputs)
    outputs = reference if isinstance(reference, (tuple, list)) else (reference,)
    output_names = ["output" if len(outputs) == 1 else f"output{i}" for i in range(len(outputs))]
    dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                _Wrapped(plain).eval(), example_inputs, buffer, dynamo=False, opset_version=opset,
                input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                training=torch.onnx.TrainingMode.EVAL if fold_batchnorm else torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=True)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}", original=exc) from None
    proto = onnx.load_from_string(buffer.getvalue())
    initializers = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}  # deduplicated weights
    convs = []
    for n in proto.graph.node:
        if n.op_type == "Conv":
            weight = n.input[1]
            while weight in aliases:
                weight = aliases[weight]
            convs.append((n.name, weight, initializers.get(weight, ())))
    meta = {"version": METADATA_VERSION, "layers": pattern_metadata(model, convs)}
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, separators=(",", ":"))
    onnx.checker.check_model(proto)
    if verify:
        _verify_with_onnxruntime(proto, plain, example_inputs, input_names, dynamic_batch)
    data = proto.SerializeToString()
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _verify_with_onnxruntime(proto, plain, example_inputs, input_names, dynamic_batch) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    batches = [example_inputs]
    if dynamic_batch:  # a different batch size, to prove the batch axis is really dynamic
        batches.append(tuple(torch.cat([x, x[:1]]) if x.dim() else x for x in example_inputs))
    for inputs in batches:
        with torch.no_grad():
            expected = plain(*inputs)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = session.run(None, {n: x.numpy() for n, x in zip(input_names, inputs)})
        for e, g in zip(expected, got):
            err = float(np.abs(e.numpy() - g).max())
            if err > 1e-4 * max(1.0, float(np.abs(e.numpy()).max())):
                raise ExportError(f"onnxruntime output differs from the model's by {err:.3g} "
                                  f"(batch {inputs[0].shape[0]}); nothing was written")


def export_torch(model: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Save a plain PyTorch checkpoint: ``{"state_dict", "masks", "patterns", "clicktrain"}``.

    ``state_dict`` has the original model's keys with pruned weights as exact zeros, so
    ``OriginalModel().load_state_dict(ckpt["state_dict"])`` works without clicktrain.
    ``masks`` maps weight names to bool masks; ``patterns`` holds library and pattern ids
    per conv so clicktrain can restore the pruning state.
    """
    state = compile_state(model)
    check_exportable(model)
    original = state.original
    hardened = [layer for layer in prunable_layers(model) if layer.mask.phase is Phase.HARD]
    masked = {layer.site.weight_target: layer.mask.mask() for layer in hardened}
    # the original module's state dict (its own keys), with pruned weights zeroed in the copy
    state_dict = {}
    for key, value in original.state_dict().items():
        value = value.detach().clone()
        if key in masked:
            value.masked_fill_(~masked[key], 0)
        state_dict[key] = value
    payload = {
        "state_dict": state_dict,
        "masks": {k: v.clone() for k, v in masked.items()},
        "patterns": {layer.site.name: {"weight": layer.site.weight_target, "library": layer.mask.library.clone(),
                                       "pattern_ids": layer.mask.pattern_ids.clone()} for layer in hardened},
        "clicktrain": {"format": 1, "config": dict(vars(state.config))},
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _from_trainer_checkpoint(payload: dict, shape: tuple, num_classes: int):
    """A ``clicktrain train`` checkpoint: rebuild its model and load the compiled state (masks,
    pattern ids and phase included)."""
    from ..api import compile_for_training
    from ..runtime.trainer import TrainConfig, Trainer
    cfg = TrainConfig(**{k: v for k, v in payload["config"].items() if k in TrainConfig.__dataclass_fields__})
    model = Trainer(cfg)._model(shape[0], num_classes).eval()
    example = torch.zeros(1, *shape)
    m = compile_for_training(model, example, config=cfg.prune_config())
    try:
        m.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise ExportError(f"the trainer checkpoint does not fit its own model at input shape {shape} and "
                          f"{num_classes} classes: {str(exc).splitlines()[0]}; pass the training data's "
                          f"--input-shape and --num-classes", original=exc) from None
    return m.eval(), example


def load_checkpoint(path: str | os.PathLike, model_name: str | None, input_shape: str, num_classes: int = 10):
    """Rebuild a compiled model from a ``clicktrain train`` checkpoint (model and pruning state
    as trained), an ``export_torch`` file (pruning state restored and hardened) or a plain
    state_dict of the named model (exported dense)."""
    from ..api import compile_for_training, harden
    from ..config import PruneConfig
    from ..models import build_model

    try:
        shape = tuple(int(v) for v in input_shape.split(","))
        assert len(shape) == 3
    except (ValueError, AssertionError):
        raise ExportError(f"--input-shape must be C,H,W (e.g. 1,28,28), got {input_shape!r}") from None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except FileNotFoundError:
        raise ExportError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}", original=exc) from None
    if not isinstance(payload, dict):
        raise ExportError(f"{path} holds a {type(payload).__name__}, not a state_dict or an export_torch checkpoint")
    if {"model", "config", "optimizer"} <= payload.keys():
        return _from_trainer_checkpoint(payload, shape, num_classes)
    if model_name is None:
        raise ExportError(f"{path} is not a `clicktrain train` checkpoint: pass --model to say which model it holds")
    is_ours = "state_dict" in payload and "clicktrain" in payload
    state_dict = payload["state_dict"] if is_ours else payload
    config = PruneConfig(**{k: tuple(v) if k == "skip" else v
                            for k, v in payload["clicktrain"]["config"].items()}) if is_ours else PruneConfig()
    model = build_model(model_name, in_channels=shape[0], num_classes=num_classes)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ExportError(f"{path} does not fit --model {model_name}: {str(exc).splitlines()[0]}", original=exc) from None
    model.eval()
    example = torch.zeros(1, *shape)
    m = compile_for_training(model, example, config=config)
    patterns = payload.get("patterns", {}) if is_ours else {}
    if patterns:
        layers = {layer.site.name: layer for layer in prunable_layers(m)}
        missing = set(patterns) - set(layers)
        if missing:
            raise ExportError(f"{path} has patterns for convs {sorted(missing)} that --model {model_name} does not prune")
        for name, entry in patterns.items():
            layers[name].mask.assign(entry["library"], entry["pattern_ids"])
            layers[name].mask.phase = Phase.SELECTED
        harden(m)
    return m.eval(), example

"""The per-layer pruning report."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.fx as fx

from ..passes.base import compile_state
from ..passes.insert_masks import prunable_layers
from ..runtime.masks import Phase
from ..util import format_table


@dataclass
class LayerReport:
    name: str
    shape: str
    treatment: str          # "pattern" or "dense: <reason>"
    phase: str
    kernels: int
    kept_kernels: int
    patterns_used: int
    weights: int
    kept_weights: int

    @property
    def density(self) -> float:
        return self.kept_weights / self.weights if self.weights else 1.0


class ConvRatios:
    """Density and compression from ``conv_weights`` and ``kept_conv_weights``."""

    @property
    def conv_density(self) -> float:
        return self.kept_conv_weights / max(1, self.conv_weights)

    @property
    def compression_ratio(self) -> float:
        """All conv weights / kept conv weights (dense convs count in both; BatchNorm never)."""
        return self.conv_weights / max(1, self.kept_conv_weights)


@dataclass
class PruningReport(ConvRatios):
    layers: list[LayerReport]
    library: list[str]
    compile_seconds: dict
    pattern_block: tuple = (1, 1)  # PruneConfig.pattern_block: (filters, input channels) sharing a pattern

    @property
    def conv_weights(self) -> int:
        return sum(r.weights for r in self.layers)

    @property
    def kept_conv_weights(self) -> int:
        return sum(r.kept_weights for r in self.layers)

    def as_dict(self) -> dict:
        return {"layers": [dict(asdict(r), density=r.density) for r in self.layers], "library": self.library,
                "pattern_block": list(self.pattern_block),
                "conv_weights": self.conv_weights, "kept_conv_weights": self.kept_conv_weights,
                "conv_density": self.conv_density, "compression_ratio": self.compression_ratio}

    def __str__(self) -> str:
        rows = [[r.name, r.shape, r.treatment, r.phase, f"{r.kept_kernels}/{r.kernels}",
                 r.patterns_used if r.treatment == "pattern" else "-", f"{r.density:.3f}",
                 f"{1 / r.density:.2f}x" if r.density else "inf"] for r in self.layers]
        rows.append(["total", "", "", "", "", "", f"{self.conv_density:.3f}", f"{self.compression_ratio:.2f}x"])
        text = format_table(["conv", "weight", "treatment", "phase", "kept kernels", "patterns", "density", "CR"], rows)
        if self.library:
            text += "\npattern library: " + "  ".join(f"{i}:{p}" for i, p in enumerate(self.library))
        if tuple(self.pattern_block) != (1, 1):
            text += (f"\npattern block: {self.pattern_block[0]}x{self.pattern_block[1]} (filters x input channels "
                     f"sharing one pattern, dropped together)")
        if self.compile_seconds:
            text += (f"\nkernel compile: {sum(self.compile_seconds.values()):.2f} s for {len(self.compile_seconds)} "
                     f"layers, convs and BatchNorms (wall time, each layer's wait for its kernels: 0 s = loaded from "
                     f"the cache, or built while an earlier layer was waited for)")
        return text


def pruning_report(gm: fx.GraphModule) -> PruningReport:
    """Per conv: shape, treatment, kept kernels, patterns used, density and compression.

    Kept weights of a prunable conv are the mask's size once patterns are selected (what
    ``harden`` keeps); of a dense conv, all its weights."""
    from ..patterns import pattern_str
    state = compile_state(gm)
    masks = {layer.site.name: layer.mask for layer in prunable_layers(gm)}
    rows, library = [], []
    for site in state.sites.values():
        o, c = site.weight_shape[:2]
        mask = masks.get(site.name)
        if mask is None or mask.phase is Phase.DENSE:
            kept_k, kept_w, used = o * c, site.num_weights, 0
        else:
            ids = mask.pattern_ids.long()
            kept_k, kept_w = mask.kept_kernels, int(mask.mask().sum())
            used = int(torch.unique(ids[ids >= 0]).numel())
            library = library or [pattern_str(p) for p in mask.library]
        rows.append(LayerReport(
            name=site.name, shape=site.describe_shape(),
            treatment="pattern" if site.prunable else f"dense: {site.reason}",
            phase=mask.phase.name if mask is not None else "-",
            kernels=o * c, kept_kernels=kept_k, patterns_used=used, weights=site.num_weights, kept_weights=kept_w))
    return PruningReport(rows, library, dict(state.compile_seconds), state.config.pattern_block)


@dataclass
class ModelCosts(ConvRatios):
    """What a model costs as it stands, per sample (see :func:`model_costs`)."""

    conv_weights: int        # of the model as first built (the reference for compression)
    kept_conv_weights: int
    parameters: int          # all parameters minus pruned conv weights
    flops: int               # forward FLOPs per sample of convs and linear layers (2 per multiply-add)


def conv_positions(model: torch.nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Output positions (H*W) of every ``nn.Conv2d`` of a plain model, from one forward."""
    sizes, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: sizes.__setitem__(name, out.shape[2] * out.shape[3])))
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(example[:1])
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return sizes


def _linear_flops(model: torch.nn.Module) -> int:
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def model_costs(model: torch.nn.Module, applied: bool = True, positions: dict[str, int] | None = None,
                reference_conv_weights: int | None = None) -> ModelCosts:
    """Conv weights, kept weights, parameters and forward FLOPs of ``model``.

    A model from ``compile_for_training`` counts its masks once ``applied`` (before that the
    selected patterns are a plan, every weight still trains). A plain model counts what it has
    (``positions`` from :func:`conv_positions`); ``reference_conv_weights`` is its conv weight
    count as first built, for models that shrink (PruneTrain)."""
    params = sum(p.numel() for p in model.parameters())
    if hasattr(model, "_clicktrain"):
        state = compile_state(model)
        report = pruning_report(model)
        total = report.conv_weights
        kept = report.kept_conv_weights if applied else total
        flops = 0
        for row in report.layers:
            shape = state.sites[row.name].output_shape
            positions_here = int(shape[2] * shape[3]) if shape is not None else 1
            flops += 2 * (row.kept_weights if applied else row.weights) * positions_here
        return ModelCosts(total, kept, params - (total - kept), flops + _linear_flops(model))
    if positions is None:
        raise ValueError("model_costs of a plain model needs positions=conv_positions(model, example)")
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    kept = sum(m.weight.numel() for m in convs.values())
    flops = sum(2 * m.weight.numel() * positions[name] for name, m in convs.items())
    return ModelCosts(reference_conv_weights or kept, kept, params, flops + _linear_flops(model))

"""The public API: compile, select, harden."""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from .config import PruneConfig
from .errors import ConfigError, StateError, TargetError
from .frontend.trace import trace_model
from .machine import check_spin_waits
from .passes.base import CompileState, PassManager, compile_state
from .passes.dump import DumpWriter
from .passes.insert_masks import prunable_layers
from .passes.lower import TARGETS
from .passes.pipeline import compile_pipeline, harden_pipeline
from .runtime.masks import Phase
from .runtime.selection import LIBRARIES, assign_patterns, generate_library


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise TargetError(f"unknown target {target!r}; choose one of {', '.join(map(repr, TARGETS))}")
    if target in ("llvm", "cuda"):
        from .codegen.target import resolve_target
        resolve_target(target)  # fails early, and clearly, if TVM cannot serve the target


def compile_for_training(model: nn.Module, example_inputs, target: str = "torch",
                         config: PruneConfig | None = None, debug_dir: str | os.PathLike | None = None,
                         leaf_modules: Iterable[str | type] = ()) -> fx.GraphModule:
    """Trace ``model`` and prepare its prunable convs for pattern pruning.

    Returns a GraphModule that computes exactly what ``model`` computes until patterns are
    selected and hardened, and trains with any optimizer. It shares parameters with
    ``model``. ``example_inputs`` is a tensor or a tuple of the forward's arguments.
    ``leaf_modules`` names submodules (or types) to call as black boxes instead of tracing
    through them. ``debug_dir`` receives one numbered file per pass.
    """
    config = PruneConfig() if config is None else config
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"config must be a clicktrain.PruneConfig, got {type(config).__name__}")
    _check_target(target)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    dump = DumpWriter(debug_dir) if debug_dir is not None else None
    gm = trace_model(model, leaf_modules)
    gm._clicktrain = CompileState(config=config, target=target, dump=dump, original=model)
    if dump is not None:
        dump.write("trace", gm)
    gm = PassManager(compile_pipeline(gm._clicktrain, example_inputs), dump)(gm).graph_module
    gm.train(model.training)
    return gm


def select_patterns(model: fx.GraphModule, importance: Mapping[str, torch.Tensor] | None = None,
                    library: torch.Tensor | None = None, library_strategy: str = "generated",
                    connectivity: float | Mapping[str, float] | None = None) -> torch.Tensor:
    """Choose the pattern library and, per kernel, its pattern; drop the least important
    kernels (``config.connectivity``). Masks are not applied until :func:`harden`.

    ``importance`` maps conv names to per-weight importance ``(O, C, 3, 3)``; missing layers
    (and the default) use weight magnitude ``W**2``. ``library`` fixes the library as a
    ``(num_patterns, 9)`` bool tensor; otherwise ``library_strategy`` (``generated``,
    ``frequency`` or ``fixed``) makes one. ``connectivity`` overrides the config's drop ratio,
    for all layers or per layer name. Returns the library.
    """
    state = compile_state(model)
    layers = prunable_layers(model)
    if not layers:
        return torch.zeros(0, 9, dtype=torch.bool)
    for layer in layers:
        if layer.mask.phase is Phase.HARD:
            raise StateError(f"'{layer.site.name}' is already hardened; patterns can be selected only before harden()")
    importance = dict(importance or {})
    unknown = set(importance) - {layer.site.name for layer in layers}
    if unknown:
        raise ConfigError(f"importance given for unknown prunable convs {sorted(unknown)}; "
                          f"known: {[layer.site.name for layer in layers]}")
    scores = {layer.site.name: importance.get(layer.site.name, layer.weight.detach() ** 2) for layer in layers}
    cfg = state.config
    if library is None:
        if library_strategy not in LIBRARIES:
            raise ConfigError(f"library_strategy={library_strategy!r}; choose one of {LIBRARIES}")
        library = generate_library(scores, cfg.pattern_nnz, cfg.num_patterns, library_strategy)
    else:
        library = torch.as_tensor(library, dtype=torch.bool).reshape(-1, 9)
        if library.shape[0] != cfg.num_patterns or not bool((library.sum(1) == cfg.pattern_nnz).all()):
            raise ConfigError(f"library must hold {cfg.num_patterns} patterns of {cfg.pattern_nnz} weights, "
                              f"got shape {tuple(library.shape)} with sizes {library.sum(1).tolist()}")
    ratios = connectivity if isinstance(connectivity, Mapping) else {}
    default = cfg.connectivity if connectivity is None or isinstance(connectivity, Mapping) else float(connectivity)
    for name, ratio in ratios.items():
        if not 0 <= ratio < 1:
            raise ConfigError(f"connectivity for '{name}' must be in [0, 1), got {ratio}")
    for layer in layers:
        ids = assign_patterns(scores[layer.site.name], library, ratios.get(layer.site.name, default), cfg.pattern_block)
        layer.mask.assign(library, ids.to(layer.mask.pattern_ids.device))
        layer.mask.phase = Phase.SELECTED
    if state.dump is not None:
        from .passes.harden import layers_table
        state.dump.write("select_patterns", model, layers_table(model), modified=False)
    return library


def harden(model: fx.GraphModule) -> fx.GraphModule:
    """Apply the selected masks for good: pruned weights become zero and stay zero through
    every later optimizer step; prunable convs run the target's pattern kernel."""
    state = compile_state(model)
    for layer in prunable_layers(model):
        if layer.mask.phase is Phase.DENSE:
            raise StateError(f"'{layer.site.name}' has no patterns yet; call ct.select_patterns(model) before ct.harden(model)")
    PassManager(harden_pipeline(state), state.dump)(model)
    if state.target == "llvm":
        check_spin_waits()
    return model

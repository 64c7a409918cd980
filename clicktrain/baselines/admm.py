"""Pruning after training with ADMM, as PatDNN does it: the baseline ClickTrain is measured against.

Three stages over the epoch budget (``split``, default 190 : 120 : 60 as in PatDNN, scaled):

1. ``pretrain``: plain dense training.
2. ``admm``: the pattern library is chosen once from the pretrained weights (PatDNN: the most
   frequent top-k magnitude patterns, ``library="frequency"``). Minimise
   ``loss(W) + rho/2 * ||W - Z + U||^2`` with ``Z`` the projection of ``W + U`` onto the
   constraint set (each kernel keeps its best library pattern, and the ``connectivity``
   fraction of kernels with the least kept magnitude is dropped); every epoch ``Z`` and ``U``
   are updated (``Z = proj(W + U)``, ``U += W - Z``) and ``rho`` grows geometrically from
   ``rho[0]`` to ``rho[1]``.
3. ``retrain``: hard-prune (project ``W`` onto the constraint set and ``harden``) and train
   with the masks applied.

Each stage restarts the learning-rate cycle (``lr_segments``): pretraining at the full rate,
the ADMM and retraining stages at ``finetune_lr`` of it, as fine-tuning stages usually do
(``ADMM.lr_segments_for``; the trainer builds its schedule from it).

Use it like :class:`clicktrain.ClickTrain` (``step`` after each optimizer step, ``epoch_end``
per epoch) on a model from ``compile_for_training``; the constraint set is the same pattern
and connectivity set ClickTrain prunes to, so the two are compared at equal compression.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, StateError
from ..passes.base import compile_state
from ..passes.insert_masks import prunable_layers
from ..runtime.masks import Phase
from ..runtime.selection import LIBRARIES

PATDNN_SPLIT = (190, 120, 60)  # pretrain : ADMM : retrain epochs in PatDNN's CIFAR runs


def split_epochs(epochs: int, split=PATDNN_SPLIT) -> tuple[int, int]:
    """Epoch indices where ADMM starts and where retraining starts, ``split`` scaled to
    ``epochs``; every stage gets at least one epoch."""
    if epochs < 3:
        raise ConfigError(f"ADMM needs at least 3 epochs (pretrain, ADMM, retrain), got {epochs}")
    if len(split) != 3 or min(split) <= 0:
        raise ConfigError(f"ADMM split must be three positive numbers (pretrain:admm:retrain), got {split!r}")
    total = sum(split)
    admm_start = min(max(1, round(epochs * split[0] / total)), epochs - 2)
    retrain_start = min(max(admm_start + 1, admm_start + round(epochs * split[1] / total)), epochs - 1)
    return admm_start, retrain_start


class ADMM:
    def __init__(self, model, optimizer: torch.optim.Optimizer, epochs: int, split=PATDNN_SPLIT,
                 rho: tuple[float, float] = (1e-3, 1e-1), library: str = "frequency", finetune_lr: float = 0.1):
        self.model, self.optimizer, self.epochs = model, optimizer, epochs
        self.config = compile_state(model).config
        self.admm_start, self.retrain_start = split_epochs(epochs, split)
        if not (len(rho) == 2 and 0 < rho[0] <= rho[1]):
            raise ConfigError(f"ADMM rho must be (start, end) with 0 < start <= end, got {rho!r}")
        if library not in LIBRARIES:
            raise ConfigError(f"ADMM library={library!r}; choose one of {LIBRARIES}")
        if not 0 < finetune_lr <= 1:
            raise ConfigError(f"ADMM finetune_lr must be in (0, 1], got {finetune_lr!r}")
        self.rho_range, self.library_mode, self.finetune_lr = tuple(map(float, rho)), library, finetune_lr
        self.layers = prunable_layers(model)
        self.epoch = 0
        self.library: torch.Tensor | None = None
        self.rho = self.rho_range[0]
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []

    @property
    def phase(self) -> str:
        if self.epoch >= self.retrain_start:
            return "retrain"
        return "admm" if self.epoch >= self.admm_start else "pretrain"

    @property
    def applied(self) -> bool:
        """True once the model runs pruned."""
        return self.phase == "retrain"

    @staticmethod
    def lr_segments_for(epochs: int, split=PATDNN_SPLIT, finetune_lr: float = 0.1) -> list[tuple[int, int, float]]:
        """(first epoch, end epoch, peak lr factor) of each learning-rate cycle."""
        admm_start, retrain_start = split_epochs(epochs, split)
        return [(0, admm_start, 1.0), (admm_start, retrain_start, finetune_lr), (retrain_start, epochs, finetune_lr)]

    # -- per step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, loss=None) -> None:
        """The augmented-Lagrangian term's gradient step, ``W -= lr * rho * (W - Z + U)``,
        after each optimizer step of the ADMM stage."""
        if self.phase != "admm":
            return
        lr = self.optimizer.param_groups[0]["lr"]
        for layer in self.layers:
            name = layer.site.name
            w = layer.weight
            w.sub_((w - self.Z[name] + self.U[name]).mul_(lr * self.rho))

    # -- per epoch -------------------------------------------------------------------------
    def epoch_end(self) -> None:
        self.epoch += 1
        if self.epoch == self.admm_start:
            self._start_admm()
        elif self.admm_start < self.epoch < self.retrain_start:
            self._update_dual()
        elif self.epoch == self.retrain_start:
            self._hard_prune()
        self.history.append({"epoch": self.epoch, "phase": self.phase, "rho": self.rho})

    @torch.no_grad()
    def _project(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Euclidean projection onto the pattern + connectivity set: the best library pattern
        per kernel by kept magnitude, the weakest kernels dropped (``select_patterns``)."""
        from ..api import select_patterns
        select_patterns(self.model, {name: v.square() for name, v in values.items()}, library=self.library)
        return {layer.site.name: values[layer.site.name] * layer.mask.mask() for layer in self.layers}

    @torch.no_grad()
    def _start_admm(self) -> None:
        from ..api import select_patterns
        self.library = select_patterns(self.model, None, library_strategy=self.library_mode)  # from magnitudes
        weights = {layer.site.name: layer.weight.detach().clone() for layer in self.layers}
        self.Z = self._project(weights)
        self.U = {name: torch.zeros_like(w) for name, w in weights.items()}

    @torch.no_grad()
    def _update_dual(self) -> None:
        weights = {layer.site.name: layer.weight.detach() for layer in self.layers}
        self.Z = self._project({name: w + self.U[name] for name, w in weights.items()})
        for name, w in weights.items():
            self.U[name].add_(w - self.Z[name])
        stages = max(1, self.retrain_start - self.admm_start - 1)
        done = self.epoch - self.admm_start
        lo, hi = self.rho_range
        self.rho = lo * (hi / lo) ** min(1.0, done / stages)

    def _hard_prune(self) -> None:
        from ..api import harden
        self._project({layer.site.name: layer.weight.detach() for layer in self.layers})
        harden(self.model)
        self.Z, self.U = {}, {}

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "library": self.library, "rho": self.rho, "history": list(self.history),
                "Z": {k: v.clone() for k, v in self.Z.items()}, "U": {k: v.clone() for k, v in self.U.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.library, self.rho = state["epoch"], state["library"], state["rho"]
        self.Z, self.U, self.history = dict(state["Z"]), dict(state["U"]), list(state["history"])
        if self.phase == "retrain" and self.layers and self.layers[0].mask.phase is not Phase.HARD:
            raise StateError("ADMM state says the model was hard-pruned, but its masks are not applied: "
                             "load the model's state_dict before the pruner's")

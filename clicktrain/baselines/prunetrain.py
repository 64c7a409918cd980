"""PruneTrain-style channel pruning during training (Lym et al., SC'19), the structured baseline.

- Group lasso on channels of every conv: one group per output channel (its weight rows, bias,
  and the BatchNorm scale/shift right after it, so a zeroed group outputs exact zeros) and one
  per input channel (its weight columns). ``lam`` is set on the first step so the penalty is
  ``penalty_ratio`` of the loss, then kept (PruneTrain's auto-scaled lambda). How far the
  penalty moves a group is ``lam`` times the sum of the learning rate over all steps; PruneTrain
  ran 182 CIFAR epochs, so on a shorter budget the same ratio prunes almost nothing (measured:
  0.09 of a typical group norm of 1.15 over 10 Fashion-MNIST epochs). Given ``lr_steps`` (this
  run's summed learning rate), ``lam`` is scaled by ``PRUNETRAIN_LR_STEPS / lr_steps`` so the
  penalty moves groups as far as in PruneTrain's own schedule.
- The penalty is applied as a proximal step after each optimizer step
  (``W_g *= max(0, 1 - lr * lam / ||W_g||)``), which makes groups exactly zero.
- Every ``reconfigure_every`` epochs, and after the last one, channels whose producers are all
  zero (or whose consumers all ignore them) are *physically removed*
  (:mod:`clicktrain.baselines.channels`): training continues on a smaller dense model.

The model is a plain ``nn.Module`` (not ``compile_for_training``): PruneTrain's output is a
smaller dense network. ``applied`` is always true: what is removed is gone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .channels import channel_spaces, shrink_space

ZERO_THRESHOLD = 1e-4  # PruneTrain's: a group with a smaller norm counts as zero
# PruneTrain's CIFAR schedule, summed lr over steps: 391 steps/epoch, lr 0.1 for 91 epochs,
# 0.01 for 45, 0.001 for 46
PRUNETRAIN_LR_STEPS = 391 * (91 * 0.1 + 45 * 0.01 + 46 * 0.001)


def _input_norms(conv: nn.Conv2d) -> torch.Tensor:
    """Norm of each input channel's group: the conv's weight columns."""
    return conv.weight.square().sum((0, 2, 3)).sqrt()


def _shrink(norm: torch.Tensor, amount: float) -> torch.Tensor:
    """The proximal group-lasso factor ``max(0, 1 - amount / ||W_g||)`` per group."""
    return (1 - amount / norm.clamp_min(1e-12)).clamp_min_(0)


class PruneTrain:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int, example: torch.Tensor,
                 penalty_ratio: float = 0.2, reconfigure_every: int | None = None, lr_steps: float | None = None):
        if not 0 < penalty_ratio < 1:
            raise ConfigError(f"PruneTrain penalty_ratio must be in (0, 1), got {penalty_ratio!r}")
        if lr_steps is not None and not lr_steps > 0:
            raise ConfigError(f"PruneTrain lr_steps must be > 0, got {lr_steps!r}")
        self.budget_scale = PRUNETRAIN_LR_STEPS / lr_steps if lr_steps else 1.0
        self.model, self.optimizer, self.epochs = model, optimizer, epochs
        self.penalty_ratio = penalty_ratio
        self.reconfigure_every = reconfigure_every or max(1, epochs // 10)
        if self.reconfigure_every < 1:
            raise ConfigError(f"PruneTrain reconfigure_every must be >= 1, got {reconfigure_every!r}")
        self.spaces = channel_spaces(model, example.to(next(model.parameters()).device))
        self.kept = [torch.arange(model.get_submodule(s.producers[0]).out_channels) for s in self.spaces]
        self.convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        self.norm_after = {conv: bn for s in self.spaces for conv, bn in s.norm_after.items()}
        self.free_inputs = {c for s in self.spaces if not s.locked for c in s.consumers}  # input channels that may go
        self.lam: float | None = None
        self.epoch = 0
        self.removed_channels = 0
        self.history: list[dict] = []

    phase = "train"
    applied = True

    # -- the penalty -----------------------------------------------------------------------
    def _out_groups(self, name: str, conv: nn.Conv2d) -> list[torch.Tensor]:
        """The tensors whose row j together form output channel j's group."""
        tensors = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
        if name in self.norm_after:  # the BatchNorm right after: its scale and shift belong to the channel
            bn = self.model.get_submodule(self.norm_after[name])
            tensors += [p for p in (bn.weight, bn.bias) if p is not None]
        return tensors

    def _output_norms(self, name: str, conv: nn.Conv2d) -> torch.Tensor:
        """Norm of each output channel's group (see ``_out_groups``)."""
        return sum(t.reshape(t.shape[0], -1).square().sum(1) for t in self._out_groups(name, conv)).sqrt()

    @torch.no_grad()
    def penalty(self) -> float:
        total = 0.0
        for name, conv in self.convs:
            total += float(self._output_norms(name, conv).sum())
            if name in self.free_inputs:
                total += float(_input_norms(conv).sum())
        return total

    @torch.no_grad()
    def step(self, loss=None) -> None:
        if self.lam is None:
            penalty = self.penalty()
            self.lam = (self.budget_scale * self.penalty_ratio * float(loss) / penalty
                        if loss is not None and penalty > 0 else 0.0)
        shrink = self.optimizer.param_groups[0]["lr"] * self.lam
        if shrink == 0:
            return
        for name, conv in self.convs:
            scale = _shrink(self._output_norms(name, conv), shrink)
            for t in self._out_groups(name, conv):
                t.mul_(scale.view(-1, *([1] * (t.dim() - 1))))
            if name in self.free_inputs:
                conv.weight.mul_(_shrink(_input_norms(conv), shrink).view(1, -1, 1, 1))

    # -- reconfiguration -------------------------------------------------------------------
    @torch.no_grad()
    def _dead_channels(self, space) -> torch.Tensor:
        dead_out = None
        for name in space.producers:
            zero = self._output_norms(name, self.model.get_submodule(name)) < ZERO_THRESHOLD
            dead_out = zero if dead_out is None else dead_out & zero
        if space.consumers and not space.linears:
            unread = None
            for name in space.consumers:
                zero = _input_norms(self.model.get_submodule(name)) < ZERO_THRESHOLD
                unread = zero if unread is None else unread & zero
            dead_out = dead_out | unread
        return dead_out

    def reconfigure(self) -> int:
        """Remove dead channels; returns how many went. A space keeps at least one channel."""
        removed = 0
        for i, space in enumerate(self.spaces):
            if space.locked:
                continue
            dead = self._dead_channels(space).cpu()
            if bool(dead.all()):
                dead[0] = False
            if bool(dead.any()):
                keep = (~dead).nonzero().flatten()
                shrink_space(self.model, space, keep, self.optimizer)
                self.kept[i] = self.kept[i][keep]
                removed += int(dead.sum())
        self.removed_channels += removed
        return removed

    def epoch_end(self) -> None:
        self.epoch += 1
        removed = 0
        if self.epoch % self.reconfigure_every == 0 or self.epoch == self.epochs:
            removed = self.reconfigure()
        self.history.append({"epoch": self.epoch, "removed_channels": removed,
                             "channels": [len(k) for k in self.kept]})

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "lam": self.lam, "kept": [k.clone() for k in self.kept],
                "removed_channels": self.removed_channels, "history": list(self.history)}

    def restore_architecture(self, state: dict) -> None:
        """Shrink a freshly built model to the saved channel sets (before loading its weights)."""
        for i, (space, kept) in enumerate(zip(self.spaces, state["kept"])):
            if len(kept) != len(self.kept[i]):
                position = {int(c): j for j, c in enumerate(self.kept[i])}
                shrink_space(self.model, space, torch.tensor([position[int(c)] for c in kept]), None)
                self.kept[i] = kept.clone()

    def load_state_dict(self, state: dict) -> None:
        self.restore_architecture(state)
        self.epoch, self.lam = state["epoch"], state["lam"]
        self.removed_channels, self.history = state["removed_channels"], list(state["history"])

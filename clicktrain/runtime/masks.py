"""PatternMask: the module the passes insert between a prunable conv and its weight.

It owns the pruning state of one conv weight -- the pattern library, one pattern id per
kernel and the phase -- and is the single source of truth for that weight's mask. The
mask is derived from (library, pattern_ids) on demand and cached until either changes.

Phases: ``DENSE`` (weight passes through), ``SELECTED`` (patterns chosen, weight still
passes through: the soft phase penalises what will be pruned), ``HARD`` (weight is
multiplied by the mask, so pruned weights get zero gradient, and every optimizer step
re-zeroes them in the parameter and in the optimizer's state). Where every reader of the
mask's output is a generated-kernel conv (``consumers_mask``, set by ``LowerToTarget``), the
multiply is skipped: those convs read only the kept weights and return exact zeros as the
pruned weights' gradient, so the product would be computed and thrown away.
"""

from __future__ import annotations

import enum
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from ..patterns import DROPPED, UNASSIGNED, kernel_masks


class Phase(enum.IntEnum):
    DENSE = 0
    SELECTED = 1
    HARD = 2


class PatternMask(nn.Module):
    """Pruning state of one prunable conv weight of shape ``(O, C, 3, 3)``."""

    def __init__(self, site: str, out_channels: int, in_channels: int, pattern_nnz: int, num_patterns: int):
        super().__init__()
        self.site = site
        self.pattern_nnz = pattern_nnz
        self.register_buffer("library", torch.zeros(num_patterns, 9, dtype=torch.bool))
        self.register_buffer("pattern_ids", torch.full((out_channels, in_channels), UNASSIGNED, dtype=torch.int16))
        self.phase = Phase.DENSE
        self.consumers_mask = False  # True: every consumer applies the mask itself (see module doc)
        self._mask_cache: tuple[tuple, torch.Tensor] | None = None
        self._pruned_cache: tuple[tuple, torch.Tensor] | None = None

    # -- state -----------------------------------------------------------------------------
    def get_extra_state(self):
        return {"phase": int(self.phase), "pattern_nnz": self.pattern_nnz}

    def set_extra_state(self, state):
        self.phase = Phase(state["phase"])
        self.pattern_nnz = int(state["pattern_nnz"])

    def assign(self, library: torch.Tensor, pattern_ids: torch.Tensor) -> None:
        """Set the library and per-kernel pattern ids (``DROPPED`` for dropped kernels)."""
        if library.shape != self.library.shape:
            raise ValueError(f"{self.site}: library shape {tuple(library.shape)} != {tuple(self.library.shape)}")
        if pattern_ids.shape != self.pattern_ids.shape:
            raise ValueError(f"{self.site}: pattern_ids shape {tuple(pattern_ids.shape)} != {tuple(self.pattern_ids.shape)}")
        if int(pattern_ids.min()) < DROPPED or int(pattern_ids.max()) >= library.shape[0]:
            raise ValueError(f"{self.site}: pattern ids must be in [-1, {library.shape[0]})")
        self.library.copy_(library)
        self.pattern_ids.copy_(pattern_ids)

    # -- the mask --------------------------------------------------------------------------
    def state_key(self) -> tuple:
        """Changes whenever the library or the pattern ids change (in place or replaced):
        the key of everything derived from them (mask, kernel index arrays)."""
        return (self.library._version, self.pattern_ids._version, self.library.data_ptr(),
                self.pattern_ids.data_ptr(), self.pattern_ids.device)

    def mask(self) -> torch.Tensor:
        """Bool mask ``(O, C, 3, 3)``; all ones while no pattern is assigned."""
        key = self.state_key()
        if self._mask_cache is None or self._mask_cache[0] != key:
            if bool((self.pattern_ids == UNASSIGNED).any()):
                mask = torch.ones(*self.pattern_ids.shape, 3, 3, dtype=torch.bool, device=self.pattern_ids.device)
            else:
                mask = kernel_masks(self.library, self.pattern_ids)
            self._mask_cache = (key, mask)
        return self._mask_cache[1]

    def pruned_float(self, dtype: torch.dtype) -> torch.Tensor:
        """1.0 where the mask prunes, 0.0 where it keeps, as ``dtype`` (cached with the mask)."""
        key = (self.state_key(), dtype)
        cache = self._pruned_cache
        if cache is None or cache[0] != key:
            cache = (key, (~self.mask()).to(dtype))
            self._pruned_cache = cache
        return cache[1]

    @property
    def kept_kernels(self) -> int:
        return int((self.pattern_ids != DROPPED).sum())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.phase is not Phase.HARD:
            return weight
        if isinstance(weight, nn.Parameter):
            _register_hardened(weight, self)
        if self.consumers_mask:
            return weight
        return self.masked(weight)

    def masked(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with its pruned entries zeroed, differentiably (their gradient is zero)."""
        return weight * self.mask()

    def apply_(self, weight: torch.Tensor) -> None:
        """Zero the pruned entries of ``weight`` in place."""
        with torch.no_grad():
            weight.masked_fill_(~self.mask(), 0)  # not mul_: a NaN or inf must not survive pruning

    def extra_repr(self) -> str:
        o, c = self.pattern_ids.shape
        return f"site={self.site!r}, kernels={o}x{c}, k={self.pattern_nnz}, patterns={self.library.shape[0]}, phase={self.phase.name}"


# -- keeping hardened parameters pruned through any optimizer ----------------------------
# Gradients of pruned weights are zero (forward multiplies by the mask), but momentum or
# other optimizer state accumulated before hardening would move them again. A global
# optimizer step post-hook zeroes the pruned entries of each hardened parameter and of the
# optimizer state tensors of its shape. Once both are zero, elementwise optimizers (SGD with
# momentum/Nesterov/weight decay, Adam/AdamW, Adagrad, RMSprop) keep them zero, since a zero
# gradient on a zero weight with zero state updates nothing. So the full pass runs on the
# first step after hardening (or after a mask change) and then every REAPPLY_EVERY steps, as
# a guard against optimizers that are not elementwise; the pass itself reads and writes every
# weight and state tensor, which is measurable on large models.
REAPPLY_EVERY = 50
_hardened = WeakIdKeyDictionary()  # Parameter -> weakref to its PatternMask (keys by identity)
_applied = WeakIdKeyDictionary()   # optimizer -> {(id(param), mask state): steps since the last full pass}
_hook_handle = None


def _register_hardened(param: nn.Parameter, mask_module: PatternMask) -> None:
    global _hook_handle
    ref = _hardened.get(param)
    if ref is None or ref() is not mask_module:
        _hardened[param] = weakref.ref(mask_module)
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_reapply_masks)


def register_hardened(param: nn.Parameter, mask_module: PatternMask) -> None:
    """Make every optimizer step keep ``param`` inside ``mask_module``'s mask."""
    _register_hardened(param, mask_module)


def _reapply_masks(optimizer, args, kwargs) -> None:
    seen = _applied.get(optimizer)
    if seen is None:
        seen = _applied[optimizer] = {}
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                ref = _hardened.get(param)
                owner = ref() if ref is not None else None
                if owner is None or owner.phase is not Phase.HARD:
                    continue
                key = (id(param), owner.state_key())
                since = seen.get(key)
                if since is not None and since < REAPPLY_EVERY:
                    seen[key] = since + 1
                    continue
                seen[key] = 1
                pruned = ~owner.mask()
                param.masked_fill_(pruned, 0)
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.masked_fill_(pruned, 0)

"""Baselines clicktrain is measured against (``benchmarks/compare.py``): pruning after
training with ADMM (PatDNN) and PruneTrain-style channel pruning. Both follow the
:class:`clicktrain.ClickTrain` protocol (``step``, ``epoch_end``, ``phase``, ``state_dict``),
so the same trainer and any user loop run them."""

from .admm import ADMM
from .prunetrain import PruneTrain

__all__ = ["ADMM", "PruneTrain"]

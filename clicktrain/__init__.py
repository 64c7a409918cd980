"""clicktrain: train CNNs that come out pattern-pruned, in one run, on generated kernels."""

from .api import compile_for_training, harden, select_patterns
from .codegen.export import ExportError, export_onnx, export_torch
from .config import PruneConfig
from .errors import ClicktrainError, ConfigError, DataError, StateError, TargetError, TraceError
from .runtime.masks import Phase
from .runtime.report import pruning_report
from .runtime.schedule import ClickTrain

__version__ = "0.1.0"

__all__ = [
    "ClickTrain", "ClicktrainError", "ConfigError", "DataError", "ExportError", "export_onnx", "export_torch", "Phase", "PruneConfig", "StateError", "TargetError",
    "TraceError", "compile_for_training", "harden", "pruning_report", "select_patterns",
]

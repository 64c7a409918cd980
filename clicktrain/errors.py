"""Errors a user can act on.

Every error clicktrain raises on bad input derives from :class:`ClicktrainError` and
says which thing is wrong and what to do about it. Errors from torch.fx or TVM are
caught at the boundary and re-raised as one of these, with the original kept on
``.original`` (and not chained, so the first thing a user reads is our message).
"""


class ClicktrainError(Exception):
    """Base class of all errors clicktrain raises on purpose."""

    def __init__(self, message: str, original: BaseException | None = None):
        super().__init__(message)
        self.original = original


class TraceError(ClicktrainError):
    """The model could not be traced to a torch.fx graph."""


class ConfigError(ClicktrainError, ValueError):
    """A configuration value is out of range or inconsistent."""


class TargetError(ClicktrainError, NotImplementedError):
    """The requested target cannot be used (unknown, not built yet, or no device)."""


class StateError(ClicktrainError, RuntimeError):
    """An operation was called in the wrong pruning phase (e.g. harden before select)."""


class DataError(ClicktrainError, OSError):
    """A data set is missing or a data file is corrupt."""

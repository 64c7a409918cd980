"""Calling a compiled TVM kernel on torch tensors, without copies (DLPack)."""

from __future__ import annotations

import torch


def to_tvm(t: torch.Tensor, keep: list):
    """DLPack view of ``t``; TVM rejects buffers not 64-byte aligned, so those are cloned
    (``keep`` holds the clone alive for the call)."""
    import tvm
    t = t.contiguous()
    if t.data_ptr() % 64:
        t = t.clone()  # a fresh allocation is aligned
    keep.append(t)
    return tvm.runtime.from_dlpack(t)


def call_kernel(func, *args) -> None:
    """``func`` on ``args``: tensors through DLPack, TVM arrays (cached index views) as they are."""
    keep: list = []
    func(*[to_tvm(a, keep) if isinstance(a, torch.Tensor) else a for a in args])

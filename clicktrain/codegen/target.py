"""Resolve a clicktrain target name to a TVM target, chosen at run time for this machine."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import TargetError


@dataclass(frozen=True)
class KernelTarget:
    name: str            # "llvm" or "cuda"
    spec: tuple          # the tvm.target.Target config, as sorted (key, value) pairs
    description: str     # stable text used in cache keys and reports
    simd_lanes: int      # float32 lanes of one vector register (CPU); threads per warp (CUDA)

    @property
    def tvm_target(self):
        """Built on demand: only compiling needs it (a runtime-only TVM can load kernels)."""
        import tvm
        return tvm.target.Target(dict(self.spec))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def resolve_target(name: str) -> KernelTarget:
    try:
        import tvm
    except ImportError as exc:  # pragma: no cover - apache-tvm is a dependency
        raise TargetError(f"target={name!r} needs apache-tvm==0.27.0.post1: pip install 'apache-tvm==0.27.0.post1'",
                          original=exc) from None
    if name == "llvm":
        # "mcpu": "native" silently falls back to a generic CPU without SIMD: ask LLVM instead.
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        flags = _cpu_flags()
        lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
        return KernelTarget("llvm", (("kind", "llvm"), ("mcpu", cpu)), f"llvm -mcpu={cpu}", lanes)
    if name == "cuda":
        arch = _cuda_arch()
        return KernelTarget("cuda", (("arch", arch), ("kind", "cuda")), f"cuda -arch={arch}", 32)
    raise TargetError(f"unknown kernel target {name!r}; choose 'llvm' or 'cuda'")


def _cuda_arch() -> str:
    """$CLICKTRAIN_CUDA_ARCH, else the GPU's compute capability if one is visible, else sm_80
    (generate-and-compile only; set the variable to build for another machine's GPU)."""
    import os
    if os.environ.get("CLICKTRAIN_CUDA_ARCH"):
        return os.environ["CLICKTRAIN_CUDA_ARCH"]
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}"
    except Exception:  # noqa: BLE001
        pass
    return "sm_80"


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False

"""Resolve a clicktrain target name to a TVM target, chosen at run time for this machine."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..errors import TargetError


@dataclass(frozen=True)
class KernelTarget:
    name: str            # "llvm" or "cuda"
    spec: tuple          # the tvm.target.Target config, as sorted (key, value) pairs
    description: str     # stable text used in cache keys and reports
    simd_lanes: int      # float32 lanes of one vector register (CPU); threads per warp (CUDA)
    # vector registers the kernels' register tiles share (x86: AVX-512 32, AVX2 and older 16)
    vector_registers: int = 32
    # a core's L2 cache, which the chwn kernels' blocking plans for (CPU; Zen 3 512 KiB, Zen 4 1 MiB)
    l2_bytes: int = 1 << 20

    @property
    def tvm_target(self):
        """Built on demand: only compiling needs it (a runtime-only TVM can load kernels)."""
        import tvm
        return tvm.target.Target(dict(self.spec))


def vector_registers(lanes: int) -> int:
    """Vector registers of an x86 CPU whose float32 vectors have ``lanes``: AVX-512 has 32,
    AVX2, AVX and SSE 16."""
    return 32 if lanes >= 16 else 16


def _l2_bytes() -> int:
    """This machine's L2 cache per core (Linux sysfs), else 1 MiB."""
    units = {"K": 1 << 10, "M": 1 << 20}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip()
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except (OSError, ValueError):
            continue
    return 1 << 20


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
        cpu, lanes = _llvm_cpu()
        return KernelTarget("llvm", (("kind", "llvm"), ("mcpu", cpu)), f"llvm -mcpu={cpu}", lanes,
                            vector_registers(lanes), _l2_bytes())
    if name == "cuda":
        arch = _cuda_arch()
        return KernelTarget("cuda", (("arch", arch), ("kind", "cuda")), f"cuda -arch={arch}", 32)
    raise TargetError(f"unknown kernel target {name!r}; choose 'llvm' or 'cuda'")


LLVM_CPU_VAR = "CLICKTRAIN_LLVM_CPU"  # generate CPU kernels for this LLVM CPU instead of this machine's
# LLVM feature names whose /proc/cpuinfo flag is spelled differently
_CPUINFO_NAMES = {"sse3": "pni", "bmi": "bmi1", "lzcnt": "abm", "sha": "sha_ni", "avxvnni": "avx_vnni"}
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "amx")  # extensions the kernels may execute


def _llvm_cpu() -> tuple[str, int]:
    """(LLVM CPU name, float32 lanes per vector) of the CPU kernels: this machine's, or the
    one ``$CLICKTRAIN_LLVM_CPU`` names (e.g. ``x86-64-v3`` for AVX2 kernels on an AVX-512
    machine, to measure or test what an AVX2-only machine would run). That CPU must be one
    this machine can execute: a kernel using an extension it lacks would die on an illegal
    instruction, so that is refused here, naming the missing extensions."""
    import os
    from tvm.target import codegen
    flags, wanted = _cpu_flags(), os.environ.get(LLVM_CPU_VAR, "").strip()
    if not wanted:
        # "mcpu": "native" silently falls back to a generic CPU without SIMD: ask LLVM instead
        return codegen.llvm_get_system_cpu(), _lanes(flags)
    import tvm
    if not codegen.llvm_is_valid_cpu(wanted, "x86_64-unknown-linux-gnu"):
        raise TargetError(f"{LLVM_CPU_VAR}={wanted!r} is not a CPU LLVM knows: use an LLVM -mcpu name such as "
                          f"x86-64-v3 (AVX2), x86-64-v4 (AVX-512), znver3 or skylake-avx512, or unset it")
    features = set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": wanted})))
    missing = sorted(f for f in features if f.startswith(_ISA_PREFIXES) and flags
                     and _cpuinfo_name(f) not in flags)
    if missing:
        raise TargetError(f"{LLVM_CPU_VAR}={wanted!r} needs {', '.join(missing)}, which this CPU lacks: its kernels "
                          f"would die on an illegal instruction. Name an older CPU (x86-64-v3 for AVX2) or unset it")
    return wanted, _lanes(features)


def _lanes(features: set[str]) -> int:
    """float32 lanes of the widest vectors among ``features`` (cpuinfo flags or LLVM features,
    which spell these two alike)."""
    return 16 if "avx512f" in features else 8 if "avx2" in features else 4


def _cpuinfo_name(feature: str) -> str:
    """The /proc/cpuinfo flag of an LLVM feature name (``avx512vnni`` -> ``avx512_vnni``)."""
    if feature in _CPUINFO_NAMES:
        return _CPUINFO_NAMES[feature]
    if feature.startswith("avx512") and feature[6:] not in ("f", "bw", "cd", "dq", "vl", "ifma", "vbmi", "er", "pf"):
        return "avx512_" + feature[6:]
    return feature.replace(".", "_").replace("-", "_")


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

"""On-disk cache of compiled kernels, keyed by everything that determines the machine code.

Key = sha256(kernel source, target description, TVM version, clicktrain kernel ABI). The
source already encodes the layer signature and the pattern library, so a layer recompiles
only when its geometry or library changes -- never when its pattern ids or weights do.
Location: ``$CLICKTRAIN_CACHE``, default ``$XDG_CACHE_HOME/clicktrain`` (``~/.cache/clicktrain``).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from ..errors import ClicktrainError
from ..util import atomic_write

KERNEL_ABI = "1"
_loaded: dict[str, object] = {}


def cache_dir() -> Path:
    if os.environ.get("CLICKTRAIN_CACHE"):
        return Path(os.environ["CLICKTRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clicktrain"


def cache_key(source: str, target_description: str) -> str:
    import tvm
    h = hashlib.sha256()
    for part in (KERNEL_ABI, tvm.__version__, target_description, source):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def compile_cached(name: str, source: str, target) -> tuple[object, float, bool]:
    """(runtime module, seconds spent compiling or loading, whether it was a cache hit)."""
    import tvm

    key = cache_key(source, target.description)
    if key in _loaded:
        return _loaded[key], 0.0, True
    path = cache_dir() / f"{name}-{key}.so"
    started = time.perf_counter()
    if path.is_file():
        try:
            module = tvm.runtime.load_module(str(path))
            _loaded[key] = module
            return module, time.perf_counter() - started, True
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt below
            path.unlink(missing_ok=True)
    try:
        prim = tvm.script.from_source(source)
        executable = tvm.compile(prim, target=target.tvm_target)
    except Exception as exc:  # noqa: BLE001
        raise ClicktrainError(
            f"TVM failed to compile kernel {name} for {target.description}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. The kernel source is in the debug dump "
            f"(compile_for_training(..., debug_dir=...)); please report it.", original=exc) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: executable.export_library(tmp))
        module = tvm.runtime.load_module(str(path))
    except OSError:
        module = executable  # an unwritable cache costs recompiles, not correctness
    _loaded[key] = module
    return module, time.perf_counter() - started, False

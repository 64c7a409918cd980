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


def _ensure_device_runtime(target) -> None:
    """TVM registers its CUDA module loader from a sidecar library when its CUDA backend
    imports; a runtime-only TVM (kernels built elsewhere) may not have done so: load it."""
    if target.name != "cuda":
        return
    import ctypes

    from tvm import base
    loaded = getattr(base, "_LOADED_LIBS", {})
    if "tvm_runtime_cuda" in loaded or "tvm_runtime" not in loaded:
        return
    sidecar = Path(loaded["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
    try:
        loaded["tvm_runtime_cuda"] = ctypes.CDLL(str(sidecar), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass  # no CUDA driver here: loading a CUDA kernel will say so


_load_warned = False


def _warn_load_failure(detail: str) -> None:
    """Once per process: a cached kernel that exists but does not load is compiled again, which
    costs time that nothing else would show (kernels built on another machine, say)."""
    global _load_warned
    if not _load_warned:
        _load_warned = True
        import warnings
        warnings.warn(f"clicktrain: a cached kernel did not load and is compiled again{detail}; "
                      f"further ones are not reported", RuntimeWarning, stacklevel=3)


def compile_cached(name: str, source: str, target, load: bool = True) -> tuple[object, float, bool]:
    """(runtime module, seconds spent compiling or loading, whether it was a cache hit).

    With ``load=False`` (a cuda target on a machine without a GPU, whose runtime cannot load
    CUDA modules) the kernel is compiled and the unloaded executable returned, so its source
    can still be inspected and dumped."""
    return start_compile(name, source, target, load)()


_pending: dict = {}  # cache key -> the result function of a build under way
_writer = None        # one background thread writes and loads the cache's .so files


def start_compile(name: str, source: str, target, load: bool = True):
    """Build the kernel now; writing its ``.so`` to the cache and loading it back (a compiler
    subprocess, about a third of a build) runs in a background thread. Returns a function
    that gives ``compile_cached``'s triple once that is done: start a layer's kernels, then
    collect them, and each link overlaps the next kernel's build. The seconds are the build
    plus the wait, so they add up to the wall time spent."""
    import tvm
    from concurrent.futures import ThreadPoolExecutor

    global _writer
    key = cache_key(source, target.description)
    if key in _loaded:
        module = _loaded[key]
        return lambda: (module, 0.0, True)
    if key in _pending:  # the same source twice in one batch (two identical copies in a layer)
        first = _pending[key]
        return lambda: (first()[0], 0.0, True)
    path = cache_dir() / f"{name}-{key}.so"
    started = time.perf_counter()
    if load:
        _ensure_device_runtime(target)
    load_error = ""
    if load and path.is_file():
        try:
            module = tvm.runtime.load_module(str(path))
            _loaded[key] = module
            seconds = time.perf_counter() - started
            return lambda: (module, seconds, True)
        except Exception as exc:  # noqa: BLE001 - rebuilt below if this TVM can compile
            load_error = f" (loading the cached {path.name} failed first: {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''})"
            _warn_load_failure(load_error)
    try:
        prim = tvm.script.from_source(source)
        executable = tvm.compile(prim, target=target.tvm_target)
    except Exception as exc:  # noqa: BLE001
        failed = cache_dir() / "failed" / f"{name}.tir.py"
        try:
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(source)
            where = f"its source is saved in {failed}"
        except OSError:
            where = "its source could not be saved"
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise ClicktrainError(
            f"TVM failed to compile kernel {name} for {target.description}: {type(exc).__name__}: "
            f"{lines[-1] if lines else ''}; {where}{load_error}. Please report it; target='torch' runs the "
            f"same model meanwhile.", original=exc) from None
    built = time.perf_counter() - started

    def write_and_load():  # the only user of `executable` from here on
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: executable.export_library(tmp))  # also when this machine cannot load it
            return tvm.runtime.load_module(str(path)) if load else executable
        except OSError:
            return executable  # an unwritable cache costs recompiles, not correctness
    if _writer is None:
        _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clicktrain-cache")
    future = _writer.submit(write_and_load)
    done: list = []

    def result():
        if not done:
            waited = time.perf_counter()
            module = future.result()
            if load:
                _loaded[key] = module
            _pending.pop(key, None)
            done.append((module, built + time.perf_counter() - waited, False))
            return done[0]
        return done[0][0], 0.0, True  # collected before: the time is counted once
    _pending[key] = result
    return result


def _tuning_path() -> Path:
    return cache_dir() / "tuning.json"


def load_tuning(key: str) -> dict | None:
    """A remembered per-kind choice (generated kernel or torch) for a layer, or None."""
    import json
    try:
        return json.loads(_tuning_path().read_text()).get(key)
    except (OSError, ValueError):
        return None


def save_tuning(key: str, use: dict) -> None:
    import json
    from ..util import atomic_write_text
    try:
        table = json.loads(_tuning_path().read_text()) if _tuning_path().is_file() else {}
    except (OSError, ValueError):
        table = {}
    table[key] = use
    try:
        atomic_write_text(_tuning_path(), json.dumps(table, indent=0, sort_keys=True))
    except OSError:
        pass  # an unwritable cache costs a re-measurement, not correctness

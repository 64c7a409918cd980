"""On-disk cache of compiled kernels, keyed by everything that determines the machine code.

Key = sha256(kernel source, target description, TVM version, clicktrain kernel ABI). The
source already encodes the layer signature and the pattern library, so a layer recompiles
only when its geometry or library changes -- never when its pattern ids or weights do.
Location: ``$CLICKTRAIN_CACHE``, default ``$XDG_CACHE_HOME/clicktrain`` (``~/.cache/clicktrain``).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import ClicktrainError, ConfigError
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


_warned: set = set()


def _warn_once(what: str, message: str) -> None:
    """Once per process and kind: a slower path taken silently would cost time that nothing
    else would show."""
    if what not in _warned:
        _warned.add(what)
        import warnings
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _warn_load_failure(detail: str) -> None:
    """A cached kernel that exists but does not load is compiled again (kernels built on
    another machine, say)."""
    _warn_once("load", f"clicktrain: a cached kernel did not load and is compiled again{detail}; "
                       f"further ones are not reported")


def compile_cached(name: str, source: str, target, load: bool = True) -> tuple[object, float, bool]:
    """(runtime module, seconds spent compiling or loading, whether it was a cache hit).

    With ``load=False`` (a cuda target on a machine without a GPU, whose runtime cannot load
    CUDA modules) the kernel is compiled and the unloaded executable returned, so its source
    can still be inspected and dumped."""
    return start_compile(name, source, target, load)()


_pending: dict = {}  # cache key -> the result function of a build under way
_writer = None        # in-process builds: one background thread writes and loads their .so files


COMPILE_WORKERS_VAR = "CLICKTRAIN_COMPILE_WORKERS"
_WORKER_SCRIPT = str(Path(__file__).with_name("compile_worker.py"))


def compile_workers() -> int:
    """Kernel-compiling processes: ``$CLICKTRAIN_COMPILE_WORKERS``, default one per core this
    process may run on; 0 compiles in this process, one kernel at a time."""
    value = os.environ.get(COMPILE_WORKERS_VAR, "")
    if not value:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not value.isdigit():
        raise ConfigError(f"{COMPILE_WORKERS_VAR}={value!r}: expected a number of processes "
                          f"(0: compile in this process)")
    return int(value)


class _WorkerGone(Exception):
    """A compile worker could not be started or died: the kernel is built in this process."""


class _CompileFailed(Exception):
    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error


class CompilePool:
    """Compile workers (``compile_worker.py``), one process per slot, fed by as many threads:
    a layer's kernels build side by side, one per core, instead of one after another."""

    def __init__(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clicktrain-compile")
        self.local = threading.local()  # each thread's own worker process
        self.processes: list = []
        self.lock = threading.Lock()

    def _process(self):
        process = getattr(self.local, "process", None)
        if process is None or process.poll() is not None:
            try:
                process = subprocess.Popen([sys.executable, _WORKER_SCRIPT], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
            except OSError as exc:
                raise _WorkerGone(str(exc)) from None
            self.local.process = process
            with self.lock:
                self.processes.append(process)
        return process

    def _build(self, source: str, target, out: str) -> None:
        process = self._process()
        try:
            process.stdin.write(json.dumps({"source": source, "target": dict(target.spec), "out": out}) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except OSError:
            line = ""
        if not line:
            self.local.process = None
            try:
                status = process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                status = "none: killed"
            raise _WorkerGone(f"exit status {status}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise _CompileFailed(answer["error"], answer["message"])

    def submit(self, source: str, target, path: Path):
        """A future of writing ``source``'s library to ``path`` (atomically: readers never see
        half a file)."""
        return self.executor.submit(atomic_write, path, lambda tmp: self._build(source, target, tmp))

    def close(self) -> None:
        self.executor.shutdown(wait=False)
        for process in self.processes:
            try:
                process.stdin.close()  # end of input ends the worker
                process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()


_pool: CompilePool | None = None
_pool_owner = (0, -1)  # (process id, workers) the pool was made for


def _compile_pool() -> CompilePool | None:
    """The process's compile pool (None: compile here), started at the first build; a forked
    child (a DataLoader worker, say) makes its own instead of writing into its parent's pipes."""
    global _pool, _pool_owner
    owner = (os.getpid(), compile_workers())
    if owner != _pool_owner:
        if _pool is not None and _pool_owner[0] == owner[0]:
            _pool.close()
        _pool, _pool_owner = (CompilePool(owner[1]) if owner[1] else None), owner
        if _pool is not None:
            atexit.register(_pool.close)
    return _pool


def _compile_error(name: str, source: str, target, error: str, message: str, load_error: str,
                   original: BaseException | None = None) -> ClicktrainError:
    failed = cache_dir() / "failed" / f"{name}.tir.py"
    try:
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(source)
        where = f"its source is saved in {failed}"
    except OSError:
        where = "its source could not be saved"
    lines = [line for line in message.splitlines() if line.strip()]
    return ClicktrainError(
        f"TVM failed to compile kernel {name} for {target.description}: {error}: "
        f"{lines[-1] if lines else ''}; {where}{load_error}. Please report it; target='torch' runs the "
        f"same model meanwhile.", original=original)


def start_compile(name: str, source: str, target, load: bool = True):
    """Start building the kernel and return a function that gives ``compile_cached``'s triple
    once it is built, written to the cache and loaded: start a layer's kernels, then collect
    them. The builds run in the compile workers (``CompilePool``), side by side; without
    workers (or with ``load=False``) each builds here, and only writing its ``.so`` and loading
    it back (a compiler subprocess, about a third of a build) overlaps the next build. The
    seconds are the time spent here, building or waiting, so they add up to the wall time."""
    import tvm

    key = cache_key(source, target.description)
    if key in _loaded:
        module = _loaded[key]
        return lambda: (module, 0.0, True)
    if key in _pending:  # started before and not collected yet (the same copy twice in a layer,
        return _pending[key]  # or a layer started ahead): the first to collect it counts the time
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
    pool = _compile_pool() if load else None
    build = pool.submit(source, target, path) if pool is not None else None
    spent = time.perf_counter() - started

    def build_here():
        """(the built executable, a function that gives the loaded module)."""
        global _writer
        try:
            executable = tvm.compile(tvm.script.from_source(source), target=target.tvm_target)
        except Exception as exc:  # noqa: BLE001
            raise _compile_error(name, source, target, type(exc).__name__, str(exc), load_error, exc) from None

        def write_and_load():  # the only user of `executable` from here on
            try:
                atomic_write(path, lambda tmp: executable.export_library(tmp))  # also when this machine cannot load it
                return tvm.runtime.load_module(str(path)) if load else executable
            except OSError:
                return executable  # an unwritable cache costs recompiles, not correctness
        if _writer is None:
            from concurrent.futures import ThreadPoolExecutor
            _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clicktrain-cache")
        return _writer.submit(write_and_load).result

    if build is None:
        begun = time.perf_counter()
        collect = build_here()
        spent += time.perf_counter() - begun
    done: list = []

    def result():
        if not done:
            waited = time.perf_counter()
            if build is not None:
                try:
                    build.result()
                    module = tvm.runtime.load_module(str(path))
                except _CompileFailed as exc:
                    raise _compile_error(name, source, target, exc.error, str(exc), load_error) from None
                except (_WorkerGone, OSError) as exc:  # no worker, or an unwritable cache: build it here
                    if isinstance(exc, _WorkerGone):
                        _warn_once("worker", f"clicktrain: a kernel compile worker failed ({exc}); building in "
                                             f"this process instead, one kernel at a time")
                    module = build_here()()
            else:
                module = collect()
            if load:
                _loaded[key] = module
            _pending.pop(key, None)
            done.append((module, spent + time.perf_counter() - waited, False))
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

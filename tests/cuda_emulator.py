"""Run a generated CUDA kernel on the CPU: its CUDA C, compiled as C++, with each block's
threads as real threads that meet at ``__syncthreads`` (a ``std::barrier``) and share its
``__shared__`` buffers. So the CUDA kernels' numerics -- shared-memory reductions and their
barriers included -- are checked on machines without a GPU (CI), not only on a lent one.

Only what the generated kernels use is emulated: ``blockIdx.x``/``threadIdx.x``, shared
buffers, ``__syncthreads`` and integer ``min``/``max`` (no warp intrinsics, no atomics).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

_PRELUDE = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
struct ct_dim3 { int x = 0, y = 0, z = 0; };
static thread_local ct_dim3 threadIdx, blockIdx;
static std::barrier<>* ct_block_barrier;
#define __global__
#define __launch_bounds__(...)
#define __syncthreads() ct_block_barrier->arrive_and_wait()
#define uint unsigned int
using std::min;
using std::max;
"""

_LAUNCHER = r"""
extern "C" void ct_emulate(void** args, int blocks, int threads) {
  std::barrier<> barrier(threads);
  ct_block_barrier = &barrier;
  std::vector<std::thread> team;
  for (int t = 0; t < threads; ++t)
    team.emplace_back([&, t] {
      threadIdx.x = t;
      for (int b = 0; b < blocks; ++b) {
        blockIdx.x = b;
        %(call)s;
        barrier.arrive_and_wait();  // no thread starts the next block while shared data is read
      }
    });
  for (auto& thread : team) thread.join();
}
"""

_SIGNATURE = re.compile(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(([^)]*)\)\s*\{')
_MATCH_BUFFER = re.compile(r"(\w+) = T\.match_buffer\((\w+), \(([^)]*)\)")
_BINDING = re.compile(r'T\.thread_binding\((.*), thread="(blockIdx|threadIdx)\.x"\):')
_BUILD_DIR = Path(tempfile.gettempdir()) / "clicktrain-cuda-emulator"


class _TIRNamespace:
    """What a launch extent's expression calls (``T.max(kk, 1)``)."""
    max = staticmethod(max)
    min = staticmethod(min)


def cuda_source(tvmscript: str, target) -> str:
    """The CUDA C that TVM generates for a kernel's TVMScript (common-subexpression
    elimination off, so the kernel's scalar parameters are the TVMScript's own: ``n``, ``kk``)."""
    import tvm
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        executable = tvm.compile(tvm.script.from_source(tvmscript), target=target.tvm_target)
    module = getattr(executable, "mod", executable)
    return next(imported.inspect_source() for imported in module.imports)


class EmulatedKernel:
    """Callable like the compiled kernel (same parameters, in TVMScript order), on CPU tensors."""

    def __init__(self, tvmscript: str, target):
        source = cuda_source(tvmscript, target)
        (threads, name, params), = {m.groups() for m in _SIGNATURE.finditer(source)}
        self.threads = int(threads)
        self.params = [p.strip().split()[-1] for p in params.split(",")]  # e.g. inp_ptr, n
        self.is_pointer = ["*" in p for p in params.split(",")]
        # TVMScript: handle -> buffer name and shape, and the grid's extent expression
        self.buffers = {handle: (buffer, [d.strip() for d in shape.split(",") if d.strip()])
                        for buffer, handle, shape in _MATCH_BUFFER.findall(tvmscript)}
        self.handles = [h.split(":")[0].strip()
                        for h in re.search(r"def \w+\(([^)]*)\)", tvmscript).group(1).split(",")]
        self.grid = next(expr for expr, axis in _BINDING.findall(tvmscript) if axis == "blockIdx")
        # a shared buffer is a static of the kernel function: one per block, seen by all its threads
        body = re.sub(r"__shared__ (alignas\(\d+\) )?", r"\1static ", source[source.index('extern "C"'):])
        call = f"{name}(" + ", ".join(
            f"({p.rsplit(' ', 1)[0].replace('__restrict__', '').strip()})args[{i}]" if ptr
            else f"(int)(intptr_t)args[{i}]"
            for i, (p, ptr) in enumerate(zip(params.split(","), self.is_pointer))) + ")"
        self.library = _build(_PRELUDE + body + _LAUNCHER % {"call": call})

    def __call__(self, *args) -> None:
        tensors = {}
        sizes = {}
        for handle, arg in zip(self.handles, args):
            tensor = arg if isinstance(arg, torch.Tensor) else torch.from_dlpack(arg)
            assert tensor.device.type == "cpu" and tensor.is_contiguous()
            buffer, shape = self.buffers[handle]
            tensors[buffer] = tensor
            for extent, size in zip(shape, tensor.shape):
                if extent.isidentifier():
                    assert sizes.setdefault(extent, size) == size, f"{extent} bound twice"
        values = []
        for param, pointer in zip(self.params, self.is_pointer):
            values.append(tensors[param.removesuffix("_ptr")].data_ptr() if pointer else sizes[param])
        blocks = eval(self.grid, {"T": _TIRNamespace}, dict(sizes))  # noqa: S307 - our own generated source
        argv = (ctypes.c_void_p * len(values))(*values)
        self.library.ct_emulate(argv, ctypes.c_int(blocks), ctypes.c_int(self.threads))


def _build(cpp: str):
    _BUILD_DIR.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(cpp.encode()).hexdigest()[:24]
    library = _BUILD_DIR / f"{digest}.so"
    if not library.is_file():  # built under this process's own names, then renamed: runs may overlap
        source = _BUILD_DIR / f"{digest}.{os.getpid()}.cpp"
        source.write_text(cpp)
        partial = library.with_suffix(f".{os.getpid()}.partial")
        subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", str(source), "-o",
                        str(partial)], check=True)
        partial.rename(library)
    return ctypes.CDLL(str(library))

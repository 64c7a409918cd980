"""A kernel-compiling process: ``python compile_worker.py`` (run by file path, so that it
imports TVM only, not torch nor the clicktrain package).

Why a process: half of a kernel's build is the TVMScript parser, in Python, and the rest of
``tvm.compile`` holds the GIL too; threads ran two builds no faster than one (measured: 2.53 s
against 2.75 s for one layer's five kernels on 2 cores). ``cache.CompilePool`` keeps one of
these per core and feeds it requests.

Protocol: one JSON object per line on stdin, ``{"source": TVMScript, "target": config dict,
"out": path}``; the worker builds it, exports the library to ``out`` and answers one JSON
line on its own copy of stdout: ``{"ok": true}`` or ``{"ok": false, "error": type name,
"message": text}``. Anything TVM or LLVM prints goes to stderr, never into the
answers. End of input ends the worker.
"""

import json
import os
import sys


def build(request: dict) -> dict:
    import tvm
    try:
        executable = tvm.compile(tvm.script.from_source(request["source"]), target=tvm.target.Target(request["target"]))
        executable.export_library(request["out"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which words the error
        return {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    return {"ok": True}


def main() -> None:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # prints from TVM, LLVM or a compiler subprocess go to stderr
    # tvm_ffi imports torch where it can, for tensor conversions a compiler never needs: 1.3 s
    # to start instead of 5 (measured)
    sys.modules["torch"] = None
    import tvm  # noqa: F401 - loaded before the first request, while the parent still plans
    for line in sys.stdin:
        answers.write(json.dumps(build(json.loads(line))) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()

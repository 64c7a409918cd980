"""Compile the CUDA kernels that tests/test_cuda.py and `benchmarks/kernels.py --target cuda`
need, into $CLICKTRAIN_CACHE: for the visible GPU, or for the architecture in
$CLICKTRAIN_CUDA_ARCH (e.g. sm_90) on a machine without one. Loading them needs TVM's
compiler library too (its runtime alone cannot load CUDA modules, docs/performance.md), so on a
GPU machine this mainly compiles ahead, in parallel with other jobs (benchmarks/gpu_checks.sh):

    CLICKTRAIN_CACHE=build/gpu-cache CLICKTRAIN_CUDA_ARCH=sm_90 .venv/bin/python tests/cuda_prebuild.py [--no-bench]

``--no-bench`` compiles only the tests' kernels (benchmarks/gpu_checks.sh compiles the
benchmark's in parallel processes).
"""

import os
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))

from clicktrain.codegen.target import cuda_available  # noqa: E402

if not os.environ.get("CLICKTRAIN_CUDA_ARCH") and not cuda_available():
    sys.exit("no GPU visible here: set CLICKTRAIN_CUDA_ARCH to the target GPU's architecture (e.g. sm_90)")

from test_cuda import MODELS, cuda_conv, cuda_models  # noqa: E402
from test_kernels import GRID  # noqa: E402

for case in GRID:
    conv, masked_w, _ = cuda_conv(case)
    conv.kernels_for(case[3:5], masked_w.shape)
for name in MODELS:
    cuda_models(name)  # harden compiles every layer's kernels
if "--no-bench" not in sys.argv:
    subprocess.run([sys.executable, str(here.parent / "benchmarks" / "kernels.py"), "--target", "cuda", "--compile-only"],
                   check=True)
print("compiled into", os.environ.get("CLICKTRAIN_CACHE"))

"""Compile the CUDA kernels that tests/test_cuda.py and `benchmarks/kernels.py --target cuda`
need, into $CLICKTRAIN_CACHE, for the GPU architecture in $CLICKTRAIN_CUDA_ARCH (e.g. sm_90).

Run on a machine with TVM's compiler (no GPU needed); a GPU machine with only TVM's runtime
then loads them from the cache:

    CLICKTRAIN_CACHE=build/gpu-cache CLICKTRAIN_CUDA_ARCH=sm_90 .venv/bin/python tests/cuda_prebuild.py
"""

import os
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))

assert os.environ.get("CLICKTRAIN_CUDA_ARCH"), "set CLICKTRAIN_CUDA_ARCH (e.g. sm_90)"

from test_cuda import MODELS, cuda_conv, cuda_models  # noqa: E402
from test_kernels import GRID  # noqa: E402

for case in GRID:
    conv, masked_w, _ = cuda_conv(case)
    conv.kernels_for(case[3:5], masked_w.shape)
for name in MODELS:
    cuda_models(name)  # harden compiles every layer's kernels
subprocess.run([sys.executable, str(here.parent / "benchmarks" / "kernels.py"), "--target", "cuda", "--compile-only"],
               check=True)
print("compiled into", os.environ.get("CLICKTRAIN_CACHE"))

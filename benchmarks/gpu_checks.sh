#!/usr/bin/env bash
# The GPU checks in one go, for a (lent) machine with an NVIDIA GPU: the CUDA numerics tests,
# then benchmarks/kernels.py and benchmarks/train_step.py on target "cuda" against cuDNN.
# Logs go to $OUT (default ./gpu-out). The machine needs torch with CUDA; TVM either installed
# or given as a bundle folder (for machines without a package registry) holding the
# apache-tvm-ffi wheel for its Python, tvm-runtime.tar.xz (the apache-tvm wheel's files
# without libtvm_compiler.so) and libtvm_compiler.so.xz, and optionally cache.tar.xz (kernels
# compiled ahead elsewhere for this GPU's architecture by tests/cuda_prebuild.py, so that the
# GPU machine's time goes to running them):
#
#     benchmarks/gpu_checks.sh [BUNDLE_DIR]
#
# GPU_CHECKS_4X4=1 also runs both benchmarks with 4x4 pattern blocks. Making the bundle's
# cache on a machine without a GPU (an H100 is sm_90; about 4 minutes on 2 cores):
#
#     CLICKTRAIN_CUDA_ARCH=sm_90 CLICKTRAIN_CACHE=/tmp/c .venv/bin/python tests/cuda_prebuild.py
#     CLICKTRAIN_CUDA_ARCH=sm_90 CLICKTRAIN_CACHE=/tmp/c .venv/bin/python benchmarks/kernels.py \
#         --target cuda --compile-only --pattern-block 4x4      # only where GPU_CHECKS_4X4=1
#     tar cf - -C /tmp/c . | xz -9e > BUNDLE_DIR/cache.tar.xz   # 129 kernels: about 190 KB
#
# The bundle must fit a lent machine's transfer limit (64 MiB with the checkout there): xz's
# x86 filter takes libtvm_compiler.so to 57.8 MB (59.5 MB without it):
#
#     xz -T1 --x86 --lzma2=preset=9e,dict=192MiB -c .venv/lib/python3.*/site-packages/tvm/lib/libtvm_compiler.so \
#         > BUNDLE_DIR/libtvm_compiler.so.xz
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CLICKTRAIN_CACHE=${CLICKTRAIN_CACHE:-/tmp/clicktrain-gpu-cache}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the scripts import clicktrain from this checkout
if [ $# -ge 1 ]; then  # TVM from the bundle: compiling happens here, for this GPU
  site=/tmp/clicktrain-tvm
  mkdir -p $site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site "$1"/*.whl || exit 1
  tar xJf "$1/tvm-runtime.tar.xz" -C $site && xz -dc "$1/libtvm_compiler.so.xz" > $site/tvm/lib/libtvm_compiler.so || exit 1
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  if [ -f "$1/cache.tar.xz" ]; then mkdir -p "$CLICKTRAIN_CACHE" && tar xJf "$1/cache.tar.xz" -C "$CLICKTRAIN_CACHE" || exit 1; fi
fi
nvidia-smi -L
$PY -c "import torch, tvm; print('torch', torch.__version__, '| TVM', tvm.__version__, '|', torch.cuda.get_device_name())" || exit 1

started=$(date +%s)
# compile every kernel first, in parallel processes sharing the cache (each kernel ~1 s)
pids=()
$PY tests/cuda_prebuild.py --no-bench > "$OUT/compile-tests.log" 2>&1 & pids+=($!)
for m in vgg11 resnet20; do for s in 28 32; do
  $PY benchmarks/kernels.py --target cuda --compile-only --models $m --sizes $s > "$OUT/compile-$m-$s.log" 2>&1 & pids+=($!)
done; done
if [ "${GPU_CHECKS_4X4:-0}" = 1 ]; then
  $PY benchmarks/kernels.py --target cuda --compile-only --pattern-block 4x4 > "$OUT/compile-4x4.log" 2>&1 & pids+=($!)
fi
for p in "${pids[@]}"; do wait $p || echo "a compile job failed (see $OUT/compile-*.log)"; done
echo "compiled in $(( $(date +%s) - started )) s"

$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test-cuda.txt"
$PY benchmarks/kernels.py --target cuda 2>&1 | tee "$OUT/kernels-cuda.txt"
$PY benchmarks/train_step.py --target cuda --models vgg11 resnet20 --sizes 32 --connectivity 0.5 0.75 --repeats 20 \
  2>&1 | tee "$OUT/train-step-cuda.txt"
CLICKTRAIN_AUTOTUNE=0 $PY benchmarks/train_step.py --target cuda --models vgg11 resnet20 --sizes 32 \
  --connectivity 0.5 0.75 --repeats 20 2>&1 | tee "$OUT/train-step-cuda-generated-only.txt"
if [ "${GPU_CHECKS_4X4:-0}" = 1 ]; then
  $PY benchmarks/kernels.py --target cuda --pattern-block 4x4 2>&1 | tee "$OUT/kernels-cuda-4x4.txt"
  $PY benchmarks/train_step.py --target cuda --models vgg11 resnet20 --sizes 32 --connectivity 0.5 0.75 --repeats 20 \
    --pattern-block 4x4 2>&1 | tee "$OUT/train-step-cuda-4x4.txt"
fi
echo "all done in $(( $(date +%s) - started )) s"

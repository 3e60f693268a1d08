#!/usr/bin/env bash
# The test suite, the GPU scripts' CPU smoke runs and an sm_90 compile of every Triton kernel
# (tools/device/compile_sm90.py) under the oldest versions pyproject admits,
# which are the lent GPU machine's (it cannot install packages): torch 2.11, triton 3.6,
# transformers 5.17, onnxruntime 1.30, onnx 1.23.1, onnxscript 0.7.2. CI tests the newest versions; run this after
# touching capture, export or kernels, and before a GPU session. About 20 minutes; the virtual
# environment (~5 GB: PyPI's torch 2.11 brings its CUDA libraries) is kept in $VENV for the next run.
#
#   tools/check_lower_bounds.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build  # the smoke runs' logs (a clean checkout has no build/ when $VENV lives elsewhere)
VENV=${VENV:-build/venv-lower-bounds}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pins=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 onnxruntime==1.30.0 onnx==1.23.1 onnxscript==0.7.2
      "numpy<2.4")  # triton 3.6's interpreter calls int() on 1-element arrays, which numpy 2.4 refuses
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${pins[@]}"
"$VENV/bin/python" -m pip install -q -e '.[test]' -c <(printf '%s\n' "${pins[@]}")
"$VENV/bin/python" -c 'import torch, triton, transformers, onnxruntime
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "onnxruntime", onnxruntime.__version__)'
"$VENV/bin/python" tools/device/bench_kernels.py --smoke > build/lower-bounds-kernels.log
"$VENV/bin/python" tools/device/bench_e2e.py --smoke > build/lower-bounds-e2e.log
"$VENV/bin/python" tools/device/compile_sm90.py > build/lower-bounds-sm90.log  # ~5 min cold
echo "GPU scripts' smoke runs passed, every kernel compiles for sm_90 (tables in build/lower-bounds-*.log)"
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest "$@"

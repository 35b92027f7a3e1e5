#!/bin/bash
# Builds the extension, runs the kernel tests, then the kernel benchmark; logs go to $OUT (default /tmp/mla_moe_out).
# $ bash csrc/run_gpu.sh [bench.py args]
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT=${OUT:-/tmp/mla_moe_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, ops; print(torch.__version__, ops._ext)" 2>&1 | tee "$OUT/build.log"
if ! python -c "import ops; assert ops._ext is not None" 2>/dev/null; then  # show the compiler's errors
    (cd "$(python -c "from torch.utils.cpp_extension import _get_build_directory as d; print(d('mla_moe_kernels', False))")" \
        && ninja -v 2>&1 | grep -v "^\[" | tail -60) | tee -a "$OUT/build.log"
    exit 1
fi
python -m pytest -q tests/test_kernels.py 2>&1 | tee "$OUT/tests.log"
python -X faulthandler bench.py "$@" --out "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log"

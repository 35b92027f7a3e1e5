#!/usr/bin/env bash
# The torchrun end-of-run test, repeated (default 20 runs; CI runs 3): every run must exit 0 with
# ckpt.pt and best.pt from its last eval. Usage: tests/ddp_repeat.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
DDP_REPEAT="${1:-20}" OMP_NUM_THREADS=1 python -m pytest -q tests/test_hardening.py -k torchrun_ends_cleanly

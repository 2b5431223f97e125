#!/usr/bin/env bash
# Early-exit speed on one CUDA GPU: full model, per-batch early exit and the batching engine, each against the
# FLOPs speed-up, for ViT-B/16 at 224 in bf16 autocast, batch 64 and 256, budgets 0.33 and 0.5.
# Needs only torch and timm (random weights, nothing downloaded, nothing installed); finishes in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh                                   # prints the table, writes gpu_check.json
#   bash benchmarks/gpu_check.sh --out results/gpu_check_h100.json
#   bash benchmarks/gpu_check.sh --device cpu --quick              # smoke test (what the test suite runs)
#
# Every option: python benchmarks/gpu_check.py --help
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="${PYTHONPATH:-$here/../src}"
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"

#!/usr/bin/env bash
# The first device run on one H100 / H200, under 8 minutes including compilation (benchmarks/gpu_check.py):
# the Triton test cases compiled (not interpreted), the compile table with the driver's n_regs / n_spills,
# and bench_gpu.py (LLA fp32 / mixed / authors, Parallax, SDPA flash; fwd and fwd+bwd; T 1K-16K; D 64, 128).
# Results: one JSON and one Markdown file in $OUT (when set) or benchmarks/results/gpu_check.
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # CPU: the same steps, tiny, under the Triton interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
exec python benchmarks/gpu_check.py "$@"

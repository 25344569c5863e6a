#!/usr/bin/env bash
# The checks that need a CUDA machine: the cell equivalence/option tests and the scan cells' tests
# (each device-parametrized test gains a cuda case when CUDA is present, and the suites run
# whole), then the cell benchmark (docs/bench_cells_cuda.md and .png) and the scan benchmark
# (outputs/bench_scan_cuda/). Extra arguments go to bench_cells, e.g. `scripts/gpu_check.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'CUDA not available'; \
print(torch.__version__, torch.cuda.get_device_name(), 'cudnn', torch.backends.cudnn.version())"
python -m pytest tests/test_cells.py tests/test_scan.py -q -rs
python scripts/bench_cells.py --device cuda "$@"
python scripts/bench_scan.py --device cuda --out outputs/bench_scan_cuda

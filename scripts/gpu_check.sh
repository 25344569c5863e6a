#!/usr/bin/env bash
# Cell backends on a CUDA machine: the equivalence/option tests (they add a cuda case to every
# device-parametrized test when CUDA is present) and the benchmark, whose figures land in
# docs/bench_cells_cuda.md and docs/bench_cells_cuda.png. Extra arguments go to the benchmark,
# e.g. `scripts/gpu_check.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'CUDA not available'; \
print(torch.__version__, torch.cuda.get_device_name(), 'cudnn', torch.backends.cudnn.version())"
python -m pytest tests/test_cells.py -q -rs
python scripts/bench_cells.py --device cuda "$@"

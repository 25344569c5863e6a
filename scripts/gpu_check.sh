#!/usr/bin/env bash
# The checks that need a CUDA machine: the cell equivalence/option tests and the scan cells' tests
# (each device-parametrized test gains a cuda case when CUDA is present, and the suites run
# whole), then the cell benchmark (docs/bench_cells_cuda.md and .png) and the scan benchmark
# (outputs/bench_scan_cuda/), then a short word-level AWD-LSTM run on CUDA (varied windows,
# NT-ASGD, tied head; then an adaptive head under bf16-mixed), each evaluated on the GPU
# (outputs/gpu_word_lm*/), then the matrix-state cells (gdn, mlstm) trained briefly on CUDA under
# bf16-mixed and evaluated there (outputs/gpu_<cell>/), and GDN under model.backend=fla, its
# checkpoint evaluated under fla and under modular (outputs/gpu_gdn_fla/: the two bpc should
# agree). Extra arguments go to bench_cells, e.g. `scripts/gpu_check.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'CUDA not available'; \
print(torch.__version__, torch.cuda.get_device_name(), 'cudnn', torch.backends.cudnn.version())"
python -m pytest tests/test_cells.py tests/test_scan.py tests/test_matrix_cells.py \
    tests/test_fla_backend.py -q -rs -m "slow or not slow"
python scripts/bench_cells.py --device cuda "$@"
python scripts/bench_scan.py --device cuda --out outputs/bench_scan_cuda
short=(trainer.accelerator=gpu trainer.max_steps=120 trainer.val_check_interval=40)
python -m seqtrain +experiment=word_lm "${short[@]}" hydra.run.dir=outputs/gpu_word_lm
python -m seqtrain.evaluate ckpt=outputs/gpu_word_lm/checkpoints/best.ckpt device=cuda
python -m seqtrain +experiment=word_lm "${short[@]}" model.tie_weights=false model.head=adaptive \
    model.cutoffs=[500,2000] trainer.precision=bf16-mixed hydra.run.dir=outputs/gpu_word_lm_adaptive
python -m seqtrain.evaluate ckpt=outputs/gpu_word_lm_adaptive/checkpoints/best.ckpt device=cuda
for cell in gdn mlstm; do
    python -m seqtrain +experiment=char_lm "${short[@]}" model.cell=$cell model.backend=modular \
        model.num_heads=4 trainer.precision=bf16-mixed hydra.run.dir=outputs/gpu_$cell
    python -m seqtrain.evaluate ckpt=outputs/gpu_$cell/checkpoints/best.ckpt device=cuda
done
# model.backend=fla (fla's Triton kernel): trains, then its checkpoint evaluates under modular
python -m seqtrain +experiment=char_lm "${short[@]}" model.cell=gdn model.backend=fla \
    model.num_heads=4 trainer.precision=bf16-mixed hydra.run.dir=outputs/gpu_gdn_fla
for backend in fla modular; do
    python -m seqtrain.evaluate ckpt=outputs/gpu_gdn_fla/checkpoints/best.ckpt device=cuda \
        model.backend=$backend
done

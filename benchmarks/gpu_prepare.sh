#!/usr/bin/env bash
# Everything the one-call GPU run needs that the GPU machine cannot make itself (no package index,
# no anndata/zarr, no ../shared): run here, in the checkout, before the device call.
#
#   bash benchmarks/gpu_prepare.sh
# then carry both ignored paths with the call (the device tool's `carry`):
#   carry: [".whl", "benchmarks/gpu_inputs"]     command: python3 benchmarks/gpu_suite.py
#
# - .whl/: the wheels the device processes import that the image lacks (benchmarks/gpu_wheels.sh)
# - benchmarks/gpu_inputs/lengths.npy: genes per cell of the real files in ../shared/data/h5ad, for the
#   training benchmark (the data itself never travels or gets committed)
# - benchmarks/gpu_inputs/gpu_test_corpus/: the synthetic corpus of tests/test_gpu_training.py (its
#   writer needs anndata and zarr), and gpu_training_reference.json: that test's fp32 CPU runs
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
mkdir -p benchmarks/gpu_inputs
"$py" benchmarks/bench_train.py --write-lengths benchmarks/gpu_inputs/lengths.npy
corpus=benchmarks/gpu_inputs/gpu_test_corpus
if [ ! -f "$corpus/manifest.json" ]; then
  rm -rf "$corpus" benchmarks/gpu_inputs/gpu_test_cells.h5ad
  # the shape tests/test_gpu_training.py would make: 200 cells, 300 genes, 8 cell types, seed 0
  "$py" -m data_pipeline synthetic --out benchmarks/gpu_inputs/gpu_test_cells.h5ad --cells 200 --genes 300 \
        --cell-types 8 --seed 0 --no-progress
  "$py" -m data_pipeline convert --out "$corpus" --label-columns cell_type --no-progress \
        benchmarks/gpu_inputs/gpu_test_cells.h5ad
  rm benchmarks/gpu_inputs/gpu_test_cells.h5ad
fi
# the GPU training test's fp32 CPU reference (a CPU DeepSpeed run there would JIT-build an op first)
"$py" -c "from tests.train_helpers import write_gpu_reference; print('wrote', write_gpu_reference())"
bash benchmarks/gpu_wheels.sh .whl   # last: it prints the total that travels, corpus and lengths included

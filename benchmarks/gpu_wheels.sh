#!/usr/bin/env bash
# Wheels for a GPU machine with no package index (torch, triton, numpy, scipy, numba, h5py, pandas,
# matplotlib, scikit-learn, einops, psutil, ninja, msgpack, py-cpuinfo, tqdm and pyyaml already there):
# DeepSpeed (built here as a pure-Python wheel: no ops compiled ahead, they JIT-build on first use)
# and what it and the benchmarks need beyond that image, for CPython 3.12 on x86-64 Linux.
#
#   bash benchmarks/gpu_wheels.sh [DIR]          # default .whl (add "/.whl/" to .git/info/exclude)
# then on the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
mkdir -p "$dir"
py="${PYTHON:-.venv/bin/python}"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps "deepspeed==0.19.8" -w "$dir"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
           performer-pytorch==1.1.4 local-attention==1.11.2 axial-positional-embedding==0.3.12 \
           hyper-connections==0.4.11 torch-einops-utils==0.2.0 \
           anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 \
           zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.8.0 \
           webdataset==1.0.2 braceexpand==0.1.7 zlib-ng==1.1.0; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dir" "$pkg"
done
ls -l "$dir"
du -sh "$dir"

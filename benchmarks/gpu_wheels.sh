#!/usr/bin/env bash
# Wheels for the GPU machine, which has no package index: exactly what the device processes of
# benchmarks/gpu_suite.py import that its image lacks (benchmarks/gpu_image_packages.txt), as listed in
# benchmarks/gpu_wheels.txt (the one list: name==version a line), for CPython 3.12 on x86-64 Linux.
# DeepSpeed is built here as a pure-Python wheel (DS_BUILD_OPS=0: no ops compiled ahead; the few it
# uses JIT-build on first use with the image's nvcc and ninja).
#
#   bash benchmarks/gpu_wheels.sh [DIR]     # default .whl (git-ignored: it travels with `run`'s carry)
# then on the GPU machine, from the repository root (gpu_suite.py does this itself when .whl/ exists):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Afterwards it checks the folder (tests/test_gpu_wheels.py: one wheel per manifest line, every
# Requires-Dist met by the image or another wheel) and the size of what travels: tracked and untracked
# non-ignored files + DIR + benchmarks/gpu_inputs must stay under 60 MiB (the copy's limit is 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
py="${PYTHON:-.venv/bin/python}"
manifest=benchmarks/gpu_wheels.txt
mkdir -p "$dir"
rm -f "$dir"/*.whl   # a stale wheel from an older list would travel too
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
while read -r spec flag _; do
  case "$spec" in ''|'#'*) continue ;; esac
  if [[ "$flag" == "[build]" ]]; then
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps "$spec" -w "$dir"
  else
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          "${platforms[@]}" -d "$dir" "$spec"
  fi
done < "$manifest"
ls -l "$dir"
GPU_WHEELS_DIR="$dir" OMP_NUM_THREADS=1 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu_wheels.py -k wheel_folder
"$py" - "$dir" <<'EOF'
import subprocess, sys
from pathlib import Path

limit = 60 * 2**20
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.decode().split("\0")
tree = sum(Path(f).stat().st_size for f in files if f and Path(f).is_file())
def folder(p):
    p = Path(p)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0
wheels, data = folder(sys.argv[1]), folder("benchmarks/gpu_inputs")
total = tree + wheels + data
mib = lambda n: f"{n / 2**20:.1f} MiB"
print(f"travels: tree {mib(tree)} + wheels {mib(wheels)} + benchmarks/gpu_inputs {mib(data)} = {mib(total)} "
      f"(limit here 60 MiB; the copy's 64 MiB)")
sys.exit(f"over 60 MiB: drop wheels or data before carrying" if total > limit else 0)
EOF

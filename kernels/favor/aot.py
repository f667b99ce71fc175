"""Compile the FAVOR+ launches for a GPU architecture without a GPU, and read their resources.

Every launch `launch.py` lists is compiled exactly as it runs (same constexprs, ``num_warps``,
``num_stages``, argument types) with ``triton.compile(ASTSource(...), target=GPUTarget(...))``,
and its cubin is read with the ``cuobjdump`` shipped in Triton's NVIDIA backend: registers per
thread, spill stack, local memory, shared memory, and the SASS counts of wgmma (``HGMMA``),
``mma.sync`` (``HMMA``) and spill loads/stores (``LDL``/``STL``).

    python -m kernels.favor.aot [--json OUT] [--jobs N] [--arch 90] [--dtypes bf16,fp32]
        [--head-dims 64,128] [--features 256]

prints one row per launch (kernel / dtype / D / m / registers / spill bytes / shared bytes / HGMMA
count / compile seconds) and exits non-zero when a launch fails to compile or breaks a limit
(`problems`). Compiles run in a private, empty ``TRITON_CACHE_DIR`` (so they really compile) and
need ``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit`` gives interpreted
functions, which cannot be compiled. tests/test_favor_compile.py runs this module in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MAX_REGISTERS = 255
# the most dynamic shared memory one block may use on H100 / H200 (227 KB): larger fails to launch
MAX_SHARED_BYTES = 232_448
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def tool_dir() -> Path:
    """Where Triton keeps ptxas / cuobjdump (its NVIDIA backend)."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    return Path(spec.origin).parent / "backends" / "nvidia" / "bin"


def missing_tools() -> list[str]:
    """The tools this check needs that Triton's package lacks (empty when it can run)."""
    return [name for name in ("ptxas", "cuobjdump") if not (tool_dir() / name).is_file()]


def cubin_resources(cubin: bytes) -> dict:
    """Registers, spill stack, local and static shared bytes, and SASS op counts of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        tool = str(tool_dir() / "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if not found:
        raise RuntimeError(f"cuobjdump printed no resource usage: {usage[-300:]}")
    reg, stack, shared, local = map(int, found.groups())
    ops = {op: len(re.findall(r"\b" + op + r"\b", sass)) for op in ("HGMMA", "HMMA", "LDL", "STL")}
    return dict(registers=reg, stack=stack, static_shared=shared, local=local, **ops)


def compile_launch(launch, arch: int = 90) -> dict:
    """Compile one `launch.Launch` for ``sm_<arch>``: a row of its resources (``ok`` False and
    ``error`` when it does not compile)."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig, attrs = launch.signature()
    row = dict(kernel=launch.name, num_warps=launch.num_warps, num_stages=launch.num_stages,
               **{k: (str(v).split(".")[-1] if k.endswith("_OP") else v) for k, v in launch.constexprs.items()})
    start = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn=launch.kernel, signature=sig, constexprs=dict(launch.constexprs),
                                        attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        res = cubin_resources(compiled.asm["cubin"])
        row.update(ok=True, shared=max(int(compiled.metadata.shared), res["static_shared"]), **res)
    except Exception as err:  # reported as a failed row: the caller decides
        row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:800]}")
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled launch (empty when it is fine)."""
    if not row.get("ok"):
        return [f"does not compile: {row.get('error')}"]
    out = []
    if row["stack"] or row["local"] or row["LDL"] or row["STL"]:
        out.append(f"spills (stack {row['stack']} B, local {row['local']} B, LDL {row['LDL']}, STL {row['STL']})")
    if row["registers"] > MAX_REGISTERS:
        out.append(f"{row['registers']} registers > {MAX_REGISTERS}")
    if row["shared"] > MAX_SHARED_BYTES:
        out.append(f"{row['shared']} B shared memory > {MAX_SHARED_BYTES}")
    return out


def _work(item):
    dtype_name, d, m, index, arch = item
    import torch

    from .launch import launches

    launch = launches(d, d, m, getattr(torch, DTYPES[dtype_name]), emulate=False).all()[index]
    return dict(dtype=dtype_name, m=m, **compile_launch(launch, arch))


def compile_all(dtypes=("fp32", "bf16", "fp16"), head_dims=(16, 32, 64, 128), features=(128, 256), jobs: int = 2,
                arch: int = 90) -> list[dict]:
    """Rows for every launch of every (dtype, D, m) (Dv = D), compiled in ``jobs`` processes."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: kernels cannot be compiled under the interpreter; "
                           "run `env -u TRITON_INTERPRET python -m kernels.favor.aot`")
    items = [(dt, d, m, i, arch) for dt in dtypes for d in head_dims for m in features for i in range(5)]
    # the slow compiles (large D, fp32) first, so that the last ones to finish are short
    items.sort(key=lambda it: (-it[1], it[0] != "fp32"))
    if jobs <= 1:
        return [_work(it) for it in items]
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_work, items))


def table(rows: list[dict]) -> str:
    head = f"{'kernel':<18} {'dtype':<5} {'D':>4} {'m':>4} {'BL':>4} {'BM':>4} {'warps':>5} {'regs':>4} " \
           f"{'spill':>6} {'shared':>7} {'HGMMA':>5} {'sec':>5}  problems"
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["dtype"], r["D"], r["m"], r["kernel"])):
        if r.get("ok"):
            lines.append(f"{r['kernel']:<18} {r['dtype']:<5} {r['D']:>4} {r['m']:>4} {r['BL']:>4} {r['BM']:>4} "
                         f"{r['num_warps']:>5} {r['registers']:>4} {r['stack']:>6} {r['shared']:>7} "
                         f"{r['HGMMA']:>5} {r['compile_s']:>5}  {'; '.join(problems(r))}")
        else:
            lines.append(f"{r['kernel']:<18} {r['dtype']:<5} {r['D']:>4} {r['m']:>4}  FAILED: {r['error'][:300]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows (and versions) here")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--head-dims", default="16,32,64,128")
    parser.add_argument("--features", default="128,256")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use the usual TRITON_CACHE_DIR (default: a fresh one, so every launch compiles)")
    args = parser.parse_args(argv)
    if missing_tools():
        print(f"Triton's package lacks {', '.join(missing_tools())} in {tool_dir()}: cannot compile for sm_XX here",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="favor_aot_cache_") as cache:
        if not args.keep_cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # the spawned workers inherit it
        start = time.perf_counter()
        rows = compile_all(args.dtypes.split(","), [int(x) for x in args.head_dims.split(",")],
                           [int(x) for x in args.features.split(",")], args.jobs, args.arch)
        wall = time.perf_counter() - start
    print(table(rows))
    bad = [r for r in rows if problems(r)]
    print(f"{len(rows)} launches, {len(bad)} with problems, {wall:.1f} s with {args.jobs} processes")
    if args.json:
        import torch
        import triton

        args.json.write_text(json.dumps(dict(arch=args.arch, triton=triton.__version__, torch=torch.__version__,
                                             jobs=args.jobs, wall_s=round(wall, 1), rows=rows), indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

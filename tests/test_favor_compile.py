"""Every FAVOR+ kernel launch compiles for sm_90 (H100/H200) without spilling, within 255 registers
and the shared-memory limit — checked on this CPU machine with the ptxas / cuobjdump that ship
inside Triton's package (kernels/favor/aot.py; `python -m kernels.favor.aot` prints the table).

The launches are the ones `kernels/favor/launch.py` gives the forward and backward (the combine in
between is PyTorch): 5 kernels x D 16/32/64/128 x m 128/256 x fp32/bf16/fp16 = 120 compiles, ~1 min
on 2 cores in 2 processes. They run in a subprocess because tests/conftest.py turns on Triton's
interpreter before any import, and under it ``@triton.jit`` yields interpreted functions that
cannot be compiled; the subprocess also compiles into a fresh private TRITON_CACHE_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.favor import aot
from kernels.favor.launch import BLOCKS, compile_grid, launches

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", sorted(BLOCKS))
@pytest.mark.parametrize("m", [16, 48, 128, 256])
def test_launch_table_types_every_argument(dtype, d, m):
    """A compile harness needs no guessing: every runtime argument of every launch has a type,
    the constexprs are the kernel's own, and the blocks tile the features."""
    cfg = launches(d, d, m, dtype, emulate=False)
    for launch in cfg.all():
        sig, attrs = launch.signature()
        assert list(sig) == list(launch.kernel.arg_names)
        assert {name for name, ty in sig.items() if ty == "constexpr"} == set(launch.constexprs)
        assert all(ty != "constexpr" for name, ty in sig.items() if name in launch.arg_types)
        assert m % launch.constexprs["BM"] == 0 and launch.num_warps in (4, 8)
        io = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        assert all(sig[p] == "*" + io for p in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "dq_ptr") if p in sig)
    proj = torch.randn(m, d)
    w, wf = cfg.projection_operands(proj, "cpu")
    assert w.shape == ((1 if dtype == torch.float32 else 2), m, d) and w.dtype == cfg.w_dtype
    assert wf.shape == (m, d) and wf.dtype == cfg.wf_dtype
    torch.testing.assert_close(w.float().sum(0), proj, rtol=1e-5, atol=1e-6)


def test_projection_split_is_exact_to_fp32_rounding():
    """``hi + lo`` of the half-precision projection copy carries W to ~2^-17 (one rounding: 2^-9)."""
    proj = torch.randn(256, 64, dtype=torch.float32)
    w, _ = launches(64, 64, 256, torch.bfloat16).projection_operands(proj, "cpu")
    err = ((w[0].float() + w[1].float()) - proj).abs().max() / proj.abs().max()
    assert err < 2 ** -15


def test_launch_errors_name_the_fix():
    with pytest.raises(ValueError, match="powers of two"):
        launches(24, 24, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        launches(64, 64, 40, torch.float32)
    with pytest.raises(TypeError, match="cast q, k, v"):
        launches(64, 64, 64, torch.float64)


def test_every_launch_compiles_for_sm90_without_spills(tmp_path):
    missing = aot.missing_tools()
    if missing:
        pytest.skip(f"Triton's package lacks {', '.join(missing)} ({aot.tool_dir()}): cannot compile for sm_90 here")
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "kernels.favor.aot", "--json", str(out), "--jobs", "2"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    want = {(launch.name, {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt], d, m)
            for dt, d, m, launch in compile_grid()}
    assert {(row["kernel"], row["dtype"], row["D"], row["m"]) for row in rows} == want
    bad = {f"{row['kernel']} {row['dtype']} D={row['D']} m={row['m']}": aot.problems(row) for row in rows
           if aot.problems(row)}
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items()) + "\n" + r.stdout[-6000:]
    assert r.returncode == 0, r.stderr[-3000:]
    # bf16 / fp16 inputs reach the tensor cores as wgmma (Hopper's HGMMA), not mma.sync or FMA
    assert all(row["HGMMA"] > 0 for row in rows)

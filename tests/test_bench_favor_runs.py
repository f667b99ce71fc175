"""The GPU benchmark script stays runnable: its --smoke mode (tiny shapes, Triton's interpreter on
CPU) goes through every implementation (varlen_attn, CUDA only, recorded as skipped) and writes its
JSON, with each row's FLOP and byte counts, and its plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_favor_smoke(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("--smoke is the CPU check; on a GPU run the benchmark itself")
    env = {**os.environ, "TMPDIR": str(tmp_path), "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "benchmarks/bench_favor.py", "--smoke"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "favor_cpu.json").read_text())
    assert result["partial"] is False and result["benchmark"] == "favor"
    rows = {(row["impl"], row["L"]): row for row in result["rows"]}
    measured = {impl for (impl, _), row in rows.items() if row.get("fwd_bwd_ms") is not None}
    assert measured == {"favor_triton", "favor_reference", "performer_pytorch", "sdpa"}
    assert all(row["skipped"] for (impl, _), row in rows.items() if impl == "varlen")  # CUDA only
    for (impl, length), row in rows.items():
        if impl == "varlen":
            continue
        assert row["error"] is None and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
        kind = "exact" if impl == "sdpa" else "favor"
        assert row["counts"]["kind"] == kind and row["counts"]["L"] == length
        assert row["fwd_tflops"] > 0 and row["fwd_gbps"] > 0
        assert "fwd_gap" not in row  # no --ceilings: no floors
    assert (tmp_path / "favor_cpu.png").stat().st_size > 0

"""The GPU benchmark script stays runnable: its --smoke mode (tiny shapes, Triton's interpreter on
CPU) goes through every implementation and writes its JSON and plot."""

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
    assert {row["impl"] for row in result["rows"]} >= {"favor_triton", "favor_reference", "performer_pytorch",
                                                       "sdpa_softmax"}
    assert all("fwd_bwd_s" in row for row in result["rows"])
    assert (tmp_path / "favor_cpu.png").stat().st_size > 0

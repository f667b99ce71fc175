"""The training-loop benchmark stays runnable: its --smoke mode trains the real trainer twice (every
step read, then every 4th) and writes steps/s of both with the JSON conventions of the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_loop_smoke(tmp_path):
    out = tmp_path / "loop.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "benchmarks/bench_train_loop.py", "--smoke", "--result", str(out),
                        "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"benchmark", "date", "device", "versions", "settings", "rows", "summary", "command"} <= set(result)
    assert result["benchmark"] == "train_loop" and result["settings"]["smoke"]
    assert [(row["log_every"], row["span_steps"]) for row in result["rows"]] == [(1, 4), (4, 4)]
    every, windowed = result["rows"]
    # the span after the first window: every step read in one run, every 4th in the other
    assert every["reads"] == 4 and windowed["reads"] == 1
    assert all(row["steps_per_s"] > 0 and row["span_s"] > 0 for row in result["rows"])
    assert result["summary"]["ratio"] == windowed["steps_per_s"] / every["steps_per_s"]

"""The contrastive benchmark stays runnable: its --smoke mode (tiny model and batches on CPU) runs
both modes, the gradient-cached and the uncached step, and writes its JSON and plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_contrastive_smoke(tmp_path):
    out = tmp_path / "contrastive.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "benchmarks/bench_contrastive.py", "--smoke", "--out", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"device", "versions", "config", "method", "rows", "comparison", "largest_batch_fits",
            "targets", "date"} <= set(result)
    rows = result["rows"]
    assert {row["mode"] for row in rows} == {"cached", "uncached"}
    for row in rows:
        assert row["status"] == "ok", row
        assert {"batch_cells", "chunk_cells", "n_chunks", "step_s", "ms_per_cell", "peak_bytes",
                "step_peak_bytes"} <= set(row)
        assert math.isfinite(row["step_s"]) and row["step_s"] > 0
        assert math.isfinite(row["ms_per_cell"]) and row["ms_per_cell"] > 0
        assert row["peak_bytes"] > 0 and math.isfinite(row["loss"])
        if row["mode"] == "uncached":
            assert row["n_chunks"] == 1
        else:
            assert row["n_chunks"] == -(-row["batch_cells"] // row["chunk_cells"])
    batches = {row["batch_cells"] for row in rows}
    assert {c["batch_cells"] for c in result["comparison"]} == batches
    assert all(c["time_per_cell_ratio"] > 0 for c in result["comparison"])
    assert result["largest_batch_fits"] == {"cached": max(batches), "uncached": max(batches)}
    assert result["limited_by"] == {"cached": "none: every batch ran", "uncached": "none: every batch ran"}
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_budget_stops_the_sweep_and_says_so(tmp_path):
    """Past the first size of each mode, a size whose predicted time passes --budget-s (counted from
    the start, its finishing reserve kept) is skipped; the largest batch that ran is then said to be
    limited by the budget, not by memory."""
    out = tmp_path / "contrastive.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "benchmarks/bench_contrastive.py", "--smoke", "--budget-s", "1", "--out",
                        str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["partial"] is False
    for mode in ("cached", "uncached"):
        statuses = [row["status"] for row in result["rows"] if row["mode"] == mode]
        assert statuses[0] == "ok" and set(statuses[1:]) == {"skipped"}, statuses
        assert result["limited_by"][mode] == "time budget"

"""The CPU FAVOR+ layout benchmark stays runnable: --smoke checks every layout against the
reference and times each on every case, and writes its JSON with the time ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_favor_cpu_smoke(tmp_path):
    out = tmp_path / "favor_layouts.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_favor_cpu.py", "--smoke", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["partial"] is False and result["settings"]["smoke"] is True
    rows = result["rows"]
    assert {row["layout"] for row in rows} == {"grouped", "ungrouped", "padded", "reference"}
    assert len({row["case"] for row in rows}) == 4
    for row in rows:
        assert row["max_rel_error_fp64"] < 1e-10 and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
        assert row["tokens"] == 600 and row["padded_tokens"] >= row["tokens"]
    assert set(result["time_ratios"]) == {"ungrouped / grouped", "padded / grouped", "reference / grouped"}


def test_the_padded_layout_is_the_same_definition():
    """What the benchmark times as ``padded`` computes FAVOR+ (or its times would compare nothing)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_favor_cpu import check_equal, layouts

    for lengths in ([7, 1, 30, 12], [50, 3]):
        errors = check_equal(layouts(), lengths, heads=2, dim=8, features=16)
        assert max(errors.values()) < 1e-12

"""The seeds' claims benchmarks stay runnable: CellLM's input cost (all genes vs expressed genes of the
scBERT shape) and the embedding throughput per preset, each in --smoke mode on a tiny lengths file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _lengths(tmp_path: Path) -> Path:
    path = tmp_path / "lengths.npy"
    np.save(path, np.random.default_rng(0).integers(20, 400, size=500).astype(np.int32))
    return path


def _run(tmp_path: Path, benchmark: str, script: str, fields: set[str]) -> dict:
    """``script --smoke`` on a small lengths file; its finished JSON, with the header every result has."""
    out = tmp_path / f"{benchmark}.json"
    r = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", "--lengths-file", str(_lengths(tmp_path)),
                        "--result", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"benchmark", "date", "device", "versions", "settings", "rows", "command", *fields} <= set(result)
    assert result["benchmark"] == benchmark and result["partial"] is False
    return result


def test_input_cost_smoke(tmp_path):
    result = _run(tmp_path, "input_cost", "bench_input_cost.py", {"summary"})
    settings = result["settings"]
    assert settings["lengths"] == "file" and settings["shrunk"] and settings["n_genes"] == 600
    rows = {(r["method"], r["cell"]): r for r in result["rows"]}
    assert set(rows) == {("model_cost", c) for c in ("median", "p90", "distribution mean")} | {
        (m, c) for m in ("flop_counter", "time") for c in ("median", "p90")}
    for row in rows.values():
        assert row["all_genes"] > 0 and row["expressed"] > 0
        assert math.isclose(row["reduction"], 1 - row["expressed"] / row["all_genes"])
    # expressed-gene input is cheaper wherever a cell expresses fewer genes than the vocabulary holds
    assert all(rows[(m, "median")]["reduction"] > 0.3 for m in ("model_cost", "flop_counter"))
    # torch's count of the actual model and the cost model agree (matrix multiplies, 3 x forward)
    counter = rows[("flop_counter", "median")]
    for key in ("all_genes", "expressed"):
        assert math.isclose(counter[key], counter["model_cost_same_shape"][key], rel_tol=0.1), key
    assert result["summary"]["median_genes"] == settings["points"]["median"]


def test_embed_smoke(tmp_path):
    result = _run(tmp_path, "embed", "bench_embed.py", {"claim"})
    assert math.isclose(result["claim"]["cells_per_s_per_device"], 100_000 / 3600 / 8)
    rows = {r["preset"]: r for r in result["rows"]}
    assert set(rows) == {"geneformer-10m", "scbert"}
    assert rows["scbert"]["gene_set"] == "all" and rows["scbert"]["backend"] == "favor"
    assert rows["geneformer-10m"]["backend"] == "sdpa" and rows["geneformer-10m"]["max_genes"] == 300
    for row in rows.values():
        assert row["shrunk"] and row["cells"] >= 16 and row["seconds"] > 0
        assert math.isclose(row["cells_per_s"], row["cells"] / row["seconds"])
        assert row["tokens_per_s"] > row["cells_per_s"]

"""The training-throughput benchmark stays runnable: its --smoke mode (two tiny presets on CPU, one
warm-up and one timed step per row) measures all four batching modes on the same cells and writes
its JSON with consistent throughput and padding figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"random_padded", "grouped_padded", "packed", "padded_to_cap"}


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "train.json"
    ceilings = tmp_path / "ceilings.json"  # as gpu_suite.py's setup part writes it
    ceilings.write_text(json.dumps({"ceilings": {"gemm_bf16_tflops": 0.5, "gemm_n": 256}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--smoke", "--result", str(out),
                        "--ceilings", str(ceilings)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"benchmark", "date", "device", "versions", "settings", "rows", "speedups", "command"} <= set(result)
    assert result["benchmark"] == "train"
    settings = result["settings"]
    assert settings["world_size"] == 1 and settings["shrunk"] and settings["lengths"] in ("real", "synthetic")
    assert result["partial"] is False and settings["measured_gemm_tflops"] == 0.5

    rows = result["rows"]
    skipped = [row for row in rows if row["skipped"]]
    measured = [row for row in rows if not row["skipped"]]
    assert all(isinstance(row["skipped"], str) and row["skipped"] for row in skipped)
    # flash-attn and varlen_attn need CUDA, and padded batches run SDPA whatever the exact backend (measured
    # once, as sdpa); FAVOR+ runs packed only (no padded fast path); every other row applies
    assert {(row["backend"], row["mode"]) for row in skipped} == (
        {(backend, mode) for backend in ("flash", "varlen") for mode in MODES}
        | {("favor", "random_padded"), ("favor", "grouped_padded"), ("favor", "padded_to_cap")})
    for preset in ("geneformer-10m", "scgpt"):
        favor = {row["mode"] for row in measured if (row["preset"], row["backend"]) == (preset, "favor")}
        assert favor == {"packed"}
        for backend in ("sdpa",):
            got = {row["mode"]: row for row in measured if (row["preset"], row["backend"]) == (preset, backend)}
            assert set(got) == MODES, (preset, backend, sorted(got))
            waste = {mode: got[mode]["padding_waste"] for mode in MODES}
            assert waste["packed"] == 0
            # the same cells: random batches pad more than length-sorted ones, which pad a little
            assert waste["random_padded"] > waste["grouped_padded"] >= 0
            # Geneformer's baseline pads every cell to the cap: the most waste, exactly 1 - mean length / cap
            assert waste["padded_to_cap"] > waste["random_padded"]
            assert got["padded_to_cap"]["cells_per_step"] == got["random_padded"]["cells_per_step"]
            if settings["lengths"] == "real":  # real cells' lengths spread widely (synthetic ones much less)
                assert waste["random_padded"] > 0.3 and waste["grouped_padded"] < 0.05
            # random_padded's fixed batch size fits the preset's longest cell into the budget
            budget, longest = settings["token_budget"], got["random_padded"]["max_genes"] + (preset == "scgpt")
            assert got["random_padded"]["cells_per_step"] == budget // longest
            assert got["grouped_padded"]["cells_per_step"] >= got["random_padded"]["cells_per_step"]
    for row in measured:
        assert not row["oom"] and row["error"] is None and row["world_size"] == 1 and row["shrunk"]
        for key in ("cells_per_s", "tokens_per_s", "median_step_s", "tflops", "loss"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["tokens_per_s"] > row["cells_per_s"]
        assert row["per_rank_cells_per_s"] == [row["cells_per_s"]] == [row["aggregate_cells_per_s"]]
        assert row["mfu"] is None  # no datasheet peak known for a CPU
        assert math.isclose(row["mfu_measured_gemm"], row["tflops"] / 0.5)  # against the measured GEMM rate
        assert row["peak_memory_bytes"] > 0 and row["params"] > 0 and row["timed_steps"] == 1
    speedups = {(s["preset"], s["backend"]): s for s in result["speedups"]}
    assert set(speedups) == {(p, b) for p in ("geneformer-10m", "scgpt") for b in ("sdpa", "favor")}
    for (_, backend), s in speedups.items():
        if backend == "sdpa":
            assert set(s["speedup_vs_random_padded"]) == {"grouped_padded", "packed"}
            assert all(v > 0 for v in s["speedup_vs_random_padded"].values())
            assert set(s["speedup_vs_padded_to_cap"]) == {"random_padded", "grouped_padded", "packed"}
            assert all(v > 0 for v in s["speedup_vs_padded_to_cap"].values())
        else:  # FAVOR+ runs packed only: nothing to compare with
            assert s["speedup_vs_random_padded"] == {"packed": None}


def test_padded_to_cap_pads_every_cell_to_the_cap():
    """Geneformer's 29.4x baseline: random batches of budget // cap cells, each cell padded to the
    cap (2,048 there) whatever the batch holds; its waste counts those slots."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import (
        bench_config,
        make_batch,
        model_input,
        padding_counts,
        parse_args,
        plan_batches,
        resolve_defaults,
    )

    args = resolve_defaults(parse_args(["--smoke", "--presets", "geneformer-10m", "--max-genes", "64"]))
    config, longest = bench_config("geneformer-10m", "sdpa", args)
    lengths = np.random.default_rng(0).integers(5, 40, size=100)
    batches = plan_batches("padded_to_cap", lengths, config.token_cost(longest), 64 * 4, longest,
                           np.random.default_rng(1))
    assert longest == 64 and {len(b) for b in batches} == {4}  # budget // cap cells, as random_padded
    counts = padding_counts("padded_to_cap", batches, lengths, longest)
    assert counts["pool_slots"] == 4 * len(batches) * 64
    assert counts["pool_slots"] > padding_counts("random_padded", batches, lengths, longest)["pool_slots"]
    batch = make_batch(lengths[batches[0]], config, args.n_genes, torch.Generator().manual_seed(0))
    padded = model_input("padded_to_cap", batch, torch.device("cpu"), longest)
    assert padded["gene_ids"].shape == (4, 64) and padded["key_padding_mask"].sum() == lengths[batches[0]].sum()


def test_write_lengths_round_trip(tmp_path):
    """--write-lengths saves genes per cell of the real files (and where they came from), which
    --lengths-file then reads back as a real distribution."""
    import numpy as np
    import pytest

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import file_lengths, real_lengths
    from common import SHARED_H5AD

    if real_lengths(SHARED_H5AD) is None:
        pytest.skip("../shared/data/h5ad is not present")
    path = tmp_path / "data" / "lengths.npy"
    r = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--write-lengths", str(path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lengths, source = file_lengths(path)
    expected, described = real_lengths(SHARED_H5AD)
    assert np.array_equal(lengths, expected) and source["kind"] == "real"
    assert source["files"] == described["files"] and "scdcc_10X_PBMC_top2000.h5ad" not in source["files"]
    path.with_suffix(".json").unlink()  # without the description beside it: a file of unknown origin
    assert file_lengths(path)[1]["kind"] == "file"

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
            # sdpa pads a packed batch for the attention only; padded modes pad every layer's slots
            assert got["packed"]["attention_padding_waste"] > 0
            assert all(got[mode]["attention_padding_waste"] == waste[mode] for mode in MODES - {"packed"})
            # padding costs FLOPs: most at the cap, none for packed cells
            work = {mode: got[mode]["flops_over_useful"] for mode in MODES}
            assert work["packed"] == 1 and work["padded_to_cap"] > work["random_padded"] > work["grouped_padded"] >= 1
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
    by_row = {(row["preset"], row["backend"], row["mode"]): row for row in measured}
    for (preset, backend), s in speedups.items():
        # padded rows run under sdpa only: FAVOR+ (packed only) is compared with them
        assert s["baseline_backend"] == {"random_padded": "sdpa", "padded_to_cap": "sdpa"}
        cap, random = by_row[preset, "sdpa", "padded_to_cap"], by_row[preset, "sdpa", "random_padded"]
        packed = by_row[preset, backend, "packed"]["cells_per_s"]
        assert math.isclose(s["speedup_vs_random_padded"]["packed"], packed / random["cells_per_s"])
        assert math.isclose(s["speedup_vs_padded_to_cap"]["packed"], packed / cap["cells_per_s"])
        # a bound for exact attention only
        assert s["padded_to_cap_flops_over_useful"] == (cap["flops_over_useful"] if backend == "sdpa" else None)
        assert cap["flops_over_useful"] > 1
        if backend == "sdpa":
            assert set(s["speedup_vs_random_padded"]) == {"grouped_padded", "packed"}
            assert all(v > 0 for v in s["speedup_vs_random_padded"].values())
            assert set(s["speedup_vs_padded_to_cap"]) == {"random_padded", "grouped_padded", "packed"}
            assert all(v > 0 for v in s["speedup_vs_padded_to_cap"].values())
        else:
            assert set(s["speedup_vs_random_padded"]) == set(s["speedup_vs_padded_to_cap"]) == {"packed"}


def test_padded_to_cap_pads_every_cell_to_the_cap():
    """Geneformer's 29.4x baseline: random batches of budget // cap cells, each cell padded to the
    cap (2,048 there) whatever the batch holds; its waste counts those slots."""
    import numpy as np
    import pytest
    import torch

    from pretrain.model.flops import model_cost

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import (
        MASK_RATIO,
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
    counts = padding_counts("padded_to_cap", batches, lengths, longest, config)
    assert counts["pool_slots"] == counts["pool_attn_slots"] == 4 * len(batches) * 64
    assert counts["pool_slots"] > padding_counts("random_padded", batches, lengths, longest)["pool_slots"]
    # its FLOPs: every cell runs the layers at the cap's length, the masked-expression head at its own
    # masked genes (a cell of the cap's length with the same masked genes)
    cells = np.concatenate(batches)
    assert counts["pool_useful_flops"] == pytest.approx(
        sum(model_cost(config, int(n), MASK_RATIO).flops_per_cell for n in lengths[cells]))
    assert counts["pool_run_flops"] == pytest.approx(
        sum(model_cost(config, 64, MASK_RATIO * int(n) / 64).flops_per_cell for n in lengths[cells]))
    assert counts["pool_useful_flops"] < counts["pool_run_flops"] < len(cells) * model_cost(
        config, 64, MASK_RATIO).flops_per_cell
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
    # a gene subset (1,287 genes) would pull the lengths down: left out, with the reason
    assert "muscat_kang_se.h5ad" not in source["files"] and "1,287 genes" in source["left_out"]["muscat_kang_se.h5ad"]
    assert len(lengths) == sum(source["files"].values())
    path.with_suffix(".json").unlink()  # without the description beside it: a file of unknown origin
    assert file_lengths(path)[1]["kind"] == "file"


def _row(preset, backend, mode, cells_per_s, **extra):
    return {"preset": preset, "backend": backend, "mode": mode, "cells_per_s": cells_per_s, "padding_waste": 0.1,
            "flops_over_useful": 1.0, "skipped": None, **extra}


def test_packed_only_backends_are_compared_with_the_presets_sdpa_baselines():
    """varlen and favor run packed only; the padded modes run SDPA whatever the backend and are
    measured under sdpa: a varlen packed row is compared with those, and says so."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import speedups

    rows = [_row("p", "sdpa", "random_padded", 10.0), _row("p", "sdpa", "grouped_padded", 20.0),
            _row("p", "sdpa", "packed", 25.0), _row("p", "sdpa", "padded_to_cap", 5.0, flops_over_useful=4.0),
            _row("p", "varlen", "packed", 40.0), {**_row("p", "varlen", "random_padded", None), "skipped": "padded"},
            _row("q", "favor", "packed", 7.0)]  # a preset whose padded rows did not run
    got = {(s["preset"], s["backend"]): s for s in speedups(rows)}
    assert set(got) == {("p", "sdpa"), ("p", "varlen"), ("q", "favor")}
    varlen = got["p", "varlen"]
    assert varlen["baseline_backend"] == {"random_padded": "sdpa", "padded_to_cap": "sdpa"}
    assert varlen["speedup_vs_random_padded"] == {"packed": 4.0}
    assert varlen["speedup_vs_padded_to_cap"] == {"packed": 8.0}
    assert varlen["padded_to_cap_flops_over_useful"] == 4.0
    assert got["p", "sdpa"]["speedup_vs_padded_to_cap"] == {"random_padded": 2.0, "grouped_padded": 4.0,
                                                             "packed": 5.0}
    favor = got["q", "favor"]
    assert favor["baseline_backend"] == {} and favor["speedup_vs_random_padded"] == {"packed": None}
    assert "speedup_vs_padded_to_cap" not in favor


def test_rows_after_a_device_fault_are_skipped_with_its_reason(monkeypatch, tmp_path):
    """A CUDA fault poisons the process's context: the row that hit it is written with its error,
    every later row is skipped with the fault as the reason, and nothing touches the device again
    (no engine is destroyed or built after it)."""
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_train

    lengths = tmp_path / "lengths.npy"
    np.save(lengths, np.random.default_rng(0).integers(5, 60, size=300))
    args = bench_train.resolve_defaults(bench_train.parse_args(
        ["--smoke", "--presets", "geneformer-10m", "scgpt", "--backends", "sdpa", "favor", "--lengths-file",
         str(lengths)]))
    built, destroyed, ran = [], [], []

    class Engine:
        def destroy(self):
            destroyed.append(self)

    def build(config, args, device):
        built.append(config)
        return Engine(), False, 10

    def run_row(engine, config, longest, mode, pool, args, device, memory, rng):
        ran.append(mode)
        counts = dict(pool_cells=4.0, pool_batches=1.0, pool_real=40.0, pool_slots=60.0, pool_attn_slots=60.0,
                      pool_useful_flops=1.0, pool_run_flops=2.0)
        return {**dict.fromkeys(bench_train.LOCAL, 0.0), **counts, "failed": 1.0}, "AcceleratorError: illegal address"

    monkeypatch.setattr(bench_train, "build", build)
    monkeypatch.setattr(bench_train, "run_row", run_row)
    monkeypatch.setattr(bench_train, "device_fault", lambda device: "AcceleratorError: illegal address")
    from pretrain.distributed import _free_port

    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)  # a world of one, unset again after the test
    out = bench_train.run_benchmark(args)
    rows = out["rows"]
    assert ran == ["random_padded"] and len(built) == 1 and destroyed == []
    assert rows[0]["error"] == "AcceleratorError: illegal address" and rows[0]["skipped"] is None
    assert len(rows) == 2 * 2 * 4 and all(
        "device faulted in an earlier row (AcceleratorError: illegal address)" in row["skipped"]
        for row in rows[1:] if not row["skipped"].startswith("FAVOR+ has no padded"))


def test_a_row_on_a_faulted_device_is_recorded_not_raised():
    """After a CUDA fault even resetting the memory counters raises: the real `run_row` records
    the row as failed with the fault (its padding figures kept), and its peak as 0."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import bench_config, parse_args, resolve_defaults, run_row

    class Faulted:
        def reset(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        peak = reset

    args = resolve_defaults(parse_args(["--smoke", "--presets", "geneformer-10m"]))
    config, longest = bench_config("geneformer-10m", "sdpa", args)
    pool = np.random.default_rng(0).integers(5, 60, size=200)
    local, error = run_row(None, config, longest, "packed", pool, args, torch.device("cpu"), Faulted(),
                           np.random.default_rng(1))
    assert local["failed"] == 1 and local["oom"] == 0 and "illegal memory access" in error
    assert local["peak_bytes"] == 0 and local["pool_cells"] > 0 and local["pool_run_flops"] > 0


def test_shrunk_presets_keep_the_attention_share():
    """The CPU rows' shrinking divides every width, the head width included: a preset with a set
    head_dim (scBERT's and CellLM's 64) keeps its q/k/v width in proportion to d_model, the heads
    and the FAVOR+ features' ratio to the head width, instead of attention growing to dominate."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from dataclasses import replace

    from bench_train import shrink_config

    from pretrain.presets import PRESETS

    for p in PRESETS.values():
        full = replace(p.model, vocab_size=64, gene_embedding_file=None)
        small = shrink_config(full, 4, 2).validate()
        assert (small.n_heads, small.n_layers) == (full.n_heads, min(2, full.n_layers))
        assert small.d_model == full.d_model // 4 // full.n_heads * full.n_heads
        assert small.attention_head_dim == full.attention_head_dim // 4 or full.head_dim is None
        assert small.favor_features == full.favor_features // 4
        assert small.decoder.n_layers == min(2, full.decoder.n_layers)
    scbert = shrink_config(PRESETS["scbert"].model, 4, None)
    assert (scbert.head_dim, scbert.d_model, scbert.n_layers) == (16, 50, 6)

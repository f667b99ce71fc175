"""Determinism and crash safety: worker counts, nodes, SIGKILL and rerun, verify, stats merge."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.plan import ConvertOptions
from data_pipeline.conversion.shards import iter_shard
from data_pipeline.conversion.stats import RELATIVE_ERROR, GeneStats
from data_pipeline.corpus import Corpus, verify
from tests.corpus_helpers import corpus_files, random_counts, write_h5ad

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(unit_cells=512, block_cells=128, shard_bytes=200 << 10)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("inputs")
    # two small files at the end: a file's end and a small file share a work unit
    return [write_h5ad(d / "a.h5ad", random_counts(3000, 1500, seed=10, density=0.08),
                       obs={"t": [str(i % 5) for i in range(3000)]}),
            # compressed: the gene scan keeps its rows in .work/cache for the conversion pass
            write_h5ad(d / "b.h5ad", random_counts(1700, 1200, seed=11, density=0.12), compression="gzip"),
            write_h5ad(d / "c.h5ad", random_counts(150, 1500, seed=12, density=0.08)),
            write_h5ad(d / "d.h5ad", random_counts(120, 1500, seed=13, density=0.08))]


def _options(inputs) -> ConvertOptions:
    return ConvertOptions([str(p) for p in inputs], label_columns=["t"], **SMALL)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "corpus"
    convert(out, _options(inputs), workers=1, progress=False)
    return out


def _assert_same_corpus(a: Path, b: Path) -> None:
    fa, fb = corpus_files(a), corpus_files(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"
    za, zb = zarr.open_group(str(a / "stats.zarr"), mode="r"), zarr.open_group(str(b / "stats.zarr"), mode="r")
    for key in ("nonzero_count", "count_sum", "cp10k_sum", "nonzero_median", "sketch_keys", "sketch_counts"):
        np.testing.assert_array_equal(za[key][...], zb[key][...], err_msg=key)


def test_units_become_shards(reference):
    manifest = Corpus(reference).manifest
    shards = [list(iter_shard(reference / s["file"])) for s in manifest["shards"]]
    assert all(len({key.split("-")[0] for key, _ in blocks}) == 1 for blocks in shards)  # one unit each
    sources = [{block.source for _, block in blocks} for blocks in shards]
    assert any(len(s) == 2 for s in sources)  # a file's end and a small file share a unit (and a shard)
    assert max(s["bytes"] for s in manifest["shards"]) < 1.5 * SMALL["shard_bytes"]


def test_workers_do_not_change_the_corpus(inputs, reference, tmp_path):
    convert(tmp_path / "w4", _options(inputs), workers=4, progress=False)
    _assert_same_corpus(reference, tmp_path / "w4")
    assert verify(tmp_path / "w4") == []


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "data_pipeline", *args]


def _convert_cmd(inputs, out: Path, *extra) -> list[str]:
    return _cli("convert", *map(str, inputs), "--out", str(out), "--label-columns", "t",
                "--unit-cells", str(SMALL["unit_cells"]), "--block-cells", str(SMALL["block_cells"]),
                "--shard-size", str(SMALL["shard_bytes"]), "--no-progress", *extra)


def test_multi_node_then_merge(inputs, reference, tmp_path):
    out = tmp_path / "nodes"
    procs = [subprocess.Popen(_convert_cmd(inputs, out, "--num-nodes", "2", "--node-rank", str(r),
                                           "--workers", "1"), cwd=REPO, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "merge" in err
    assert not (out / "manifest.json").exists()
    r = subprocess.run(_cli("merge", str(out), "--no-progress"), cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_same_corpus(reference, out)


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


# (what to watch, how many must exist before the kill)
KILL_POINTS = [
    (".work/scan", "u*.npz", 2),
    (".work/cache", "u*.rows", 1),
    (".work/units", "u*.json", 1),
    (".work/units", "u*.json", 6),
    ("shards", "corpus-*.tar", 1),
]


@pytest.mark.parametrize("where,pattern,after", KILL_POINTS)
def test_sigkill_then_rerun_gives_the_same_corpus(inputs, reference, tmp_path, where, pattern, after):
    out = tmp_path / "killed"
    cmd = _convert_cmd(inputs, out, "--workers", "2")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while _count(out / where, pattern) < after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: workers die too, as on a node failure
    proc.wait()
    killed_midway = not (out / "manifest.json").exists()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_same_corpus(reference, out)
    assert not (out / ".work").exists()
    assert killed_midway, "the run finished before the kill point; the test did not test a crash"


def test_verify_names_damaged_shards(inputs, reference, tmp_path):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(reference, out)
    assert verify(out) == []
    shards = sorted((out / "shards").glob("*.tar"))
    assert len(shards) >= 3
    data = bytearray(shards[0].read_bytes())
    data[5000] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    shards[1].write_bytes(shards[1].read_bytes()[:-3000])
    shards[2].unlink()
    problems = verify(out)
    assert any(shards[0].name in p and "edited" in p for p in problems)
    assert any(shards[1].name in p for p in problems)
    assert any(shards[2].name in p and "missing" in p for p in problems)
    r = subprocess.run(_cli("verify", str(out)), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and shards[2].name in r.stderr


def test_merged_stats_equal_single_pass(reference):
    corpus = Corpus(reference)
    one_pass = GeneStats(len(corpus.vocab))
    genes, counts, indptr, totals = [], [], [0], []
    for _, b in corpus.iter_blocks():
        genes.append(b.genes)
        counts.append(b.counts)
        indptr.extend((b.indptr[1:] + indptr[-1]).tolist())
        totals.append(b.total_counts)
    genes, counts, totals = np.concatenate(genes), np.concatenate(counts), np.concatenate(totals)
    one_pass.add_cells(genes, counts, np.array(indptr), totals)
    merged = GeneStats.from_zarr(reference / "stats.zarr")
    np.testing.assert_array_equal(merged.sketch_keys, one_pass.finalize().sketch_keys)
    np.testing.assert_array_equal(merged.sketch_counts, one_pass.sketch_counts)
    np.testing.assert_array_equal(merged.nonzero_count, one_pass.nonzero_count)
    np.testing.assert_allclose(merged.count_sum, one_pass.count_sum, rtol=1e-12)
    np.testing.assert_allclose(merged.cp10k_sum, one_pass.cp10k_sum, rtol=1e-12)
    # sketch medians within the documented bound of the exact nonzero medians
    normalized = counts * np.repeat(1e4 / totals, np.diff(indptr))
    medians = zarr.open_group(str(reference / "stats.zarr"), mode="r")["nonzero_median"][...]
    order = np.argsort(genes, kind="stable")
    bounds = np.searchsorted(genes[order], np.arange(len(corpus.vocab) + 1))
    for g in np.flatnonzero(merged.nonzero_count):
        v = np.sort(normalized[order[bounds[g]:bounds[g + 1]]])
        lo, hi = v[(len(v) - 1) // 2], v[len(v) // 2]
        assert lo * (1 - RELATIVE_ERROR) <= medians[g] <= hi * (1 + RELATIVE_ERROR)


def test_torn_or_missing_row_cache_is_read_again(inputs, reference, tmp_path):
    """A cache file torn by a crash (no fsync: cut short, or whole in length with blocks that read
    back as zeros after a power cut) or lost is detected and its rows re-read."""
    from data_pipeline.conversion.convert import WORK, ensure_vocab, prepare_out
    from data_pipeline.conversion.plan import build_plan, load_plan, save_plan

    out = tmp_path / "corpus"
    options = _options(inputs)
    assert prepare_out(out, options, overwrite=False) == "new"
    (out / WORK).mkdir(parents=True)
    save_plan(out / WORK, *build_plan(options))
    plan = load_plan(out / WORK)
    ensure_vocab(out, plan, 1, list(range(len(plan["units"]))), False, 1, 0, 0.0)
    caches = sorted((out / WORK / "cache").glob("u*.rows"))
    assert len(caches) >= 3
    blob = caches[0].read_bytes()
    caches[0].write_bytes(blob[: len(blob) // 2])
    caches[1].unlink()
    blob = caches[2].read_bytes()  # the header and pointers intact, the counts zeroed: it still parses
    caches[2].write_bytes(blob[: len(blob) // 2] + bytes(len(blob) - len(blob) // 2))
    convert(out, options, workers=1, progress=False)
    _assert_same_corpus(reference, out)


# --- training: a resumed run's MLflow record ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # mlflow's SQLAlchemy store
def test_a_resumed_training_run_logs_each_step_once_to_mlflow(tmp_path):
    """A job killed while saving its step-4 checkpoint had logged steps 3 and 4; `--resume auto`
    retrains them from the step-2 checkpoint in the same MLflow run, which then holds each step once."""
    from mlflow.tracking import MlflowClient

    from tests.train_helpers import TINY, make_corpus, metrics, run_pretrain

    corpus = make_corpus(tmp_path, n_cells=96, n_genes=300)
    run = tmp_path / "run"
    args = [*TINY, f"data.corpus={corpus}", f"run.out={run}", "run.mlflow=true", "run.log_every=1",
            "run.checkpoint_every=2"]
    run_pretrain([*args, "schedule.max_steps=4"])
    (run / "checkpoints" / "step-00000004" / "COMPLETE").unlink()  # the save the kill cut short
    run_id = (run / "mlflow_run_id").read_text().strip()
    run_pretrain([*args, "schedule.max_steps=6"], resume="auto")
    assert (run / "mlflow_run_id").read_text().strip() == run_id  # one MLflow run across the restart
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("loss", "lr", "cells_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4, 5, 6], key
    assert [h["step"] for h in metrics(run)] == [1, 2, 3, 4, 5, 6]

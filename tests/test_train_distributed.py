"""2-rank CPU training jobs (torchrun, gloo, DeepSpeed ZeRO, fp32) of a tiny model on a synthetic
corpus: exact resume after SIGKILL, ZeRO 1/2/3 bundles that load without DeepSpeed, and SIGTERM.

Every job has the same model, data and schedule (warm-up over the first 5 steps, then a constant
learning rate, so that a 3-step run is the beginning of an 8-step one); run A, the uninterrupted
8-step ZeRO-2 reference, is shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from tests.train_helpers import (
    LOSS_KEYS,
    TINY,
    complete_steps,
    export,
    job_env,
    kill_group,
    kill_job,
    make_corpus,
    metrics,
    run_pretrain,
    same_number,
    start_pretrain,
    steps_logged,
    summary,
    wait_for,
    weights,
    worker_pids,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def overrides(corpus: Path, run: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.corpus={corpus}", f"run.out={run}", "schedule.warmup_steps=5", "schedule.decay=constant",
            "deepspeed.zero_stage=2", "deepspeed.bf16=false", "run.log_every=1", *extra]


A_STEPS = ["schedule.max_steps=8", "run.checkpoint_every=3"]


@pytest.fixture(scope="module")
def run_a(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("a") / "run"
    run_pretrain(overrides(corpus, run, *A_STEPS), ranks=2)
    return run


@pytest.fixture(scope="module")
def bundle_a(run_a) -> Path:
    return export(run_a, run_a.parent / "bundle")


@pytest.fixture(scope="module")
def bundle_a3(run_a) -> Path:
    """Run A's weights after 3 steps (its checkpoint step-00000003)."""
    return export(run_a / "checkpoints" / "step-00000003", run_a.parent / "bundle3")


def test_uninterrupted_run_records_every_step_and_keeps_checkpoints(run_a):
    history = metrics(run_a)
    assert [h["step"] for h in history] == list(range(1, 9))
    for h in history:
        for key in (*LOSS_KEYS, "lr", "grad_norm", "cells_per_s", "tokens_per_s", "padding_waste"):
            assert h[key] is not None and np.isfinite(h[key]), (h["step"], key, h[key])
        assert h["skipped_steps"] == 0
        assert h["contrastive"] > 0 and h["label"] > 0 and h["mlm"] > 0
    # warm-up over 5 steps, then constant (which step each value belongs to: the next test)
    lrs = [h["lr"] for h in history]
    assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(2e-3) and lrs[0] < 2e-3
    done = summary(run_a)
    assert done["steps"] == 8 and done["world_size"] == 2 and not done["stopped_by_signal"] and not done["bf16"]
    assert complete_steps(run_a) == [3, 6, 8]  # every 3 steps and at the end, keep_checkpoints=3


def test_logged_lr_is_the_one_the_step_used(run_a):
    # lr_factor(step) for the 0-based step: 1/5, 2/5, ... of the peak during warm-up
    lrs = [h["lr"] for h in metrics(run_a)]
    np.testing.assert_allclose(lrs, [2e-3 * min(1, (i + 1) / 5) for i in range(8)], rtol=1e-9)


def test_resume_after_sigkill_equals_the_uninterrupted_run(corpus, run_a, bundle_a, tmp_path):
    run_b = tmp_path / "run"
    args = overrides(corpus, run_b, *A_STEPS)
    log = tmp_path / "b.log"
    proc = start_pretrain(args, 2, log)
    try:
        wait_for(lambda: (run_b / "checkpoints" / "step-00000003" / "COMPLETE").exists(), proc, log,
                 what="the step-3 checkpoint")
    finally:
        ranks = kill_job(proc)  # both ranks and torchrun, as a node failure would
    assert proc.returncode == -signal.SIGKILL and len(ranks) == 2
    assert not (run_b / "summary.json").exists(), "the job finished before it was killed"
    # nothing of the job is left to train on and save later checkpoints
    time.sleep(1)
    assert complete_steps(run_b) == [3] and steps_logged(run_b) < 8
    marker = run_b / "checkpoints" / "step-00000003" / "COMPLETE"
    stamp = marker.stat().st_mtime_ns
    # a checkpoint folder without its COMPLETE marker (a save cut short): --resume auto skips it
    fake = run_b / "checkpoints" / "step-00000099"
    fake.mkdir()
    (fake / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    proc = run_pretrain(args, ranks=2, resume="auto", check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert marker.stat().st_mtime_ns == stamp, "the resumed job retrained from step 0 (it re-saved step 3)"
    assert summary(run_b)["steps"] == 8
    a, b = metrics(run_a), metrics(run_b)
    assert [h["step"] for h in b] == [h["step"] for h in a]
    for ha, hb in zip(a, b):
        for key in (*LOSS_KEYS, "lr", "grad_norm", "skipped_steps"):
            assert same_number(ha[key], hb[key]), (ha["step"], key, ha[key], hb[key])
    wa, wb = weights(bundle_a), weights(export(run_b, tmp_path / "bundle"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6, msg=name)


def test_bundle_records_model_vocabulary_and_normalization(bundle_a, run_a, corpus):
    import yaml

    from pretrain import load_pretrained

    resolved = yaml.safe_load((run_a / "config.yaml").read_text())
    meta = json.loads((bundle_a / "config.json").read_text())
    assert meta["bundle_format"] == 2 and meta["model"] == resolved["model"]
    assert (bundle_a / "vocab.tsv").read_bytes() == (corpus / "vocab.tsv").read_bytes()
    norm = json.loads((bundle_a / "normalization.json").read_text())
    assert norm["mode"] == "log1p_bins" and norm["max_genes"] == 32 and norm["n_bins"] == resolved["model"]["n_bins"]
    assert len(norm["bin_edges"]) >= 2 and norm["medians"] is None
    model = load_pretrained(bundle_a)
    assert not model.training and model.config.d_model == 32 and model.normalization.mode == "log1p_bins"
    loaded, saved = model.state_dict(), weights(bundle_a)
    assert loaded.keys() == saved.keys()  # the FAVOR+ projections (buffers) included
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
    assert "trained for 8 optimizer steps (checkpoint step-00000008)" in (bundle_a / "README.md").read_text()


def test_model_card_names_the_corpus(bundle_a, corpus):
    card = (bundle_a / "README.md").read_text()
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["plan_hash"] in card
    assert f"{manifest['totals']['n_cells']} cells" in card
    assert manifest["vocab"]["sha256"] in card


NO_DEEPSPEED = r"""
import json, sys
sys.modules["deepspeed"] = None  # `import deepspeed` raises ImportError from here on
import anndata, numpy as np
import pretrain
from pretrain.embed import embed_h5ad
bundle, source, out = sys.argv[1:4]
model = pretrain.load_pretrained(bundle)
report = embed_h5ad(model, source, out, progress=False)
x = anndata.read_h5ad(out).obsm["X_scfm"]
try:
    import deepspeed  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({"blocked": blocked, "shape": list(x.shape), "finite": bool(np.isfinite(x).all()),
                  "spread": float(x.std(axis=0).mean()), "training": model.training, "report": report,
                  "deepspeed": sorted(k for k, v in sys.modules.items() if k.startswith("deepspeed") and v)}))
"""



@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_bundle_loads_and_embeds_without_deepspeed(stage, corpus, run_a, bundle_a3, tmp_path):
    # a fresh 3-step run at every stage, ZeRO-2 included: compared with the first 3 steps of the
    # 8-step ZeRO-2 run (run_a), whose checkpoint at step 3 is bundle_a3
    run = tmp_path / "run"
    run_pretrain(overrides(corpus, run, "schedule.max_steps=3", "run.checkpoint_every=0",
                           f"deepspeed.zero_stage={stage}"), ranks=2)
    assert complete_steps(run) == [3]
    bundle = export(run / "checkpoints" / "step-00000003", tmp_path / "bundle")
    assert {p.name for p in bundle.iterdir()} >= {"model.safetensors", "config.json", "vocab.tsv",
                                                  "normalization.json", "README.md"}
    # same data, same initialization, fp32: every stage trains the same model (up to the order of
    # the gradient reductions, which Adam amplifies for the rarely seen genes' embeddings to ~2e-5;
    # one step moves a weight by up to lr = 2e-3)
    reference = metrics(run_a)[:3]
    for ha, hb in zip(reference, metrics(run)[:3]):
        for key in LOSS_KEYS:
            assert same_number(ha[key], hb[key], rel=1e-5), (stage, ha["step"], key, ha[key], hb[key])
    wa, wb = weights(bundle_a3), weights(bundle)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wb[name].dtype == torch.float32
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-4, msg=name)

    out = tmp_path / "embedded.h5ad"
    proc = subprocess.run([sys.executable, "-c", NO_DEEPSPEED, str(bundle), str(corpus.parent / "cells.h5ad"),
                           str(out)], env=job_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["blocked"] and result["deepspeed"] == [] and result["training"] is False
    assert result["shape"] == [800, 32] and result["finite"] and result["spread"] > 1e-4
    assert result["report"]["input_fraction"] == 1.0


def _small_h5ad(path: Path, gene_ids: list[str], n_cells: int, seed: int) -> Path:
    """Counts with at most 8 genes a cell (under data.max_genes=32: no random gene subset)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_cells):
        cols = np.sort(rng.choice(len(gene_ids), size=rng.integers(1, 9), replace=False))
        rows.append(sp.csr_matrix((rng.integers(1, 20, len(cols)), (np.zeros(len(cols), int), cols)),
                                  shape=(1, len(gene_ids))))
    var = pd.DataFrame({"ensembl_id": gene_ids}, index=gene_ids)
    obs = pd.DataFrame(index=[f"cell{i:03d}" for i in range(n_cells)])
    ad.AnnData(X=sp.vstack(rows).tocsr().astype(np.int32), obs=obs, var=var).write_h5ad(path)
    return path


def test_embedding_rows_follow_the_input_order(bundle_a, tmp_path):
    from pretrain import load_pretrained
    from pretrain.embed import embed_h5ad

    model = load_pretrained(bundle_a)
    genes = model.vocab.ensembl_ids[-300:]
    source = _small_h5ad(tmp_path / "cells.h5ad", list(genes), 60, seed=3)
    cells = ad.read_h5ad(source)
    reverse = tmp_path / "reversed.h5ad"
    cells[::-1].copy().write_h5ad(reverse)
    report = embed_h5ad(model, source, tmp_path / "a.h5ad", progress=False, token_budget=64)
    embed_h5ad(model, reverse, tmp_path / "b.h5ad", progress=False, token_budget=256)
    a, b = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    assert list(a.obs_names) == list(cells.obs_names) and list(b.obs_names) == list(cells.obs_names[::-1])
    x, y = a.obsm["X_scfm"], b.obsm["X_scfm"]
    assert x.shape == (60, 32) and np.isfinite(x).all()
    assert np.abs(x - x[0]).max() > 1e-3  # cells differ
    # each row is its own cell's embedding, whatever the batches (budgets differ) and the order
    np.testing.assert_allclose(y[::-1], x, rtol=0, atol=1e-5)
    assert report["mapped_genes"] == 300 and report["n_cells"] == 60


def test_embedding_genes_outside_the_vocabulary_is_refused(bundle_a, tmp_path):
    from pretrain import load_pretrained
    from pretrain.embed import embed_h5ad

    made_up = [f"ENSG{80000000000 + i:011d}" for i in range(300)]  # not among the corpus's ENSG9... ids
    source = _small_h5ad(tmp_path / "cells.h5ad", made_up, 20, seed=4)
    with pytest.raises(ValueError, match="vocabulary"):
        embed_h5ad(load_pretrained(bundle_a), source, tmp_path / "out.h5ad", progress=False)
    assert not (tmp_path / "out.h5ad").exists()


# --- SIGTERM ---------------------------------------------------------------------------------------

MANY_STEPS = ["schedule.max_steps=100000", "run.checkpoint_every=0"]


def _signalled_run(corpus: Path, folder: Path, target) -> dict:
    """Start a long 2-rank job, wait for 2 logged steps, send SIGTERM to ``target(proc)``'s pids."""
    run = folder / "run"
    log = folder / "job.log"
    proc = start_pretrain(overrides(corpus, run, *MANY_STEPS), 2, log)
    try:
        wait_for(lambda: steps_logged(run) >= 2, proc, log, what="2 logged steps")
        for pid in target(proc):
            os.kill(pid, signal.SIGTERM)
        started = time.monotonic()
        rc = proc.wait(timeout=90)
        seconds = time.monotonic() - started
    finally:
        kill_group(proc)
    return {"run": run, "rc": rc, "seconds": seconds, "log": log.read_text()}


@pytest.fixture(scope="module")
def sigterm_torchrun(corpus, tmp_path_factory) -> dict:
    """SIGTERM to the torchrun agent, which forwards it to both workers."""
    return _signalled_run(corpus, tmp_path_factory.mktemp("term"), lambda proc: [proc.pid])


@pytest.fixture(scope="module")
def sigterm_rank1(corpus, tmp_path_factory) -> dict:
    """SIGTERM to rank 1's worker only: rank 0 learns of it through the step's vote."""
    return _signalled_run(corpus, tmp_path_factory.mktemp("term1"), lambda proc: [worker_pids(proc)[1]])


def _assert_stopped_cleanly(job: dict) -> int:
    run = job["run"]
    assert "[rank0]: Traceback" not in job["log"] and "[rank1]: Traceback" not in job["log"], job["log"][-5000:]
    done = summary(run)
    stopped = done["steps"]
    assert 2 <= stopped < 100000
    assert complete_steps(run) == [stopped], "one checkpoint, written at the step the job stopped"
    assert [h["step"] for h in metrics(run)] == list(range(1, stopped + 1))
    return stopped


def test_sigterm_to_torchrun_checkpoints_and_stops(sigterm_torchrun):
    job = sigterm_torchrun
    assert job["seconds"] < 60
    _assert_stopped_cleanly(job)
    assert summary(job["run"])["stopped_by_signal"] is True
    # torchrun (2.x) itself exits 1 after forwarding a signal: its agent re-raises SignalException
    # whatever the workers did; their own exit code is checked in the next test
    assert job["rc"] in (0, 1), job["log"][-5000:]


def test_sigterm_to_one_rank_stops_every_rank_with_exit_code_0(sigterm_rank1):
    job = sigterm_rank1
    assert job["rc"] == 0, job["log"][-5000:]  # torchrun: both workers exited 0
    assert job["seconds"] < 60
    _assert_stopped_cleanly(job)


def test_summary_says_stopped_by_signal_when_another_rank_got_it(sigterm_rank1):
    assert summary(sigterm_rank1["run"])["stopped_by_signal"] is True


def test_resume_after_sigterm_continues_from_the_stop(corpus, sigterm_torchrun):
    run = sigterm_torchrun["run"]
    before = metrics(run)
    stopped = len(before)
    proc = run_pretrain(overrides(corpus, run, f"schedule.max_steps={stopped + 2}", "run.checkpoint_every=0"),
                        ranks=2, resume="auto", check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    after = metrics(run)
    assert [h["step"] for h in after] == list(range(1, stopped + 3))
    assert after[:stopped] == before
    assert summary(run)["steps"] == stopped + 2 and not summary(run)["stopped_by_signal"]
    assert complete_steps(run)[-1] == stopped + 2

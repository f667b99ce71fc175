"""A training job that cannot start: wrong settings fail before the run folder exists, with an error
that names the fix; a failure once the run has begun ends its MLflow run FAILED (not FINISHED with
no metrics) and leaves no half-made run folder for a later `--resume auto` to trip over. Also: the
once-said warning that a label loss has nothing to train on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pretrain.config import load_config
from tests.train_helpers import TINY, TINY_CONFIG, make_corpus, run_pretrain


def unlabeled_corpus(folder: Path) -> Path:
    """A small synthetic corpus converted without label columns."""
    from data_pipeline.conversion.convert import convert
    from data_pipeline.conversion.plan import ConvertOptions
    from data_pipeline.synthetic import write_synthetic_h5ad

    source = folder / "cells.h5ad"
    write_synthetic_h5ad(source, 96, 300, n_cell_types=4, seed=0)
    corpus = folder / "corpus"
    convert(corpus, ConvertOptions([str(source)]), progress=False)
    return corpus


def _mlflow_runs(run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, order_by=["attributes.start_time ASC"])


def test_unknown_choices_are_refused_when_loading():
    with pytest.raises(ValueError, match=r"model\.attention='nope': choose one of favor, flash, sdpa, varlen"):
        load_config(str(TINY_CONFIG), ["model.attention=nope"])
    with pytest.raises(ValueError, match=r"model\.decoder\.attention='fast': choose one of"):
        load_config(str(TINY_CONFIG), ["model.decoder.attention=fast"])


@pytest.mark.slow
def test_a_missing_corpus_fails_before_the_run_folder_exists(tmp_path):
    run = tmp_path / "run"
    proc = run_pretrain([*TINY, f"data.corpus={tmp_path / 'nowhere'}", f"run.out={run}", "run.mlflow=true",
                         "schedule.max_steps=1"], check=False)
    assert proc.returncode != 0
    assert "data.corpus=" in proc.stderr and "data_pipeline convert" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # the config's mistake: one line naming the fix
    assert not run.exists()


@pytest.mark.slow
def test_mlflow_on_without_mlflow_installed_fails_before_the_run_folder_exists(tmp_path):
    """As on the GPU image: mlflow is absent. run.mlflow=true is refused at setup (one line naming
    run.mlflow=false), not after the engine is built."""
    import subprocess
    import sys

    from tests.train_helpers import ROOT, _cwd, job_env

    corpus = make_corpus(tmp_path)
    run = tmp_path / "run"
    overrides = [*TINY, f"data.corpus={corpus}", f"run.out={run}", "run.mlflow=true", "schedule.max_steps=1"]
    code = ("import runpy, sys; sys.modules['mlflow'] = None; "
            f"sys.argv = ['pretrain.py', '--config', {str(TINY_CONFIG)!r}, *{overrides!r}]; "
            f"runpy.run_path({str(ROOT / 'launch' / 'pretrain.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], env=job_env(), cwd=_cwd(overrides), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 2 and "run.mlflow=false" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # mlflow's SQLAlchemy store
def test_a_start_that_fails_after_mlflow_began_ends_failed_and_leaves_no_half_run(tmp_path):
    good = unlabeled_corpus(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    shard = next((broken / "shards").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:100])  # every block cut short: the first batch cannot be read
    run = tmp_path / "run"
    args = [*TINY, f"run.out={run}", "run.mlflow=true", "schedule.max_steps=2", "run.log_every=1",
            "objectives.label_weight=0.5"]
    proc = run_pretrain([*args, f"data.corpus={broken}"], resume="auto", check=False)
    assert proc.returncode != 0 and "cut short" in proc.stderr, proc.stderr[-3000:]
    # the corpus has no label columns: said once, naming the key to set
    assert proc.stderr.count("objectives.label_weight=0.5 but the corpus") == 1, proc.stderr[-3000:]
    assert "set objectives.label_weight=0" in proc.stderr

    client, runs = _mlflow_runs(run)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.get_metric_history(runs[0].info.run_id, "loss") == []
    # only the MLflow store (which holds the FAILED run) is left: no config.yaml, run id or checkpoints
    assert {p.name for p in run.iterdir()} <= {"mlflow-artifacts", "mlflow.db"}

    # the same command with the corpus fixed starts afresh, in a new MLflow run
    proc = run_pretrain([*args, f"data.corpus={good}"], resume="auto")
    client, runs = _mlflow_runs(run)
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert (run / "mlflow_run_id").read_text().strip() == runs[1].info.run_id
    assert [m.step for m in client.get_metric_history(runs[1].info.run_id, "loss")] == [1, 2]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_a_failed_start_never_removes_an_existing_run(tmp_path):
    """A resume that fails before it reopens the MLflow run (here: another corpus, whose model lacks
    the checkpoint's label head: the resume's config check refuses it) leaves the folder, its
    checkpoint and its FINISHED MLflow run as they were."""
    corpus = make_corpus(tmp_path, n_cells=96, n_genes=300)
    run = tmp_path / "run"
    args = [*TINY, f"run.out={run}", "run.mlflow=true", "run.log_every=1", "run.checkpoint_every=0"]
    run_pretrain([*args, f"data.corpus={corpus}", "schedule.max_steps=1"])
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    other = unlabeled_corpus(tmp_path / "other")
    proc = run_pretrain([*args, f"data.corpus={other}", "schedule.max_steps=2", "objectives.label_weight=0"],
                         resume="auto", check=False)
    assert proc.returncode != 0 and "cannot change" in proc.stderr, proc.stderr[-3000:]
    assert "data.corpus: trained on the corpus with plan hash" in proc.stderr and "model.label_classes" in proc.stderr
    assert set(before) <= {p.relative_to(run) for p in run.rglob("*")}
    client, runs = _mlflow_runs(run)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1]


def test_the_label_warning_needs_a_label_weight_and_an_unlabeled_corpus(tmp_path, caplog):
    import torch

    from pretrain.train import build_loader, resolve_model_config, warn_unused_objectives

    corpora = {"labeled": make_corpus(tmp_path / "a", n_cells=64, n_genes=200),
               "unlabeled": unlabeled_corpus(tmp_path / "b")}
    said = {}
    for name, corpus in corpora.items():
        for weight in (0.0, 0.5):
            config = load_config(str(TINY_CONFIG), [*TINY, f"data.corpus={corpus}",
                                                    f"objectives.label_weight={weight}"])
            loader = build_loader(config, torch.device("cpu"))
            caplog.clear()
            warn_unused_objectives(resolve_model_config(config, loader.corpus), loader.corpus)
            said[name, weight] = [r.getMessage() for r in caplog.records]
    assert said.pop(("unlabeled", 0.5)) == [
        f"objectives.label_weight=0.5 but the corpus {corpora['unlabeled']} has no label columns, so the label "
        "loss is 0 and trains nothing: set objectives.label_weight=0 (or convert the corpus with --label-columns "
        "COLUMN)"]
    assert all(messages == [] for messages in said.values()), said


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_run_folder_is_refused_and_changes_nothing(tmp_path):
    """Two trainers in one run folder (a job submitted twice, a rerun while the first still runs)
    overwrite each other's checkpoints and metrics: the second is refused at once, naming the first."""
    from data_pipeline.conversion.fsio import OutputLock

    corpus = make_corpus(tmp_path, n_cells=96, n_genes=300)
    run = tmp_path / "run"
    args = [*TINY, f"data.corpus={corpus}", f"run.out={run}", "run.log_every=1", "schedule.max_steps=1"]
    run_pretrain(args)
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}
    with OutputLock(run, command="deepspeed launch/pretrain.py (the first job)"):
        proc = run_pretrain([*args, "schedule.max_steps=2"], resume="auto", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {run} is in use by another command (host " in proc.stderr
    assert "(the first job)). Wait for it to finish, or stop it" in proc.stderr, proc.stderr[-3000:]
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")} == before
    run_pretrain([*args, "schedule.max_steps=2"], resume="auto")  # the folder is free again
    assert not (run / ".lock").exists()

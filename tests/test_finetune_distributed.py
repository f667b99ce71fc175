"""Fine-tuning under a launcher (issue 23, point 1): 2-rank CPU jobs (torchrun, gloo, DeepSpeed
ZeRO-2, fp32) of `launch/finetune.py` against the single-process run, and their resume.

The bundle is test_finetune's tiny random one with dropout 0 in the encoder, so that the only
random draws are the shuffle (the same on every rank) and the head's dropout; a run with head
dropout 0 is then the same computation on 1 or 2 ranks up to float summation order. 120 training
cells in batches of 17 leave a last batch of one cell: rank 1 has no share of it and still joins
the gradient all-reduce. Each job takes ~15-25 s on 2 CPU cores, most of it imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.conversion.vocab import Vocabulary
from data_pipeline.loading.normalize import Normalization
from pretrain.config import FinetuneConfig, ModelConfig
from pretrain.downstream.finetune import HEAD_FILE, finetune
from pretrain.export import write_bundle
from pretrain.model import CellModel

from .test_finetune import GENES, SYMBOLS, cells
from .train_helpers import JOB_TIMEOUT, ROOT, job_env

SETTINGS = {"label_column": "cell_type", "mode": "full", "epochs": 2, "batch_size": 17, "hidden": [16], "lr": 1e-2,
            "encoder_lr_scale": 0.1, "val_fraction": 0.2, "dropout": 0.0}


def flags(**settings) -> list[str]:
    out = []
    for key, value in {**SETTINGS, **settings}.items():
        flag = "--" + key.replace("_", "-")
        out += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    vocab = Vocabulary.from_genes(GENES, SYMBOLS)
    config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention="sdpa", n_bins=7,
                         dropout=0.0, pooling="mean")
    return write_bundle(tmp_path_factory.mktemp("pretrained") / "bundle", CellModel.initial(config, seed=0).state_dict(),
                        config, vocab.to_tsv(), Normalization(mode="log1p_bins", n_bins=7), "# test bundle\n")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cells") / "train.h5ad"
    cells(150, seed=1).write_h5ad(path)
    return path


def start(bundle: Path, labelled: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A 2-rank job (as the pretraining tests launch theirs: torchrun, --standalone)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch" / "finetune.py"), str(bundle), str(labelled), "--out", str(out), "--threads", "1",
           "--deepspeed.zero_stage", "2", "--no-deepspeed.bf16", *extra]
    return subprocess.Popen(cmd, env=job_env(), cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def two_ranks(bundle: Path, labelled: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return finished(start(bundle, labelled, out, *extra))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{k}": v for name in ("model.safetensors", HEAD_FILE)
            for k, v in load_file(str(run / "bundle" / name)).items()}


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_two_ranks_train_as_one_process_with_the_same_global_batch(bundle, labelled, tmp_path):
    plain = finetune(bundle, [labelled], tmp_path / "plain", FinetuneConfig(**SETTINGS))
    proc = two_ranks(bundle, labelled, tmp_path / "ranks", *flags())
    summaries = proc.stdout.count("\n{\n") + proc.stdout.startswith("{\n")
    assert summaries == 1, proc.stdout  # rank 0 alone prints the summary (DeepSpeed prints its notes to stdout too)
    assert json.loads(proc.stdout[proc.stdout.rindex("{\n"):])["epochs_run"] == 2
    ranks = report(tmp_path / "ranks")
    # pretraining's checkpoints (DeepSpeed's files, the COMPLETE marker), one per epoch, named by optimizer step
    steps = sorted(p.name for p in (tmp_path / "ranks" / "checkpoints").glob("step-*"))
    assert steps == ["step-00000008", "step-00000016"]
    assert all((tmp_path / "ranks" / "checkpoints" / s / "COMPLETE").exists() for s in steps)
    assert not (tmp_path / "ranks" / "checkpoint.pt").exists()
    for a, b in zip(plain["history"], ranks["history"], strict=True):
        assert a["val_macro_f1"] == b["val_macro_f1"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert {k: ranks[k] for k in ("macro_f1", "accuracy", "confusion", "best_epoch", "n_train", "n_val")} == \
           {k: plain[k] for k in ("macro_f1", "accuracy", "confusion", "best_epoch", "n_train", "n_val")}
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ranks")
    pretrained = load_file(str(bundle / "model.safetensors"))
    assert any(not torch.equal(b[f"model.safetensors:{k}"], v) for k, v in pretrained.items())  # the encoder trained
    # the encoder's lower learning rate survived DeepSpeed's optimizer: at one rate the encoder would differ far more
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def test_a_resumed_two_rank_run_equals_an_uninterrupted_one(bundle, labelled, tmp_path):
    settings = {"dropout": 0.3, "epochs": 3, "patience": 0}  # head dropout: each rank's random state is restored
    # the two first jobs side by side: their start-up (imports) is most of their time
    jobs = [start(bundle, labelled, tmp_path / "whole", *flags(**settings)),
            start(bundle, labelled, tmp_path / "resumed", *flags(**{**settings, "epochs": 1}))]  # stopped after epoch 1
    for job in jobs:
        finished(job)
    proc = two_ranks(bundle, labelled, tmp_path / "resumed", *flags(**settings))
    assert "resumed" in proc.stderr and "after epoch 1" in proc.stderr
    whole, resumed = report(tmp_path / "whole"), report(tmp_path / "resumed")
    assert resumed["epochs_run"] == 3 and resumed == whole
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

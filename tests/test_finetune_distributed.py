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
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.conversion.vocab import Vocabulary
from data_pipeline.loading.normalize import Normalization
from pretrain.config import DeepSpeedConfig, FinetuneConfig, ModelConfig
from pretrain.downstream.finetune import CHECKPOINT_FILE, HEAD_FILE, finetune
from pretrain.export import write_bundle
from pretrain.model import CellModel

from .test_finetune import GENES, SYMBOLS, cells
from .train_helpers import JOB_TIMEOUT, ROOT, job_env, kill_job, wait_for

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


def start(bundle: Path, labelled: Path, out: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    """A 2-rank job (as the pretraining tests launch theirs: torchrun, --standalone) in its own
    process group; its output piped, or written to ``log``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch" / "finetune.py"), str(bundle), str(labelled), "--out", str(out), "--threads", "1",
           "--deepspeed.zero_stage", "2", "--no-deepspeed.bf16", *extra]
    if log is not None:
        with open(log, "w") as fh:
            return subprocess.Popen(cmd, env=job_env(), cwd=out.parent, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    return subprocess.Popen(cmd, env=job_env(), cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


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
    # full mode (the encoder in the engine, at its lower learning rate) and head mode (the embeddings
    # shared over the ranks and gathered), side by side: their start-up (imports) is most of their time
    jobs = {mode: start(bundle, labelled, tmp_path / f"ranks-{mode}", *flags(mode=mode)) for mode in ("full", "head")}
    plain = {mode: finetune(bundle, [labelled], tmp_path / f"plain-{mode}", FinetuneConfig(**{**SETTINGS, "mode": mode}))
             for mode in ("full", "head")}
    procs = {mode: finished(job) for mode, job in jobs.items()}
    for mode, proc in procs.items():
        summaries = proc.stdout.count("\n{\n") + proc.stdout.startswith("{\n")
        assert summaries == 1, proc.stdout  # rank 0 alone prints the summary (DeepSpeed prints notes to stdout too)
        assert json.loads(proc.stdout[proc.stdout.rindex("{\n"):])["epochs_run"] == 2
        run = tmp_path / f"ranks-{mode}"
        # pretraining's checkpoints (DeepSpeed's files, the COMPLETE marker), one per epoch, named by optimizer step
        steps = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
        assert steps == ["step-00000008", "step-00000016"]
        assert all((run / "checkpoints" / s / "COMPLETE").exists() for s in steps)
        assert not (run / CHECKPOINT_FILE).exists()
        ranks = report(run)
        for a, b in zip(plain[mode]["history"], ranks["history"], strict=True):
            assert a["val_macro_f1"] == b["val_macro_f1"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        keys = ("macro_f1", "accuracy", "confusion", "best_epoch", "n_train", "n_val")
        assert {k: ranks[k] for k in keys} == {k: plain[mode][k] for k in keys}
        a, b = weights(tmp_path / f"plain-{mode}"), weights(run)
        assert set(a) == set(b)
        for k in a:
            if k.endswith(".attn.qkv.bias"):
                # (exact attention, this bundle's sdpa; FAVOR+'s features would not drop it exactly)
                # the key bias shifts every score of a query alike, so the softmax drops it: its gradient
                # is rounding noise, whose sign AdamW turns into a full-size step that any other
                # summation order (two ranks) draws differently; queries' and values' biases are compared
                d = a[k].shape[0] // 3
                a[k], b[k] = torch.cat([a[k][:d], a[k][2 * d:]]), torch.cat([b[k][:d], b[k][2 * d:]])
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (mode, k)
    # the encoder trained at its own (lower) rate: DeepSpeed's optimizer kept the parameter groups
    pretrained = load_file(str(bundle / "model.safetensors"))
    tuned = weights(tmp_path / "ranks-full")
    assert any(not torch.equal(tuned[f"model.safetensors:{k}"], v) for k, v in pretrained.items())


def test_a_killed_and_resumed_two_rank_run_equals_an_uninterrupted_one(bundle, labelled, tmp_path):
    settings = flags(dropout=0.3, epochs=6, patience=0)  # head dropout: each rank's random state is restored
    whole = start(bundle, labelled, tmp_path / "whole", *settings)
    log = tmp_path / "killed.log"
    killed = start(bundle, labelled, tmp_path / "resumed", *settings, log=log)
    first = tmp_path / "resumed" / "checkpoints" / "step-00000008" / "COMPLETE"  # epoch 1's checkpoint
    wait_for(first.exists, killed, log, what="the first epoch's checkpoint")
    kill_job(killed)  # every rank and torchrun, SIGKILL, as a node failure would
    finished(whole)
    assert not (tmp_path / "resumed" / "report.json").exists()  # it was killed before the end
    proc = two_ranks(bundle, labelled, tmp_path / "resumed", *settings)  # the same command again resumes
    assert "resumed" in proc.stderr and "after epoch" in proc.stderr
    whole, resumed = report(tmp_path / "whole"), report(tmp_path / "resumed")
    assert resumed["epochs_run"] == 6 and resumed == whole
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setting, fix", [({"zero_stage": 3}, "--deepspeed.zero_stage 2"),
                                          ({"chunks_per_step": 2}, "--batch-size"),
                                          ({"bf16": True}, "deepspeed launch/finetune.py")])
def test_deepspeed_settings_that_cannot_work_are_refused_naming_the_fix(bundle, labelled, tmp_path, setting, fix):
    settings = FinetuneConfig(**{**SETTINGS, "epochs": 1, "deepspeed": DeepSpeedConfig(gradient_clipping=0.0, **setting)})
    with pytest.raises(ValueError, match=re.escape(fix)):
        finetune(bundle, [labelled], tmp_path, settings)  # bf16: no launcher here, so no engine


def test_a_launched_run_folder_is_not_resumed_in_one_process(bundle, labelled, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="under a launcher"):
        finetune(bundle, [labelled], tmp_path, FinetuneConfig(**{**SETTINGS, "epochs": 1}))


def test_gradient_clipping_reaches_the_single_process_step(bundle, labelled, tmp_path):
    clipped = {**SETTINGS, "epochs": 1, "deepspeed": DeepSpeedConfig(gradient_clipping=1e-3)}
    finetune(bundle, [labelled], tmp_path / "clipped", FinetuneConfig(**clipped))
    finetune(bundle, [labelled], tmp_path / "free", FinetuneConfig(**{**SETTINGS, "epochs": 1}))
    a, b = weights(tmp_path / "clipped"), weights(tmp_path / "free")
    assert any(not torch.allclose(a[k], b[k]) for k in a)

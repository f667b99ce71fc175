"""Checkpoints a user cannot trust blindly (issue 20, point 4): a planted pickle in a checkpoint is
refused by export; a checkpoint damaged after it was marked complete is found by its checksums
(`--resume auto` falls back to the newest intact one, an explicit one is refused naming the file);
a resume with a changed config refuses what breaks the run and says what it applies.

One tiny 1-process run with a checkpoint at every step (1, 2, 3) is shared; each test works on a
copy of it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint
from pretrain.config import load_config, resume_changes
from tests.train_helpers import TINY, TINY_CONFIG, complete_steps, make_corpus, metrics, run_pretrain, summary

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_cells=96, n_genes=300)


def _args(corpus: Path, run: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.corpus={corpus}", f"run.out={run}", "run.checkpoint_every=1", "run.log_every=1", *extra]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    run_pretrain(_args(corpus, run, "schedule.max_steps=3"))
    assert complete_steps(run) == [1, 2, 3]
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / checkpoint.tag_of(step)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# --- 4a: export unpickles weights-only ---------------------------------------------------------------

class _Planted:
    """Unpickling it runs ``open(target, "w").write(...)``: what a hostile checkpoint would do."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


@pytest.mark.slow
def test_export_refuses_a_checkpoint_with_a_planted_reduce_and_runs_none_of_it(run, tmp_path):
    from pretrain.export import export_bundle

    ckpt = _ckpt(run, 3)
    target = tmp_path / "planted-code-ran"
    states = torch.load(ckpt / MODEL_STATES, weights_only=False)  # our own file: trusted
    states["extra"] = _Planted(target)
    torch.save(states, ckpt / MODEL_STATES)
    # the attacker records the new file's checksum too, so that the unpickler alone has to refuse it
    marker = checkpoint.read_marker(ckpt)
    marker["files"] = checkpoint.file_digests(ckpt)
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="refused to unpickle") as err:
        export_bundle(ckpt, tmp_path / "bundle")
    assert MODEL_STATES in str(err.value) and "exec" in str(err.value)
    assert not target.exists(), "the planted code ran during export"
    assert not (tmp_path / "bundle").exists()
    # the same checkpoint, untouched, exports (weights-only loading allows what DeepSpeed writes)
    assert (export_bundle(_ckpt(run, 2), tmp_path / "bundle2") / "model.safetensors").exists()


# --- 4b: checksums in the marker ---------------------------------------------------------------------

@pytest.mark.slow
def test_the_marker_records_every_file_and_problems_name_the_damaged_one(run):
    ckpt = _ckpt(run, 3)
    marker = checkpoint.read_marker(ckpt)
    assert marker["step"] == 3 and set(marker["files"]) == {MODEL_STATES, OPTIM_STATES}
    assert marker["corpus"]["plan_hash"] and marker["config"]["optimizer"]["lr"] == pytest.approx(2e-3)
    assert checkpoint.problems(ckpt) == []
    _truncate(ckpt / OPTIM_STATES)
    [problem] = checkpoint.problems(ckpt)
    assert OPTIM_STATES in problem and "truncated" in problem
    (ckpt / MODEL_STATES).unlink()
    assert any(MODEL_STATES in p and "missing" in p for p in checkpoint.problems(ckpt))
    data = bytearray((_ckpt(run, 2) / MODEL_STATES).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other contents
    (_ckpt(run, 2) / MODEL_STATES).write_bytes(bytes(data))
    [problem] = checkpoint.problems(_ckpt(run, 2))
    assert MODEL_STATES in problem and "checksum" in problem


def test_resume_auto_refuses_when_every_complete_checkpoint_is_damaged(tmp_path):
    """Not a silent start from step 0 (a requeued job would discard the run): refused, naming why."""
    for step in (2, 4):
        ckpt = tmp_path / "run" / "checkpoints" / checkpoint.tag_of(step)
        ckpt.mkdir(parents=True)
        (ckpt / MODEL_STATES).write_bytes(b"weights")
        (ckpt / checkpoint.MARKER).write_text(json.dumps({"step": step, "files": checkpoint.file_digests(ckpt)}))
        (ckpt / MODEL_STATES).write_bytes(b"other!!")  # same size, other contents
    with pytest.raises(checkpoint.ResumeError, match="every complete checkpoint .* is damaged"):
        checkpoint.resume_point(tmp_path / "run", "auto")
    assert checkpoint.resume_point(tmp_path / "other", "auto") is None  # no checkpoint at all: a fresh start


def test_a_marker_from_before_checksums_is_accepted_and_said_once(tmp_path, caplog):
    ckpt = tmp_path / "run" / "checkpoints" / checkpoint.tag_of(5)
    ckpt.mkdir(parents=True)
    (ckpt / MODEL_STATES).write_bytes(b"x")
    (ckpt / checkpoint.MARKER).write_text(json.dumps({"step": 5}))
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resume_point(tmp_path / "run", "auto") == ckpt
    assert [r.getMessage().count("no checksums") for r in caplog.records] == [1]


@pytest.mark.slow
def test_resume_auto_falls_back_to_the_newest_intact_checkpoint_and_keeps_it(run, corpus):
    """Steps 2 and 3 damaged: the job resumes from step 1, says which it skipped and why, and its
    own checkpoint (step 2, with keep_checkpoints=1) is not pruned in favour of the damaged step 3."""
    _truncate(_ckpt(run, 3) / MODEL_STATES)
    (_ckpt(run, 2) / OPTIM_STATES).unlink()
    proc = run_pretrain(_args(corpus, run, "schedule.max_steps=2", "run.keep_checkpoints=1", "run.log_every=2"),
                        resume="auto")
    assert "skipping the damaged checkpoint" in proc.stderr
    assert f"{_ckpt(run, 3) / MODEL_STATES} has" in proc.stderr and f"{_ckpt(run, 2) / OPTIM_STATES} is missing" in proc.stderr
    assert f"resumed from {_ckpt(run, 1)} (step 1)" in proc.stderr
    done = summary(run)
    assert done["resumed_from_step"] == 1 and done["resumed_from"] == str(_ckpt(run, 1)) and done["steps"] == 2
    assert complete_steps(run) == [2]  # step 1 pruned (keep 1)
    # steps 2 and 3 (damaged, of the branch this resume left) moved aside, not deleted: --resume auto never
    # takes them, and the new step 2 is saved in a folder of its own
    assert sorted(p.name[:13] for p in (run / "checkpoints" / "set-aside").iterdir()) == ["step-00000002",
                                                                                          "step-00000003"]
    assert checkpoint.problems(_ckpt(run, 2)) == []
    assert [h["step"] for h in metrics(run)] == [1, 2]
    # a changed free key is applied and said
    assert "run.log_every: 1 in the checkpoint, 2 now" in proc.stderr


@pytest.mark.slow
def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(run, corpus):
    _truncate(_ckpt(run, 3) / OPTIM_STATES)
    before = (run / "config.yaml").read_text()
    proc = run_pretrain(_args(corpus, run, "schedule.max_steps=4"), resume=str(_ckpt(run, 3)), check=False)
    assert proc.returncode != 0
    assert f"--resume {_ckpt(run, 3)}: the checkpoint is damaged: {_ckpt(run, 3) / OPTIM_STATES} has" in proc.stderr
    assert "PytorchStreamReader" not in proc.stderr
    assert (run / "config.yaml").read_text() == before and complete_steps(run) == [1, 2, 3]


# --- 4c: resuming with a changed config ---------------------------------------------------------------

def test_resume_changes_refuses_what_breaks_the_run_and_applies_the_rest():
    saved = json.loads(json.dumps(asdict(load_config(str(TINY_CONFIG), ["model.vocab_size=300"]))))
    now = load_config(str(TINY_CONFIG), ["model.vocab_size=300", "optimizer.lr=0.5", "model.d_model=32",
                                         "data.normalization=quantile_bins", "schedule.max_steps=400",
                                         "run.checkpoint_every=7", "model.decoder.n_layers=3"])
    refused, applied = resume_changes(saved, now)
    assert [line.split(":")[0] for line in refused] == ["data.normalization", "model.d_model",
                                                        "model.decoder.n_layers", "optimizer.lr"]
    assert "optimizer state holds its own value" in refused[-1] and "trained with it" in refused[0]
    assert [line.split(":")[0] for line in applied] == ["schedule.max_steps", "run.checkpoint_every"]
    del saved["optimizer"]["lr"]  # a checkpoint from before a key existed: that key is not compared
    assert [line.split(":")[0] for line in resume_changes(saved, now)[0]] == ["data.normalization", "model.d_model",
                                                                              "model.decoder.n_layers"]


@pytest.mark.slow
def test_a_resume_that_changes_the_optimizer_or_the_normalization_is_refused_naming_each_key(run, corpus):
    before = (run / "config.yaml").read_text()
    proc = run_pretrain(_args(corpus, run, "schedule.max_steps=4", "optimizer.lr=0.5",
                              "data.normalization=quantile_bins"), resume="auto", check=False)
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]  # an error line, not a crash
    assert "error: --resume" in err and "the config changes keys a resumed run cannot change" in err, err[-3000:]
    assert "data.normalization: 'log1p_bins' in the checkpoint, 'quantile_bins' now" in err
    assert "optimizer.lr: 0.002 in the checkpoint, 0.5 now" in err
    assert (run / "config.yaml").read_text() == before and complete_steps(run) == [1, 2, 3]
    assert summary(run)["steps"] == 3


# --- branches, schedules and signals ----------------------------------------------------------------

def _marked(run: Path, *steps: int) -> None:
    for step in steps:
        ckpt = _ckpt(run, step)
        ckpt.mkdir(parents=True)
        (ckpt / MODEL_STATES).write_bytes(b"x")
        (ckpt / checkpoint.MARKER).write_text(json.dumps({"step": step}))


def test_a_fresh_start_in_a_folder_holding_checkpoints_is_refused(tmp_path):
    """Training anew where an earlier run saved checkpoints mixed the two runs' steps, and a later
    --resume auto took the earlier run's newest."""
    _marked(tmp_path / "run", 2, 4)
    with pytest.raises(checkpoint.ResumeError, match=r"holds checkpoints of an earlier run \(the newest "
                                                     r"step-00000004\): continue it with --resume auto"):
        checkpoint.resume_point(tmp_path / "run", None)
    assert checkpoint.resume_point(tmp_path / "empty", None) is None


def test_resuming_an_earlier_checkpoint_sets_the_later_branch_aside(tmp_path):
    """Resumed at step 2 (on purpose, say after a divergence) of a run that saved 2, 4 and 6: 4 and 6 are
    moved into set-aside/, so that --resume auto after a preemption continues the new branch."""
    run = tmp_path / "run"
    _marked(run, 2, 4, 6)
    moved = checkpoint.set_aside_later(run, 2)
    assert complete_steps(run) == [2] and [p.name[:13] for p in moved] == ["step-00000004", "step-00000006"]
    assert all((p / MODEL_STATES).read_bytes() == b"x" for p in moved)  # moved, not deleted
    assert checkpoint.resume_point(run, "auto") == _ckpt(run, 2)


@pytest.mark.slow
def test_a_resume_with_more_steps_trains_its_first_step_at_the_new_schedules_rate(corpus, tmp_path):
    """schedule.max_steps may change on resume: every resumed step trains at the new schedule's rate,
    the first one too (the restored optimizer held the old schedule's rate for it: its floor, past
    the old end)."""
    from pretrain.train import lr_factor

    run = tmp_path / "run"
    run_pretrain(_args(corpus, run, "schedule.max_steps=2", "schedule.warmup_steps=1"))
    longer = _args(corpus, run, "schedule.max_steps=6", "schedule.warmup_steps=1")
    run_pretrain(longer, resume="auto")
    config = load_config(str(TINY_CONFIG), longer)
    lrs = {m["step"]: m["lr"] for m in metrics(run)}
    for step in range(3, 7):  # metrics' steps are 1-based; lr_factor's 0-based
        assert lrs[step] == pytest.approx(config.optimizer.lr * lr_factor(config.schedule, step - 1), rel=1e-6), step


@pytest.mark.slow
def test_a_skipped_step_does_not_advance_the_schedule_across_a_resume(corpus, tmp_path):
    """DeepSpeed does not step the scheduler on a skipped update: a resumed run goes on from the
    schedule's own position, at the rates the uninterrupted run has."""
    nan = ("run.inject_nan_steps=[2]", "schedule.warmup_steps=4", "schedule.max_steps=6")
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_pretrain(_args(corpus, whole, *nan))
    run_pretrain(_args(corpus, split, *nan[:2], "schedule.max_steps=3"))  # the warm-up does not depend on max_steps
    run_pretrain(_args(corpus, split, *nan), resume="auto")
    expected = {m["step"]: m["lr"] for m in metrics(whole)}
    assert [m["skipped_steps"] for m in metrics(whole)][-1] == 1
    assert expected[3] == expected[2]  # the skipped step 2 left the warm-up where it was
    resumed = {m["step"]: m["lr"] for m in metrics(split) if m["step"] > 3}
    assert resumed == pytest.approx({s: expected[s] for s in (4, 5, 6)}, rel=1e-6)


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_are_given_back():
    import signal

    before = signal.getsignal(signal.SIGINT)
    stop = checkpoint.StopSignal()
    stop._handle(signal.SIGINT, None)
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGTERM, None)  # a repeated SIGTERM (a scheduler's reminder) still waits for the save
    stop.restore()
    assert signal.getsignal(signal.SIGINT) is before

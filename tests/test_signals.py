"""Signals as clusters send them: SIGTERM to every process of a training job (the trainer, its
DataLoader workers, under torchrun the agent and each rank's session), then `--resume auto`."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from tests.train_helpers import (
    LOSS_KEYS,
    TINY,
    complete_steps,
    kill_group,
    make_corpus,
    metrics,
    run_pretrain,
    same_number,
    signal_every_group,
    start_pretrain,
    steps_logged,
    summary,
    wait_for,
)

pytestmark = pytest.mark.slow

STEPS = 10
TORCH_ELASTIC_GRACE_S = 30  # torch elastic (and DeepSpeed's launcher) SIGKILL a rank this long after SIGTERM


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_cells=300, n_genes=400)


def _overrides(corpus: Path, run: Path, ranks: int) -> list[str]:
    # loader workers on: they are the processes a group-wide SIGTERM used to kill. About 4 steps an
    # epoch, so that the 10 steps cross epoch boundaries.
    return [*TINY, f"data.corpus={corpus}", f"run.out={run}", f"data.num_workers={3 - ranks}",
            "schedule.warmup_steps=3", f"schedule.max_steps={STEPS}", "run.checkpoint_every=0",
            "deepspeed.zero_stage=1", "deepspeed.bf16=false", "run.log_every=1"]


def _loader_state(run: Path, step: int) -> dict:
    """The loader position rank 0 saved in its checkpoint at ``step`` (what the next batch is)."""
    folder = run / "checkpoints" / f"step-{step:08d}"
    return torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["loader"]


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_to_every_process_checkpoints_and_resume_equals_the_uninterrupted_run(corpus, tmp_path, ranks):
    reference = tmp_path / "reference"
    run_pretrain(_overrides(corpus, reference, ranks), ranks=ranks)

    run = tmp_path / "run"
    log = tmp_path / "job.log"
    proc = start_pretrain(_overrides(corpus, run, ranks), ranks, log)
    try:
        wait_for(lambda: steps_logged(run) >= 2, proc, log, what="2 logged steps")
        groups = signal_every_group(proc, signal.SIGTERM)
        started = time.monotonic()
        rc = proc.wait(timeout=3 * TORCH_ELASTIC_GRACE_S)
        seconds = time.monotonic() - started
    finally:
        kill_group(proc)
    text = log.read_text()
    assert len(groups) == ranks + (ranks > 1), groups  # torchrun's group and each rank's
    assert "DataLoader worker" not in text, text[-5000:]  # "... is killed by signal: Terminated"
    # no rank failed (torchrun prefixes its ranks' lines; its own traceback, a SignalException, is how it exits)
    rank_tracebacks = ["Traceback"] if ranks == 1 else [f"[rank{r}]: Traceback" for r in range(ranks)]
    assert not any(t in text for t in rank_tracebacks), text[-5000:]
    if ranks == 1:
        assert rc == 0, text[-5000:]
    else:
        # torchrun's agent exits 1 after it forwarded a signal, whatever its ranks did; the ranks
        # stopped by themselves (checkpoint, summary) well before its SIGKILL grace ran out
        assert rc in (0, 1), text[-5000:]
        assert seconds < TORCH_ELASTIC_GRACE_S, text[-5000:]
    done = summary(run)
    stopped = done["steps"]
    assert done["stopped_by_signal"] is True and 2 <= stopped < STEPS, done
    assert complete_steps(run) == [stopped], "one checkpoint, at the step the job stopped"

    proc = run_pretrain(_overrides(corpus, run, ranks), ranks=ranks, resume="auto", check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    a, b = metrics(reference), metrics(run)
    assert [h["step"] for h in b] == [h["step"] for h in a] == list(range(1, STEPS + 1))
    for ha, hb in zip(a, b):
        for key in (*LOSS_KEYS, "lr", "grad_norm"):
            assert same_number(ha[key], hb[key]), (ha["step"], key, ha[key], hb[key])
    assert _loader_state(run, STEPS) == _loader_state(reference, STEPS)  # the same cells, to the last batch

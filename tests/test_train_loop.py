"""The training loop's components without a training run (fast, no DeepSpeed): the checkpoint
cadence and stop vote of `Checkpointer`, the reads of `StepLog` (the device only on log steps,
every step's values kept), the non-finite streak, the host counts of a step, and the model's
FAVOR+ redraw decision."""

from __future__ import annotations

import json
import math
import os
import signal
from copy import deepcopy
from dataclasses import replace

import pytest
import torch

from pretrain import checkpoint
from pretrain.checkpoint import Checkpointer
from pretrain.config import TrainConfig
from pretrain.metrics import NonFiniteStreak, RunLog, StepLog, skip_streak
from pretrain.model import CellModel
from pretrain.objectives import StepCounts, StepResult
from tests.model_helpers import random_batch, small_config


def config(**run) -> TrainConfig:
    c = TrainConfig()
    return replace(c, data=replace(c.data, views=True), schedule=replace(c.schedule, max_steps=10),
                   run=replace(c.run, progress=False, mlflow=False, **run))


class Loader:
    def state_dict(self) -> dict:
        return {"position": "here"}


@pytest.fixture
def handlers():
    """The SIGTERM / SIGINT handlers of the test process, restored after a `Checkpointer` set its own."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def saves(monkeypatch) -> list[dict]:
    """The client states `checkpoint.save` was asked to write (DeepSpeed's part left out)."""
    calls = []
    # a copy, as the file is written: the history list goes on growing
    monkeypatch.setattr(checkpoint, "save", lambda engine, run_dir, step, state, keep, record: calls.append(deepcopy(state)))
    return calls


def test_checkpoints_at_every_nth_step_at_a_stop_vote_and_once_at_the_end(tmp_path, saves, handlers):
    c = config(checkpoint_every=3, log_every=100)
    run_log = RunLog(tmp_path, "e", use_mlflow=False)
    run_log.start({}, [], resumed=False)
    log = StepLog(c, 1, torch.device("cpu"), None, run_log)
    saver = Checkpointer(None, Loader(), tmp_path, c.run, {})
    for step in range(1, 8):
        log.step(step, _result(float(step)), COUNTS, lr=0.1, grad_norm=None, applied=step != 2)
        saver.maybe_save(step, stop=False, log=log)
    saver.finish(7, log)
    saver.finish(7, log)
    assert [s["step"] for s in saves] == [3, 6, 7]
    # no log step yet at step 3: the save read the pending steps, so its history has every step
    assert [h["loss"] for h in saves[0]["history"]] == [1.0, 2.0, 3.0]
    assert saves[0]["loader"] == {"position": "here"} and saves[0]["skipped"] == 1

    saves.clear()
    saver = Checkpointer(None, Loader(), tmp_path, c.run, {})
    saver.maybe_save(1, stop=False, log=log)
    saver.maybe_save(2, stop=True, log=log)  # a stop vote saves whatever the cadence
    saver.finish(2, log)  # and the end does not save that step again
    assert [s["step"] for s in saves] == [2]


def test_a_signal_is_a_stop_vote_agreed_with_the_counts(tmp_path, handlers):
    saver = Checkpointer(None, Loader(), tmp_path, config().run, {})
    counts = StepCounts(masked=3, labels=2, cells=4, seqs=8, tokens=100, slots=120)
    assert saver.agree(counts) == (counts, False)
    os.kill(os.getpid(), signal.SIGTERM)
    assert saver.agree(counts) == (counts, True)


def _result(loss: float) -> StepResult:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return StepResult(loss=t(loss), mlm=t(loss / 2), label=t(loss / 4), contrastive=t(loss / 8), temperature=t(0.1),
                      mvc=t(loss / 16))


COUNTS = StepCounts(masked=10, labels=4, cells=4, seqs=8, tokens=120, slots=160, flops=3e9)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every read of a tensor's value on the host (``item``, ``tolist``, ``float()``, ``bool()``)."""
    calls = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_device_values_are_read_on_log_steps_only_and_every_step_is_kept(tmp_path, reads):
    c = config(log_every=4)
    run_log = RunLog(tmp_path, "e", use_mlflow=False)
    run_log.start({}, [], resumed=False)
    log = StepLog(c, 1, torch.device("cpu"), None, run_log)
    for step in range(1, 11):
        log.step(step, _result(float(step)), COUNTS, lr=0.1, grad_norm=torch.tensor(0.5), applied=True)
        if step == 3:
            assert reads == [] and run_log.history == []
        if step == 4:
            assert reads == ["tolist"] and [h["step"] for h in run_log.history] == [1, 2, 3, 4]
            # metrics.json: written at a log step; a write that took 1 s spaces the next by 20 s
            assert [h["step"] for h in json.loads((tmp_path / "metrics.json").read_text())] == [1, 2, 3, 4]
            run_log.flush_seconds = 1.0
    assert reads == ["tolist"] * 3  # steps 4, 8 and 10 (the last)
    assert len(json.loads((tmp_path / "metrics.json").read_text())) == 4
    run_log.flush()  # as at the end of the run
    assert len(json.loads((tmp_path / "metrics.json").read_text())) == 10
    history = run_log.history
    assert [h["loss"] for h in history] == [float(s) for s in range(1, 11)]
    assert [h["mlm"] for h in history] == [s / 2 for s in range(1, 11)]
    assert all(h["grad_norm"] == 0.5 and h["skipped_steps"] == 0 for h in history)
    # a window's steps share its rates and read time; the rates count cells, not sequences
    assert len({h["time"] for h in history}) == 3 and history[4]["cells_per_s"] == history[7]["cells_per_s"]
    for h in history:
        assert h["sequences_per_s"] == pytest.approx(2 * h["cells_per_s"])
        assert h["tokens_per_s"] == pytest.approx(30 * h["cells_per_s"])
        assert h["padding_waste"] == pytest.approx(0.25)
        assert h["tflops_per_device"] / h["cells_per_s"] == pytest.approx(COUNTS.flops / COUNTS.cells / 1e12)


def test_skipped_steps_in_a_row_stop_the_run_at_once_without_a_log_step(tmp_path):
    c = config(log_every=100, max_nan_steps=3)
    run_log = RunLog(tmp_path, "e", use_mlflow=False)
    run_log.start({}, [], resumed=False)
    log = StepLog(c, 1, torch.device("cpu"), None, run_log)
    log.step(1, _result(1.0), COUNTS, 0.1, None, applied=True)
    log.step(2, _result(math.nan), COUNTS, 0.1, None, applied=False)
    log.step(3, _result(math.nan), COUNTS, 0.1, None, applied=False)
    with pytest.raises(NonFiniteStreak, match=r"3 non-finite losses in a row \(step 4\)"):
        log.step(4, _result(math.nan), COUNTS, 0.1, None, applied=False)
    assert [h["skipped_steps"] for h in run_log.history] == [0, 1, 2, 3]
    assert run_log.history[0]["grad_norm"] is None


def test_a_non_finite_loss_of_an_applied_step_is_caught_at_the_next_read(tmp_path):
    c = config(log_every=5, max_nan_steps=2)
    log = StepLog(c, 1, torch.device("cpu"), None, None)  # a rank other than 0: no RunLog, the same decision
    for step in (1, 2, 3):
        log.step(step, _result(1.0 if step == 1 else math.nan), COUNTS, 0.1, None, applied=True)
    assert log.skipped == 0 and len(log.pending) == 3
    log.step(4, _result(1.0), COUNTS, 0.1, None, applied=True)
    with pytest.raises(NonFiniteStreak, match=r"2 non-finite losses in a row \(step 3\)"):
        log.step(5, _result(1.0), COUNTS, 0.1, None, applied=True)
    assert log.skipped == 2


def test_a_resumed_run_goes_on_counting_the_skipped_steps_in_a_row(tmp_path):
    """The streak a checkpoint's history ends with counts toward run.max_nan_steps after a resume, on
    every rank (each gets the history from the checkpoint): an interruption does not reset it."""
    assert skip_streak([]) == 0
    assert skip_streak([{"skipped_steps": s} for s in (0, 0, 1, 2)]) == 2
    assert skip_streak([{"skipped_steps": s} for s in (1, 2, 2)]) == 0
    assert skip_streak([{"skipped_steps": s} for s in (1, 2, 3)]) == 3
    c = config(log_every=100, max_nan_steps=3)
    first = RunLog(tmp_path / "first", "e", use_mlflow=False)
    first.start({}, [], resumed=False)
    log = StepLog(c, 1, torch.device("cpu"), None, first)
    log.step(1, _result(1.0), COUNTS, 0.1, None, applied=True)
    for step in (2, 3):
        log.step(step, _result(math.nan), COUNTS, 0.1, None, applied=False)
    log.read()  # as a checkpoint save does
    history, skipped = deepcopy(first.history), log.skipped
    for run_log in (RunLog(tmp_path / "again", "e", use_mlflow=False), None):  # rank 0, another rank
        if run_log is not None:
            run_log.start({}, history, resumed=True)
        log = StepLog(c, 1, torch.device("cpu"), None, run_log, 3, skipped, skip_streak(history))
        with pytest.raises(NonFiniteStreak, match=r"3 non-finite losses in a row \(step 4\)"):
            log.step(4, _result(math.nan), COUNTS, 0.1, None, applied=False)


def test_step_counts_come_from_the_cpu_batches():
    chunks = [random_batch([5, 5, 7, 7], seed=1, views_per_cell=2), random_batch([3, 3], seed=2, views_per_cell=2)]
    counts = StepCounts.of(chunks)
    assert (counts.cells, counts.seqs, counts.tokens) == (3, 6, 30)
    assert counts.masked == sum(int(c.mlm_mask.sum()) for c in chunks)
    assert counts.labels == sum(int((c.labels >= 0).sum()) for c in chunks)
    assert counts.slots == 4 * 7 + 2 * 3
    assert counts.flops == 0  # no cost model given
    seen = []
    costed = StepCounts.of(chunks, cost=lambda lengths, masked: seen.append((lengths, masked)) or 1.5)
    assert costed.flops == 3.0 and costed.as_list()[:6] == counts.as_list()[:6]
    assert [x.tolist() for x, _ in seen] == [[5, 5, 7, 7], [3, 3]]
    for (_, masked), chunk in zip(seen, chunks):
        assert masked.tolist() == [int(m.sum()) for m in chunk.mlm_mask.split(chunk.cu_seqlens.diff().tolist())]


def test_the_model_decides_its_favor_redraws():
    favor = CellModel(small_config(attention="favor", favor_redraw_interval=3))
    assert [s for s in range(9) if favor.redraws_after(s)] == [2, 5, 8]
    assert not any(CellModel(small_config(attention="favor", favor_redraw_interval=0)).redraws_after(s) for s in range(9))
    assert not any(CellModel(small_config(attention="sdpa", favor_redraw_interval=3)).redraws_after(s) for s in range(9))


def test_deepspeed_overrides_merge_key_by_key_and_the_guard_sees_the_result(monkeypatch):
    """An override of one ZeRO key keeps the stage; the fp32 stage-0 refusal and the bf16 answer
    come from the merged config (what DeepSpeed runs)."""
    import deepspeed

    from pretrain.config import DeepSpeedConfig, merge_nested
    from pretrain.distributed import deepspeed_engine

    assert merge_nested({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 5}, "e": {"f": 1}}) == {"a": {"b": 1, "c": 5}, "d": 3,
                                                                                     "e": {"f": 1}}
    seen = {}
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: seen.update(kw["config"]) or ("engine",))
    module, cpu = torch.nn.Linear(2, 2), torch.device("cpu")
    optimizer = torch.optim.AdamW(module.parameters())
    tuned = DeepSpeedConfig(zero_stage=2, bf16=False, overrides={"zero_optimization": {"overlap_comm": True}})
    assert deepspeed_engine(module, optimizer, tuned, cpu) == ("engine", False)
    assert seen["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    to_zero = DeepSpeedConfig(zero_stage=2, bf16=False, overrides={"zero_optimization": {"stage": 0}})
    with pytest.raises(ValueError, match="zero_stage=0 in fp32"):
        deepspeed_engine(module, optimizer, to_zero, cpu)
    half = DeepSpeedConfig(zero_stage=0, bf16=False, overrides={"bf16": {"enabled": True}})
    assert deepspeed_engine(module, optimizer, half, cpu) == ("engine", True)


def test_mfu_peak_of_each_h100_variant(monkeypatch):
    from pretrain.metrics import device_peak_tflops

    cuda = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                       ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        assert device_peak_tflops(cuda, None)[0] == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some GPU")
    assert device_peak_tflops(cuda, None)[0] is None and device_peak_tflops(cuda, 123.0)[0] == 123.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    peak, why = device_peak_tflops(cuda, None, bf16=False)  # an fp32 run against the bf16 peak would read low
    assert peak is None and "not bf16" in why and device_peak_tflops(cuda, 400.0, bf16=False)[0] == 400.0


def test_the_time_a_read_spends_logging_counts_in_the_next_window(tmp_path, monkeypatch):
    """Rates are over wall time, checkpoint saves alone left out: a slow log write (a remote MLflow,
    a long metrics.json) falls in the next window instead of in none, which overstated the rates."""
    import time

    run_log = RunLog(tmp_path, "e", use_mlflow=False)
    run_log.start({}, [], resumed=False)
    slow = run_log.record

    def record(metrics, log):
        slow(metrics, log)
        time.sleep(0.3)

    monkeypatch.setattr(run_log, "record", record)
    log = StepLog(config(log_every=1), 1, torch.device("cpu"), None, run_log)
    for step in (1, 2):
        log.step(step, _result(1.0), COUNTS, lr=0.1, grad_norm=None, applied=True)
    assert run_log.history[1]["cells_per_s"] <= COUNTS.cells / 0.3


@pytest.mark.parametrize("when", ["call", "write"])
def test_an_mlflow_failure_is_said_once_and_the_run_goes_on(tmp_path, caplog, when):
    """Steps are logged asynchronously (the store writes beside the training): a failure, of the
    call itself or of its write in the background, is found by the next log step or the end."""
    class Failed:
        def wait(self):
            raise ConnectionError("tracking server unreachable")

    class Failing:
        calls = 0

        def log_metrics(self, metrics, step, synchronous):
            assert synchronous is False
            Failing.calls += 1
            if when == "call":
                raise ConnectionError("tracking server unreachable")
            return Failed()

    run_log = RunLog(tmp_path, "e", use_mlflow=False)
    run_log.start({}, [], resumed=False)
    run_log.mlflow = Failing()
    with caplog.at_level("WARNING", logger="pretrain.metrics"):
        for step in (1, 2, 3):
            run_log.record({"step": step, "loss": 1.0, "time": 0.0}, log=True)
        run_log.settle_mlflow()
    run_log.flush()
    assert Failing.calls == 1  # a failed write is found when the next step logs, before that step's call
    assert caplog.text.count("MLflow logging failed at step 1") == 1 and "failed at step 2" not in caplog.text
    assert [h["step"] for h in json.loads((tmp_path / "metrics.json").read_text())] == [1, 2, 3]


def test_chunks_are_joined_only_for_a_contrastive_loss_without_the_cache():
    """Without the gradient cache the contrastive negatives must meet in one graph; masked modelling
    alone needs no such graph, so its chunks stay micro-steps (memory of one chunk, not of all)."""
    from pretrain.config import ObjectiveConfig

    for cache, contrastive, joined in ((True, 0.5, False), (True, 0.0, False), (False, 0.5, True), (False, 0.0, False)):
        assert ObjectiveConfig(gradient_cache=cache, contrastive_weight=contrastive).joins_chunks is joined


def test_a_started_invocation_sets_the_finished_ones_summary_aside(tmp_path):
    """summary.json means the latest invocation finished: the next one renames it (its steps in the
    name) as it starts and writes its own only at its end; an unreadable one is kept all the same."""
    first = RunLog(tmp_path, "e", use_mlflow=False)
    first.start({}, [], resumed=False)
    first.finish({"steps": 4})
    resumed = RunLog(tmp_path, "e", use_mlflow=False)
    resumed.start({}, [{"step": 1}], resumed=True)
    assert not (tmp_path / "summary.json").exists()
    assert json.loads((tmp_path / "summary-step4.json").read_text()) == {"steps": 4}
    resumed.finish({"steps": 9})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 9}
    (tmp_path / "summary.json").write_text("{cut off")
    RunLog(tmp_path, "e", use_mlflow=False).start({}, [], resumed=True)
    assert (tmp_path / "summary-stepunknown.json").read_text() == "{cut off"
    (tmp_path / "summary.json").write_text('{"steps": "../elsewhere"}')  # not a number: never part of a path
    RunLog(tmp_path, "e", use_mlflow=False).start({}, [], resumed=True)
    assert (tmp_path / "summary-stepunknown.json").read_text() == '{"steps": "../elsewhere"}'
    assert sorted(p.name for p in tmp_path.glob("summary*")) == ["summary-step4.json", "summary-stepunknown.json"]

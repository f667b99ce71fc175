"""What a run records: `StepLog` (every rank) turns the steps' device values into per-step metrics,
reading the device only on log steps; `RunLog` (rank 0) keeps them in ``RUN/metrics.json``, a
loss-curve PNG, and an MLflow run (a SQLite store in the run directory unless
``MLFLOW_TRACKING_URI`` is set)."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# metrics.json is rewritten whole on a log step (and at the end): as often as keeps that writing under
# FLUSH_SHARE of the run's time, and at least every FLUSH_SECONDS
FLUSH_SHARE, FLUSH_SECONDS = 0.05, 30.0

# dense bf16 peak of known GPUs (TFLOP/s, no sparsity), for MFU; others need run.peak_tflops. The
# first name part found in the device's name wins: the PCIe and NVL variants before the SXM ones
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200 NVL": 835.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def device_peak_tflops(device: torch.device, configured: float | None, bf16: bool = True) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) for MFU; (None, why) when unknown. The table holds bf16
    peaks: a run without bf16 gets one only from ``configured``."""
    if configured:
        return configured, "run.peak_tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU; set run.peak_tflops to report MFU"
    if not bf16:
        return None, ("the known peaks are bf16 ones and this run is not bf16; set run.peak_tflops (e.g. the "
                      "device's TF32 or FP32 dense peak) to report MFU")
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak, f"{name}: dense bf16 peak {peak} TFLOP/s"
    return None, f"{name}: peak unknown; set run.peak_tflops to report MFU"


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class RunLog:
    """Rank 0's record of a run. ``history``: one dict per step (restored on resume, so that a
    resumed run's metrics.json equals an uninterrupted run's).

    The MLflow run opens in `start`, once the checkpoint to resume (if any) is known: a resumed run
    continues the MLflow run named in ``RUN/mlflow_run_id`` (one curve across restarts), a fresh
    start opens a new one (re-opening an old run would log its steps again). A run that raises ends
    in `fail`: MLflow's own exit hook would otherwise mark it FINISHED."""

    def __init__(self, run_dir: Path, experiment: str, use_mlflow: bool):
        self.run_dir = Path(run_dir)
        self.experiment, self.use_mlflow = experiment, use_mlflow
        self.history: list[dict] = []
        self.restored = 0  # steps that came from the checkpoint, not from this invocation
        self.mlflow, self.tracking_uri, self.run_id = None, None, None
        self.mlflow_logged_through = 0  # steps MLflow already has (a resume after a kill retrains some)
        self.mlflow_failed = False  # a logging call failed: no more are made (metrics.json keeps every step)
        # the last asynchronous log_metrics (MLflow's RunOperations) and its step: a store's write (SQLite, a
        # server) runs beside the training instead of stalling every rank at each log step; its failure is
        # found at the next log step or at the end
        self.mlflow_pending, self.mlflow_pending_step = None, None
        self.flushed_at = -math.inf  # when metrics.json was last written (time.monotonic)
        self.flush_seconds = 0.0  # how long that write took
        # decided now: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, our own store's included
        self.local_store = use_mlflow and not os.environ.get("MLFLOW_TRACKING_URI")

    def start(self, config: dict, history: list[dict], resumed: bool) -> None:
        self.history, self.restored = list(history), len(history)
        self._set_aside_summary()
        if not self.use_mlflow:
            return
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        mlflow.set_tracking_uri(uri)
        if self.local_store and mlflow.get_experiment_by_name(self.experiment) is None:
            # artifacts beside the store, not in ./mlruns of whatever directory the run started in
            mlflow.create_experiment(self.experiment,
                                     artifact_location=(self.run_dir / "mlflow-artifacts").resolve().as_uri())
        mlflow.set_experiment(self.experiment)
        id_file = self.run_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else None
        run = mlflow.start_run(run_id=run_id, run_name=self.run_dir.name)
        self.mlflow, self.tracking_uri, self.run_id = mlflow, uri, run.info.run_id
        if run_id is None:
            id_file.write_text(run.info.run_id)
            params = {k: str(v)[:500] for k, v in _flatten(config).items()}
            for i in range(0, len(params), 100):
                mlflow.log_params(dict(list(params.items())[i : i + 100]))
            mlflow.log_dict(config, "config.json")
        else:
            # a job killed after logging steps past its last checkpoint retrains them on resume (to the
            # same values: resume is exact); MLflow keeps every value it is sent, so send each step once
            logged = mlflow.tracking.MlflowClient(uri).get_metric_history(run_id, "loss")
            self.mlflow_logged_through = max((m.step for m in logged), default=0)

    def _set_aside_summary(self) -> None:
        """summary.json says an invocation finished: from the start of the next one (a resume), it
        describes an earlier state of the run, so it is renamed ``summary-step<N>.json`` (its steps), and
        summary.json comes back only when this invocation finishes. A resume that fails leaves none."""
        earlier = self.run_dir / "summary.json"
        if not earlier.exists():
            return
        try:
            steps = int(json.loads(earlier.read_text())["steps"])  # a number: it becomes part of a file name
        except (ValueError, KeyError, TypeError):  # unreadable: kept all the same, under a name that says so
            steps = "unknown"
        earlier.replace(self.run_dir / f"summary-step{steps}.json")

    def record(self, metrics: dict, log: bool) -> None:
        self.history.append(metrics)
        if log:
            # the whole history is rewritten (an atomic replace): spaced by its own cost, so that a long
            # run's growing file does not cost O(steps^2), while a short run's stays current
            if time.monotonic() - self.flushed_at >= min(FLUSH_SECONDS, self.flush_seconds / FLUSH_SHARE):
                self.flush()
            self.settle_mlflow()
            if self.mlflow is not None and not self.mlflow_failed and metrics["step"] > self.mlflow_logged_through:
                step = metrics["step"]
                try:
                    self.mlflow_pending = self.mlflow.log_metrics(
                        {k: float(v) for k, v in metrics.items()  # MLflow stamps its own time
                         if k not in ("step", "time") and isinstance(v, (int, float))}, step=step, synchronous=False)
                    self.mlflow_pending_step = step
                except Exception as err:  # noqa: BLE001 - a tracking server's hiccup must not end a multi-day run
                    self._mlflow_failed_at(step, err)

    def settle_mlflow(self) -> None:
        """Wait for the last asynchronous MLflow write (done by now, unless the store is slower than
        ``log_every`` steps) and say if it failed."""
        pending, self.mlflow_pending = self.mlflow_pending, None
        if pending is not None and not self.mlflow_failed:
            try:
                pending.wait()
            except Exception as err:  # noqa: BLE001 - as above
                self._mlflow_failed_at(self.mlflow_pending_step, err)

    def _mlflow_failed_at(self, step: int, err: Exception) -> None:
        self.mlflow_failed = True
        logger.warning(f"MLflow logging failed at step {step} ({type(err).__name__}: {err}); the run goes "
                       f"on without it: every step's record stays in {self.run_dir / 'metrics.json'}")

    def flush(self) -> None:
        started = time.monotonic()
        tmp = self.run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(self.history, indent=0))
        tmp.replace(self.run_dir / "metrics.json")
        self.flushed_at = time.monotonic()
        self.flush_seconds = self.flushed_at - started

    def plot(self) -> Path | None:
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("loss", "mlm", "mvc", "contrastive", "label"):
            values = [h.get(key) for h in self.history]
            if any(v for v in values):
                ax.plot(steps, values, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        path = self.run_dir / "loss.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def finish(self, summary: dict) -> None:
        self.flush()
        self.settle_mlflow()
        png = self.plot()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if self.mlflow is not None:
            for path in (png, self.run_dir / "metrics.json", self.run_dir / "summary.json"):
                if path is not None and path.exists():
                    self.mlflow.log_artifact(str(path))
            self.mlflow.end_run()

    @property
    def took_steps(self) -> bool:
        """Whether this invocation finished any step (restored ones do not count)."""
        return len(self.history) > self.restored

    def fail(self) -> None:
        """The run raised: keep the steps this invocation took in metrics.json and end the MLflow
        run as FAILED (without this, MLflow's exit hook ends it FINISHED)."""
        if self.took_steps:
            self.flush()
        self.settle_mlflow()
        if self.mlflow is not None and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status="FAILED")


class NonFiniteStreak(RuntimeError):
    """``run.max_nan_steps`` non-finite losses in a row: the run stops (each of them was skipped)."""


def skip_streak(history: list[dict]) -> int:
    """The skipped steps in a row at the end of a run's history (every step's record, as a checkpoint
    keeps it): a resumed run goes on counting them toward ``run.max_nan_steps``, so that a run that
    keeps failing at the same place stops whether or not it was interrupted."""
    streak = 0
    for before, record in zip([{"skipped_steps": 0}, *history], history):
        streak = streak + 1 if record["skipped_steps"] > before["skipped_steps"] else 0
    return streak


class StepLog:
    """Every rank's bookkeeping of the steps: their metrics records, the skipped steps and the
    non-finite streak, on every rank alike (all ranks stop at the same step).

    A step's values stay on the device (`pretrain.objectives.StepResult`) until a read: on a log
    step (every ``run.log_every``-th and the last), before a checkpoint (its history holds every
    step), and when the skipped steps in a row reach ``run.max_nan_steps``. A read fetches all
    pending steps' values in one transfer, so that metrics.json still has every step's losses and
    no other step waits for the device. A step counts as skipped when DeepSpeed did not apply it
    (``engine.was_step_applied()``, a host bool) or its loss is not finite (seen at the read).

    Throughput is measured per window, the steps since the previous read: their cells, sequences,
    tokens and FLOPs (`StepCounts.flops`: each sequence at its own length) over the window's wall
    time (loader waits included, checkpoint saves not), taken after a device sync at the read.
    Every record of a window carries the window's rates (``cells_per_s``, ``sequences_per_s`` with
    views, ``tokens_per_s``, ``tflops_per_device``, ``mfu``) and its ``peak_memory_bytes``;
    ``padding_waste`` is the step's own; ``time`` is the Unix time of the read."""

    def __init__(self, config, world: int, device: torch.device, peak_tflops: float | None, run_log: RunLog | None,
                 step: int = 0, skipped: int = 0, streak: int = 0):
        self.config, self.world, self.device, self.peak_tflops = config, world, device, peak_tflops
        self.run_log, self.skipped, self.streak = run_log, skipped, streak  # a resumed run's: `skip_streak`
        self.pending: list[tuple] = []
        self.known_streak = streak  # the streak as far as the host knows without a read (DeepSpeed's skips)
        self.progress = None
        if run_log is not None and config.run.progress:
            from tqdm import tqdm

            self.progress = tqdm(total=config.schedule.max_steps, initial=step, desc="pretrain", unit="step")
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start a new throughput window now (after a checkpoint save, so that it is not counted)."""
        self.clock = time.perf_counter()

    @property
    def history(self) -> list[dict]:
        return self.run_log.history if self.run_log is not None else []

    def step(self, step: int, result, counts, lr: float, grad_norm, applied: bool) -> None:
        """Record optimizer step ``step`` (1-based, done): its `StepResult` (device values), its
        `StepCounts` (all ranks'), learning rate, DeepSpeed's grad norm and whether it applied the
        update. Reads the device only on a log step or a streak of skips long enough to stop."""
        self.pending.append((step, result, counts, lr, grad_norm, applied))
        self.known_streak = 0 if applied else self.known_streak + 1
        if self._logs(step) or self.known_streak >= self.config.run.max_nan_steps:
            self.read()

    def read(self) -> None:
        """Fetch the pending steps' values (one device transfer), append their records, log the log
        steps; raises `NonFiniteStreak` once ``run.max_nan_steps`` skipped steps came in a row."""
        if not self.pending:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # the next window starts here: the records, metrics.json and MLflow writes below are run time
        # that the next window's rates count (checkpoint saves alone are left out: `restart_clock`)
        read_at = time.perf_counter()
        seconds = max(read_at - self.clock, 1e-9)
        values = torch.stack([torch.cat([r.stacked(), _tensor_or_nan(g, r.loss)])
                              for _, r, _, _, g, _ in self.pending]).tolist()
        cells = sum(c.cells for _, _, c, _, _, _ in self.pending)
        seqs = sum(c.seqs for _, _, c, _, _, _ in self.pending)
        tokens = sum(c.tokens for _, _, c, _, _, _ in self.pending)
        flops = sum(c.flops for _, _, c, _, _, _ in self.pending)
        tflops = flops / seconds / self.world / 1e12
        rates = {"cells_per_s": cells / seconds, "tokens_per_s": tokens / seconds, "tflops_per_device": tflops,
                 "mfu": tflops / self.peak_tflops if self.peak_tflops else None}
        peak_memory, now, stop_at = _peak_memory(self.device), time.time(), None
        for (step, _, counts, lr, grad_norm, applied), row in zip(self.pending, values):
            loss, mlm, label, contrastive, temperature, mvc, norm = row
            good = applied and math.isfinite(loss)  # DeepSpeed skips an update whose gradients are not finite
            self.streak = 0 if good else self.streak + 1
            self.skipped += 0 if good else 1
            if self.streak >= self.config.run.max_nan_steps and stop_at is None:
                stop_at = (self.streak, step)
            record = {"step": step, "loss": loss, "mlm": mlm, "contrastive": contrastive, "label": label,
                      "mvc": mvc, "temperature": temperature, "lr": lr, "grad_norm": None if grad_norm is None else norm,
                      **rates, "padding_waste": 1 - counts.tokens / max(counts.slots, 1),
                      "peak_memory_bytes": peak_memory, "skipped_steps": self.skipped, "time": now}
            if self.config.data.views:  # two sequences per cell: cells_per_s above counts each cell once
                record["sequences_per_s"] = seqs / seconds
            if self.run_log is not None:
                self.run_log.record(record, log=self._logs(step))
        last = self.pending[-1][0]
        self.pending, self.known_streak = [], self.streak
        if self.progress is not None:
            self.progress.update(last - self.progress.n)
            self.progress.set_postfix(loss=f"{values[-1][0]:.4f}", cells_s=f"{rates['cells_per_s']:.0f}")
        if stop_at is not None:
            from .checkpoint import latest_complete

            saved = latest_complete(self.run_log.run_dir) if self.run_log is not None else None
            raise NonFiniteStreak(f"{stop_at[0]} non-finite losses in a row (step {stop_at[1]}): lower optimizer.lr, "
                                  "raise deepspeed.gradient_clipping or check the corpus; "
                                  + (f"the last complete checkpoint is {saved}" if saved else "no checkpoint was saved"))
        self.clock = read_at

    def read_what_is_left(self) -> None:
        """After a failure: the pending steps' records, if the device can still give them (a failed
        CUDA context cannot: then they are lost, and the failure is the error the user sees)."""
        try:
            self.read()
        except Exception as err:  # noqa: BLE001 - the run's own error is being raised
            if not isinstance(err, NonFiniteStreak):
                logger.warning(f"the last {len(self.pending)} steps' metrics could not be read after the failure ({err})")

    def _logs(self, step: int) -> bool:
        return step % self.config.run.log_every == 0 or step == self.config.schedule.max_steps

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def _tensor_or_nan(grad_norm, like: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's grad norm (a tensor, a float, or None) as a [1] float64 tensor beside ``like``."""
    if isinstance(grad_norm, torch.Tensor):
        return grad_norm.detach().reshape(1).to(like.device, torch.float64)
    return torch.tensor([math.nan if grad_norm is None else float(grad_norm)], dtype=torch.float64, device=like.device)


def _peak_memory(device: torch.device) -> int:
    """The window's peak on a GPU (the counter is reset for the next window); a CPU process's
    lifetime peak RSS."""
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def history_tail(history: list[dict], n: int = 20) -> dict:
    """Mean of the last ``n`` steps' losses and throughput (skipped steps left out). Every step of a
    throughput window carries the window's rates, so this weighs windows by their steps."""
    tail = history[-n:]
    keys = ("loss", "mlm", "mvc", "contrastive", "label", "cells_per_s", "sequences_per_s", "tokens_per_s", "mfu")
    out = {}
    for key in keys:
        values = [h[key] for h in tail if h.get(key) is not None and math.isfinite(h[key])]
        if values:
            out[key] = sum(values) / len(values)
    return out

"""What a run records, on rank 0: per-step metrics in ``RUN/metrics.json``, a loss-curve PNG, and
an MLflow run (a SQLite store in the run directory unless ``MLFLOW_TRACKING_URI`` is set)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# dense bf16 peak of known GPUs (TFLOP/s, no sparsity), for MFU; others need run.peak_tflops
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def device_peak_tflops(device: torch.device, configured: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) for MFU; (None, why) when unknown."""
    if configured:
        return configured, "run.peak_tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU; set run.peak_tflops to report MFU"
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
        # decided now: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, our own store's included
        self.local_store = use_mlflow and not os.environ.get("MLFLOW_TRACKING_URI")

    def start(self, config: dict, history: list[dict], resumed: bool) -> None:
        self.history, self.restored = list(history), len(history)
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

    def record(self, metrics: dict, log: bool) -> None:
        self.history.append(metrics)
        if log:
            self.flush()
            if self.mlflow is not None and metrics["step"] > self.mlflow_logged_through:
                step = metrics["step"]
                self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                                         if k != "step" and isinstance(v, (int, float)) and v is not None}, step=step)

    def flush(self) -> None:
        tmp = self.run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(self.history, indent=0))
        tmp.replace(self.run_dir / "metrics.json")

    def plot(self) -> Path | None:
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("loss", "mlm", "contrastive", "label"):
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
        if self.mlflow is not None and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status="FAILED")

"""Launching `launch/pretrain.py` jobs from the training tests: a small synthetic corpus, tiny model
overrides (a step well under a second on a CPU), 1- and 2-rank subprocess jobs, and readers of
what a run leaves behind (metrics.json, summary.json, exported weights)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "launch" / "configs" / "tiny.yaml"
LOSS_KEYS = ("loss", "mlm", "contrastive", "label")
JOB_TIMEOUT = 240  # seconds for one training job (a tiny one takes ~10-25 s on 2 CPU cores)

# on top of launch/configs/tiny.yaml: masked bins + labels + gradient-cached contrastive, 2 chunks a step
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.favor_features=16",
        "data.max_genes=32", "data.token_budget=1024", "data.megabatch_cells=256", "data.num_workers=0",
        "run.progress=false", "run.mlflow=false"]


def make_corpus(folder: Path, n_cells: int = 800, n_genes: int = 2000) -> Path:
    """A synthetic corpus (label column ``cell_type``) and its source file ``folder/cells.h5ad``."""
    from data_pipeline.conversion.convert import convert
    from data_pipeline.conversion.plan import ConvertOptions
    from data_pipeline.synthetic import write_synthetic_h5ad

    source = folder / "cells.h5ad"
    write_synthetic_h5ad(source, n_cells, n_genes, n_cell_types=8, seed=0)
    corpus = folder / "corpus"
    convert(corpus, ConvertOptions([str(source)], label_columns=["cell_type"]), progress=False)
    return corpus


def _cwd(overrides: list[str]) -> Path:
    """Jobs run in the parent of their run directory: whatever a job writes relative to its working
    directory stays out of the checkout."""
    out = [o.split("=", 1)[1] for o in overrides if o.startswith("run.out=")]
    assert out, "pass run.out=... (a folder under the test's tmp_path)"
    folder = Path(out[-1]).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def job_env() -> dict:
    # the checkout first, then whatever was there (on the GPU machine: the carried wheels' folder)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # runs keep their MLflow store in the run directory
    return env


def pretrain_cmd(overrides: list[str], ranks: int = 1, resume: str | None = None) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [sys.executable])
    cmd = [*launcher, str(ROOT / "launch" / "pretrain.py"), "--config", str(TINY_CONFIG), *overrides]
    return cmd + (["--resume", resume] if resume else [])


def run_pretrain(overrides: list[str], ranks: int = 1, resume: str | None = None, check: bool = True,
                 timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run(pretrain_cmd(overrides, ranks, resume), env=job_env(), cwd=_cwd(overrides),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def start_pretrain(overrides: list[str], ranks: int, log: Path) -> subprocess.Popen:
    """A job in its own process group (so that the test can signal or kill all of it)."""
    with open(log, "w") as fh:
        return subprocess.Popen(pretrain_cmd(overrides, ranks), env=job_env(), cwd=_cwd(overrides), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = JOB_TIMEOUT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-5000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-5000:]}")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def kill_job(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a job as a node failure would: every rank and the launcher. torch elastic starts each
    rank in its own session (start_new_session=True), so the job's process group (`kill_group`)
    holds torchrun alone and its ranks would live on, training and saving. Returns the ranks' pids,
    all gone when it returns."""
    ranks = list(worker_pids(proc).values()) if proc.poll() is None else []
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    kill_group(proc)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in ranks):
        assert time.monotonic() < deadline, f"ranks {ranks} still alive 30 s after SIGKILL"
        time.sleep(0.05)
    return ranks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_ui(run: Path, log: Path, timeout: float = JOB_TIMEOUT):
    """The README's `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db` on a free 127.0.0.1 port,
    in its own process group; yields its base URL once it answers ``/health``. On exit, whatever the
    test did, the whole group (server, uvicorn worker) is killed and gone before this returns."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{run / 'mlflow.db'}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # no job runner (MLflow's GenAI jobs, a pool of huey consumers): the UI and REST API serve without it
    env = {**job_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow ui ended (exit {proc.returncode}):\n{log.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:  # not listening yet
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow ui did not answer in {timeout:.0f} s:\n{log.read_text()[-5000:]}")
            time.sleep(0.5)
        yield url
    finally:
        kill_group(proc)
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid):
            assert time.monotonic() < deadline, f"processes of mlflow ui's group {proc.pid} alive 30 s after SIGKILL"
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def worker_pids(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of a torchrun job's workers (Linux /proc: torchrun's children and their RANK)."""
    pids = {}
    for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks = [e[len(b"RANK="):] for e in environ if e.startswith(b"RANK=")]
        if ranks:
            pids[int(ranks[0])] = int(pid)
    return pids


def steps_logged(run: Path) -> int:
    try:
        return len(json.loads((run / "metrics.json").read_text()))
    except (OSError, ValueError):  # not written yet (it is replaced atomically)
        return 0


def metrics(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def same_number(a, b, rel: float = 1e-6) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def export(run: Path, out: Path) -> Path:
    """The bundle of ``run``'s latest complete checkpoint, through launch/export.py's `main`."""
    spec = importlib.util.spec_from_file_location("launch_export", ROOT / "launch" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(run), "--out", str(out)])
    return out


def weights(bundle: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(bundle / "model.safetensors"))


def complete_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / "COMPLETE").exists())


# --- two optimizer steps, for comparing devices and attention backends (tests/test_gpu_training.py) ---

def two_step_overrides(corpus: Path, run: Path, attention: str, bf16: bool) -> list[str]:
    """A 2-step run of the tiny model under DeepSpeed ZeRO-2: dropout off (so that a CPU and a GPU run
    draw nothing from their different RNGs), MLflow off, every step's metrics recorded."""
    return [*TINY, f"data.corpus={corpus}", f"run.out={run}", f"model.attention={attention}", "model.dropout=0.0",
            "schedule.max_steps=2", "deepspeed.zero_stage=2", f"deepspeed.bf16={str(bf16).lower()}",
            "run.checkpoint_every=0", "run.log_every=1", "run.mlflow=false"]


def two_step_run(corpus: Path, run: Path, attention: str, *, cpu: bool, bf16: bool = False) -> list[dict]:
    """The per-step metrics of `two_step_overrides`' run of launch/pretrain.py, in its own process on
    one rank. ``cpu``: CUDA hidden from the job (the trainer then runs on the CPU, gloo); otherwise
    the job sees the machine's GPUs (NCCL, device 0)."""
    env = job_env()
    if cpu:  # torch then sees no GPU (the trainer picks the CPU) and DeepSpeed uses its CPU accelerator
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    overrides = two_step_overrides(corpus, run, attention, bf16)
    proc = subprocess.run(pretrain_cmd(overrides), env=env, cwd=_cwd(overrides), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return metrics(run)


def job_process_groups(proc: subprocess.Popen) -> list[int]:
    """Every process group of a job started by `start_pretrain`: its own and, under torchrun, each
    rank's (torch elastic starts every rank in a session of its own, with its loader workers)."""
    groups = [os.getpgid(proc.pid)]
    for pid in worker_pids(proc).values():
        try:
            groups.append(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return sorted(set(groups))


def signal_every_group(proc: subprocess.Popen, sig: int) -> list[int]:
    """``sig`` to every process of the job, as a scheduler (SLURM's scancel, a preemption) does:
    `job_process_groups`, each with ``kill -SIG -- -PGID``. Returns the groups signalled."""
    groups = job_process_groups(proc)
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
    return groups


# --- the GPU training test's fp32 CPU reference, made before the device call --------------------------

GPU_INPUTS = ROOT / "benchmarks" / "gpu_inputs"  # made by benchmarks/gpu_prepare.sh, carried to the GPU
PREPARED_CORPUS = GPU_INPUTS / "gpu_test_corpus"
PREPARED_REFERENCE = GPU_INPUTS / "gpu_training_reference.json"
REFERENCE_BACKENDS = ("sdpa", "favor")


def source_digest() -> str:
    """sha256 over the code a training run executes (pretrain, data_pipeline, kernels, launch and
    this file): a carried reference stands only for the code that made it."""
    import hashlib

    h = hashlib.sha256()
    files = [p for d in ("pretrain", "data_pipeline", "kernels", "launch") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts]
    for p in sorted({*files, Path(__file__).resolve()}):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def write_gpu_reference(corpus: Path = PREPARED_CORPUS, path: Path = PREPARED_REFERENCE) -> Path:
    """The fp32 CPU runs `tests/test_gpu_training.py` compares the GPU with, made here: on the GPU
    machine a CPU run of DeepSpeed would first JIT-build its shared-memory op (g++, minutes of a
    lease, or a failure where the image lacks the headers)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = {b: two_step_run(corpus, Path(tmp) / b / "run", b, cpu=True) for b in REFERENCE_BACKENDS}
    record = {"source_digest": source_digest(), "corpus": str(corpus.relative_to(ROOT)), "runs": runs}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def prepared_reference(corpus: Path, backend: str) -> list[dict] | None:
    """The carried reference run of ``backend`` on ``corpus``, when it was made by this code on
    this corpus; else None (the caller runs it)."""
    if not PREPARED_REFERENCE.exists() or corpus.resolve() != PREPARED_CORPUS.resolve():
        return None
    record = json.loads(PREPARED_REFERENCE.read_text())
    if record.get("source_digest") != source_digest():
        return None
    return record["runs"].get(backend)

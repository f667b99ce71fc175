"""Per-process CPU setup for the entry points: how many threads torch uses, and where compiled
extensions are cached.

Why threads: torch sizes its intra-op pool from the machine's core count, not from the cores this
process may really use. In a container with a CPU quota, under a CPU affinity mask, or with several
ranks (and their loader workers) on one host, every process then runs more threads than there are
cores and the OpenMP workers spin against each other: a user report (issue 19) measured the demo at 1,685 s with torch's
default against 194 s with one thread on such a machine. So each entry point calls
:func:`apply_threads` first; an explicit choice (``run.threads`` / ``--threads``, or the user's
``OMP_NUM_THREADS``) is never overridden.

Why the extension folder: DeepSpeed compiles its CPU shared-memory op (g++; about a minute on a
2-core VM) the first time a CPU run starts, into torch's default cache under the home folder, which throwaway
machines and containers lose; :func:`use_project_extension_dir` keeps it in the checkout instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.cores import CGROUP, usable_cores

REPO = Path(__file__).resolve().parents[1]
# launchers' "processes on this host": torchrun, the `deepspeed` launcher, Open MPI, SLURM
LOCAL_RANK_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # one line for the log: where the number came from

    def line(self) -> str:
        return f"torch threads: {self.threads} ({self.reason})"


def local_ranks(env: Mapping[str, str]) -> int:
    """Training processes on this host, from whichever launcher started us (1 for plain python)."""
    for name in LOCAL_RANK_VARS:
        try:
            value = int(env[name])
        except (KeyError, ValueError):
            continue
        if value > 0:
            return value
    return 1


def choose_threads(requested: int = 0, loader_workers: int = 0, env: Mapping[str, str] | None = None,
                   affinity: set[int] | None = None, cgroup_root: Path = CGROUP) -> ThreadChoice:
    """Threads for this process's torch, in order of precedence: ``requested`` (> 0: the config's
    ``run.threads`` or a ``--threads`` flag), the user's ``OMP_NUM_THREADS``, else the usable cores
    shared among this host's ranks, less one core per loader worker process of this rank (torch's
    DataLoader runs each worker on one thread), at least one.

    The workers get at most a quarter of the rank's cores: they mostly wait on a full prefetch
    queue, so on a small machine a core kept for each would idle while compute lacks it. Measured
    on a quiet 2-core VM, tiny config, 1 worker, 40 steps: 2 threads 20 s (212 cells/s), 1 thread
    27 s (137 cells/s). What this cannot see is other jobs on the machine: with them, torch's
    OpenMP threads (which spin at every barrier until the slowest arrives) lose badly (same VM
    under other tests' load, 30 steps: 2 threads 108 s, 1 thread 32 s); set run.threads there."""
    env = os.environ if env is None else env
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0: automatic), not {requested}")
    if requested:
        return ThreadChoice(requested, "asked for explicitly")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        try:
            return ThreadChoice(max(1, int(omp.split(",")[0])), f"OMP_NUM_THREADS={omp} from the environment")
        except ValueError:
            pass  # not a number: OpenMP ignores it too, so choose as if unset
    cores, how = usable_cores(affinity, cgroup_root)
    ranks = local_ranks(env)
    per_rank = max(1, cores // ranks)
    threads = max(1, per_rank - loader_workers, per_rank - per_rank // 4)
    kept = per_rank - threads
    reason = f"automatic: {how}"
    if ranks > 1:
        reason += f", / {ranks} ranks on this host"
    if kept:
        reason += f", - {kept} for {loader_workers} loader worker(s)"
    return ThreadChoice(threads, reason + "; set run.threads / --threads or OMP_NUM_THREADS to override")


def _log_once(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per rank (all ranks choose alike)
        logger.info(line)


def apply_threads(requested: int = 0, loader_workers: int = 0,
                  log: Callable[[str], None] | None = _log_once) -> ThreadChoice:
    """Choose (see :func:`choose_threads`), set torch's intra-op threads, and log one line (at INFO,
    through ``logging``: stdout carries the entry points' JSON summaries)."""
    import torch

    choice = choose_threads(requested, loader_workers)
    torch.set_num_threads(choice.threads)
    try:
        # the inter-op pool only serves forked TorchScript work here; keep it from adding its own
        # core-count-sized pool. Torch refuses once parallel work started: then leave it.
        torch.set_num_interop_threads(choice.threads)
    except RuntimeError:
        pass
    if log is not None:
        log(choice.line())
    return choice


def use_project_extension_dir(env: dict[str, str] | None = None, repo: Path = REPO) -> str | None:
    """Point TORCH_EXTENSIONS_DIR at ``<repo>/.cache/torch_extensions`` unless the user set it,
    so DeepSpeed's shm op is built once per checkout. Must run before DeepSpeed builds it (in
    ``init_distributed``; torch reads the variable at build time). Returns the folder in use
    (None: torch's default under the home folder, where the package is installed, not a checkout:
    site-packages is no place for build products)."""
    env = os.environ if env is None else env
    if not env.get("TORCH_EXTENSIONS_DIR") and (repo / "pyproject.toml").is_file():
        env["TORCH_EXTENSIONS_DIR"] = str(repo / ".cache" / "torch_extensions")
    return env.get("TORCH_EXTENSIONS_DIR")


def add_runtime_arguments(parser) -> None:
    """An entry point's ``--device`` (cuda when available) and ``--threads`` (for `apply_threads`)."""
    import torch

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0: the usable cores; an OMP_NUM_THREADS is kept)")

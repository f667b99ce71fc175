"""How this package's child processes treat their parent's death and the signals a cluster sends.

Two kinds of children: the converter's pool workers (`convert.run_pool`, `plan.build_plan`), which
must not outlive a parent killed with SIGKILL (they would wait forever on its task queue, holding
their memory), and the loader's DataLoader workers, which must not die of the SIGTERM a scheduler
sends to every process of a job (the trainer checkpoints on it and needs its workers until then).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int) -> None:
    """Call first in a forked worker: the worker is killed (SIGKILL) as soon as ``parent_pid`` dies.

    Linux: ``prctl(PR_SET_PDEATHSIG)``, because the kernel then kills the worker at once even when it
    is deep in a numba kernel or an HDF5 read holding the GIL, which a thread polling
    ``os.getppid()`` could not interrupt. The death signal fires when the parent *thread* that forked
    the worker ends: pools are made and used by one thread and live no longer than it, so that is
    never earlier than the end of the pool. The parent may have died before the prctl: the check of
    ``getppid`` after it closes that race. Elsewhere (no prctl) a daemon thread polls ``getppid``.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = sys.platform.startswith("linux") and libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True,
                         name="exit-with-parent").start()


def _exit_when_orphaned(parent_pid: int) -> None:
    import time

    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def leave_stop_signals_to_parent() -> None:
    """Call first in a DataLoader worker: SIGTERM and SIGINT sent to the whole job (a scheduler's
    ``kill -TERM -PGID``, torch elastic's and DeepSpeed's forwarding to every process of a rank,
    Ctrl-C in a terminal) no longer kill the worker; the trainer that got the same signal finishes
    its step with the worker's batches, checkpoints and then shuts its workers down itself.

    SIGINT is ignored. SIGTERM is blocked and taken by a thread with ``sigwaitinfo``, which tells
    who sent it: from the parent (the DataLoader's own last-resort ``terminate()`` of a worker
    that did not stop) it still ends the worker at once, as torch's handler would; from anyone else
    it is dropped. A worker whose parent dies exits by torch's own parent watchdog (a few seconds).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    threading.Thread(target=_take_sigterm, args=(parent,), daemon=True, name="sigterm-from-parent").start()


def _take_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "cell"):
    """A tqdm bar on stderr for the converter's stages, safe to hold while a pool forks."""
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: the pool forks
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)

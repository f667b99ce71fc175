"""How the nodes of a multi-node conversion learn about each other through the shared output folder.

Each node converts its share (item ``i`` of a stage is node ``i % num_nodes``'s) and, at the stages
that need every share (10x mtx indexes, gene scans for a built vocabulary), waits for the others'.
Two records in ``OUT/.work/`` let a waiting node stop early instead of waiting ``--wait``:

- ``node-R.failed``: the error that stopped node R (`record_failure`), cleared when R is rerun;
- ``node-R.alive``: R's heartbeat, rewritten every `HEARTBEAT_S` while R runs (`heartbeat`) and
  removed when it ends, unless it was killed. A node killed by a signal, the out-of-memory killer or
  the loss of its machine records no error; its heartbeat stops changing instead, and a node waiting
  for its share stops once it has seen the heartbeat unchanged for `HEARTBEAT_STALE_S`, by its own
  clock (the nodes' clocks need not agree, and a file's modification time on a network filesystem
  is the server's). A node that has not started yet has no heartbeat, and is waited for.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .fsio import atomic_write_bytes
from .plan import ConvertError

log = logging.getLogger(__name__)

WAIT_POLL_S = 5.0          # how often a waiting node looks at the shared folder
HEARTBEAT_S = 30.0         # how often a running node rewrites its heartbeat
HEARTBEAT_STALE_S = 600.0  # a heartbeat unchanged this long: its node was killed (20 missed beats, so
                           # that a slow shared filesystem or a busy machine is not taken for a kill)


def failure_path(work: Path, node_rank: int) -> Path:
    """Where node ``node_rank`` leaves the error that stopped it, so that the nodes waiting for its
    share stop too instead of waiting ``wait_s`` (24 h by default)."""
    return work / f"node-{node_rank}.failed"


def heartbeat_path(work: Path, node_rank: int) -> Path:
    return work / f"node-{node_rank}.alive"


class OtherNodeFailed(ConvertError):
    """A node stopped because another node failed or was killed: it records no failure of its own,
    which would stop that node in turn when it is rerun and waits for this one's share."""


def record_failure(work: Path, node_rank: int, exc: BaseException) -> None:
    """Leave ``exc`` where the waiting nodes look (`failure_path`); nothing for `OtherNodeFailed`,
    or where the work folder is gone."""
    if work.is_dir() and not isinstance(exc, OtherNodeFailed):
        atomic_write_bytes(failure_path(work, node_rank), f"{type(exc).__name__}: {exc}\n".encode())


@contextmanager
def heartbeat(work: Path, node_rank: int):
    """Keep ``node-R.alive`` changing, from a thread, while the block runs; ``work`` must exist. The
    file goes when the block ends with a result or an error (an error leaves its `record_failure`);
    an interrupt (Ctrl-C, SystemExit) leaves it to go stale, as a kill does, since neither is an
    error the waiting nodes could be told of."""
    path = heartbeat_path(work, node_rank)
    stop = threading.Event()
    host, pid = socket.gethostname(), os.getpid()

    def beat() -> None:
        n = 0
        while True:
            try:  # in place, not atomic: a reader that sees half a write sees a change, which it is
                path.write_text(f"host {host} pid {pid} beat {n}\n")
            except OSError as exc:  # a full or flaky shared filesystem: the next beat tries again
                log.debug(f"heartbeat {path}: {exc}")
            n += 1
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name=f"node-{node_rank}-heartbeat", daemon=True)
    thread.start()
    interrupted = False
    try:
        yield path
    except BaseException as exc:
        interrupted = not isinstance(exc, Exception)
        raise
    finally:
        stop.set()
        thread.join()
        if not interrupted:
            path.unlink(missing_ok=True)


class _Heartbeats:
    """What a waiting node has seen of the others' heartbeats: each one's last text, and when (by
    this node's monotonic clock) it last changed."""

    def __init__(self, work: Path):
        self.work = work
        self.seen: dict[int, tuple[bytes, float]] = {}

    def stopped(self, ranks) -> str | None:
        """The first node of ``ranks`` whose heartbeat has not changed for `HEARTBEAT_STALE_S`."""
        now = time.monotonic()
        for rank in sorted(set(ranks)):
            path = heartbeat_path(self.work, rank)
            try:
                text = path.read_bytes()
            except FileNotFoundError:  # not started yet, or ended (its share done, or its failure recorded)
                self.seen.pop(rank, None)
                continue
            last = self.seen.get(rank)
            if last is None or last[0] != text:
                self.seen[rank] = (text, now)
            elif now - last[1] >= HEARTBEAT_STALE_S:
                return (f"node {rank} stopped without recording an error: its heartbeat ({path}: "
                        f"{text.decode(errors='replace').strip()}) has not changed for {now - last[1]:.0f} s, "
                        "so it was killed (a signal, out of memory, its job's time limit) or its machine was lost")
        return None


def _recorded_failure(work: Path, ranks) -> str | None:
    """The failure record (`failure_path`) of the first node of ``ranks`` that has one."""
    for rank in sorted(set(ranks)):
        path = failure_path(work, rank)
        try:
            return f"node {rank} stopped with an error ({path}): {path.read_text().strip()}"
        except FileNotFoundError:  # none, or that node was rerun meanwhile and cleared it
            continue
    return None


def wait_for_nodes(missing_fn, num_nodes: int, wait_s: float, what: str, work: Path, node_rank: int) -> list:
    """Wait for the other nodes' share of a stage (``missing_fn() -> [item]``, item ``i`` node
    ``i % num_nodes``'s); -> what is still missing after ``wait_s``. Raises `OtherNodeFailed` as soon as
    a node whose share is missing has recorded a failure, or once its heartbeat has stopped."""
    missing = missing_fn()
    if not missing or num_nodes <= 1:
        return missing
    deadline = time.monotonic() + wait_s
    heartbeats = _Heartbeats(work)
    log.info(f"waiting for the other nodes' {what} ({len(missing)} units left)")
    while missing and time.monotonic() < deadline:
        ranks = [r for r in {i % num_nodes for i in missing} if r != node_rank]
        failed = _recorded_failure(work, ranks)
        if failed:
            raise OtherNodeFailed(f"{failed}. This node was waiting for the other nodes' {what}: fix the cause, "
                                  "rerun that node, then rerun this one (each goes on from where it stopped)")
        killed = heartbeats.stopped(ranks)
        if killed:
            raise OtherNodeFailed(f"{killed}. This node was waiting for the other nodes' {what}: rerun that node, "
                                  "then rerun this one (each goes on from where it stopped)")
        time.sleep(WAIT_POLL_S)
        missing = missing_fn()
    return missing

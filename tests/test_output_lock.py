"""A converter's processes and its output folder: pool workers die with their parent, one command
at a time writes a folder (an exclusive lock naming its holder), and a rerun sweeps the temp files
a killed or failed writer left in the corpus root."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.fsio import LOCK_FILE, FolderBusy, OutputLock, remove_stale_temps, temp_path
from data_pipeline.conversion.plan import ConvertError, ConvertOptions
from data_pipeline.corpus import verify
from tests.corpus_helpers import random_counts, write_h5ad

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--unit-cells", "256", "--block-cells", "64", "--no-progress"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    # 16 work units: a 2-worker pool stays busy for a while
    return write_h5ad(tmp_path_factory.mktemp("in") / "a.h5ad", random_counts(4096, 800, seed=3, density=0.1))


def _convert_cmd(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_pipeline", "convert", str(source), "--out", str(out), *SMALL, *extra]


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(k) for k in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaps yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_exit_when_the_converter_is_sigkilled(source, tmp_path):
    out = tmp_path / "corpus"
    proc = subprocess.Popen(_convert_cmd(source, out, "--workers", "2"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    workers = set()
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            workers = _children(proc.pid) if (out / ".work" / "plan.json").exists() else set()
            time.sleep(0.01)
        assert len(workers) >= 2, "the conversion ended (or never forked) before the test could kill it"
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, as an OOM killer does
        proc.wait()
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers)), f"pool workers {sorted(filter(_alive, workers))} outlived their parent"
    finally:
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_second_conversion_into_the_same_folder_is_refused_naming_the_first(source, tmp_path):
    out = tmp_path / "corpus"
    first = subprocess.Popen(_convert_cmd(source, out, "--workers", "1"), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while f'"pid": {first.pid}' not in _read(out / LOCK_FILE) and first.poll() is None:
            assert time.monotonic() < deadline, "the first conversion never took the lock"
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the second takes to start
        try:
            second = subprocess.run(_convert_cmd(source, out, "--workers", "1"), cwd=REPO, capture_output=True,
                                    text=True, timeout=120)
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr
    assert second.stderr.startswith("error: ") and "Traceback" not in second.stderr, second.stderr
    for fact in ("in use by another command", socket.gethostname(), f"pid {first.pid}", "data_pipeline convert",
                 str(out / LOCK_FILE)):
        assert fact in second.stderr, (fact, second.stderr)
    assert first.returncode == 0, err
    assert verify(out) == []
    assert not (out / LOCK_FILE).exists(), "the lock file stays behind in the corpus"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_merge_is_refused_while_a_node_converts_and_nodes_share_the_folder(tmp_path):
    with OutputLock(tmp_path, "node 0", node=0):
        with OutputLock(tmp_path, "node 1", node=1):  # the other node of the same run
            with pytest.raises(FolderBusy, match="node 0"):
                OutputLock(tmp_path, "node 0 again", node=0).__enter__()  # one node rank runs once
            with pytest.raises(FolderBusy, match=r"node 0.*node 1|node 1.*node 0"):
                OutputLock(tmp_path, "merge").__enter__()  # merge (or a single-node run) waits for every node
    with OutputLock(tmp_path, "merge"):
        with pytest.raises(FolderBusy, match="merge"):
            OutputLock(tmp_path, "node 0", node=0).__enter__()
    assert list(tmp_path.iterdir()) == [], "a lock file stays behind"


def test_a_rerun_sweeps_the_temp_files_a_killed_merge_left(source, tmp_path):
    out = tmp_path / "corpus"
    options = ConvertOptions([str(source)], unit_cells=256, block_cells=64)
    convert(out, options, progress=False, keep_work=True)
    (out / "manifest.json").unlink()  # killed before the merge wrote its manifest
    left = [temp_path(out / "stats.zarr").with_name(".stats.zarr.tmp-othernode-1234"),
            temp_path(out / "cell_lengths.npy").with_name(".cell_lengths.npy.tmp-othernode-99"),
            temp_path(out / "manifest.json")]
    left[0].mkdir()
    (left[0] / ".zgroup").write_text("{}")
    for p in left[1:]:
        p.write_bytes(b"partial")
    not_ours = out / ".stats.zarr.tmp-notes"  # no host-pid tail: not a name `temp_path` makes
    not_ours.write_text("kept")
    convert(out, options, progress=False)
    assert not any(p.exists() for p in left)
    assert not_ours.exists()
    assert verify(out) == []


def test_nodes_sweep_only_the_temps_of_their_own_dead_processes(tmp_path):
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine_dead = tmp_path / f".u000001.tar.tmp-{host}-{dead}"
    mine_live = temp_path(tmp_path / "u000002.tar")  # this process: still writing it
    other_host = tmp_path / f".u000003.tar.tmp-node7-{dead}"
    for p in (mine_dead, mine_live, other_host):
        p.write_bytes(b"")
    assert remove_stale_temps(tmp_path, others_may_write=True) == 1
    assert not mine_dead.exists() and mine_live.exists() and other_host.exists()
    assert remove_stale_temps(tmp_path) == 2  # holding the folder alone: every temp is stale


def test_refusal_is_a_convert_error(source, tmp_path):
    out = tmp_path / "corpus"
    with OutputLock(out, "python -m data_pipeline convert x --out corpus"):
        with pytest.raises(ConvertError, match="in use by another command"):
            convert(out, ConvertOptions([str(source)]), progress=False)


def _orphan_after_parent_dies(arm: bool) -> str:
    """A worker (``exit_with_parent`` armed or not) whose parent is SIGKILLed: 'gone' or 'orphaned'.
    The same call guards both converter pools (`convert.run_pool`, `plan.build_plan`)."""
    code = f"""
import os, signal, sys, time
from data_pipeline.child_processes import exit_with_parent
r, w = os.pipe()
parent = os.fork()
if parent == 0:  # the converter
    parent_pid = os.getpid()
    worker = os.fork()
    if worker == 0:
        if {arm}:
            exit_with_parent(parent_pid)
        os.write(w, str(os.getpid()).encode() + b"\\n")
        time.sleep(60)
        os._exit(0)
    time.sleep(60)
    os._exit(0)
worker = int(os.read(r, 64))
os.kill(parent, signal.SIGKILL)
os.waitpid(parent, 0)
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    try:
        state = open(f"/proc/{{worker}}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "Z"
    if state == "Z":
        print("gone")
        sys.exit(0)
    time.sleep(0.05)
os.kill(worker, signal.SIGKILL)
print("orphaned")
"""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_exit_with_parent_ends_a_worker_whose_parent_was_killed():
    assert _orphan_after_parent_dies(arm=False) == "orphaned"  # what the converter's workers did
    assert _orphan_after_parent_dies(arm=True) == "gone"


def test_a_worker_whose_parent_died_before_it_armed_exits_at_once():
    code = "from data_pipeline.child_processes import exit_with_parent; exit_with_parent(1 << 30); print('ran on')"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "ran on" not in r.stdout


def test_a_filesystem_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.warns(UserWarning, match="refuses file locks.*make sure no other command writes there"):
        with OutputLock(tmp_path / "corpus"):
            pass


def test_without_a_lock_only_old_temps_of_the_named_outputs_are_swept(tmp_path):
    """predict and fine-tuning sweep a user's folder without holding its lock: only the temps of
    their own files, of this host's dead processes, and unchanged for the given age."""
    import os
    import socket
    import time

    host, dead = socket.gethostname(), 2**22 + 12345  # above the default pid_max: no such process
    old_ours = tmp_path / f".out.h5ad.tmp-{host}-{dead}"
    new_ours = tmp_path / f".out.h5ad.tmp-{host}-{dead + 1}"
    old_other = tmp_path / f".theirs.h5ad.tmp-{host}-{dead}"
    for path in (old_ours, new_ours, old_other):
        path.write_bytes(b"partial")
    hour_ago = time.time() - 7200
    for path in (old_ours, old_other):
        os.utime(path, (hour_ago, hour_ago))
    assert remove_stale_temps(tmp_path, others_may_write=True, names={"out.h5ad"}, min_age_s=3600) == 1
    assert not old_ours.exists() and new_ours.exists() and old_other.exists()

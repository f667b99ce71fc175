"""Checkpoints of a run: DeepSpeed's files (model, optimizer, ZeRO shards, lr schedule) plus our
client state (step, loader position, metrics history), in ``RUN/checkpoints/step-NNNNNNNN``.

A checkpoint is complete once every rank has written its part and rank 0 has written the
``COMPLETE`` marker after a barrier; `complete_checkpoints` ignores any other folder, so a run
killed while saving resumes from the previous checkpoint. The marker (JSON) records the size and
xxh3 checksum of every file of the folder, the run's resolved config and its corpus's identity:
`problems` finds a checkpoint damaged after it was written (a truncated or missing file), and a
resumed run compares its config with the one that trained the checkpoint.

Loading trusts nothing it did not write only where that is possible: `load_state_file` and
`weights_only_loads` (export) unpickle with torch's weights-only unpickler, allowing tensors,
plain containers and the few DeepSpeed classes of its checkpoints. Resuming (`load`) goes through
DeepSpeed's own loader, which unpickles freely: resume only from checkpoint folders you trust.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import xxhash

from data_pipeline.conversion.fsio import atomic_write_with, fsync_tree
from data_pipeline.loading.loader import LoaderStateError

from .config import resume_changes
from .distributed import host_all_reduce

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_TAG = re.compile(r"step-(\d{8})")
# torch.load reads it on every call and then unpickles weights-only even where the caller (DeepSpeed's
# zero_to_fp32) passes weights_only=False
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class ResumeError(ValueError):
    """A resume refused before anything is written: no such, a damaged or an incompatible checkpoint."""


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def step_of(checkpoint: Path) -> int:
    return int(_TAG.fullmatch(Path(checkpoint).name).group(1))


def save(engine, run_dir: Path, step: int, client_state: dict, keep: int, record: dict | None = None) -> Path:
    """Collective: every rank calls it. ``record``: what a resume checks (`read_marker`), stored in
    the marker. Returns the checkpoint folder."""
    folder = Path(run_dir) / "checkpoints"
    tag = tag_of(step)
    if dist.get_rank() == 0:
        # a folder saved again (a run resumed past a damaged checkpoint of this step) is incomplete
        # until its new marker is written
        (folder / tag / MARKER).unlink(missing_ok=True)
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
    # on disk before the marker calls the checkpoint complete and older ones are deleted: each rank
    # flushes what it wrote (the others' files are clean here, their fsync costs little)
    fsync_tree(folder / tag)
    dist.barrier()
    if dist.get_rank() == 0:
        # every rank's files are in the folder (a shared filesystem) once all have passed the barrier
        marker = {"step": step, "files": file_digests(folder / tag), **(record or {})}
        atomic_write_with(folder / tag / MARKER, lambda fh: fh.write(json.dumps(marker).encode()))
        # only this run's past counts: a checkpoint of a later step (damaged, which the run resumed
        # before) neither takes a place among the kept nor is deleted before it is saved again
        earlier = [p for p in complete_checkpoints(run_dir) if step_of(p) <= step]
        for old in earlier[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder / tag


def _digest(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_digests(checkpoint: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "xxh3_64"}} of every file of a checkpoint folder but its marker."""
    return {str(p.relative_to(checkpoint)): {"bytes": p.stat().st_size, "xxh3_64": _digest(p)}
            for p in sorted(Path(checkpoint).rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.startswith(f".{MARKER}")}  # nor its temp files


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders (a marker; not checked against it, see `problems`), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _TAG.fullmatch(p.name) and (p / MARKER).exists())


def latest_complete(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_marker(checkpoint: Path) -> dict:
    """The marker's record: ``step``, ``files`` (absent in markers written before checksums),
    ``config`` and ``corpus`` (see `save`'s ``record``; absent in older markers)."""
    path = Path(checkpoint) / MARKER
    try:
        marker = json.loads(path.read_text() or "{}")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable checkpoint marker ({err})") from None
    if not isinstance(marker, dict):
        raise ValueError(f"{path}: unreadable checkpoint marker (not a JSON object)")
    return marker


def problems(checkpoint: Path) -> list[str]:
    """What is wrong with a complete checkpoint's files against its marker, one line per file (empty:
    intact, or a marker without checksums: see `has_checksums`)."""
    checkpoint = Path(checkpoint)
    try:
        files = read_marker(checkpoint).get("files") or {}
    except ValueError as err:
        return [str(err)]
    found = []
    for name, saved in sorted(files.items()):
        path = checkpoint / name
        if not path.is_file():
            found.append(f"{path} is missing")
        elif path.stat().st_size != saved["bytes"]:
            found.append(f"{path} has {path.stat().st_size} bytes, {saved['bytes']} when saved (truncated or replaced)")
        elif _digest(path) != saved["xxh3_64"]:
            found.append(f"{path} differs from when it was saved (xxh3 checksum mismatch)")
    return found


def has_checksums(checkpoint: Path) -> bool:
    try:
        return "files" in read_marker(checkpoint)
    except ValueError:
        return True  # unreadable: `problems` says so


def resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint a run resumes from, checked against its marker (call it on one rank: it reads
    every file). ``resume``: None (no resume), "auto" (the newest intact complete checkpoint of
    ``run_dir``, if any; damaged ones are skipped with a warning saying why) or a checkpoint
    folder (refused, naming the file, when damaged)."""
    if resume is None:
        earlier = complete_checkpoints(run_dir)
        if earlier:  # a fresh start here would mix two runs' checkpoints, and --resume auto then take the other's
            raise ResumeError(f"{run_dir} holds checkpoints of an earlier run (the newest {earlier[-1].name}): continue "
                              "it with --resume auto (or --resume CHECKPOINT), or train anew in another run.out")
        return None
    if resume != "auto":
        checkpoint = Path(resume)
        if not (checkpoint / MARKER).exists():
            raise ResumeError(f"--resume {checkpoint} is not a complete checkpoint (no {MARKER} marker): the run "
                             "was killed while writing it; resume from an earlier one (or --resume auto)")
        found = problems(checkpoint)
        if found:
            raise ResumeError(f"--resume {checkpoint}: the checkpoint is damaged: {'; '.join(found)}. Resume from "
                             "an earlier checkpoint of the run (or --resume auto, which skips damaged ones)")
        _note_unverified(checkpoint)
        return checkpoint
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        found = problems(checkpoint)
        if not found:
            _note_unverified(checkpoint)
            return checkpoint
        logger.warning(f"--resume auto: skipping the damaged checkpoint {checkpoint} ({'; '.join(found)}); "
                       "trying the one before it")
    if complete_checkpoints(run_dir):
        # not a silent start over (a requeued job would discard the run): the user decides
        raise ResumeError(f"--resume auto: every complete checkpoint in {Path(run_dir) / 'checkpoints'} is damaged "
                          "(each named above): nothing to resume. Restore one, start afresh in another run.out, or "
                          "move the checkpoints folder away and start without --resume")
    return None


def set_aside_later(run_dir: Path, step: int) -> list[Path]:
    """Move the run's checkpoint folders of steps after ``step`` (the one it resumed from) into
    ``checkpoints/set-aside/``: the steps of a branch the resume abandoned (an earlier checkpoint
    resumed on purpose, or damaged ones --resume auto skipped), which a later --resume auto would
    otherwise take. Moved, not deleted.  -> their new paths"""
    folder = Path(run_dir) / "checkpoints"
    later = sorted(p for p in folder.iterdir() if p.is_dir() and _TAG.fullmatch(p.name) and step_of(p) > step) \
        if folder.is_dir() else []
    moved = []
    if later:
        (folder / "set-aside").mkdir(exist_ok=True)
    for old in later:
        moved.append(folder / "set-aside" / f"{old.name}-{int(time.time())}")
        os.replace(old, moved[-1])
    if moved:
        logger.warning(f"resumed at step {step}: the run's later checkpoints ({', '.join(p.name for p in later)}) "
                       f"belong to the branch this resume leaves; moved to {folder / 'set-aside'} so that --resume auto "
                       "does not take them (delete them when no longer wanted)")
    return moved


def _note_unverified(checkpoint: Path) -> None:
    if not has_checksums(checkpoint):
        logger.warning(f"{checkpoint}: its marker has no checksums (written before they were recorded), so its "
                       "files are loaded unchecked")


def load(engine, checkpoint: Path) -> dict:
    """Restore engine state from ``checkpoint`` (DeepSpeed's loader: it unpickles the files freely, so
    the checkpoint folder is trusted); returns the client state."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / MARKER).exists():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {MARKER} marker): "
                         "the run was killed while writing it; resume from an earlier one")
    _, client_state = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if client_state is None:
        raise ValueError(f"{checkpoint}: DeepSpeed could not load it")
    return client_state


# --- the trainer's side: where to resume, what to restore, when to save ---------------------------

class StopSignal:
    """SIGTERM / SIGINT (cluster preemption, Ctrl-C) ask for a checkpoint and a clean exit; the
    ranks agree on it in `Checkpointer.agree`."""

    def __init__(self):
        self.requested = False
        self.before = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            # a second Ctrl-C stops at once: a run stuck in a collective or a data wait never reaches the vote
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        """The handlers from before (the run is over: a caller's own Ctrl-C works again)."""
        for sig, handler in self.before.items():
            signal.signal(sig, handler)


class Checkpointer:
    """A run's checkpoints as the training loop uses them (every rank holds one): the resume point
    (`resume_point`, before anything is written), the restore of the client state (step, loader
    position, metrics history, skipped steps), the stop vote and the save cadence: every
    ``run.checkpoint_every``-th step, at a stop vote, and at the end (`finish`)."""

    def __init__(self, engine, loader, run_dir: Path, run, record: dict):
        """``run``: the `pretrain.config.RunConfig`; ``record``: what the markers record (`save`)."""
        self.engine, self.loader, self.run_dir, self.run, self.record = engine, loader, Path(run_dir), run, record
        self.stop = StopSignal()
        self.last_saved = 0

    @staticmethod
    def resume_point(run_dir: Path, resume: str | None, config, record: dict, rank: int) -> Path | None:
        """The checkpoint to resume from, intact and trained with a config this run may change into
        (`pretrain.config.resume_changes`; the changes applied are said): `agreed_resume_point`."""
        return agreed_resume_point(run_dir, resume, rank, lambda found: _check_resumed_config(found, config, record))

    def load(self, found: Path | None, restart_epoch: bool = False) -> tuple[int, list[dict], int]:
        """Restore the engine and the loader from ``found`` (None: a fresh start); returns (step,
        metrics history, skipped steps). ``restart_epoch``: a loader position taken under another
        layout (world size, loader workers, token cost), or saved before loader state version 2 (another
        block order), starts its epoch over instead of being refused."""
        if found is None:
            return 0, [], 0
        state = load(self.engine, found)
        try:
            self.loader.load_state_dict(state["loader"], restart_epoch=restart_epoch)
        except LoaderStateError as err:
            if not err.restartable:
                raise ResumeError(f"--resume {found}: {err}: this run cannot continue that checkpoint's cell order "
                                  "(--restart-epoch would not help); resume with the corpus, seed, data settings "
                                  "and version that saved it, or start a new run in another run.out") from None
            raise ResumeError(f"--resume {found}: {err}. From launch/pretrain.py: add --restart-epoch (the "
                              "interrupted epoch starts over: its cells seen before the interruption are seen "
                              "again), or resume with the settings that saved it where the error names them") from None
        self.last_saved = state["step"]
        if dist.get_rank() == 0:
            logger.info(f"resumed from {found} (step {state['step']})")
            set_aside_later(self.run_dir, state["step"])
        dist.barrier()
        return state["step"], state["history"], state["skipped"]

    def agree(self, counts) -> tuple:
        """The step's `pretrain.objectives.StepCounts` summed over ranks, and whether any rank was asked
        to stop: one CPU all-reduce, no device sync. Taken when a step's batches are in hand, so a
        signal stops the run after the step that follows it (that step's cells are already drawn)."""
        *summed, votes = host_all_reduce([*counts.as_list(), float(self.stop.requested)])
        return type(counts)(*summed), votes > 0

    def maybe_save(self, step: int, stop: bool, log) -> bool:
        """Save at the cadence or a stop vote; ``log``: the run's `pretrain.metrics.StepLog`, read
        first (the history goes into the checkpoint). Returns whether it saved."""
        every = self.run.checkpoint_every
        if stop or (every and step % every == 0):
            self.save(step, log)
            return True
        return False

    def finish(self, step: int, log) -> None:
        """The run's last checkpoint, unless this step has one."""
        if self.last_saved != step:
            self.save(step, log)

    def save(self, step: int, log) -> Path:
        log.read()
        # "skipped_steps" is DeepSpeed's own key in a checkpoint's client state
        state = {"step": step, "loader": self.loader.state_dict(), "history": log.history, "skipped": log.skipped}
        folder = save(self.engine, self.run_dir, step, state, self.run.keep_checkpoints, self.record)
        self.last_saved = step
        log.restart_clock()  # a save is no training time
        return folder


def agreed_resume_point(run_dir: Path, resume: str | None, rank: int, check=None) -> Path | None:
    """`resume_point` on rank 0, then ``check(found)`` there (raises ValueError to refuse it); every
    rank gets the answer, or raises the `ResumeError`. Collective: every rank calls it."""
    answer: list = [None]
    if rank == 0:
        try:
            found = resume_point(run_dir, resume)
            if found is not None and check is not None:
                check(found)
            answer = [("ok", None if found is None else str(found))]
        except ValueError as err:
            answer = [("error", str(err))]
        except OSError as err:  # a shared filesystem's error: every rank hears it, none waits in the broadcast
            answer = [("error", f"--resume: reading the checkpoints of {run_dir} failed: {err}")]
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise ResumeError(value)
    return None if value is None else Path(value)


def _check_resumed_config(found: Path, config, record: dict) -> None:
    marker = read_marker(found)
    if "config" not in marker:
        logger.warning(f"{found} records no config (saved before configs were recorded): a changed key is not "
                       "detected; resume with the config that trained it")
        return
    refused, applied = resume_changes(marker["config"], config)
    corpus = marker.get("corpus")
    if corpus is not None and corpus != record["corpus"]:
        refused.insert(0, f"data.corpus: trained on the corpus with plan hash {corpus['plan_hash']}, now "
                          f"{config.data.corpus} with plan hash {record['corpus']['plan_hash']} "
                          "(the loader's position and the vocabulary are that corpus's)")
    if refused:
        raise ResumeError(f"--resume {found}: the config changes keys a resumed run cannot change: "
                          + "; ".join(refused) + f". Resume with the checkpoint's values (its config is in "
                          f"{found / MARKER}), or train a new run (another run.out, no --resume)")
    if applied:
        logger.warning(f"resuming {found} with changed keys, applied from its step on: " + "; ".join(applied))


# --- weights-only loading (export) -----------------------------------------------------------------

def _deepspeed_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoint files (the ZeRO optimizer states), beyond
    tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads():
    """Inside, every ``torch.load`` (DeepSpeed's included, which asks for full unpickling) uses
    torch's weights-only unpickler with `_deepspeed_globals` allowed: a file that needs anything
    else (code a planted ``__reduce__`` would run) raises `pickle.UnpicklingError`."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def load_state_file(path: Path):
    """One file of a checkpoint, unpickled weights-only (tensors memory-mapped, not read)."""
    with weights_only_loads():
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            # torch's message: advice to load weights_only=False (wrong here), then the refused global
            match = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please|\n|$)", str(err))
            detail = match.group(1) if match else str(err).splitlines()[0]
            raise ValueError(f"{path}: refused to unpickle it: it asks for more than tensors and DeepSpeed's "
                             f"checkpoint types ({detail}). A checkpoint this project wrote never does: it was "
                             "edited or comes from elsewhere; export only checkpoints of runs you trust") from None

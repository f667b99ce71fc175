"""`CellLoader`: corpus shards -> normalized, masked, length-grouped `PackedBatch` streams.

Per epoch, `epoch_plan.EpochPlan` decides from the corpus index alone which cells form which
batch on which rank and DataLoader worker (every cell once per epoch, the same number of batches
on every rank, token budgets kept). Each rank's loader computes the plan once per epoch, in its
own process (it needs the batch count for ``len()``), and hands the part that passes over every
cell, its megabatches' batch counts, to its workers in a small shared-memory array: a worker
rebuilds the rest (O(blocks)) and cuts only its own stream's megabatches, so no cell is planned
twice in a rank. Each worker then reads only the blocks of its megabatches (random access
through the manifest's block records, each block checked before use: checksum, structure,
agreement with its record and ``cell_lengths.npy``; a damaged one stops the loader with a
`CorpusError` naming it), gathers their cells in batch order, makes the contrastive views,
normalizes, masks, and cuts the megabatch into batches; all of it vectorized over the megabatch.
Random draws come from generators seeded by (seed, epoch, megabatch), so a megabatch gives the
same batches whichever process makes it and whenever.

Resume: ``state_dict()`` records the epoch and how many batches this rank has yielded in it; a
loader given that state (same corpus, seed, world size and worker count) yields exactly the
batches that would have followed. With another world size or worker count the epoch's layout
differs, so `load_state_dict` refuses the state unless ``restart_epoch=True``: the interrupted
epoch then starts over under the new layout (cells of that epoch before the interruption are
seen again; later epochs are unaffected). A state of version 1 (before the block order had its
own random stream) is refused mid-epoch the same way.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from numba import njit
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..child_processes import leave_stop_signals_to_parent
from ..conversion.vocab import gene_token_range
from ..corpus import BlockReader, BlockTable, Corpus
from ..remote import is_url
from .batch import PackedBatch
from .batching import TokenCost
from .epoch_plan import (
    MASKED_ZEROS,
    VIEWS_AND_MASKING,
    Batching,
    EpochPlan,
    megabatch_count,
    stream_key,
    worker_skip,
)
from .masking import Masking, Views, make_views, mask_for_mode
from .normalize import Normalization, Normalized, normalize
from .read_depth import Downsampling, downsample
from .zero_masking import add_masked_zeros

STATE_VERSION = 2  # 2: the block order has its own random stream (epoch_plan.stream_key); 1's epochs differ
DEFAULT_MASKING = Masking()  # 15 % of each cell's genes; 80 % mask id, 10 % random, 10 % kept


class LoaderStateError(ValueError):
    """A saved loader position this loader cannot continue. ``restartable``: starting the saved
    epoch over (``restart_epoch=True``) would do (another layout or token cost); otherwise the
    state is of another corpus, seed, batching or state version, and only those would."""

    def __init__(self, message: str, restartable: bool):
        super().__init__(message)
        self.restartable = restartable


def rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's (when initialized), else ``RANK``/``WORLD_SIZE``
    from the environment (set by the deepspeed and torchrun launchers), else (0, 1). One of the two
    alone is refused: the other taken from elsewhere could make every process read the same cells."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if rank is not None or world_size is not None:
        raise ValueError(f"rank={rank}, world_size={world_size}: pass both (this process's rank among world_size "
                         "readers), or neither to take them from torch.distributed or RANK / WORLD_SIZE")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _Spec:
    """What every process needs to make its batches (picklable; arrays loaded lazily)."""

    def __init__(self, corpus: Corpus, normalization: Normalization, batching: Batching, masking: Masking | None,
                 views: Views | None, seed: int, rank: int, world_size: int, streams_per_rank: int,
                 token_cost: TokenCost, label_columns: list[int] | None = None,
                 downsampling: Downsampling | None = None):
        self.corpus = corpus
        self.check_blocks = True  # False only in benchmarks/bench_loader.py, to measure what the checks cost
        # False: every worker computes the whole epoch plan itself, the loader shares nothing (the
        # reference path tests compare the shared plan with)
        self.share_plan = True
        self.normalization, self.batching, self.masking, self.views = normalization, batching, masking, views
        self.downsampling = downsampling
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.streams_per_rank, self.token_cost = streams_per_rank, token_cost
        # the cost without the full-gene-set floor: what `_check_cell_lengths` compares, since a cost
        # that is the full gene set for every cell cannot tell a block's lengths from the index's
        self.length_cost = replace(token_cost, full_length=None)
        self.vocab_size = corpus.vocab_size
        special = corpus.special_tokens
        if "<mask>" not in special:
            raise ValueError(f"{corpus.path}: the vocabulary has no <mask> token (special tokens: {special})")
        self.mask_token = special["<mask>"]
        self.gene_range = gene_token_range(special.values(), corpus.vocab_size)  # [low, high) of the gene tokens
        n_columns = len(corpus.label_columns)
        self.label_columns = list(range(n_columns)) if label_columns is None else list(label_columns)
        if any(not 0 <= c < n_columns for c in self.label_columns):
            raise ValueError(f"label_columns={label_columns}: the corpus has {n_columns} label columns")
        self.n_label_columns = len(self.label_columns)
        # here, not in a worker: a malformed index or a shard outside the corpus fails at once
        self._table = self.corpus.block_table()
        self._cost = self._checked = None

    @property
    def table(self) -> BlockTable:
        if self._table is None:
            self._table = self.corpus.block_table()
        return self._table

    @property
    def cost(self) -> np.ndarray:
        """Tokens each cell takes in a batch (`TokenCost.cells`).  [N] int32"""
        if self._cost is None:
            self._cost = self.token_cost.cells(self.corpus.cell_lengths())
        return self._cost

    @property
    def checked(self) -> np.ndarray:
        """`length_cost` of every cell (the cost array itself unless there is a full-gene-set floor).  [N]"""
        if self.token_cost.full_length is None:
            return self.cost
        if self._checked is None:
            self._checked = self.length_cost.cells(self.corpus.cell_lengths())
        return self._checked

    def plan(self, epoch: int, batch_counts: np.ndarray | None = None) -> EpochPlan:
        """The plan of ``epoch``; ``batch_counts``: its megabatches' batch counts, computed by the
        loader's own process (None: computed here, a pass over every cell)."""
        return EpochPlan(self.table, self.cost, self.batching, self.seed, epoch, self.world_size,
                         self.streams_per_rank, self.token_cost.padded, batch_counts=batch_counts)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_table"] = state["_cost"] = state["_checked"] = None  # rebuilt in the worker rather than pickled
        return state


class _EpochStream(IterableDataset):
    """The rest of one epoch of one rank: ``control`` (shared with the workers, which persist
    from epoch to epoch) holds the epoch, how many of its batches the rank has had, and the epoch
    whose plan ``counts`` holds (-1: none). ``counts`` [K] (shared memory, with workers only): the
    epoch plan's ``batch_counts``, written by `CellLoader` before each epoch, so that workers
    rebuild the plan without computing them; ``plan``: the plan itself, for batches made in the
    loader's own process (not sent to workers). In a DataLoader, worker w makes stream
    ``rank * W + w`` and the DataLoader's round-robin over workers gives the rank's order."""

    def __init__(self, spec: _Spec, control, rings: list | None = None, counts=None):
        self.spec, self.control, self.rings, self.counts = spec, control, rings, counts
        self.plan: EpochPlan | None = None
        self._slot = -1

    def __getstate__(self):
        return {**self.__dict__, "plan": None}  # a spawned worker rebuilds it from ``counts``

    def _plan(self, epoch: int, in_worker: bool) -> EpochPlan:
        if not in_worker:
            return self.plan if self.plan is not None and self.plan.epoch == epoch else self.spec.plan(epoch)
        counts = None
        if self.counts is not None and int(self.control[2]) == epoch:
            counts = np.frombuffer(self.counts, np.int64).copy()
            if int(self.control[2]) != epoch:  # rewritten meanwhile (an iteration dropped at its start)
                counts = None
        return self.spec.plan(epoch, counts)

    def __iter__(self):
        # in this CellLoader's own DataLoader worker (not in some outer one, nor in-process)
        info = get_worker_info() if self.rings is not None else None
        spec = self.spec
        epoch, start = int(self.control[0]), int(self.control[1])
        # the DataLoader asks its workers round-robin from worker 0: after ``start`` batches the
        # next one is due from stream ``start % W``, so worker 0 plays that stream, and so on
        worker = ((info.id if info is not None else 0) + start) % spec.streams_per_rank
        plan = self._plan(epoch, info is not None)
        skip = worker_skip(start, spec.streams_per_rank, worker)
        reader = BlockReader(spec.corpus, spec.table, spec.check_blocks)
        try:
            for m in plan.iter_stream_megabatches(spec.rank * spec.streams_per_rank + worker):
                if skip >= m.n_batches:
                    skip -= m.n_batches
                    continue
                for batch in _megabatch_batches(spec, plan, m, reader, first=skip, epoch=epoch):
                    yield self._send(info.id, batch) if info is not None else batch
                skip = 0
        finally:
            reader.close()


    def _send(self, worker: int, batch: PackedBatch) -> tuple:
        """Write ``batch`` into this worker's next ring buffer (shared memory the consumer mapped
        when the workers started) and return what says where: ``(worker, slot, header)``.

        The DataLoader asks a worker for at most ``prefetch_factor`` batches beyond the one the
        consumer has just received, and `CellLoader` copies that one out before asking for more,
        so a ring of ``prefetch_factor + 2`` buffers is never overwritten while in use. Sending
        a slot number instead of a tensor spares a shared-memory handshake per batch."""
        ring = self.rings[worker]
        self._slot = (self._slot + 1) % len(ring)
        if batch.wire_bytes() > ring[self._slot].numel():
            raise RuntimeError("a batch outgrew its ring buffer: wire_bytes_bound is wrong")
        _, header = batch.to_wire(ring[self._slot])
        return worker, self._slot, header


def wire_bytes_bound(token_budget: int, n_label_columns: int, max_seqs: int | None = None) -> int:
    """Most bytes `PackedBatch.to_wire` can need: at most ``token_budget`` tokens (8-byte ids,
    values, targets; 1-byte mask) in at most ``max_seqs`` (default ``token_budget``) sequences
    (4-byte cu_seqlens; 8-byte view and cell index and labels; two 4-byte read depths), each array padded to 8 bytes."""
    seqs = token_budget if max_seqs is None else min(max_seqs, token_budget)
    return token_budget * 25 + (seqs + 1) * 4 + seqs * 8 * (3 + n_label_columns) + 8 * 10


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse in this process: large arrays (a megabatch's are
    tens of MB, a batch's copy a few MB) otherwise get fresh pages from the kernel at every
    allocation, and first touches of fresh pages cost more than the loader's own work on a VM
    measured here (`benchmarks/results/loader.json`). Sets the mmap threshold to 1 GB and the
    trim threshold to 2 GB. Returns False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, (1 << 31) - 1))  # MMAP, TRIM
    except (OSError, AttributeError):
        return False


def _worker_init(_: int) -> None:
    # a scheduler's SIGTERM to the whole job must reach the trainer, not end its workers (which
    # DataLoader reports as a crash, before the trainer could checkpoint)
    leave_stop_signals_to_parent()
    tune_malloc()


def _gather(blocks: list, first_cells: np.ndarray, cells: np.ndarray):
    """Rows ``cells`` (global indices) of ``blocks`` (whose first cells are ``first_cells``, sorted)
    as CSR arrays in that order: indptr, genes (int64, as batches carry them: widened while copied
    rather than in a pass of their own), counts, total_counts, labels. Each block's rows are copied
    straight from its arrays (no concatenation of the blocks first: that would copy every entry
    twice, and the copies are most of the loader's time in the unnormalized modes)."""
    which = np.searchsorted(first_cells, cells, side="right") - 1
    local = cells - first_cells[which]
    lengths = np.empty(len(cells), np.int64)
    members = [np.flatnonzero(which == k) for k in range(len(blocks))]
    for b, at in zip(blocks, members):
        lengths[at] = np.diff(b.indptr)[local[at]]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    genes = np.empty(int(indptr[-1]), np.int64)
    counts = np.empty(int(indptr[-1]), np.result_type(*(b.counts.dtype for b in blocks)))
    for b, at in zip(blocks, members):
        if len(at):
            _gather_rows(np.asarray(b.indptr, np.int64), local[at], indptr[at], lengths[at], b.genes, b.counts, genes,
                         counts)
    totals = np.concatenate([b.total_counts for b in blocks])
    labels = np.concatenate([b.labels.reshape(b.n_cells, -1) for b in blocks])
    row_base = np.concatenate([[0], np.cumsum([b.n_cells for b in blocks])])
    rows = row_base[which] + local
    return indptr, genes, counts, totals[rows], labels[rows].astype(np.int64)


@njit(cache=True, nogil=True)
def _gather_rows(src_indptr, rows, dest, lengths, src_genes, src_counts, genes, counts):  # pragma: no cover
    """Row ``rows[i]`` of one block (``src_indptr``) to ``dest[i]`` onwards, ``lengths[i]`` entries."""
    for i in range(len(rows)):
        a, d, n = src_indptr[rows[i]], dest[i], lengths[i]
        genes[d : d + n] = src_genes[a : a + n]
        counts[d : d + n] = src_counts[a : a + n]


def _values_at(full: Normalized, subset: Normalized) -> np.ndarray:
    """``full``'s values at ``subset``'s entries: the same cells, each with a subset of its genes
    (ascending in both).  [len(subset.genes)]"""
    width = int(max(full.genes.max(initial=0), subset.genes.max(initial=0))) + 1
    key = np.repeat(np.arange(len(full.indptr) - 1), np.diff(full.indptr)) * width + full.genes
    wanted = np.repeat(np.arange(len(subset.indptr) - 1), np.diff(subset.indptr)) * width + subset.genes
    return full.values[np.searchsorted(key, wanted)]


def _check_zero_masking(spec: _Spec) -> None:
    """Masked unexpressed genes (`zero_masking`) are continuous zeros, and tokens beyond a cell's
    expressed genes, which only a cost of the full gene set per cell keeps within the budget."""
    if spec.normalization.mode != "continuous":
        raise ValueError(f"masking unexpressed genes gives them the continuous target 0, but the normalization is "
                         f"{spec.normalization.mode}: use normalization continuous (data.normalization=continuous) "
                         "or turn it off (data.mask_zero_prob=0)")
    n_genes, token_cost = spec.gene_range[1] - spec.gene_range[0], spec.token_cost
    if token_cost.full_length is None or token_cost.full_length < n_genes:
        raise ValueError(f"masking unexpressed genes adds tokens to a cell, up to the {n_genes} genes of the "
                         f"vocabulary, but the token cost counts a cell as {token_cost.full_length or 'its expressed'} "
                         "genes: build the token cost of a model that runs the full gene set (ModelConfig.token_cost "
                         "of architecture=encoder_decoder) or turn it off (data.mask_zero_prob=0)")


def _check_cell_lengths(spec: _Spec, block_ids: np.ndarray, blocks: list) -> None:
    """The plan cut batches by ``cell_lengths.npy``; blocks whose genes per cell disagree with it
    (an edited or stale index) would not give the batches planned, and could overrun the token
    budget. Compared below the cap, also where every cell costs the full gene set."""
    for b, block in zip(block_ids, blocks):
        first = int(spec.table.first_cell[b])
        if not np.array_equal(spec.length_cost.cells(np.diff(block.indptr)), spec.checked[first : first + block.n_cells]):
            raise spec.corpus.damaged(spec.table, int(b), f"its genes per cell disagree with "
                                      f"{spec.corpus.cell_lengths_file}")


def _megabatch_batches(spec: _Spec, plan: EpochPlan, m, reader: BlockReader, first: int, epoch: int):
    """The batches of megabatch ``m`` from its batch ``first`` on."""
    block_ids = np.sort(plan.blocks_of(m.index))
    blocks = [reader.read(int(b)) for b in block_ids]
    if reader.check:
        _check_cell_lengths(spec, block_ids, blocks)
    indptr, genes, counts, totals, labels = _gather(blocks, spec.table.first_cell[block_ids], m.cells)
    labels = labels[:, spec.label_columns]
    rng = np.random.default_rng(stream_key(spec.seed, epoch, m.index, VIEWS_AND_MASKING))
    per_cell = 1
    if spec.views is not None:
        indptr, genes, counts, totals = make_views(spec.views, indptr, genes, counts, totals, rng)
        per_cell = 2
    input_totals, original = totals, None
    stored_ptr, stored_genes = indptr, genes  # the genes with a count, before the cap and downsampling
    if spec.downsampling is not None:  # read-depth-aware: a lower-depth input, the original as the target
        counts_in, input_totals, _ = downsample(spec.downsampling, indptr, counts, totals, rng)
        # every stored gene's original value (continuous: a gene's value needs only its count and the
        # total), taken below at the genes the input keeps: a cap of the thinned counts' top genes is
        # not the original counts' top genes
        original = normalize(replace(spec.normalization, max_genes=None), indptr, genes, counts, totals)
        counts = counts_in
    norm = normalize(spec.normalization, indptr, genes, counts, input_totals, rng)
    values, genes, seq_ptr = norm.values, norm.genes, norm.indptr
    if original is not None:  # the input kept a subset of the genes (a cap): the originals at those
        original = original.values if len(original.genes) == len(genes) else _values_at(original, norm)
    if spec.masking is not None:
        genes, values, mlm, targets = mask_for_mode(spec.masking, spec.normalization.mode, spec.normalization.n_bins,
                                                    norm.indptr, genes, values, spec.mask_token,
                                                    spec.gene_range, rng)
        if original is not None:
            targets = original
        if spec.masking.zero_prob:  # its own generator: the draws above stay what they are without it
            seq_ptr, genes, values, mlm, targets = add_masked_zeros(
                spec.masking.zero_prob, stored_ptr, stored_genes, norm.indptr, genes, values, mlm, targets,
                spec.gene_range, np.random.default_rng(stream_key(spec.seed, epoch, m.index, MASKED_ZEROS)))
    else:
        mlm = np.zeros(len(genes), bool)
        targets = np.zeros_like(values)
    read_depth = np.stack([totals, input_totals], axis=1).astype(np.float32)  # [n_seqs, 2]: T, S
    # per sequence, for the whole megabatch; batches below are views of these arrays (a worker
    # copies each into its ring buffer, so views cost no copy of their own)
    genes = genes.astype(np.int64, copy=False)
    seq_labels = np.repeat(labels, per_cell, axis=0)
    seq_cells = np.repeat(m.cells, per_cell)
    seq_view = np.arange(len(seq_cells), dtype=np.int64) // per_cell
    for j in range(first, m.n_batches):
        c0, c1 = int(m.bounds[j]), int(m.bounds[j + 1])
        s0, s1 = c0 * per_cell, c1 * per_cell
        t0, t1 = int(seq_ptr[s0]), int(seq_ptr[s1])
        cu = (seq_ptr[s0 : s1 + 1] - t0).astype(np.int32)
        yield PackedBatch(
            gene_ids=torch.from_numpy(genes[t0:t1]),
            values=torch.from_numpy(values[t0:t1]),
            cu_seqlens=torch.from_numpy(cu),
            max_seqlen=int((cu[1:] - cu[:-1]).max(initial=0)),
            mlm_mask=torch.from_numpy(mlm[t0:t1]),
            mlm_targets=torch.from_numpy(targets[t0:t1]),
            labels=torch.from_numpy(seq_labels[s0:s1]),
            view_index=torch.from_numpy(seq_view[s0:s1] - c0),
            cell_index=torch.from_numpy(seq_cells[s0:s1]),
            read_depth=torch.from_numpy(read_depth[s0:s1]),
        )


class CellLoader:
    """Batches of a corpus for one rank, epoch after epoch.

    ``corpus``: a `Corpus` (or its folder). ``normalization`` (default log1p_cp10k in 51 bins; rank mode
    without medians takes them from the corpus's ``stats.zarr``), ``batching`` (token budget,
    megabatch size), ``masking`` (None: no masked-expression targets), ``views`` (None: one
    sequence per cell; else two views per cell, linked by ``view_index``). ``rank`` /
    ``world_size``: default from torch.distributed or the launcher's environment.
    ``num_workers``: DataLoader worker processes (0: batches made in this process).
    ``token_cost``: what a cell costs against the token budget and how a batch's cells add up
    (`batching.TokenCost`, from the model: ``ModelConfig.token_cost`` in `pretrain`); its ``cap``
    and ``views`` must be the normalization's ``max_genes`` and the views' 2 (or 1). Default: the
    capped length plus ``extra_tokens_per_cell`` (e.g. 1 for ``<cls>``), per view, summed.
    ``label_columns``: the corpus label columns a batch's ``labels`` hold, by position (default all).
    ``masking.zero_prob``: that share of each cell's unexpressed genes masked too, as extra tokens
    (`zero_masking`): continuous normalization and a token cost of the full gene set only.
    ``downsampling``: read-depth-aware pretraining (`read_depth.Downsampling`; continuous
    normalization only): inputs at a lower depth, targets at the original. Every batch carries
    ``read_depth`` (T, S) per sequence.
    ``malloc_tuning``: `tune_malloc` in this process too (the
    workers always do). Iterating gives one epoch; the next iteration the next epoch.
    """

    def __init__(self, corpus: Corpus | str | Path, normalization: Normalization | None = None,
                 batching: Batching | None = None, masking: Masking | None = DEFAULT_MASKING, views: Views | None = None,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 4, extra_tokens_per_cell: int = 0,
                 token_cost: TokenCost | None = None, malloc_tuning: bool = True, label_columns: list[int] | None = None,
                 downsampling: Downsampling | None = None):
        if not isinstance(corpus, Corpus):
            # a URL's own errors (nothing there, no filesystem for the protocol, server down) are clearer:
            # Corpus raises them
            if not is_url(corpus) and not Corpus.is_finished(corpus):
                raise ValueError(f"{corpus}: no manifest.json; pass a finished corpus folder "
                                 "(`python -m data_pipeline convert ... --out CORPUS`)")
            corpus = Corpus(corpus)
        normalization = normalization or Normalization()
        if normalization.mode == "rank" and normalization.medians is None:
            normalization = Normalization(**{**asdict(normalization), "medians": corpus.medians()})
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("CellLoader(pin_memory=True) without CUDA: pinned memory needs an accelerator, "
                          "so batches are left unpinned", stacklevel=2)
            pin_memory = False
        if malloc_tuning:
            tune_malloc()  # workers always do
        rank, world_size = rank_and_world_size(rank, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.corpus = corpus
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        n_views = 1 if views is None else 2
        if token_cost is None:
            token_cost = TokenCost(normalization.max_genes, extra_tokens_per_cell, n_views)
        elif (token_cost.cap, token_cost.views) != (normalization.max_genes, n_views):
            raise ValueError(f"token_cost counts cells capped at {token_cost.cap} genes in {token_cost.views} view(s), "
                             f"but the loader caps them at max_genes={normalization.max_genes} and makes {n_views}: "
                             "build the token cost from the same normalization and views")
        if downsampling is not None and normalization.mode != "continuous":
            raise ValueError(f"read-depth downsampling predicts the original cell's continuous values, but the "
                             f"normalization is {normalization.mode}: use normalization continuous (data.normalization="
                             "continuous) or turn downsampling off (data.downsample_prob=0)")
        self.spec = _Spec(corpus, normalization, batching or Batching(), masking, views, seed, rank, world_size,
                          max(1, num_workers), token_cost, label_columns, downsampling)
        if masking is not None and masking.zero_prob:
            _check_zero_masking(self.spec)
        if self.spec.table.checksum is None:
            warnings.warn(f"{corpus.path}: a corpus of schema {corpus.schema_version} has no block "
                          "checksums, so damaged blocks are caught only by structural checks: reconvert to "
                          "get block checksums", stacklevel=2)
        vocab_size = self.spec.vocab_size
        if normalization.medians is not None and len(normalization.medians) != vocab_size:
            raise ValueError(f"{len(normalization.medians)} medians for a vocabulary of {vocab_size} tokens")
        self.epoch = 0
        self.batches_done = 0  # in the current epoch, by this rank
        self._control = multiprocessing.Array("q", 3, lock=False)  # read by the workers at each epoch
        self._control[2] = -1
        rings = counts = None
        if num_workers:
            # a batch holds at most budget // (cheapest cell's cost) cells: few where every cell
            # costs the full gene set, so the rings need not have room for a sequence per token
            budget, cells = self.spec.batching.token_budget, self.spec.batching.max_batch_cells
            most = budget // max(1, int(self.spec.cost.min(initial=budget)))
            seqs = (2 if views else 1) * min(most, cells or most)
            slot = wire_bytes_bound(budget, self.spec.n_label_columns, seqs)
            rings = [[torch.empty(slot, dtype=torch.uint8).share_memory_() for _ in range(prefetch_factor + 2)]
                     for _ in range(num_workers)]
            # the epoch plan's batch counts for the workers (K is the same every epoch): 8 bytes a
            # megabatch, ~100 KB at 100M cells; freed with the loader, like the rings
            k = megabatch_count(self.spec.table.n_cells, self.spec.batching, world_size * num_workers)
            counts = multiprocessing.Array("q", k, lock=False)
        self._stream = _EpochStream(self.spec, self._control, rings, counts)
        self._dataloader = None
        self._plan: EpochPlan | None = None  # of the current epoch, computed once

    def epoch_plan(self) -> EpochPlan:
        """This rank's plan of the current epoch, computed at most once per epoch (here, in the
        loader's process; workers get its batch counts rather than computing them again)."""
        if self._plan is None or self._plan.epoch != self.epoch:
            self._plan = self.spec.plan(self.epoch)
        return self._plan

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.epoch_plan().batches_per_stream * self.spec.streams_per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = epoch, 0

    def __iter__(self):
        if self.batches_done >= len(self):  # a state saved after the epoch's last batch
            self.set_epoch(self.epoch + 1)
        plan = self.epoch_plan()
        self._stream.plan = plan if self.spec.share_plan else None
        self._control[2] = -1  # while the counts are rewritten
        if self._stream.counts is not None and self.spec.share_plan:  # before the workers start the epoch
            np.frombuffer(self._stream.counts, np.int64)[:] = plan.batch_counts
            self._control[2] = self.epoch
        self._control[0], self._control[1] = self.epoch, self.batches_done
        if self.num_workers == 0:
            source = iter(self._stream)
        else:
            if self._dataloader is None:
                self._dataloader = DataLoader(self._stream, batch_size=None, num_workers=self.num_workers,
                                              prefetch_factor=self.prefetch_factor, persistent_workers=True,
                                              worker_init_fn=_worker_init)
            source = iter(self._dataloader)
        for batch in source:
            if self.num_workers:  # copied out of the worker's ring buffer before the next request
                worker, slot, header = batch
                buf = self._stream.rings[worker][slot]
                batch = PackedBatch.from_wire(buf.pin_memory() if self.pin_memory else buf.clone(), header)
            elif self.pin_memory:
                batch = batch.pin_memory()
            self.batches_done += 1
            yield batch
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        s = self.spec
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches_done": self.batches_done, "seed": s.seed,
                "world_size": s.world_size, "streams_per_rank": s.streams_per_rank,
                "corpus": s.corpus.plan_hash, "batching": asdict(s.batching), "token_cost": asdict(s.token_cost)}

    def load_state_dict(self, state: dict, restart_epoch: bool = False) -> None:
        s = self.spec
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise LoaderStateError(f"loader state version {version} is not {STATE_VERSION} (saved by another version "
                                   "of the loader)", restartable=False)
        if state["corpus"] != s.corpus.plan_hash:
            raise LoaderStateError("the loader state is from another corpus", restartable=False)
        if state["seed"] != s.seed or state["batching"] != asdict(s.batching):
            raise LoaderStateError("the loader state was taken with another seed or batching; pass the same ones",
                                   restartable=False)
        # states saved before the token cost was recorded summed capped lengths (+ extra tokens, per view)
        cost = state.get("token_cost", asdict(replace(s.token_cost, full_length=None, padded=False)))
        # what makes the saved epoch's batches other than this loader's: it can only start over
        differs = [why for same, why in (
            (cost == asdict(s.token_cost),
             f"the loader state was taken with cells costing {cost} against the token budget, this loader counts "
             f"{asdict(s.token_cost)} (another model shape or attention backend, or a state saved before sdpa "
             "batches and full-gene-set cells were counted as the model runs them): the epoch's batches differ"),
            ((state["world_size"], state["streams_per_rank"]) == (s.world_size, s.streams_per_rank),
             f"the loader state was taken with world size {state['world_size']} and {state['streams_per_rank']} "
             f"streams per rank, this loader has {s.world_size} and {s.streams_per_rank}: the epoch's layout differs"),
            # version 1 drew the block order from megabatch 0's shuffle stream (a state taken before its
            # epoch's first batch loses nothing)
            (version == STATE_VERSION or state["batches_done"] == 0,
             "the loader state was saved by an earlier loader (state version 1), whose epochs order the blocks "
             "differently")) if not same]
        if differs and not restart_epoch:
            raise LoaderStateError(f"{differs[0]}, so it cannot continue exactly; pass restart_epoch=True to start "
                                   "that epoch over", restartable=True)
        self.set_epoch(state["epoch"])
        if not differs:
            self.batches_done = state["batches_done"]

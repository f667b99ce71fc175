"""CellLoader: exactly-once coverage across ranks and workers, determinism, exact resume, budgets,
content equal to the per-cell normalization reference, views and labels."""

from __future__ import annotations

import functools
import inspect
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.plan import ConvertOptions
from data_pipeline.corpus import Corpus
from data_pipeline.loading import loader as loader_module
from data_pipeline.loading import normalize_reference as ref
from data_pipeline.loading.epoch_plan import Batching, EpochPlan
from data_pipeline.loading.loader import CellLoader, LoaderStateError
from data_pipeline.loading.masking import Masking, Views
from data_pipeline.loading.normalize import Normalization
from tests.corpus_helpers import ensembl, random_counts, write_h5ad

BUDGET = 3000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~1,500 cells in shards and blocks of uneven sizes, with a label column."""
    tmp = tmp_path_factory.mktemp("loader")
    inputs = []
    for i, (n, density) in enumerate([(530, 0.05), (770, 0.15), (203, 0.3)]):
        path = tmp / f"s{i}.h5ad"
        write_h5ad(path, random_counts(n, 400, seed=10 + i, density=density),
                   obs={"kind": [f"k{(j * 7 + i) % 4}" for j in range(n)]})
        inputs.append(str(path))
    out = tmp / "corpus"
    convert(out, ConvertOptions(inputs, block_cells=64, unit_cells=256, label_columns=["kind"]), workers=2,
            progress=False)
    return out


@pytest.fixture(scope="module")
def cells(corpus):
    """Global cell index -> (genes, counts, total, labels) read straight from the shards."""
    out = {}
    for first, b in Corpus(corpus).iter_blocks():
        for i in range(b.n_cells):
            lo, hi = b.indptr[i], b.indptr[i + 1]
            out[first + i] = (b.genes[lo:hi].astype(np.int64), b.counts[lo:hi], b.total_counts[i], b.labels[i])
    return out


def _loader(corpus, **kw):
    kw.setdefault("batching", Batching(token_budget=BUDGET, megabatch_cells=200))
    return CellLoader(corpus, **kw)


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in
               ("gene_ids", "values", "cu_seqlens", "mlm_mask", "mlm_targets", "labels", "view_index", "cell_index"))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_cell_once_per_epoch_and_equal_batches(corpus, cells, world_size, workers):
    seen, lengths = [], set()
    for rank in range(world_size):
        loader = _loader(corpus, rank=rank, world_size=world_size, num_workers=workers, masking=None)
        n = len(loader)  # of epoch 0 (epochs differ)
        batches = list(loader)
        assert len(batches) == n
        lengths.add(len(batches))
        for b in batches:
            assert b.cu_seqlens[-1] == b.n_tokens <= BUDGET  # packed: no padding, budget kept
            seen.append(b.cell_index.numpy())
    assert len(lengths) == 1, "ranks got different numbers of batches"
    seen = np.concatenate(seen)
    assert len(seen) == len(cells) and np.array_equal(np.sort(seen), np.arange(len(cells)))


def test_batches_hold_the_normalized_cells(corpus, cells):
    """Unmasked values equal the per-cell reference, masked targets too, masks ~15%."""
    loader = _loader(corpus, num_workers=2, normalization=Normalization("log1p_bins", n_bins=7))
    edges = Normalization(n_bins=7).edges
    masked = total = 0
    for b in loader:
        cu = b.cu_seqlens.numpy()
        for s, cell in enumerate(b.cell_index.numpy()):
            genes, counts, tc, labels = cells[cell]
            want_g, want_v = ref.log1p_bins(genes, counts, tc, edges, 7)
            sl = slice(cu[s], cu[s + 1])
            m = b.mlm_mask[sl].numpy()
            np.testing.assert_array_equal(b.gene_ids[sl].numpy(), want_g)
            np.testing.assert_array_equal(b.mlm_targets[sl].numpy()[m], want_v[m])
            v = b.values[sl].numpy()
            np.testing.assert_array_equal(v[~m], want_v[~m])
            assert set(v[m]) <= set(range(1, 8))  # mask id 7, a random bin, or the value kept
            assert m.sum() == max(1, round(0.15 * len(genes)))
            np.testing.assert_array_equal(b.labels[s].numpy(), labels)
            masked, total = masked + m.sum(), total + len(m)
    assert 0.14 < masked / total < 0.17


@pytest.mark.parametrize("mode", ["raw", "continuous"])
def test_unmasked_raw_and_log1p_cp10k_batches_hold_the_cells_packed(corpus, cells, mode):
    """The like-for-like modes of `benchmarks/bench_loader_peers.py`: each cell's expressed genes
    with their raw counts (raw) or log1p-CP10k values (continuous), packed, nothing masked."""
    reference = ref.raw if mode == "raw" else ref.continuous
    seen = 0
    for b in _loader(corpus, normalization=Normalization(mode), masking=None):
        cu = b.cu_seqlens.numpy()
        assert b.values.dtype == torch.float32 and not b.mlm_mask.any()
        for s, cell in enumerate(b.cell_index.numpy()):
            genes, counts, tc, _ = cells[cell]
            want_g, want_v = reference(genes, counts, tc)
            np.testing.assert_array_equal(b.gene_ids[cu[s]:cu[s + 1]].numpy(), want_g)
            np.testing.assert_array_equal(b.values[cu[s]:cu[s + 1]].numpy(), want_v)
            seen += 1
    assert seen == len(cells)


def test_deterministic_and_epochs_differ(corpus):
    a = list(_loader(corpus, seed=5, views=Views()))
    b = list(_loader(corpus, seed=5, views=Views()))
    assert len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    loader = _loader(corpus, seed=5, views=Views())
    first, second = list(loader), list(loader)  # two epochs
    assert all(_same(x, y) for x, y in zip(first, a))
    assert not np.array_equal(np.concatenate([x.cell_index for x in first]),
                              np.concatenate([x.cell_index for x in second]))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corpus_or_its_folder_gives_the_same_batches(corpus, workers):
    """What a trainer holds (an open `Corpus`, also pickled into the workers) or what a user passes
    (the folder)."""
    by_path = list(_loader(corpus, seed=3, num_workers=workers, views=Views()))
    opened = Corpus(corpus)
    loader = _loader(opened, seed=3, num_workers=workers, views=Views())
    assert loader.corpus is opened
    by_corpus = list(loader)
    assert len(by_path) == len(by_corpus) and all(_same(x, y) for x, y in zip(by_path, by_corpus))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(corpus, workers):
    kw = dict(seed=3, num_workers=workers, views=Views(), normalization=Normalization("quantile_bins", n_bins=11,
                                                                                      max_genes=40))
    whole = _loader(corpus, **kw)
    n = len(whole)
    expected = list(whole) + list(whole)  # epochs 0 and 1
    for stop in (1, n // 2 + 1, n):
        first = _loader(corpus, **kw)
        it = iter(first)
        got = [next(it) for _ in range(stop)]
        state = first.state_dict()
        del it
        resumed = _loader(corpus, **kw)
        resumed.load_state_dict(state)
        got += list(resumed)
        if stop < n:
            got += list(resumed)  # then the next epoch, whole
        assert len(got) == len(expected), stop
        assert all(_same(x, y) for x, y in zip(got, expected)), stop


@pytest.fixture
def plan_log(monkeypatch, tmp_path):
    """Every `EpochPlan` built in this process or its forked loader workers, as (pid, epoch,
    whether it computed the batch counts itself) lines of a file."""
    log = tmp_path / "plans.txt"
    build = EpochPlan.__init__

    def logged(self, *args, **kw):
        build(self, *args, **kw)
        given = inspect.signature(build).bind(self, *args, **kw).arguments.get("batch_counts")
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {self.epoch} {int(given is None)}\n")

    monkeypatch.setattr(EpochPlan, "__init__", logged)

    def read():
        return [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []
    return read


def test_the_epoch_plan_is_computed_once_per_epoch(corpus, plan_log):
    """``len()`` and the epoch share one plan; its 2 workers rebuild it from the batch counts the
    loader's process computed (a pass over every cell, made once), also in a resumed epoch."""
    loader = _loader(corpus, num_workers=2, seed=1)
    n = len(loader)
    assert len(list(loader)) == n  # epoch 0
    assert len(loader) == len(list(loader))  # epoch 1
    resumed = _loader(corpus, num_workers=2, seed=1)
    resumed.load_state_dict({**loader.state_dict(), "epoch": 2, "batches_done": 3})
    n = len(resumed)
    assert len(list(resumed)) == n - 3  # the rest of epoch 2
    plans = plan_log()
    computed = [(pid, epoch) for pid, epoch, whole in plans if whole]
    assert computed == [(os.getpid(), 0), (os.getpid(), 1), (os.getpid(), 2)]
    in_workers = [(pid, epoch) for pid, epoch, whole in plans if not whole]
    assert sorted(e for _, e in in_workers) == [0, 0, 1, 1, 2, 2]  # one per worker per epoch
    assert os.getpid() not in {pid for pid, _ in in_workers}


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_the_shared_plan_gives_the_batches_of_a_plan_computed_in_every_worker(corpus, plan_log, workers):
    """The reference: every worker (and ``len()``) computing the whole plan itself, as before the
    plan was shared. Two epochs, views, masking, a resume mid-epoch."""
    def batches(share: bool, resume_at: int | None = None):
        loader = _loader(corpus, seed=4, num_workers=workers, views=Views())
        loader.spec.share_plan = share
        if resume_at is not None:
            loader.load_state_dict({**loader.state_dict(), "batches_done": resume_at})
        return list(loader) + list(loader)

    reference = batches(False)
    shared = batches(True)
    assert len(shared) == len(reference) and all(_same(x, y) for x, y in zip(shared, reference))
    resumed = batches(True, resume_at=5)
    assert all(_same(x, y) for x, y in zip(resumed, reference[5:], strict=True))
    whole = sum(w for _, _, w in plan_log())
    # the reference computes in len() and in every worker (in-process: once more for the stream);
    # shared, once per epoch
    assert whole == 2 * (1 + max(1, workers)) + 2 + 2


def test_spawned_workers_get_the_shared_plan(corpus, monkeypatch):
    """Workers started by spawn (a fresh interpreter, the loader pickled to it) rebuild the same
    plan from the shared counts."""
    fork = list(_loader(corpus, seed=2, num_workers=2))
    monkeypatch.setattr(loader_module, "DataLoader", functools.partial(DataLoader, multiprocessing_context="spawn"))
    loader = _loader(corpus, seed=2, num_workers=2)
    spawned = list(loader)
    assert loader._dataloader.multiprocessing_context.get_start_method() == "spawn"
    assert len(spawned) == len(fork) and all(_same(x, y) for x, y in zip(spawned, fork))


def test_state_from_another_layout_is_refused_or_restarts(corpus):
    first = _loader(corpus, world_size=2, rank=0)
    it = iter(first)
    next(it)
    state = first.state_dict()
    other = _loader(corpus, world_size=1, rank=0)
    with pytest.raises(LoaderStateError, match="restart_epoch") as layout:
        other.load_state_dict(state)
    assert layout.value.restartable  # the trainer then names --restart-epoch
    other.load_state_dict(state, restart_epoch=True)
    assert (other.epoch, other.batches_done) == (0, 0)
    for loader, changed, what in ((_loader(corpus, world_size=2, rank=0, seed=9), state, "seed"),
                                  (other, {**state, "version": 0}, "version"),
                                  (other, {**state, "corpus": "x"}, "another corpus")):
        with pytest.raises(LoaderStateError, match=what) as refused:
            loader.load_state_dict(changed, restart_epoch=True)  # starting the epoch over would not do
        assert not refused.value.restartable


def test_state_of_the_earlier_block_order_restarts_its_epoch(corpus):
    """A state saved by state version 1 (whose block order was megabatch 0's shuffle stream) cannot
    continue its epoch's batches: it is refused as restartable, and starts the epoch over."""
    first = _loader(corpus, seed=3)
    it = iter(first)
    next(it)
    state = {**first.state_dict(), "version": 1, "epoch": 1}
    again = _loader(corpus, seed=3)
    with pytest.raises(LoaderStateError, match="state version 1.*restart_epoch") as refused:
        again.load_state_dict(state)
    assert refused.value.restartable
    again.load_state_dict(state, restart_epoch=True)
    assert (again.epoch, again.batches_done) == (1, 0)
    same = _loader(corpus, seed=3)
    same.load_state_dict(first.state_dict())  # this version's own state continues where it was
    assert (same.epoch, same.batches_done) == (0, 1)
    same.load_state_dict({**state, "batches_done": 0})  # an epoch not begun loses nothing: no refusal
    assert (same.epoch, same.batches_done) == (1, 0)


def test_views_are_linked_and_from_the_same_cell(corpus, cells):
    for b in _loader(corpus, views=Views(gene_dropout=0.3, min_depth=0.3), masking=None,
                     normalization=Normalization("continuous")):
        vi, ci = b.view_index.numpy(), b.cell_index.numpy()
        assert np.array_equal(vi, np.repeat(np.arange(len(vi) // 2), 2))
        assert np.array_equal(ci[0::2], ci[1::2])
        assert b.n_cells == len(np.unique(ci)) == b.n_seqs // 2  # a cell's two views are one cell
        cu = b.cu_seqlens.numpy()
        for s in range(b.n_seqs):
            genes = b.gene_ids[cu[s]:cu[s + 1]].numpy()
            assert len(genes) >= 1 and np.all(np.diff(genes) > 0)
            assert np.isin(genes, cells[ci[s]][0]).all()  # a view only drops genes


def test_rank_mode_masks_genes(corpus):
    loader = _loader(corpus, normalization=Normalization("rank", max_genes=30), views=None)
    b = next(iter(loader))
    m = b.mlm_mask.numpy()
    assert m.any() and (b.gene_ids.numpy()[m] != b.mlm_targets.numpy()[m]).any()
    cu = b.cu_seqlens.numpy()
    assert np.diff(cu).max() <= 30
    assert np.array_equal(b.values[cu[0]:cu[1]].numpy(), np.arange(cu[1] - cu[0]))


def test_to_padded_layout(corpus):
    b = next(iter(_loader(corpus)))
    p = b.to_padded(pad_id=0)
    lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long()
    assert p["gene_ids"].shape == (b.n_seqs, b.max_seqlen)
    assert torch.equal(p["key_padding_mask"].sum(1), lengths)
    assert torch.equal(p["gene_ids"][p["key_padding_mask"]], b.gene_ids)
    assert torch.equal(p["values"][p["key_padding_mask"]], b.values)
    assert (p["gene_ids"][~p["key_padding_mask"]] == 0).all()


def test_pinned_memory(corpus):
    """Pinned batches where CUDA is present (as DataLoader does, a warning and unpinned without)."""
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="pin_memory"):
            loader = _loader(corpus, num_workers=1, pin_memory=True)
        assert not next(iter(loader)).gene_ids.is_pinned()
        return
    for workers in (0, 2):
        b = next(iter(_loader(corpus, num_workers=workers, pin_memory=True)))
        assert b.gene_ids.is_pinned() and b.cu_seqlens.is_pinned()
        assert b.to("cuda").gene_ids.is_cuda



def test_rank_mode_over_a_token_dictionary_without_cls(tmp_path):
    """A Geneformer-style pickled token dictionary ({<pad>: 0, <mask>: 1, genes...}: no <cls>, which the
    vocabulary appends after the genes) in rank mode: masking's random replacements are gene tokens,
    never the appended <cls> (which left no ids to draw from and failed on the first batch)."""
    import pickle

    from data_pipeline.conversion.vocab import gene_token_range

    n_genes = 300
    mapping = {"<pad>": 0, "<mask>": 1, **{ensembl(i): i + 2 for i in range(n_genes)}}
    vocab = tmp_path / "token_dictionary.pkl"
    vocab.write_bytes(pickle.dumps(mapping))
    source = write_h5ad(tmp_path / "cells.h5ad", random_counts(200, n_genes, seed=3, density=0.2))
    out = tmp_path / "corpus"
    convert(out, ConvertOptions([str(source)], vocab=str(vocab)), progress=False)
    made = Corpus(out)
    cls = made.special_tokens["<cls>"]
    assert cls == n_genes + 2 == made.vocab_size - 1 and gene_token_range([0, 1, cls], made.vocab_size) == (2, cls)
    norm = Normalization("rank", medians=np.ones(made.vocab_size), max_genes=64)
    loader = _loader(out, normalization=norm, masking=Masking(ratio=0.5, mask_prob=0.2, random_prob=0.8))
    replaced = 0
    for batch in loader:
        ids, masked = batch.gene_ids.numpy(), batch.mlm_mask.numpy()
        drawn = ids[masked & (ids != 1)]
        assert ((drawn >= 2) & (drawn < cls)).all()
        replaced += int((masked & (ids != 1) & (ids != batch.mlm_targets.numpy())).sum())
    assert replaced > 100


def test_gene_token_range_takes_special_tokens_on_either_side():
    from data_pipeline.conversion.vocab import VocabError, gene_token_range

    assert gene_token_range([0, 1, 2], 10) == (3, 10)
    assert gene_token_range([0, 1, 9], 10) == (2, 9)
    with pytest.raises(VocabError, match="contiguous"):
        gene_token_range([0, 1, 5], 10)


def test_rank_without_world_size_is_refused(corpus):
    """`CellLoader(corpus, rank=1)` alone once streamed the whole corpus as rank 0 of 1 (the world size
    from an unset environment): every such process read the same cells."""
    for given in ({"rank": 1}, {"world_size": 4}):
        with pytest.raises(ValueError, match="pass both"):
            _loader(corpus, **given)
    with pytest.raises(ValueError, match="outside world size"):
        _loader(corpus, rank=2, world_size=2)

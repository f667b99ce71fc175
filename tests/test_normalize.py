"""Each normalization mode equals its plain per-cell definition, on real cells and random ones."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.plan import ConvertOptions
from data_pipeline.conversion.stats import GeneStats
from data_pipeline.conversion.vocab import read_pickled_dict
from data_pipeline.corpus import Corpus
from data_pipeline.loading import normalize_reference as ref
from data_pipeline.loading.normalize import Normalization, medians_for_vocab, normalize
from tests.conftest import SHARED_DATA as SHARED


@pytest.fixture(scope="module")
def real_corpus(tmp_path_factory):
    """Three real files with different depths (PBMC, tumour, pancreas), as a corpus."""
    files = [SHARED / "h5ad" / n for n in ("mudan_pbmcA.h5ad", "copykat_tumor302.h5ad", "cider_baron_pancreas350.h5ad")]
    if not all(f.exists() for f in files):
        pytest.skip("../shared/data is absent")
    out = tmp_path_factory.mktemp("norm") / "corpus"
    convert(out, ConvertOptions([str(f) for f in files]), workers=1, progress=False)
    return Corpus(out)


def _blocks(corpus: Corpus):
    return [b for _, b in corpus.iter_blocks()]


def _random_block(seed: int):
    """Cells with many ties (small counts), lengths 1..300, totals above their vocabulary sums."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    lengths = rng.integers(1, 300, n)
    genes = np.concatenate([np.sort(rng.choice(5000, k, replace=False)) for k in lengths]) + 3
    counts = np.where(rng.random(len(genes)) < 0.6, rng.integers(1, 4, len(genes)), rng.integers(1, 2000, len(genes)))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    totals = np.add.reduceat(counts, indptr[:-1]) * rng.uniform(1.0, 1.5, n)
    return indptr, genes.astype(np.uint16), counts.astype(np.uint16), totals


def _check(norm: Normalization, indptr, genes, counts, totals, reference):
    got = normalize(norm, indptr, genes, counts, totals)
    assert got.indptr[-1] == len(got.genes) == len(got.values)
    for i in range(len(indptr) - 1):
        lo, hi = indptr[i], indptr[i + 1]
        want_genes, want_values = reference(genes[lo:hi].astype(np.int64), counts[lo:hi], totals[i])
        a, b = got.indptr[i], got.indptr[i + 1]
        np.testing.assert_array_equal(got.genes[a:b], want_genes)
        np.testing.assert_array_equal(got.values[a:b], want_values)
        assert got.values.dtype == want_values.dtype


def _modes(medians):
    edges = Normalization(n_bins=7).edges
    return {
        "log1p_bins": (Normalization("log1p_bins", n_bins=7),
                       lambda g, c, t: ref.log1p_bins(g, c, t, edges, 7)),
        "log1p_bins_edges": (Normalization("log1p_bins", n_bins=5, bin_edges=(0.5, 2.25, 3.0)),
                             lambda g, c, t: ref.log1p_bins(g, c, t, (0.5, 2.25, 3.0), 5)),
        "log2_floor_bins": (Normalization("log2_floor_bins", n_bins=6),  # scBERT
                            lambda g, c, t: ref.log2_floor_bins(g, c, t, 6)),
        "log2_floor_bins_7": (Normalization("log2_floor_bins", n_bins=7),  # CellLM
                              lambda g, c, t: ref.log2_floor_bins(g, c, t, 7)),
        "quantile_bins": (Normalization("quantile_bins", n_bins=51, quantile_ties="high"),
                          lambda g, c, t: ref.quantile_bins(g, c, t, 51)),
        "quantile_bins_few": (Normalization("quantile_bins", n_bins=5, quantile_ties="high"),
                              lambda g, c, t: ref.quantile_bins(g, c, t, 5)),
        "continuous": (Normalization("continuous"), lambda g, c, t: ref.continuous(g, c, t)),
        "raw": (Normalization("raw"), lambda g, c, t: ref.raw(g, c, t)),
        "rank": (Normalization("rank", medians=medians, max_genes=2048),
                 lambda g, c, t: ref.rank_value(g, c, t, medians, 2048)),
        "rank_short": (Normalization("rank", medians=medians, max_genes=25),
                       lambda g, c, t: ref.rank_value(g, c, t, medians, 25)),
    }


@pytest.mark.parametrize("mode", ["log1p_bins", "log1p_bins_edges", "log2_floor_bins", "quantile_bins",
                                  "quantile_bins_few", "continuous", "raw", "rank", "rank_short"])
def test_modes_equal_reference_on_real_cells(real_corpus, mode):
    medians = GeneStats.from_zarr(real_corpus.path / "stats.zarr").nonzero_medians()
    norm, reference = _modes(medians)[mode]
    for b in _blocks(real_corpus):
        _check(norm, b.indptr, b.genes, b.counts, b.total_counts, reference)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["log1p_bins", "log2_floor_bins", "log2_floor_bins_7", "quantile_bins",
                                  "quantile_bins_few", "continuous", "raw", "rank_short"])
def test_modes_equal_reference_on_random_cells(seed, mode):
    rng = np.random.default_rng(100 + seed)
    medians = rng.uniform(0.5, 20, 5003)
    medians[rng.random(5003) < 0.1] = np.nan  # genes without a median are dropped in rank mode
    norm, reference = _modes(medians)[mode]
    indptr, genes, counts, totals = _random_block(seed)
    if seed % 3 == 2:  # counts of a corpus converted with --allow-non-integer
        counts = (counts * 0.75).astype(np.float32)
    _check(norm, indptr, genes, counts, totals, reference)


def test_scbert_bins_equal_scberts_formula_on_mudan_pbmc():
    """scBERT's binning straight from the h5ad matrix, as its code does it (preprocess.py:
    normalize_total to 1e4 and log1p base 2, i.e. scanpy's log1p(x) / log(2); pretrain.py: integer
    cast, capped at bin_num 5), equals the loader's ``log2_floor_bins``; low expressed genes fall in
    bin 0 as in scBERT. The occupancy of the nonzero genes is the one this mode gives."""
    import anndata as ad

    path = SHARED / "h5ad" / "mudan_pbmcA.h5ad"
    if not path.exists():
        pytest.skip("../shared/data is absent")
    x = ad.read_h5ad(path).X.tocsr()
    totals = np.asarray(x.sum(axis=1), np.float64).ravel()
    per_entry = np.repeat(totals, np.diff(x.indptr))
    scbert = np.minimum(np.log1p(x.data.astype(np.float64) / per_entry * 1e4) / np.log(2), 5).astype(np.int64)
    got = normalize(Normalization("log2_floor_bins", n_bins=6), x.indptr, x.indices + 3, x.data, totals)
    np.testing.assert_array_equal(got.indptr, x.indptr)
    np.testing.assert_array_equal(got.values, scbert)
    occupancy = np.bincount(got.values, minlength=6) / len(got.values)
    # issue 22 quotes scBERT's 9 / 58 / 17 / 6 / 10 % for bins 1..5 on this file; its cells are all under
    # 10k counts, so no expressed gene is below 1 per 10k (bin 0)
    np.testing.assert_allclose(occupancy, [0, 0.0895, 0.5781, 0.1657, 0.0644, 0.1022], atol=5e-4)
    old = normalize(Normalization("log1p_bins", n_bins=7), x.indptr, x.indices + 3, x.data, totals)
    assert np.mean(old.values == 1) < 0.02  # the ln-based bins the scbert preset used before: 1 % in bin 1


def _check_random_ties(n_bins, indptr, genes, counts, totals, seed):
    """quantile_ties="random" equals scGPT's tie-breaking given the same uniforms (the fast path draws
    one per token of the block, in order)."""
    got = normalize(Normalization("quantile_bins", n_bins=n_bins, quantile_ties="random"), indptr, genes, counts,
                    totals, np.random.default_rng(seed))
    uniforms = np.random.default_rng(seed).random(int(indptr[-1]))
    for i in range(len(indptr) - 1):
        lo, hi = indptr[i], indptr[i + 1]
        _, want = ref.quantile_bins(genes[lo:hi].astype(np.int64), counts[lo:hi], totals[i], n_bins,
                                    uniforms=uniforms[lo:hi])
        np.testing.assert_array_equal(got.values[lo:hi], want)
    return got


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_bins", [51, 5])
def test_random_quantile_ties_equal_scgpt_on_random_cells(seed, n_bins):
    indptr, genes, counts, totals = _random_block(seed)
    if seed % 2:
        counts = (counts * 0.75).astype(np.float32)
    _check_random_ties(n_bins, indptr, genes, counts, totals, seed)


def test_random_quantile_ties_spread_the_tied_genes(real_corpus):
    """On real cells the genes seen once are tied over many edges: "high" gives them all the top bin
    of that span (a per-cell number), "random" spreads them over it."""
    b = _blocks(real_corpus)[0]
    high = normalize(Normalization("quantile_bins", n_bins=51, quantile_ties="high"), b.indptr, b.genes, b.counts, b.total_counts)
    rand = _check_random_ties(51, b.indptr, b.genes, b.counts, b.total_counts, 0)
    assert np.all((rand.values >= 1) & (rand.values <= high.values))
    spread = []
    for i in range(min(200, len(b.indptr) - 1)):
        lo, hi = b.indptr[i], b.indptr[i + 1]
        ones = b.counts[lo:hi] == 1
        if ones.sum() > 50:
            assert len(np.unique(high.values[lo:hi][ones])) == 1
            spread.append(len(np.unique(rand.values[lo:hi][ones])))
    assert spread and np.median(spread) > 5
    with pytest.raises(ValueError, match="rng"):
        normalize(Normalization("quantile_bins"), b.indptr, b.genes, b.counts, b.total_counts)  # random: the default
    with pytest.raises(ValueError, match="quantile_ties"):
        Normalization("quantile_bins", quantile_ties="low")


def test_rank_mode_with_the_geneformer_median_dictionary(real_corpus):
    """Geneformer's algorithm with its published medians: count / total * 1e4 / median, genes
    outside its dictionary dropped, sorted descending, truncated to 2048."""
    path = SHARED / "genes" / "geneformer_gene_median_dictionary.pkl"
    medians = medians_for_vocab(real_corpus.vocab.ensembl_ids, read_pickled_dict(path))
    assert np.isfinite(medians).sum() > 5000
    norm = Normalization("rank", medians=medians, max_genes=2048)
    for b in _blocks(real_corpus):
        _check(norm, b.indptr, b.genes, b.counts, b.total_counts,
               lambda g, c, t: ref.rank_value(g, c, t, medians, 2048))


def test_max_genes_keeps_a_random_subset_in_order():
    indptr, genes, counts, totals = _random_block(3)
    full = normalize(Normalization("log1p_bins", n_bins=7), indptr, genes, counts, totals)
    cap = 40
    seen = []
    for seed in range(2):
        got = normalize(Normalization("log1p_bins", n_bins=7, max_genes=cap), indptr, genes, counts, totals,
                        np.random.default_rng(seed))
        for i in range(len(indptr) - 1):
            a, b = got.indptr[i], got.indptr[i + 1]
            lo, hi = full.indptr[i], full.indptr[i + 1]
            assert b - a == min(cap, hi - lo)
            kept = got.genes[a:b]
            assert np.all(np.diff(kept) > 0)
            pos = np.searchsorted(full.genes[lo:hi], kept)
            np.testing.assert_array_equal(full.genes[lo:hi][pos], kept)
            np.testing.assert_array_equal(full.values[lo:hi][pos], got.values[a:b])
        seen.append(got.genes.copy())
    assert len(seen[0]) != len(genes) and not np.array_equal(seen[0], seen[1])
    with pytest.raises(ValueError, match="rng"):
        normalize(Normalization("log1p_bins", max_genes=cap), indptr, genes, counts, totals)


@pytest.mark.parametrize("mode", ["log1p_bins", "continuous"])
def test_top_cap_keeps_each_cells_most_expressed_genes_in_order(mode):
    """``cap="top"``: per cell, the ``max_genes`` highest counts (ties: the lower token), in token
    order, with the values of the uncapped cell; no generator needed, the same every time."""
    indptr, genes, counts, totals = _random_block(5)
    full = normalize(Normalization(mode, n_bins=7), indptr, genes, counts, totals)
    cap = 40
    got = normalize(Normalization(mode, n_bins=7, max_genes=cap, cap="top"), indptr, genes, counts, totals)
    assert (np.diff(indptr) > cap).any()
    for i in range(len(indptr) - 1):
        lo, hi = indptr[i], indptr[i + 1]
        best = sorted(sorted(range(hi - lo), key=lambda j: (-int(counts[lo + j]), j))[:cap])  # the definition
        a, b = got.indptr[i], got.indptr[i + 1]
        np.testing.assert_array_equal(got.genes[a:b], genes[lo:hi][best])
        np.testing.assert_array_equal(got.values[a:b], full.values[lo:hi][best])
    again = normalize(Normalization(mode, n_bins=7, max_genes=cap, cap="top"), indptr, genes, counts, totals)
    np.testing.assert_array_equal(again.genes, got.genes)
    with pytest.raises(ValueError, match="cap="):
        Normalization(mode, cap="highest")


def test_quantile_tie_spans_count_the_edges_a_value_equals():
    """Span = max(1, digitize(x, edges) - digitize(x, edges, right=True)) per cell: scGPT's
    ``_digitize`` draws ceil(u (low - high) + high), uniform over low + 1 ... high; with the entries
    and cap of `normalize`; a random cap is refused."""
    from data_pipeline.loading.normalize import quantile_tie_spans

    indptr, genes, counts, totals = _random_block(6)
    norm = Normalization("quantile_bins", n_bins=11, max_genes=50, cap="top")
    spans = quantile_tie_spans(norm, indptr, genes, counts, totals)
    capped = normalize(norm, indptr, genes, counts, totals, np.random.default_rng(0))
    np.testing.assert_array_equal(spans.genes, capped.genes)
    x = np.log1p(counts / np.repeat(totals, np.diff(indptr)) * 1e4)
    for i in range(len(indptr) - 1):
        lo, hi = indptr[i], indptr[i + 1]
        edges = np.quantile(x[lo:hi], np.linspace(0, 1, 10))
        expected = np.maximum(1, np.digitize(x[lo:hi], edges) - np.digitize(x[lo:hi], edges, right=True))
        keep = np.isin(genes[lo:hi], spans.genes[spans.indptr[i]:spans.indptr[i + 1]])
        np.testing.assert_array_equal(spans.values[spans.indptr[i]:spans.indptr[i + 1]], expected[keep])
    assert (spans.values > 1).any() and (spans.values == 1).any()
    with pytest.raises(ValueError, match="rng"):
        quantile_tie_spans(Normalization("quantile_bins", n_bins=11, max_genes=50), indptr, genes, counts, totals)


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="medians"):
        normalize(Normalization("rank"), np.array([0, 1]), np.array([3]), np.array([1]), np.array([1.0]))
    with pytest.raises(ValueError, match="not one of"):
        Normalization("log2")
    with pytest.raises(ValueError, match="at least 3"):
        Normalization("quantile_bins", n_bins=2)


@pytest.mark.parametrize("seed", range(4))
def test_rank_mode_equals_reference_on_long_cells_with_many_ties(seed):
    """Rank mode's bucket sort (counting pass on leading bits, then insertion sort per bucket or
    radix sort per large bucket) against the plain sort: cells of 1 ... 6,000 genes (over the cap,
    and over the 4,096 buckets), values with heavy ties (few distinct medians and counts: large
    buckets of equal keys) and spread over many magnitudes, non-integer counts too."""
    rng = np.random.default_rng(300 + seed)
    n_genes = 8000
    medians = rng.choice([0.5, 1.0, 2.0, 3.0], n_genes) if seed % 2 else np.exp(rng.uniform(-8, 8, n_genes))
    medians[rng.random(n_genes) < 0.05] = np.nan
    medians[rng.random(n_genes) < 0.02] = 0.0  # no median either
    lengths = np.concatenate([rng.integers(1, 80, 20), rng.integers(40, 6000, 12), [0, 49, 48, 50]])
    genes = np.concatenate([np.sort(rng.choice(n_genes, k, replace=False)) for k in lengths]).astype(np.int64)
    small = rng.random(len(genes)) < 0.7
    counts = np.where(small, rng.integers(1, 4, len(genes)), rng.integers(1, 100_000, len(genes)))
    if seed == 3:
        counts = (counts * 0.25).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    totals = np.maximum(np.add.reduceat(counts, indptr[:-1]), 1) * rng.uniform(1.0, 1.5, len(lengths))
    for cap in (2048, 25, None):
        norm = Normalization("rank", medians=medians, max_genes=cap)
        _check(norm, indptr, genes, counts, totals,
               lambda g, c, t, cap=cap: ref.rank_value(g, c, t, medians, cap if cap is not None else len(g)))

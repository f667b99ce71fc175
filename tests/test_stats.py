"""Tests of ``data_pipeline.conversion.stats``: mergeable per-gene statistics and the nonzero-median sketch.

Everything is checked against plain numpy references computed here: the sketch exactly (it is an
integer histogram), the counts exactly, the sums to rounding, and the median estimate against the
documented error bound. The real-data test uses ``../shared/data`` (skipped when absent).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.conversion import stats as stats_mod
from data_pipeline.conversion.stats import (
    MANTISSA_BITS,
    RELATIVE_ERROR,
    GeneStats,
    bucket_midpoints,
    sketch_buckets,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BUCKETS = 1 << (8 + MANTISSA_BITS)  # buckets per token: exponent (8 bits) + mantissa bits
# documented bound against the median of the float64 normalized values
BOUND = RELATIVE_ERROR + 2.0 ** -23


# --- helpers -------------------------------------------------------------------------------------

def random_block(rng, n_cells: int, vocab: int, mean_genes: int = 40, zero_frac: float = 0.02,
                 count_dtype=np.uint16):
    """A CSR block like the corpus's: sorted token ids per cell, raw counts (heavy tailed, some
    explicit zeros), some empty cells; totals before vocabulary filtering >= the row sums."""
    genes, counts, lengths = [], [], []
    # token popularity is skewed, and the last tenth of the vocabulary is never used
    p = 1.0 / np.arange(1, int(vocab * 0.9) + 1) ** 0.7
    p /= p.sum()
    for _ in range(n_cells):
        k = min(int(rng.poisson(mean_genes)), len(p)) if rng.random() > 0.05 else 0
        g = np.sort(rng.choice(len(p), size=k, replace=False, p=p))
        c = np.ceil(np.exp(rng.exponential(1.2, size=k))).astype(np.int64)  # 1 .. thousands
        c[rng.random(k) < zero_frac] = 0
        genes.append(g)
        counts.append(c)
        lengths.append(k)
    indptr = np.zeros(n_cells + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    genes = np.concatenate(genes).astype(np.int32)
    counts = np.minimum(np.concatenate(counts), 60000).astype(count_dtype)
    cell = np.repeat(np.arange(n_cells), np.diff(indptr))
    rows = np.bincount(cell, weights=counts.astype(np.float64), minlength=n_cells)
    totals = np.floor(rows * rng.uniform(1.0, 1.6, n_cells)) + rng.integers(1, 50, n_cells)
    return genes, counts, indptr, totals


def cell_slice(block, c0: int, c1: int):
    genes, counts, indptr, totals = block
    a, b = indptr[c0], indptr[c1]
    return genes[a:b], counts[a:b], indptr[c0:c1 + 1] - a, totals[c0:c1]


def reference(block, vocab: int) -> dict:
    """Plain numpy statistics of a block (the sketch with the implementation's float formula, the
    medians of ``count / total * 1e4`` as documented)."""
    genes, counts, indptr, totals = block
    cell = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    nz = counts != 0
    g = genes[nz].astype(np.int64)
    c = counts[nz].astype(np.float64)
    t = totals[cell[nz]].astype(np.float64)
    nonzero_count = np.bincount(g, minlength=vocab)
    keys, key_counts = np.unique(g * BUCKETS + sketch_buckets(c * (1e4 / t)), return_counts=True)
    values = c / t * 1e4
    order = np.lexsort((values, g))
    starts = np.concatenate([[0], np.cumsum(nonzero_count)])[:-1]
    seen = nonzero_count > 0
    lo_i = starts + (nonzero_count - 1) // 2
    hi_i = starts + nonzero_count // 2
    v_sorted = values[order]
    median = np.full(vocab, np.nan)
    median[seen] = (v_sorted[lo_i[seen]] + v_sorted[hi_i[seen]]) / 2
    # the documented estimate, computed directly: mean of the midpoints of the middle values'
    # buckets (float32-rounded values of the implementation's formula)
    v32 = (c * (1e4 / t))[order]
    mids = bucket_midpoints(sketch_buckets(v32))
    estimate = np.full(vocab, np.nan)
    estimate[seen] = (mids[lo_i[seen]] + mids[hi_i[seen]]) / 2
    return {
        "nonzero_count": nonzero_count,
        "count_sum": np.bincount(g, weights=c, minlength=vocab),
        "cp10k_sum": np.bincount(g, weights=values, minlength=vocab),
        "sketch_keys": keys,
        "sketch_counts": key_counts,
        "median": median,
        "estimate": estimate,
    }


def assert_same_sketch(a: GeneStats, b: GeneStats) -> None:
    np.testing.assert_array_equal(a.sketch_keys, b.sketch_keys)
    np.testing.assert_array_equal(a.sketch_counts, b.sketch_counts)
    np.testing.assert_array_equal(a.nonzero_count, b.nonzero_count)
    assert a.n_cells == b.n_cells


def assert_matches_reference(s: GeneStats, ref: dict) -> None:
    np.testing.assert_array_equal(s.sketch_keys, ref["sketch_keys"])
    np.testing.assert_array_equal(s.sketch_counts, ref["sketch_counts"])
    np.testing.assert_array_equal(s.nonzero_count, ref["nonzero_count"])
    np.testing.assert_allclose(s.count_sum, ref["count_sum"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.cp10k_sum, ref["cp10k_sum"], rtol=1e-12, atol=0)


def assert_median_bound(est: np.ndarray, ref: dict) -> float:
    """Estimate within the documented bound of the exact median; NaN exactly where unseen.
    Returns the largest relative error."""
    seen = ref["nonzero_count"] > 0
    np.testing.assert_array_equal(np.isnan(est), ~seen)
    rel = np.abs(est[seen] - ref["median"][seen]) / ref["median"][seen]
    worst = float(rel.max()) if rel.size else 0.0
    assert worst <= BOUND, f"relative error {worst} > {BOUND}"
    np.testing.assert_array_equal(est, ref["estimate"])  # exactly the documented estimator
    return worst


def one_pass(block, vocab: int) -> GeneStats:
    s = GeneStats(vocab)
    s.add_cells(*block)
    return s.finalize()


# --- split / merge invariance --------------------------------------------------------------------

@pytest.fixture(scope="module")
def block():
    rng = np.random.default_rng(1234)
    return random_block(rng, 1500, 700)


VOCAB = 700


def test_one_pass_matches_numpy_reference(block):
    s = one_pass(block, VOCAB)
    assert s.n_cells == 1500
    assert_matches_reference(s, reference(block, VOCAB))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_calls_are_identical_to_one_pass(block, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    whole = one_pass(block, VOCAB)
    n = len(block[2]) - 1
    # random cut points, with repeats (empty blocks) and a few single cells
    cuts = np.unique(np.concatenate([[0, n], rng.integers(0, n + 1, 25), [5, 6, 7]]))
    cuts = np.sort(np.concatenate([cuts, cuts[:3]]))
    if seed == 1:  # small pieces and pending thresholds: piecewise adds and mid-stream folds
        monkeypatch.setattr(stats_mod, "_PIECE", 97)
        monkeypatch.setattr(stats_mod, "_FLUSH_MIN", 500)
    s = GeneStats(VOCAB)
    for i, (c0, c1) in enumerate(zip(cuts[:-1], cuts[1:])):
        s.add_cells(*cell_slice(block, c0, c1))
        if seed == 2 and i % 4 == 3:
            s.finalize()  # folds into an existing sketch, then goes on adding
    s.finalize()
    assert_same_sketch(s, whole)
    # sums are accumulated per gene in cell order: bit-identical however cells are split
    np.testing.assert_array_equal(s.count_sum, whole.count_sum)
    np.testing.assert_array_equal(s.cp10k_sum, whole.cp10k_sum)


def test_trusted_blocks_equal_validated_ones(block):
    """The converter passes its row kernel's per-partition token counts and skips validation."""
    from data_pipeline.conversion.stats import PARTITION_BITS

    whole = one_pass(block, VOCAB)
    trusted = GeneStats(VOCAB)
    for c0, c1 in [(0, 1), (1, 400), (400, 1100), (1100, 1500)]:
        genes, counts, indptr, totals = cell_slice(block, c0, c1)
        parts = np.bincount(genes[counts != 0].astype(np.int64) >> PARTITION_BITS)
        trusted.add_cells(genes, counts, indptr, totals, parts)
    trusted.finalize()
    _assert_same_stats(whole, trusted)
    assert trusted.n_cells == whole.n_cells
    with pytest.raises(ValueError, match="token id"):  # counts for tokens past the vocabulary
        GeneStats(8).add_cells(np.array([1]), np.array([1]), np.array([0, 1]), np.array([1.0]),
                               np.array([1, 0, 0, 1]))


def _partials(block, cuts) -> list[GeneStats]:
    out = []
    for c0, c1 in zip(cuts[:-1], cuts[1:]):
        s = GeneStats(VOCAB)
        s.add_cells(*cell_slice(block, c0, c1))
        out.append(s)  # not finalized: merge must finalize
    return out


@pytest.mark.parametrize("order", ["forward", "backward", "tree", "shuffled"])
def test_merged_partials_equal_one_pass(block, order):
    whole = one_pass(block, VOCAB)
    ref = reference(block, VOCAB)
    cuts = [0, 1, 200, 200, 731, 1100, 1499, 1500]  # includes an empty partial
    parts = _partials(block, cuts)
    if order == "forward":
        total = parts[0]
        for p in parts[1:]:
            total.merge(p)
    elif order == "backward":
        total = parts[-1]
        for p in parts[-2::-1]:
            total.merge(p)
    elif order == "tree":
        while len(parts) > 1:
            parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i]
                     for i in range(0, len(parts), 2)]
        total = parts[0]
    else:
        rng = np.random.default_rng(7)
        perm = rng.permutation(len(parts))
        total = GeneStats(VOCAB)
        for i in perm:
            total.merge(parts[i])
    assert_same_sketch(total, whole)
    np.testing.assert_allclose(total.count_sum, whole.count_sum, rtol=1e-12, atol=0)
    np.testing.assert_allclose(total.cp10k_sum, whole.cp10k_sum, rtol=1e-12, atol=0)
    assert_matches_reference(total, ref)
    np.testing.assert_array_equal(total.nonzero_medians(), whole.nonzero_medians())


@pytest.mark.parametrize("dense, threads", [(True, 1), (True, 3), (True, 64), (False, 1)])
def test_merge_partials_equals_one_pass(block, tmp_path, monkeypatch, dense, threads):
    if not dense:  # windows over the limit: the pairwise fallback
        monkeypatch.setattr(stats_mod, "_DENSE_MERGE_MAX", 10)
    whole = one_pass(block, VOCAB)
    paths = []
    for i, part in enumerate(_partials(block, [0, 1, 200, 200, 731, 1100, 1499, 1500])):
        paths.append(tmp_path / f"p{i}.stats")
        part.save_partial(paths[-1])
    seen = []
    total = stats_mod.merge_partials(paths, VOCAB, seen.append, threads)
    assert len(seen) == len(paths)
    assert total.n_cells == whole.n_cells
    assert_same_sketch(total, whole)
    np.testing.assert_array_equal(total.nonzero_count, whole.nonzero_count)
    np.testing.assert_allclose(total.count_sum, whole.count_sum, rtol=1e-12, atol=0)
    np.testing.assert_allclose(total.cp10k_sum, whole.cp10k_sum, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(total.nonzero_medians(), whole.nonzero_medians())
    with pytest.raises(ValueError):
        stats_mod.merge_partials(paths, VOCAB + 1)


def test_merge_is_deterministic_for_a_fixed_order(block):
    cuts = [0, 300, 900, 1500]
    a = _partials(block, cuts)
    b = _partials(block, cuts)
    for p in a[1:]:
        a[0].merge(p)
    for p in b[1:]:
        b[0].merge(p)
    np.testing.assert_array_equal(a[0].count_sum, b[0].count_sum)
    np.testing.assert_array_equal(a[0].cp10k_sum, b[0].cp10k_sum)


def test_merge_rejects_other_vocabulary():
    with pytest.raises(ValueError):
        GeneStats(5).merge(GeneStats(6))


# --- median estimate -----------------------------------------------------------------------------

def test_bucket_midpoint_error_bound():
    rng = np.random.default_rng(3)
    v = np.exp(rng.uniform(np.log(1e-6), np.log(1e6), 200_000)).astype(np.float32)
    edges = (np.arange(0, 1 << MANTISSA_BITS) << (23 - MANTISSA_BITS)) | (127 << 23)
    v = np.concatenate([v, edges.astype(np.int32).view(np.float32)])  # bucket lower edges
    mid = bucket_midpoints(sketch_buckets(v))
    rel = np.abs(mid - v.astype(np.float64)) / v
    assert rel.max() <= RELATIVE_ERROR
    assert rel.max() > 0.99 * RELATIVE_ERROR  # the bound is tight (lower edge of k = 0 buckets)


@pytest.mark.parametrize("seed", [10, 11])
def test_median_estimate_within_bound_random(seed):
    rng = np.random.default_rng(seed)
    vocab = 300
    blk = random_block(rng, 2500, vocab, mean_genes=30)
    s = one_pass(blk, vocab)
    ref = reference(blk, vocab)
    worst = assert_median_bound(s.nonzero_medians(), ref)
    assert worst > 0  # not trivially exact
    n = ref["nonzero_count"]
    assert (n[n > 0] % 2 == 0).any() and (n[n > 0] % 2 == 1).any()  # even and odd counts


def test_even_count_median_uses_both_middle_values():
    # one token, values 1 and 3 (even count): median 2, estimate mean of the two midpoints
    s = GeneStats(3)
    s.add_cells(np.array([1, 1], np.int32), np.array([1, 3], np.uint16), np.array([0, 1, 2]),
                np.array([1e4, 1e4]))
    med = s.nonzero_medians()
    assert np.isnan(med[0]) and np.isnan(med[2])
    assert abs(med[1] - 2.0) <= RELATIVE_ERROR * 2.0
    expected = bucket_midpoints(sketch_buckets(np.array([1.0, 3.0]))).mean()
    assert med[1] == expected


def test_wide_and_sparse_values():
    # few values per token over a very wide range (the sort path of a fold), merged with an
    # existing sketch; and one token with many values (the dense path)
    rng = np.random.default_rng(5)
    vocab = 4
    n = 400
    genes = np.tile(np.array([0, 1, 2], np.int32), n)
    counts = np.empty(3 * n, np.float32)
    counts[0::3] = np.exp(rng.uniform(-20, 20, n))  # token 0: 40 e-folds of range
    counts[1::3] = rng.integers(1, 5, n)  # token 1: narrow
    counts[2::3] = np.where(rng.random(n) < 0.99, 0, np.exp(rng.uniform(-20, 20, n)))
    indptr = np.arange(0, 3 * n + 1, 3)
    totals = np.full(n, 1e4)
    blk = (genes, counts, indptr, totals)
    whole = one_pass(blk, vocab)
    s = GeneStats(vocab)
    for c0 in range(0, n, 50):
        s.add_cells(*cell_slice(blk, c0, c0 + 50))
        s.finalize()
    assert_same_sketch(s, whole)
    ref = reference(blk, vocab)
    assert_matches_reference(whole, ref)
    assert_median_bound(whole.nonzero_medians(), ref)


def _real_files():
    folder = DATA / "h5ad"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.h5ad") if p.name != "scdcc_10X_PBMC_top2000.h5ad")


@pytest.mark.parametrize("path", _real_files() or [None], ids=lambda p: p.stem if p else "absent")
def test_median_estimate_within_bound_real_data(path):
    if path is None:
        pytest.skip(f"real data not found at {DATA}")
    anndata = pytest.importorskip("anndata")
    adata = anndata.read_h5ad(path)
    X = adata.X.tocsr()
    assert X.has_sorted_indices
    totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    blk = (X.indices, X.data, X.indptr, totals)
    vocab = X.shape[1]
    # two halves merged, and one pass: identical sketches
    half = X.shape[0] // 2
    a = GeneStats(vocab)
    a.add_cells(*cell_slice(blk, 0, half))
    b = GeneStats(vocab)
    b.add_cells(*cell_slice(blk, half, X.shape[0]))
    merged = a.merge(b)
    s = one_pass(blk, vocab)
    assert_same_sketch(merged, s)
    ref = reference(blk, vocab)
    assert_matches_reference(s, ref)
    np.testing.assert_array_equal(s.count_sum, ref["count_sum"])  # integer sums: exact
    worst = assert_median_bound(s.nonzero_medians(), ref)
    assert worst > 0


# --- storage -------------------------------------------------------------------------------------

def _assert_same_stats(a: GeneStats, b: GeneStats) -> None:
    assert a.vocab_size == b.vocab_size
    assert_same_sketch(a, b)
    np.testing.assert_array_equal(a.count_sum, b.count_sum)
    np.testing.assert_array_equal(a.cp10k_sum, b.cp10k_sum)
    np.testing.assert_array_equal(a.nonzero_medians(), b.nonzero_medians())


def test_partial_round_trip(block, tmp_path):
    s = one_pass(block, VOCAB)
    one_pass(block, VOCAB).save_partial(tmp_path / "s.stats")
    back = GeneStats.load_partial(tmp_path / "s.stats", VOCAB)
    _assert_same_stats(s, back)
    with pytest.raises(ValueError, match="tokens"):
        GeneStats.load_partial(tmp_path / "s.stats", VOCAB + 1)
    blob = (tmp_path / "s.stats").read_bytes()
    (tmp_path / "torn.stats").write_bytes(blob[: len(blob) - 3])
    with pytest.raises(ValueError, match="truncated"):
        GeneStats.load_partial(tmp_path / "torn.stats", VOCAB)
    # a loaded partial goes on accumulating like one pass
    first = GeneStats(VOCAB)
    first.add_cells(*cell_slice(block, 0, 600))
    first.save_partial(tmp_path / "p.stats")
    resumed = GeneStats.load_partial(tmp_path / "p.stats", VOCAB)
    resumed.add_cells(*cell_slice(block, 600, 1500))
    assert_same_sketch(resumed.finalize(), s)


def test_zarr_round_trip(block, tmp_path):
    pytest.importorskip("zarr")
    import zarr

    s = one_pass(block, VOCAB)
    s.to_zarr(tmp_path / "stats.zarr")
    back = GeneStats.from_zarr(tmp_path / "stats.zarr")
    _assert_same_stats(s, back)
    root = zarr.open_group(str(tmp_path / "stats.zarr"), mode="r")
    np.testing.assert_array_equal(root["nonzero_median"][...], s.nonzero_medians())
    np.testing.assert_array_equal(GeneStats.read_nonzero_medians(tmp_path / "stats.zarr"), s.nonzero_medians())
    del zarr.open_group(str(tmp_path / "stats.zarr"), mode="a")["nonzero_median"]  # as an older writer left it
    np.testing.assert_array_equal(GeneStats.read_nonzero_medians(tmp_path / "stats.zarr"), s.nonzero_medians())
    assert root.attrs["sketch"]["buckets_per_token"] == BUCKETS
    assert root.attrs["sketch"]["relative_error"] == RELATIVE_ERROR


def test_empty_round_trips(tmp_path):
    pytest.importorskip("zarr")
    s = GeneStats(8)
    GeneStats(8).save_partial(tmp_path / "e.stats")
    s.to_zarr(tmp_path / "e.zarr")
    for back in (GeneStats.load_partial(tmp_path / "e.stats", 8), GeneStats.from_zarr(tmp_path / "e.zarr")):
        _assert_same_stats(s, back)
        assert np.isnan(back.nonzero_medians()).all()


# --- edge cases and validation -------------------------------------------------------------------

def test_empty_blocks_and_unseen_genes():
    s = GeneStats(6)
    s.add_cells(np.zeros(0, np.int32), np.zeros(0, np.uint16), np.array([0]), np.zeros(0))
    assert s.n_cells == 0
    s.add_cells(np.zeros(0, np.int32), np.zeros(0, np.uint16), np.array([0, 0, 0]),
                np.array([0.0, 5.0]))  # two cells without counts
    assert s.n_cells == 2
    assert np.isnan(s.nonzero_medians()).all()
    assert len(s.sketch_keys) == 0
    # an explicit zero is not a nonzero
    s.add_cells(np.array([1, 3, 4], np.int32), np.array([2, 0, 5], np.uint16), np.array([0, 3]),
                np.array([10.0]))
    med = s.nonzero_medians()
    np.testing.assert_array_equal(s.nonzero_count, [0, 1, 0, 0, 1, 0])
    assert np.isnan(med[[0, 2, 3, 5]]).all()
    assert abs(med[1] - 2000.0) <= RELATIVE_ERROR * 2000.0
    assert abs(med[4] - 5000.0) <= RELATIVE_ERROR * 5000.0
    assert s.n_cells == 3
    np.testing.assert_array_equal(s.count_sum, [0, 2, 0, 0, 5, 0])


@pytest.mark.parametrize("piece", [None, 3])
@pytest.mark.parametrize("bad", ["gene", "negative", "nan", "total", "indptr"])
def test_invalid_block_is_rejected_and_changes_nothing(bad, piece, monkeypatch):
    if piece:  # the bad cell is in a later piece: the earlier pieces are rolled back
        monkeypatch.setattr(stats_mod, "_PIECE", piece)
    rng = np.random.default_rng(9)
    good = random_block(rng, 40, 50, mean_genes=8, count_dtype=np.float32)
    genes, counts, indptr, totals = (x.copy() for x in good)
    j = int(indptr[30])  # first entry of a late cell
    assert indptr[31] > j
    if bad == "gene":
        genes[j] = 50
    elif bad == "negative":
        counts[j] = -1
    elif bad == "nan":
        counts[j] = np.nan
    elif bad == "total":
        counts[j] = 1
        totals[30] = 0
    else:
        indptr[20] = indptr[21] + 1
    s = GeneStats(50)
    s.add_cells(*cell_slice(good, 0, 10))
    before = (s.count_sum.copy(), s.cp10k_sum.copy(), s.n_cells)
    with pytest.raises(ValueError):
        s.add_cells(genes, counts, indptr, totals)
    np.testing.assert_array_equal(s.count_sum, before[0])
    np.testing.assert_array_equal(s.cp10k_sum, before[1])
    assert s.n_cells == before[2]
    s.add_cells(*cell_slice(good, 10, 40))
    expected = one_pass(good, 50)
    assert_same_sketch(s.finalize(), expected)
    np.testing.assert_array_equal(s.cp10k_sum, expected.cp10k_sum)


def test_shape_errors():
    s = GeneStats(5)
    with pytest.raises(ValueError):
        s.add_cells(np.array([1, 2], np.int32), np.array([1], np.uint16), np.array([0, 2]),
                    np.array([3.0]))
    with pytest.raises(ValueError):
        s.add_cells(np.array([1, 2], np.int32), np.array([1, 1], np.uint16), np.array([0, 2]),
                    np.array([3.0, 4.0]))

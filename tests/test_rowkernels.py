"""The compiled row kernels equal the plain numpy/scipy reference on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from data_pipeline.conversion.rowkernels import columns_in_token_order, convert_rows, scan_rows
from data_pipeline.conversion.validate import SKIP_REASONS, row_flags


def _random_source(rng, n, n_vars, dtype, bad: bool, shuffle: bool):
    x = sp.random(n, n_vars, density=rng.uniform(0.02, 0.3), format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 300, k)).astype(dtype)
    x.data[rng.random(x.nnz) < 0.02] = 0  # explicit zeros are not genes
    if bad and dtype in (np.float32, np.float64):
        for value in (np.nan, np.inf, -2.0, 1.5):
            x.data[rng.integers(0, x.nnz, 2)] = value
    elif bad and np.dtype(dtype).kind == "i":
        x.data[rng.integers(0, x.nnz, 2)] = -3
    if shuffle:  # unsorted column indices within rows, as some writers leave them
        perm = rng.permutation(n_vars)
        x = sp.csr_matrix((x.data, perm[x.indices], x.indptr), shape=x.shape)
    return x


def _reference(x, colmap, integer, min_genes, vocab_size):
    """Value checks (validate.row_flags), then map -> drop -> sum duplicates -> sort (scipy)."""
    reason = row_flags(x, integer)
    coo = x.tocoo()
    token = colmap[coo.col]
    keep = (coo.data > 0) & (token >= 0) & (reason[coo.row] < 0)
    m = sp.csr_matrix((coo.data[keep].astype(np.float64), (coo.row[keep], token[keep])),
                      shape=(x.shape[0], vocab_size))
    m.sum_duplicates()
    reason[(reason < 0) & (np.diff(m.indptr) < min_genes)] = SKIP_REASONS.index("below_min_genes")
    total = np.asarray(x.astype(np.float64).sum(axis=1)).ravel()
    return reason, total, m[np.flatnonzero(reason < 0)]


@pytest.mark.parametrize("trial", range(24))
def test_convert_rows_equals_reference(trial):
    """Covers every way a row gets ordered: a source in vocabulary order (every third trial)
    with rows stored sorted (as read), or unsorted (a bitmap over a narrow token range, a radix
    sort over a wide one); any other source (`map_rows_scattered`)."""
    rng = np.random.default_rng(trial)
    n, n_vars = int(rng.integers(1, 200)), int(rng.integers(1, 400))
    dtype = [np.int32, np.int64, np.float32, np.float64, np.uint16][trial % 5]
    in_vocab_order = trial % 3 == 2
    shuffle = trial % 2 == 0 if in_vocab_order else rng.random() < 0.5
    x = _random_source(rng, n, n_vars, dtype, bad=trial % 3 == 0, shuffle=shuffle)
    vocab_size = int(rng.integers(3, 300_000 if trial % 4 == 0 else 3000))
    colmap = rng.integers(3, vocab_size, n_vars)
    colmap[rng.random(n_vars) < 0.2] = -1                 # genes not in the vocabulary
    colmap[rng.integers(0, n_vars, n_vars // 10)] = colmap[0]  # several columns of one gene
    if in_vocab_order:
        vocab_size = max(vocab_size, 4 + 2 * n_vars)
        colmap = np.where(rng.random(n_vars) < 0.2, -1, 3 + np.arange(n_vars) * (vocab_size // (n_vars + 3)))
    assert columns_in_token_order(colmap) == in_vocab_order
    integer, min_genes = trial % 2 == 0 or dtype in (np.int32, np.int64, np.uint16), int(rng.integers(1, 6))
    token_dtype = np.uint16 if vocab_size <= 65536 else np.uint32

    part_bits = int(rng.integers(2, 12))
    reason, total, indptr, tokens, values, parts = convert_rows(x.indptr, x.indices, x.data, colmap, integer,
                                                                min_genes, token_dtype, None, part_bits)
    ref_reason, ref_total, ref = _reference(x, colmap, integer, min_genes, vocab_size)
    np.testing.assert_array_equal(reason, ref_reason)
    ok = ref_reason < 0
    np.testing.assert_allclose(total[ok], ref_total[ok], rtol=1e-12)
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(tokens, ref.indices)
    assert tokens.dtype == token_dtype
    np.testing.assert_allclose(values.astype(np.float64), ref.data, rtol=1e-6)
    expect_parts = np.bincount(ref.indices.astype(np.int64) >> part_bits, minlength=len(parts))
    np.testing.assert_array_equal(parts, expect_parts)
    if integer:
        assert values.dtype == (np.uint16 if ref.data.max(initial=0) <= 65535 else np.uint32)


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_scan_rows_counts_cells_of_valid_rows(dtype):
    rng = np.random.default_rng(7)
    x = _random_source(rng, 150, 90, dtype, bad=True, shuffle=True)
    counts = np.zeros(90, np.int64)
    is_float = np.dtype(dtype).kind == "f"
    scan_rows(x.indptr.astype(np.int64), x.indices, x.data, is_float, is_float, np.arange(90), counts)
    ok = row_flags(x, True) < 0
    expect = ((x[np.flatnonzero(ok)] > 0).astype(np.int64)).sum(axis=0).A1
    np.testing.assert_array_equal(counts, expect)
    # columns of one gene: a cell counts once for it; unresolved columns (-1) count for nothing
    slot_of = rng.integers(-1, 30, size=90)
    genes = np.zeros(30, np.int64)
    scan_rows(x.indptr.astype(np.int64), x.indices, x.data, is_float, is_float, slot_of, genes)
    good = (x[np.flatnonzero(ok)] > 0).toarray()
    np.testing.assert_array_equal(genes, [good[:, slot_of == g].any(axis=1).sum() for g in range(30)])


@pytest.mark.parametrize("colmap", [[3, 3, 5], [5, 5, 3]], ids=["ordered", "scattered"])
def test_large_counts_widen_and_an_overflowing_cell_is_skipped(colmap):
    x = sp.csr_matrix(np.array([[70000, 0, 1], [4_000_000_000, 4_000_000_000, 0], [2, 0, 7]], np.float64))
    values = convert_rows(x[:1].indptr, x[:1].indices, x[:1].data, np.array([3, 4, 5]), True, 1, np.uint16).values
    assert values.dtype == np.uint32 and values.tolist() == [70000, 1]
    # the two large columns are one gene: the sum overflows uint32; that cell alone is skipped
    rows = convert_rows(x.indptr, x.indices, x.data, np.array(colmap), True, 1, np.uint16)
    assert rows.reason.tolist() == [-1, SKIP_REASONS.index("count_overflow"), -1]
    assert rows.indptr.tolist() == [0, 2, 4] and rows.values.dtype == np.uint32
    assert sorted(rows.values[:2].tolist()) == [1, 70000] and sorted(rows.values[2:].tolist()) == [2, 7]

"""Synthetic count generator: determinism, valid AnnData layout, and realistic statistics."""

from __future__ import annotations

import re

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from data_pipeline.synthetic import (
    BLOCK_CELLS,
    iter_synthetic_chunks,
    synthetic_model,
    synthetic_var,
    write_synthetic_h5ad,
)

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")

# Small but crossing a block boundary, so the multi-block path is exercised.
N_CELLS = BLOCK_CELLS + 904
N_GENES = 3000
N_TYPES = 4


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "small.h5ad"
    summary = write_synthetic_h5ad(path, N_CELLS, n_genes=N_GENES, n_cell_types=N_TYPES, seed=7)
    return path, summary


@pytest.fixture(scope="module")
def default_cells():
    """2,000 cells with the default model (20,000 genes, 8 types): [n_cells, n_genes] CSR + codes."""
    parts = list(iter_synthetic_chunks(2000, seed=11))
    return sp.vstack([m for _, m, _ in parts], format="csr"), np.concatenate([c for _, _, c in parts])


def _stack(chunks):
    chunks = list(chunks)
    starts = [s for s, _, _ in chunks]
    matrix = sp.vstack([m for _, m, _ in chunks], format="csr")
    return starts, matrix, np.concatenate([c for _, _, c in chunks])


def test_same_seed_same_bytes_different_seed_differs(small_file, tmp_path):
    path, _ = small_file
    again = tmp_path / "again.h5ad"
    write_synthetic_h5ad(again, N_CELLS, n_genes=N_GENES, n_cell_types=N_TYPES, seed=7)
    assert path.read_bytes() == again.read_bytes()
    other = tmp_path / "other.h5ad"
    write_synthetic_h5ad(other, N_CELLS, n_genes=N_GENES, n_cell_types=N_TYPES, seed=8)
    assert path.read_bytes() != other.read_bytes()
    # Only the final files remain: the temporary name was renamed away.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.h5ad", "other.h5ad"]


def test_values_do_not_depend_on_chunk_size():
    n = 2 * BLOCK_CELLS + 100
    kw = dict(n_genes=1000, n_cell_types=3, seed=5, median_library_size=2000)
    starts, ref, ref_codes = _stack(iter_synthetic_chunks(n, **kw))
    assert starts == [0, BLOCK_CELLS, 2 * BLOCK_CELLS]
    for chunk_cells in (1000, 5000, 3 * BLOCK_CELLS):
        starts, m, codes = _stack(iter_synthetic_chunks(n, chunk_cells=chunk_cells, **kw))
        assert starts == list(range(0, n, chunk_cells))
        assert (m != ref).nnz == 0 and np.array_equal(codes, ref_codes)
        assert m.dtype == np.int32
    # A smaller data set is a prefix of a larger one.
    _, prefix, prefix_codes = _stack(iter_synthetic_chunks(BLOCK_CELLS + 10, **kw))
    assert (prefix != ref[:BLOCK_CELLS + 10]).nnz == 0
    assert np.array_equal(prefix_codes, ref_codes[:BLOCK_CELLS + 10])


def test_h5ad_layout_and_valid_csr(small_file):
    path, summary = small_file
    with h5py.File(path, "r") as f:
        assert f.attrs["encoding-type"] == "anndata"
        x = f["X"]
        assert x.attrs["encoding-type"] == "csr_matrix"
        assert list(x.attrs["shape"]) == [N_CELLS, N_GENES]
        assert x["data"].dtype == np.int32
        assert x["indices"].dtype == np.int32
        assert x["indptr"].dtype == np.int64
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            assert name in f

    adata = ad.read_h5ad(path)
    assert adata.shape == (N_CELLS, N_GENES)
    x = adata.X
    assert sp.issparse(x) and x.format == "csr"
    assert x.dtype == np.int32
    assert x.indptr[0] == 0 and x.indptr[-1] == x.nnz and np.all(np.diff(x.indptr) >= 0)
    assert x.data.min() > 0                          # nonnegative, no explicit zeros
    # Strictly ascending within every row (no duplicates either).
    steps = np.diff(x.indices.astype(np.int64))
    row_starts = np.zeros(x.nnz, dtype=bool)
    row_starts[x.indptr[:-1][np.diff(x.indptr) > 0]] = True
    assert np.all(steps[~row_starts[1:]] > 0)
    assert x.indices.min() >= 0 and x.indices.max() < N_GENES

    assert adata.obs_names[0] == "syn-0000000" and adata.obs_names[-1] == f"syn-{N_CELLS - 1:07d}"
    assert adata.obs_names.is_unique
    type_names = [f"type_{t:02d}" for t in range(N_TYPES)]
    assert list(adata.obs["cell_type"].cat.categories) == type_names
    assert set(adata.obs["cell_type"]) == set(adata.obs["cell_type"].cat.categories)
    assert list(adata.var.columns) == ["ensembl_id", "gene_symbol"]
    assert list(adata.var_names) == list(adata.var["ensembl_id"])
    assert adata.var["gene_symbol"].iloc[5] == "SYN5"

    assert summary["n_cells"] == N_CELLS and summary["n_genes"] == N_GENES
    assert summary["nnz"] == x.nnz
    assert summary["median_genes_per_cell"] == np.median(np.diff(x.indptr))
    assert summary["median_library_size"] == np.median(np.asarray(x.sum(axis=1)).ravel())


def test_gene_ids_are_ensembl_style_and_unique():
    var = synthetic_var(20000)
    assert var.index.is_unique and len(var) == 20000
    assert all(ENSEMBL_RE.match(g) for g in var.index)
    assert all(ENSEMBL_RE.match(g) for g in var["ensembl_id"])
    assert var["gene_symbol"].is_unique


def test_cell_types_are_distinguishable_by_their_markers(default_cells):
    x, codes = default_cells
    model = synthetic_model(seed=11)
    assert all(50 <= len(m) <= 200 for m in model.markers)
    # Markers of different types are disjoint.
    all_markers = np.concatenate(model.markers)
    assert len(np.unique(all_markers)) == len(all_markers)
    totals = np.asarray(x.sum(axis=1)).ravel()
    norm = sp.diags(1e4 / totals) @ x.astype(np.float64)
    for t, markers in enumerate(model.markers):
        score = np.asarray(norm[:, markers].sum(axis=1)).ravel()
        own = score[codes == t].mean()
        others = [score[codes == u].mean() for u in range(model.n_cell_types) if u != t]
        assert own > 5 * max(others), (t, own, others)


def test_realistic_depth_and_genes_per_cell(default_cells):
    x, _ = default_cells
    genes_per_cell = np.diff(x.indptr)
    totals = np.asarray(x.sum(axis=1)).ravel()
    assert 1000 <= np.median(genes_per_cell) <= 2000
    assert genes_per_cell.min() >= 100 and genes_per_cell.max() <= 6000
    assert 4000 <= np.median(totals) <= 6000
    # Library sizes vary (log-normal), not a constant depth.
    assert np.percentile(totals, 90) / np.percentile(totals, 10) > 2
    # Heavy-tailed genes: the top 1% of genes take a large share of the counts.
    gene_sums = np.sort(np.asarray(x.sum(axis=0)).ravel())[::-1]
    assert gene_sums[:200].sum() / gene_sums.sum() > 0.25


def test_median_library_size_is_configurable():
    _, x, _ = _stack(iter_synthetic_chunks(500, n_genes=5000, seed=3, median_library_size=20000))
    assert 16000 <= np.median(np.asarray(x.sum(axis=1)).ravel()) <= 24000


def test_counts_are_overdispersed(default_cells):
    x, codes = default_cells
    sub = x[codes == np.bincount(codes).argmax()]
    totals = np.asarray(sub.sum(axis=1)).ravel()
    dense = sub.toarray()
    g = np.argmax(dense.mean(axis=0))
    assert dense[:, g].var() > 2 * dense[:, g].mean()
    # Also after removing library-size variation: among cells of similar depth the gene is
    # still over-dispersed (Gamma-Poisson), not Poisson.
    mid = (totals > np.percentile(totals, 40)) & (totals < np.percentile(totals, 60))
    y = dense[mid, g] / totals[mid] * np.median(totals[mid])
    assert y.var() > 1.5 * y.mean()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        list(iter_synthetic_chunks(10, n_genes=10))
    with pytest.raises(ValueError):
        list(iter_synthetic_chunks(10, n_cell_types=0))
    with pytest.raises(ValueError):
        list(iter_synthetic_chunks(-1))
    with pytest.raises(ValueError):
        write_synthetic_h5ad(tmp_path / "x.h5ad", 10, median_library_size=0)
    assert not list(tmp_path.iterdir())

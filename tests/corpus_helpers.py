"""Small input files and corpus readers shared by the converter tests."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_pipeline.conversion.shards import iter_shard


def ensembl(i: int) -> str:
    return f"ENSG{90000000000 + i:011d}"


def random_counts(n_cells: int, n_genes: int, seed: int, density: float = 0.1) -> sp.csr_matrix:
    """Integer counts, every row with at least one nonzero.  [n_cells, n_genes] int32"""
    rng = np.random.default_rng(seed)
    x = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.negative_binomial(2, 0.3, k) + 1).astype(np.int32)
    # one guaranteed nonzero per row, so no cell is empty by accident
    ensure = sp.csr_matrix((np.ones(n_cells, np.int32), (np.arange(n_cells), rng.integers(0, n_genes, n_cells))),
                           shape=(n_cells, n_genes))
    return (x + ensure).tocsr()


def write_h5ad(path: Path, x, gene_ids=None, obs: dict | None = None, var_names=None,
               compression: str | None = None) -> Path:
    n_cells, n_genes = x.shape
    gene_ids = gene_ids if gene_ids is not None else [ensembl(i) for i in range(n_genes)]
    var = pd.DataFrame({"ensembl_id": gene_ids, "gene_symbol": [f"SYM{i}" for i in range(n_genes)]},
                       index=var_names if var_names is not None else gene_ids)
    obs_frame = pd.DataFrame(obs or {}, index=[f"{path.stem}-cell{i}" for i in range(n_cells)])
    ad.AnnData(X=x, obs=obs_frame, var=var).write_h5ad(path, compression=compression)
    return path


def corpus_cells(corpus: Path) -> dict[tuple[int, int], dict[str, int]]:
    """{(source index, source row): {ensembl id: count}} for every cell of a corpus."""
    vocab = [line.split("\t")[1] for line in (corpus / "vocab.tsv").read_text().splitlines()[1:]]
    manifest = json.loads((corpus / "manifest.json").read_text())
    cells = {}
    for shard in manifest["shards"]:
        for _, b in iter_shard(corpus / shard["file"]):
            for i in range(b.n_cells):
                lo, hi = b.indptr[i], b.indptr[i + 1]
                cells[(b.source, int(b.source_row[i]))] = {
                    vocab[g]: c.item() for g, c in zip(b.genes[lo:hi], b.counts[lo:hi])}
    return cells


def corpus_files(corpus: Path) -> dict[str, bytes]:
    """Every file of a corpus except stats.zarr (compared by value elsewhere), by relative path."""
    return {str(p.relative_to(corpus)): p.read_bytes() for p in sorted(corpus.rglob("*"))
            if p.is_file() and "stats.zarr" not in p.parts}

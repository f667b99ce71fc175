"""Embed cells of an `.h5ad` with an exported bundle: raw counts -> the bundle's vocabulary ->
its normalization -> length-grouped packed batches -> cell embeddings, in the input's cell order.

Genes are matched by Ensembl id (found the way the converter finds it: a var column or var_names,
versions stripped), else by symbol. Each cell's total counts are over all its genes, as in the
corpus. Cells are read in chunks of rows (backed mode), so the input need not fit in memory when
the output is a `.zarr` array; an `.h5ad` output is the input with ``obsm["X_<name>"]`` added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from data_pipeline.batch import PackedBatch
from data_pipeline.gene_ids import resolve_gene_ids
from data_pipeline.normalize import normalize
from data_pipeline.readers import SourceError

from .model import CellModel


def gene_tokens(var, vocab, source: str) -> tuple[np.ndarray, dict]:
    """Token per var row (-1: not in the vocabulary) and a coverage report."""
    try:
        identity = resolve_gene_ids(var, source)
    except SourceError as err:  # its advice names the converter's options
        raise ValueError(f"{source}: no gene identifiers the model's vocabulary can match: var needs Ensembl ids "
                         "or gene symbols (in var_names or a var column); add them to the file and embed "
                         f"again ({err})") from None
    tokens = vocab.lookup(identity.ids)
    gene_token_ids = set(vocab.index.values())
    by_symbol = {s.upper(): i for i, s in enumerate(vocab.symbols) if s and i in gene_token_ids}
    for row in np.flatnonzero(tokens < 0):
        symbol = str(identity.symbols[row]).upper() if len(identity.symbols) else ""
        tokens[row] = by_symbol.get(symbol, -1)
    mapped = tokens >= 0
    report = {"input_genes": int(len(tokens)), "mapped_genes": int(mapped.sum()),
              "input_fraction": float(mapped.mean()) if len(tokens) else 0.0,
              "vocab_genes": int(vocab.n_genes), "vocab_fraction": float(len(set(tokens[mapped])) / max(1, vocab.n_genes))}
    return tokens, report


def token_csr(x, tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of counts ``x`` [n, n_vars] as CSR over tokens, ascending within a cell, duplicate
    genes summed: (indptr, genes, counts, total_counts)."""
    x = sp.csr_matrix(x)
    if (x.data < 0).any() or not np.all(np.mod(x.data, 1) == 0):
        raise ValueError("the input is not raw counts (negative or fractional values): embed the raw UMI counts "
                         "(pass --layer counts if they are in a layer)")
    totals = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    cols = tokens[x.indices]
    keep = cols >= 0
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))[keep]
    m = sp.csr_matrix((x.data[keep], (rows, cols[keep])), shape=(x.shape[0], vocab_size))
    m.sum_duplicates()
    m.sort_indices()
    return m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data, totals


def length_batches(indptr: np.ndarray, genes: np.ndarray, values: np.ndarray, token_budget: int, extra_tokens: int = 0,
                   mlm_mask: np.ndarray | None = None, targets: np.ndarray | None = None):
    """Normalized cells (CSR: ``indptr`` [n+1], ``genes`` / ``values`` [nnz]) as packed batches of
    length-sorted cells, each within ``token_budget`` counting ``extra_tokens`` (a <cls>) per
    cell; ``mlm_mask`` / ``targets`` [nnz] when positions are masked. Yields (cell indices [B],
    `PackedBatch`)."""
    lengths = np.diff(indptr)
    order = np.argsort(lengths, kind="stable")
    start = 0
    while start < len(order):
        stop, longest = start, 0
        while stop < len(order):
            longest = max(longest, lengths[order[stop]] + extra_tokens)
            if stop > start and longest * (stop + 1 - start) > token_budget:
                break
            stop += 1
        cells = order[start:stop]
        parts = [np.arange(indptr[c], indptr[c + 1]) for c in cells]
        index = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        cu = np.zeros(len(cells) + 1, np.int32)
        cu[1:] = np.cumsum(lengths[cells])
        n = len(index)
        yield cells, PackedBatch(
            gene_ids=torch.from_numpy(genes[index]), values=torch.from_numpy(values[index]),
            cu_seqlens=torch.from_numpy(cu), max_seqlen=int(lengths[cells].max(initial=0)),
            mlm_mask=torch.zeros(n, dtype=torch.bool) if mlm_mask is None else torch.from_numpy(mlm_mask[index]),
            mlm_targets=torch.zeros(n) if targets is None else torch.from_numpy(targets[index]),
            labels=torch.zeros(len(cells), 0, dtype=torch.long),
            view_index=torch.arange(len(cells)), cell_index=torch.from_numpy(cells))
        start = stop


@torch.inference_mode()
def embed_counts(model: CellModel, indptr, genes, counts, totals, token_budget: int = 16384, seed: int = 0,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """Cell embeddings ``[n, d]`` (float32) of cells given as CSR over tokens, batched by length."""
    norm = normalize(model.normalization, indptr, genes, counts, totals, np.random.default_rng(seed))
    out = np.zeros((len(norm.indptr) - 1, model.config.d_model), np.float32)
    extra = 1 if model.config.use_cls else 0
    for cells, batch in length_batches(norm.indptr, norm.genes, norm.values, token_budget, extra):
        batch = batch.to(device)
        _, cell_states = model.encode(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen)
        out[cells] = cell_states.float().cpu().numpy()
    return out


def embed_h5ad(model: CellModel, source: str | Path, out: str | Path, name: str = "scfm", layer: str | None = None,
               min_coverage: float = 0.5, chunk_cells: int = 8192, token_budget: int = 16384,
               device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Embed every cell of ``source``; write ``out`` (.h5ad: the input plus ``obsm["X_<name>"]``;
    .zarr: the embedding array ``[n_cells, d]`` with ``obs_names``). Refuses inputs where less
    than ``min_coverage`` of the counts fall on vocabulary genes. Returns a coverage report."""
    import anndata

    source, out = Path(source), Path(out)
    if out.suffix not in (".h5ad", ".zarr"):
        raise ValueError(f"--out {out}: write .h5ad (the input plus obsm['X_{name}']) or .zarr (the array only)")
    adata = anndata.read_h5ad(source, backed="r")
    tokens, report = gene_tokens(adata.var, model.vocab, str(source))
    matrix = adata.layers[layer] if layer else adata.X
    n = adata.n_obs
    # coverage of what the cells express: the share of counts (over the first chunk) on vocabulary genes
    first = sp.csr_matrix(matrix[0 : min(n, chunk_cells)])
    report["count_fraction"] = float(first.data[tokens[first.indices] >= 0].sum() / max(first.data.sum(), 1))
    if report["count_fraction"] < min_coverage:
        raise ValueError(f"{source}: only {report['count_fraction']:.0%} of the counts fall on genes of the model's "
                         f"vocabulary ({report['mapped_genes']} of {report['input_genes']} genes matched; minimum "
                         f"{min_coverage:.0%}); check the gene identifiers (var Ensembl ids or symbols) or lower "
                         "--min-coverage")
    embedding = np.zeros((n, model.config.d_model), np.float32)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="embed", unit="cell")
    for a in range(0, n, chunk_cells):
        b = min(n, a + chunk_cells)
        indptr, genes, counts, totals = token_csr(matrix[a:b], tokens, model.config.vocab_size)
        embedding[a:b] = embed_counts(model, indptr, genes, counts, totals, token_budget, seed=a, device=device)
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    if out.suffix == ".zarr":
        import zarr

        root = zarr.open_group(str(out), mode="w")
        root.create_array(f"X_{name}", data=embedding)
        root.attrs["obs_names"] = list(map(str, adata.obs_names))
    else:
        full = adata.to_memory()
        full.obsm[f"X_{name}"] = embedding
        full.write_h5ad(out)
    adata.file.close()
    report.update(n_cells=n, dim=int(embedding.shape[1]), out=str(out), key=f"X_{name}")
    return report

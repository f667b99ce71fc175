"""Embed cells of an `.h5ad` with an exported bundle: raw counts -> the bundle's vocabulary ->
its normalization -> length-grouped packed batches -> cell embeddings, in the input's cell order.

Genes are resolved as the converter resolves them (`data_pipeline.conversion.gene_ids.resolve_gene_ids`, with
the same ``gene_column`` / ``symbol_table`` options): Ensembl ids from the var column (or
var_names) that holds them, versions stripped; else symbols, mapped to Ensembl ids through the
bundle vocabulary's symbol column and, taking precedence, a ``symbol_table``. A symbol the
vocabulary gives to several genes means the first listed (lowest token id). Beyond conversion,
for rows still unmatched: an Ensembl id the vocabulary lacks (another annotation release) or a
symbol differing only in case is matched by the row's symbol, unless the file holds that gene
under the vocabulary's id. Each cell's total
counts are over all its genes, as in the corpus. Cells are read in chunks of rows by the converter's
reader and their embeddings written as they come (`pretrain.embed_output`), so the input need not
fit in memory: an `.h5ad` output is the input with ``obsm["X_<name>"]`` added, a `.zarr` output an
AnnData store of obs, var and that obsm.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import xxhash

from data_pipeline.conversion.gene_ids import resolve_gene_ids, vocabulary_symbol_table
from data_pipeline.conversion.readers import SourceError
from data_pipeline.conversion.vocab import ensembl_prefix, read_symbol_table
from data_pipeline.loading.batch import PackedBatch
from data_pipeline.loading.batching import TokenCost, group_by_length
from data_pipeline.loading.normalize import CellSeeds, Normalized, normalize

from .model import CellModel

logger = logging.getLogger(__name__)


def gene_tokens(var, vocab, source: str, gene_column: str | None = None,
                symbol_table: dict[str, str] | None = None) -> tuple[np.ndarray, dict]:
    """Token per var row (-1: not in the vocabulary) and a coverage report.

    ``gene_column``: the var column (or "var_names") holding Ensembl ids or symbols, detected if
    None; ``symbol_table``: symbol -> Ensembl id, consulted before the vocabulary's own symbols.
    """
    table = {**vocabulary_symbol_table(vocab), **(symbol_table or {})}
    try:
        identity = resolve_gene_ids(var, source, gene_column, table)
    except SourceError as err:
        detail = str(err).removeprefix(f"{source}: ")
        raise ValueError(f"{source}: no gene identifiers the model's vocabulary can match: var needs Ensembl ids "
                         "or gene symbols (in var_names or a var column); add them to the file and embed "
                         f"again ({detail})") from None
    tokens = vocab.lookup(identity.ids)
    by_symbol, syms = identity.from_symbols.copy(), identity.symbols
    # rows still unmatched that have a symbol: an Ensembl id of another annotation release (CCL5, SOD2,
    # TXNIP changed ids), or a symbol that differs only in case (C2ORF15 for C2orf15). The symbol names
    # the vocabulary's gene, unless the file also holds that gene under the vocabulary's id.
    # Rows rescued onto one gene (CD4 and Cd4) are summed, as rows of one id are.
    rows = np.flatnonzero((tokens < 0) & (syms != ""))
    other_species = 0
    if len(rows):
        upper: dict[str, str] = {}
        for symbol, gene in table.items():
            upper.setdefault(symbol.upper(), gene)
        via = vocab.lookup(np.array([table.get(str(s)) or upper.get(str(s).upper(), "") for s in syms[rows]],
                                    dtype=object))
        taken = set(tokens[tokens >= 0].tolist())
        species = next((k for k in vocab.id_prefixes() if k != "other"), None)
        for row, token in zip(rows, via):
            if token >= 0 and token not in taken:
                tokens[row], by_symbol[row] = token, True
                own = ensembl_prefix(identity.ids[row])
                other_species += bool(own and species and own != species)
        if other_species:
            logger.warning(f"{source}: {other_species} genes with Ensembl ids of another species than the model's "
                           f"({species}) were matched to its genes by symbol (Cd4 -> CD4): a mapping by name, not "
                           "by orthology; map the genes to the model's species first if that is not intended")
    mapped = tokens >= 0
    # matched through a symbol that the vocabulary gives to several genes (the first listed was taken)
    symbol_genes: dict[str, int] = {}
    for gene, symbol in zip(vocab.ensembl_ids, vocab.symbols):
        if symbol and gene in vocab.index:
            symbol_genes[symbol.upper()] = symbol_genes.get(symbol.upper(), 0) + 1
    user = symbol_table or {}
    ambiguous = mapped & by_symbol & np.array([str(s) not in user and symbol_genes.get(str(s).upper(), 0) > 1
                                               for s in syms], bool)
    report = {"input_genes": int(len(tokens)), "mapped_genes": int(mapped.sum()),
              "input_fraction": float(mapped.mean()) if len(tokens) else 0.0,
              "mapped_by_ensembl": int((mapped & ~by_symbol).sum()),
              "mapped_by_symbol": int((mapped & by_symbol).sum()), "ambiguous_symbols": int(ambiguous.sum()),
              "mapped_from_other_species": other_species,
              "gene_identity": identity.how.replace("the symbol table", "the vocabulary's symbols"
                                                    + (" and --symbol-table" if symbol_table else "")),
              "vocab_genes": int(vocab.n_genes), "vocab_fraction": float(len(set(tokens[mapped])) / max(1, vocab.n_genes))}
    return tokens, report


def add_cell_input_arguments(parser) -> None:
    """The flags of every command that reads an .h5ad's cells into a bundle's vocabulary (embed,
    predict, cluster): --layer, --min-coverage, --gene-column, --symbol-table, --token-budget."""
    parser.add_argument("--layer", default=None, help="take the counts from this layer instead of X")
    parser.add_argument("--min-coverage", type=float, default=0.5,
                        help="refuse inputs with a smaller share of their counts on vocabulary genes (default 0.5)")
    parser.add_argument("--gene-column", default=None,
                        help="var column holding the genes' Ensembl ids or symbols (or 'var_names'); detected if "
                             "omitted, as by `python -m data_pipeline convert`")
    parser.add_argument("--symbol-table", default=None,
                        help="symbol -> Ensembl table (CSV/TSV[.gz] or pickled dict) for symbols; its entries take "
                             "precedence over the bundle vocabulary's own symbols")
    parser.add_argument("--token-budget", type=int, default=16384,
                        help="tokens per batch, counted as in training: a cell of a gene_set=all or encoder-decoder "
                             "model costs the full gene set (default 16384)")


def add_encoder_layer_argument(parser) -> None:
    """--encoder-layer, for the commands whose output is the embedding itself (embed, cluster)."""
    parser.add_argument("--encoder-layer", type=int, default=-1,
                        help="the encoder block whose states are pooled: -1 the last (default), -2 the "
                             "second-to-last (Geneformer's EmbExtractor default), down to minus the model's layers")


def require_coverage(cells, chunk_cells: int, tokens: np.ndarray, report: dict, source: str,
                     min_coverage: float) -> None:
    """Refuse an input where less than ``min_coverage`` of the counts of its first cells (``cells``:
    `open_cells`'s reader; the first chunk of ``chunk_cells`` cells that holds any counts, since empty
    droplets may come first) fall on vocabulary genes; sets ``report["count_fraction"]`` (``report``:
    `gene_tokens`'s), None when the input holds no counts at all (no cells, or only empty ones:
    nothing to judge, and every embedding is the empty cell's)."""
    report["count_fraction"] = None
    for a in range(0, cells.n_cells, chunk_cells):
        first = sp.csr_matrix(cells.read_rows(a, min(cells.n_cells, a + chunk_cells)))
        if first.data.sum() > 0:
            break
    else:
        return
    report["count_fraction"] = float(first.data[tokens[first.indices] >= 0].sum() / first.data.sum())
    if report["count_fraction"] < min_coverage:
        raise ValueError(f"{source}: only {report['count_fraction']:.0%} of the counts fall on genes of the model's "
                         f"vocabulary (minimum {min_coverage:.0%}; {report['mapped_genes']} of "
                         f"{report['input_genes']} genes matched, {report['mapped_by_ensembl']} by Ensembl id and "
                         f"{report['mapped_by_symbol']} by symbol, genes taken from {report['gene_identity']}); "
                         "pass --gene-column NAME if another var column holds the Ensembl ids or symbols, "
                         "--symbol-table FILE (symbol -> Ensembl id) for symbols the vocabulary lacks, or lower "
                         "--min-coverage")


def token_csr(x, tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of counts ``x`` [n, n_vars] as CSR over tokens, ascending within a cell, duplicate
    genes summed, stored zeros dropped (the converter keeps only counts > 0, so a zero is not an
    expressed gene): (indptr, genes, counts, total_counts)."""
    x = sp.csr_matrix(x)
    if (x.data < 0).any() or not np.all(np.mod(x.data, 1) == 0):
        raise ValueError("the input is not raw counts (negative or fractional values): embed the raw UMI counts "
                         "(pass --layer counts if they are in a layer, or --layer raw.X if they are in raw)")
    totals = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    cols = tokens[x.indices]
    keep = (cols >= 0) & (x.data != 0)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))[keep]
    data = x.data[keep]
    if np.issubdtype(data.dtype, np.integer):  # genes summed below: a uint16 sum of two 40,000s wraps around
        data = data.astype(np.int64)
    m = sp.csr_matrix((data, (rows, cols[keep])), shape=(x.shape[0], vocab_size))
    m.sum_duplicates()
    m.sort_indices()
    return m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data, totals


def length_batches(indptr: np.ndarray, genes: np.ndarray, values: np.ndarray, token_budget: int,
                   cost: TokenCost | None = None, mlm_mask: np.ndarray | None = None,
                   targets: np.ndarray | None = None, read_depth: np.ndarray | None = None):
    """Normalized cells (CSR: ``indptr`` [n+1], ``genes`` / ``values`` [nnz]) as packed batches of
    length-sorted cells (longest first), cut by the trainer's batcher (`data_pipeline.loading.batching`)
    within ``token_budget`` as ``cost`` counts them (the model's `ModelConfig.token_cost`; None:
    lengths summed); a cell over the budget on its own is a batch of its own. ``mlm_mask`` / ``targets`` [nnz] when
    positions are masked; ``read_depth`` [n, 2] (T, S per cell) for models with depth tokens.
    Yields (cell indices [B], `PackedBatch`)."""
    lengths = np.diff(indptr)
    cost = cost or TokenCost()
    order, bounds = group_by_length(cost.cells(lengths), token_budget, padded=cost.padded)
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
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
            view_index=torch.arange(len(cells)), cell_index=torch.from_numpy(cells),
            read_depth=None if read_depth is None else torch.from_numpy(read_depth[cells]))


def cell_keys(indptr: np.ndarray, genes: np.ndarray, counts: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 64-bit key per cell from its content alone (its tokens and counts) and ``seed``.  [n] uint64"""
    genes, counts = np.asarray(genes, np.int64), np.asarray(counts, np.float64)  # int or float input: one key
    keys = np.empty(len(indptr) - 1, np.uint64)
    for i, (a, b) in enumerate(zip(indptr[:-1].tolist(), indptr[1:].tolist())):
        h = xxhash.xxh3_64(genes[a:b].tobytes(), seed=seed)
        h.update(counts[a:b].tobytes())
        keys[i] = h.intdigest()
    return keys


GENE_CAPS = ("auto", "none", "top", "sample")


def embedding_normalization(model: CellModel, cap: str = "auto"):
    """The normalization cells are embedded with (`GENE_CAPS`): ``none``: every expressed gene;
    ``top``: the model's trained cap ``data.max_genes`` filled with each cell's most expressed genes
    (deterministic); ``sample``: that cap as a uniform random subset, the input the model was
    trained on; ``auto``: ``none`` for FAVOR+ (linear in length: a long cell costs no more per
    gene) and where no cap was trained, else ``top`` (exact attention's memory grows with the
    square of the length). Rank mode always keeps the top ranks."""
    import dataclasses

    if cap not in GENE_CAPS:
        raise ValueError(f"gene cap {cap!r} is not one of {', '.join(GENE_CAPS)}")
    norm = model.normalization
    if norm.mode == "rank":  # its input is the top ranks by definition (Geneformer's truncation, model.max_rank)
        return norm
    if cap == "auto":
        cap = "none" if model.config.attention == "favor" or norm.max_genes is None else "top"
    if cap == "none":
        return dataclasses.replace(norm, max_genes=None)
    return dataclasses.replace(norm, cap="top" if cap == "top" else "random")


def model_input(model: CellModel, indptr, genes, counts, totals, seed: int = 0,
                cap: str = "auto") -> tuple[Normalized, np.ndarray]:
    """Cells given as CSR over tokens, normalized as `embed_counts` feeds them to the model (``cap``:
    `embedding_normalization`; each cell's random draws seeded by its own content, see there):
    (normalized cells, read depth [n, 2] float32: T = S = each cell's total count, for models with
    depth tokens)."""
    rng = CellSeeds(cell_keys(indptr, genes, counts, seed))
    norm = normalize(embedding_normalization(model, cap), indptr, genes, counts, totals, rng)
    return norm, np.repeat(np.asarray(totals, np.float32)[:, None], 2, axis=1)


@torch.inference_mode()
def embed_counts(model: CellModel, indptr, genes, counts, totals, token_budget: int = 16384, seed: int = 0,
                 device: str | torch.device = "cpu", cap: str = "auto", encoder_layer: int = -1) -> np.ndarray:
    """Cell embeddings ``[n, d]`` (float32) of cells given as CSR over tokens, batched by length as
    the trainer batches them (``token_budget`` counted by the model's `ModelConfig.token_cost`).

    ``cap``: which genes of a long cell the model sees (`embedding_normalization`; by default all of
    them with FAVOR+, else its most expressed up to the trained cap). Random draws (``cap="sample"``,
    and random quantile ties) are seeded by each cell's own content (`cell_keys`, ``seed``), so the
    same cell gets the same embedding in any file, at any position, among any other cells.

    With depth tokens (scFoundation's T and S) a cell is embedded at its own depth: T = S = its
    total count (scFoundation's get_embedding.py sets S = the cell's total and T by --tgthighres,
    e.g. a higher target depth; not offered here).

    ``encoder_layer``: the encoder block whose states are pooled (-1, the last; -2, the
    second-to-last: Geneformer's `EmbExtractor` default, ``emb_layer=-1`` there)."""
    model.encoder.blocks_through(encoder_layer)  # refused before any cell is read
    norm, depth = model_input(model, indptr, genes, counts, totals, seed, cap)
    out = np.zeros((len(norm.indptr) - 1, model.config.cell_dim), np.float32)
    training = model.training
    model.eval()  # no dropout draws: the same cell, the same embedding (restored below)
    cost = model.config.token_cost(embedding_normalization(model, cap).max_genes)
    try:
        for cells, batch in length_batches(norm.indptr, norm.genes, norm.values, token_budget, cost,
                                           read_depth=depth):
            batch = batch.to(device)
            _, cell_states = model.encode(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen,
                                          batch.read_depth, layer=encoder_layer)
            out[cells] = cell_states.float().cpu().numpy()
    finally:
        model.train(training)
    return out


def open_cells(source: str | Path, layer: str | None = None):
    """``source`` (.h5ad) as the converter reads it (`data_pipeline.conversion.readers.open_source`:
    row ranges of X or ``layer``, never the whole matrix); errors name --layer."""
    from data_pipeline.conversion.readers import open_source

    try:
        cells = open_source(source, matrix=layer)
    except SourceError as err:
        raise SourceError(str(err).replace("(choose with --matrix)", "(choose with --layer)")) from None
    if cells.format != "h5ad":  # the outputs copy the input's .h5ad (embed_output)
        cells.close()
        raise SourceError(f"{source}: a {cells.format} input; this command reads .h5ad files: write one first "
                          "(e.g. `anndata.read_zarr(path).write_h5ad(path.h5ad)`, or scanpy's read_10x_h5 / "
                          "read_10x_mtx then write_h5ad)")
    return cells


def embed_h5ad(model: CellModel, source: str | Path, out: str | Path, name: str = "scfm", layer: str | None = None,
               min_coverage: float = 0.5, chunk_cells: int = 8192, token_budget: int = 16384,
               device: str | torch.device = "cpu", progress: bool = True, gene_column: str | None = None,
               symbol_table: str | Path | dict[str, str] | None = None, cap: str = "auto",
               encoder_layer: int = -1) -> dict:
    """Embed every cell of ``source``; write ``out`` (`pretrain.embed_output`: .h5ad, the input
    plus ``obsm["X_<name>"]``; .zarr, an AnnData store of obs, var and that obsm), ``chunk_cells``
    rows at a time: neither the input's matrix nor the whole embedding is held in memory. Refuses
    inputs where less than ``min_coverage`` of the counts fall on vocabulary genes.
    ``gene_column`` / ``symbol_table`` (a symbol -> Ensembl CSV/TSV[.gz] or pickled dict, or a
    dict) mean what the converter's ``--gene-column`` / ``--symbol-table`` mean; ``cap`` and
    ``encoder_layer`` as in `embed_counts`. Returns a coverage report."""
    from .embed_output import EmbeddingWriter, check_output

    key = f"X_{name}"
    check_output(source, out, key)  # before the input is read: a typo costs nothing
    model.encoder.blocks_through(encoder_layer)
    if symbol_table is not None and not isinstance(symbol_table, dict):
        symbol_table = read_symbol_table(symbol_table)
    with open_cells(source, layer) as cells:
        tokens, report = gene_tokens(cells.var, model.vocab, str(source), gene_column, symbol_table)
        n = cells.n_cells
        require_coverage(cells, chunk_cells, tokens, report, str(source), min_coverage)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc="embed", unit="cell")
        with EmbeddingWriter(source, out, key, n, model.config.cell_dim, chunk_cells) as writer:
            for a in range(0, n, chunk_cells):
                b = min(n, a + chunk_cells)
                indptr, genes, counts, totals = token_csr(cells.read_rows(a, b), tokens, model.config.vocab_size)
                writer.write(embed_counts(model, indptr, genes, counts, totals, token_budget, device=device, cap=cap,
                                          encoder_layer=encoder_layer))
                if bar is not None:
                    bar.update(b - a)
        if bar is not None:
            bar.close()
    report.update(n_cells=n, dim=int(model.config.cell_dim), out=str(out), key=key, encoder_layer=encoder_layer)
    return report

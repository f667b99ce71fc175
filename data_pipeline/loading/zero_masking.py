"""Masked unexpressed genes (scFoundation's ``zero_mask_prob``): beside a share of each cell's
expressed genes, a share of the genes it has no count for is masked too, so that a decoder over the
full gene set learns to predict zeros, not only the values of expressed genes.

The corpus stores only a cell's expressed genes, so a masked unexpressed gene becomes an extra
token of its sequence: input 0, ``mlm_mask`` True, target 0, at its place in ascending gene order
(the batch layout's order outside rank mode). Each gene of the vocabulary that the cell has no count
for is drawn independently with probability ``zero_prob`` (a binomial number per cell, then a uniform
subset). "No count" means in the cell as stored (or in its contrastive view): genes left out by the
``max_genes`` cap, and genes a read-depth-downsampled input lost every read of, are expressed cells'
genes with a nonzero target and are never drawn here.

Only a model that never reads a masked token's input can take these tokens: the encoder-decoder's
encoder sees the unmasked genes whose input is above 0, and its decoder puts the mask embedding at
every masked gene (`pretrain.model.cell_model`). Their input is 0, not the mask value, so that an
encoder that read masked inputs would show the leak rather than hide it; the configuration refuses
such models anyway (`pretrain.config`). Extra tokens also mean a sequence holds more tokens than the
cell's expressed genes: the token budget holds them where every cell costs the full gene set
(`batching.TokenCost.full_length`), which the loader checks.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def pick_unexpressed(zero_prob: float, indptr: np.ndarray, genes: np.ndarray, gene_tokens: tuple[int, int],
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per cell of CSR ``(indptr [n+1], genes [nnz])`` (ascending, distinct gene tokens in
    ``gene_tokens = (first, end)``), each token of ``[first, end)`` not among its genes drawn with
    probability ``zero_prob``.  -> CSR ``(indptr [n+1], genes)``, ascending within each cell."""
    first, end = gene_tokens
    indptr = np.asarray(indptr, np.int64)
    unexpressed = (end - first) - np.diff(indptr)
    if unexpressed.min(initial=0) < 0:
        raise ValueError(f"a cell has more genes than the {end - first} gene tokens [{first}, {end}): the corpus "
                         "does not match its vocabulary")
    picks = rng.binomial(unexpressed, zero_prob) if zero_prob else np.zeros_like(unexpressed)
    out_ptr = np.concatenate([[0], np.cumsum(picks)]).astype(np.int64)
    out = np.empty(int(out_ptr[-1]), np.int64)
    _floyd_unexpressed(indptr, np.asarray(genes, np.int64) - first, picks, rng.random(len(out)),
                       np.zeros(end - first, np.bool_), out_ptr, out)
    return out_ptr, out + first


@njit(cache=True, nogil=True)
def _floyd_unexpressed(indptr, genes, picks, u, taken, out_ptr, out):  # pragma: no cover
    """Per cell: Floyd's uniform ``picks[i]``-subset of ranks among its ``n`` unexpressed genes
    (``taken``: scratch, all False between cells), sorted, then rank r mapped to the gene: the r-th
    gene index that is not among the cell's ascending ``genes`` (offsets from the first gene token)."""
    d = 0
    for i in range(len(indptr) - 1):
        lo, hi = indptr[i], indptr[i + 1]
        n = len(taken) - (hi - lo)
        o, k = out_ptr[i], picks[i]
        for j in range(n - k, n):
            t = min(np.int64(u[d] * (j + 1)), j)
            d += 1
            pick = j if taken[t] else t
            taken[pick] = True
            out[o] = pick
            o += 1
        ranks = out[out_ptr[i]:o]
        ranks.sort()
        e = lo
        for m in range(len(ranks)):
            taken[ranks[m]] = False
            # the r-th unexpressed index is r plus the expressed genes at or below it
            while e < hi and genes[e] <= ranks[m] + (e - lo):
                e += 1
            ranks[m] += e - lo


def add_masked_zeros(zero_prob: float, source_indptr: np.ndarray, source_genes: np.ndarray, indptr: np.ndarray,
                     genes: np.ndarray, values: np.ndarray, mlm: np.ndarray, targets: np.ndarray,
                     gene_tokens: tuple[int, int], rng: np.random.Generator):
    """Masked unexpressed genes (`pick_unexpressed` on the cells as stored: ``source_indptr``,
    ``source_genes``) merged into the model's tokens of the same cells (``indptr``, ``genes``,
    ``values``, ``mlm``, ``targets``, ascending genes within a cell) as tokens of input 0, masked,
    target 0.  -> (indptr, genes, values, mlm, targets); the tokens given keep their order."""
    zero_ptr, zero_genes = pick_unexpressed(zero_prob, source_indptr, source_genes, gene_tokens, rng)
    indptr = np.asarray(indptr, np.int64)
    kept_at, zero_at = np.empty(len(genes), np.int64), np.empty(len(zero_genes), np.int64)
    _merge_positions(indptr, np.asarray(genes, np.int64), zero_ptr, zero_genes, kept_at, zero_at)
    total = len(genes) + len(zero_genes)

    def merged(kept: np.ndarray, zero) -> np.ndarray:
        out = np.empty(total, kept.dtype)
        out[kept_at] = kept
        out[zero_at] = zero
        return out

    return (indptr + zero_ptr, merged(np.asarray(genes), zero_genes), merged(values, 0), merged(mlm, True),
            merged(targets, 0))


@njit(cache=True, nogil=True)
def _merge_positions(indptr, genes, zero_ptr, zero_genes, kept_at, zero_at):  # pragma: no cover
    """Where each token of two per-cell ascending CSR lists lands in their per-cell merge."""
    for i in range(len(indptr) - 1):
        a, a_end, z, z_end = indptr[i], indptr[i + 1], zero_ptr[i], zero_ptr[i + 1]
        o = indptr[i] + zero_ptr[i]
        while a < a_end or z < z_end:
            if z == z_end or (a < a_end and genes[a] < zero_genes[z]):
                kept_at[a] = o
                a += 1
            else:
                zero_at[z] = o
                z += 1
            o += 1

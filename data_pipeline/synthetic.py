"""Synthetic single-cell UMI counts, written as a CSR `.h5ad` without holding the matrix.

Generative model (all parameters derived from ``seed``):

- Background: log gene weights ``b_g ~ Normal(0, 1.7)`` over all genes, i.e. log-normal gene means,
  so a handful of genes take a large share of the UMIs, as in real scRNA-seq.
- Cell types ``t = 0..K-1`` with unequal proportions. Each type expresses an *active* gene set
  (about 4k genes with the defaults): a shared core of ~3k genes at background weight with a
  small per-type perturbation, ~1k type-specific genes at background weight, and 50-200 marker
  genes set to the background's top-5% weight level. Markers are disjoint between types and
  silent outside their type. Genes outside the active set are zero for that type, which bounds
  the cost per cell.
  ``p[t, g]`` = weights normalized to sum to 1 over the active set.
- Per cell ``c`` of type ``t``: library size ``L_c = median * exp(0.55 * Normal(0, 1))``
  (clipped to [median / 8, median * 8]) and
  ``x[c, g] ~ Poisson(L_c * p[t, g] * Gamma(shape=1/phi_g, scale=phi_g))``, i.e. negative
  binomial with mean ``L_c * p[t, g]`` and gene-wise dispersion ``phi_g`` (log-normal around
  0.25); ``E[sum_g x[c, g]] = L_c``.

With the defaults (20,000 genes, median library size 5,000) a cell has a median of ~1,400
nonzero genes.

Determinism: cells are generated in fixed blocks of ``BLOCK_CELLS`` rows; block ``k`` draws from
its own generator seeded by ``(seed, k)``, and within a block cells are drawn one after another.
The output therefore depends only on the arguments of the model (never on the chunk size asked
for or on memory), and the first ``n`` cells of a larger data set equal a data set of ``n``
cells. The same arguments give a byte-identical file (with the same versions of numpy, numba,
h5py and anndata: the samplers and the HDF5 layout come from them).

Sampling: a negative binomial draw per (cell, active gene) is done in a numba kernel by
inversion of the NB CDF with one uniform, with the squeeze ``u < 1 - mu <= P(x = 0)`` that
settles most entries (mean ``mu`` well below 1) without evaluating the CDF; entries with
a large mean use an explicit Gamma then Poisson draw. Both are exact samplers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from numba import njit

from .conversion.fsio import commit, fsync_file, temp_path

log = logging.getLogger(__name__)

# Fixed so that results do not depend on how many cells a caller asks for per chunk.
BLOCK_CELLS = 4096

_LIB_SIGMA = 0.55            # log-sd of library sizes (10x data: ~0.4-0.8)
_GENE_SIGMA = 1.7            # log-sd of background gene weights (heavy tail)
_CORE_GENES = 3000           # shared "housekeeping" active genes
_EXTRA_GENES = 1000          # type-specific active genes (non-marker)
_MARKERS = (50, 200)         # marker genes per type, inclusive range
_MARKER_QUANTILE = 0.95      # marker weight level, as a quantile of background log weights
_DISPERSION_MEDIAN = 0.25
_INVERSION_MAX_MU = 12.0     # above this mean, Gamma-Poisson is cheaper than CDF inversion
_INV_TABLE_SIZE = 256
# Chunk of the h5 `data`/`indices` datasets (elements): 1 MiB of int32.
_H5_CHUNK = 1 << 18


@dataclass(frozen=True)
class SyntheticModel:
    """Parameters of the generator. Active sets are concatenated over types (CSR-like):
    type ``t`` owns positions ``active_ptr[t]:active_ptr[t + 1]`` of ``active_genes``
    (sorted ascending), ``active_probs`` (sum to 1 per type) and ``active_r`` (1/phi)."""

    n_genes: int
    type_names: tuple[str, ...]
    type_proportions: np.ndarray      # [n_cell_types]
    active_ptr: np.ndarray            # [n_cell_types + 1] int64
    active_genes: np.ndarray          # [sum of active set sizes] int32
    active_probs: np.ndarray          # [sum of active set sizes] float64
    active_r: np.ndarray              # [sum of active set sizes] float64
    markers: tuple[np.ndarray, ...]   # per type: sorted gene indices of its marker program
    dispersion: np.ndarray            # [n_genes] phi_g
    # per type library sizes (`synthetic_atlas`: each tissue its own depth); None: one for all cells
    library_median: np.ndarray | None = None   # [n_cell_types]
    library_sigma: np.ndarray | None = None    # [n_cell_types] log-sd

    @property
    def n_cell_types(self) -> int:
        return len(self.type_names)


def _check_args(n_cells: int, n_genes: int, n_cell_types: int, seed: int, median_library_size: float):
    if n_cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {n_cells}")
    if n_cell_types < 1:
        raise ValueError(f"n_cell_types must be >= 1, got {n_cell_types}")
    if n_genes < max(16, 4 * n_cell_types):
        raise ValueError(f"n_genes must be >= max(16, 4 * n_cell_types) = {max(16, 4 * n_cell_types)}, "
                         f"got {n_genes}")
    if n_genes > 10**10:
        raise ValueError("n_genes must be < 1e10 (gene ids have 11 digits)")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not median_library_size > 0:
        raise ValueError(f"median_library_size must be > 0, got {median_library_size}")


def synthetic_model(n_genes: int = 20000, n_cell_types: int = 8, seed: int = 0) -> SyntheticModel:
    """The model behind :func:`iter_synthetic_chunks` for these arguments (markers, profiles)."""
    _check_args(0, n_genes, n_cell_types, seed, 1.0)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0,))))
    log_w = rng.normal(0.0, _GENE_SIGMA, n_genes)
    dispersion = np.clip(np.exp(rng.normal(np.log(_DISPERSION_MEDIAN), 0.5, n_genes)), 0.02, 5.0)
    proportions = 0.5 + rng.random(n_cell_types)   # unequal but no vanishing type
    proportions /= proportions.sum()
    marker_level = float(np.quantile(log_w, _MARKER_QUANTILE))

    perm = rng.permutation(n_genes)
    n_core = min(_CORE_GENES, n_genes // 2)
    core, pool = perm[:n_core], perm[n_core:]
    # Markers are disjoint between types so each type has genes that identify it.
    per_type = len(pool) // n_cell_types
    n_markers = np.minimum(rng.integers(_MARKERS[0], _MARKERS[1] + 1, n_cell_types), per_type)
    bounds = np.concatenate([[0], np.cumsum(n_markers)])
    markers = [np.sort(pool[bounds[t]:bounds[t + 1]]) for t in range(n_cell_types)]
    # Type programs exclude every type's markers, so a marker is silent outside its own type.
    candidates = pool[bounds[-1]:]
    n_extra = min(_EXTRA_GENES, len(candidates) // 2)

    ptr, genes, probs = [0], [], []
    for t in range(n_cell_types):
        mk = markers[t]
        extra = rng.choice(candidates, size=n_extra, replace=False)
        idx = np.concatenate([core, extra, mk])
        lw = np.concatenate([log_w[core] + rng.normal(0.0, 0.5, n_core),
                             log_w[extra],
                             marker_level + rng.normal(0.0, 0.5, len(mk))])
        order = np.argsort(idx, kind="stable")
        idx, lw = idx[order], lw[order]
        w = np.exp(lw - lw.max())
        genes.append(idx.astype(np.int32))
        probs.append(w / w.sum())
        ptr.append(ptr[-1] + len(idx))
    active_genes = np.concatenate(genes)
    return SyntheticModel(
        n_genes=n_genes,
        type_names=tuple(f"type_{t:02d}" for t in range(n_cell_types)),
        type_proportions=proportions,
        active_ptr=np.asarray(ptr, dtype=np.int64),
        active_genes=active_genes,
        active_probs=np.concatenate(probs),
        active_r=1.0 / dispersion[active_genes],
        markers=tuple(m.astype(np.int64) for m in markers),
        dispersion=dispersion,
    )


def synthetic_var(n_genes: int) -> pd.DataFrame:
    """``var`` for ``n_genes`` synthetic genes: index and ``ensembl_id`` are Ensembl-style ids
    that are deliberately not real (``ENSG9xxxxxxxxxx``), ``gene_symbol`` is ``SYN{i}``."""
    ids = [f"ENSG{90000000000 + i:011d}" for i in range(n_genes)]
    return pd.DataFrame({"ensembl_id": ids, "gene_symbol": [f"SYN{i}" for i in range(n_genes)]},
                        index=pd.Index(ids))


def synthetic_obs(cell_type_codes: np.ndarray, type_names, start: int = 0, width: int = 7) -> pd.DataFrame:
    """``obs`` for cells ``start..start+len(codes)-1``: index ``syn-0000000``, categorical ``cell_type``."""
    n = len(cell_type_codes)
    ids = [f"syn-{i:0{width}d}" for i in range(start, start + n)]
    cats = pd.Categorical.from_codes(np.asarray(cell_type_codes), categories=list(type_names))
    return pd.DataFrame({"cell_type": cats}, index=pd.Index(ids))


# ----------------------------------------------------------------------------- sampling kernel

@njit(cache=True, inline="always")
def _rotl(x, k):
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


@njit(cache=True, inline="always")
def _uniform(s):
    # xoshiro256+: numpy's Generator costs ~6 ns per call from numba; this is ~1 ns and we need
    # one uniform per (cell, active gene).
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    result = s0 + s3
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = _rotl(s3, 45)
    s[0], s[1], s[2], s[3] = s0, s1, s2, s3
    return np.float64(result >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def _sample_block(lib, codes, active_ptr, active_genes, active_probs, active_r, state, rng, inv_max):
    inv_table = 1.0 / np.arange(1, _INV_TABLE_SIZE + 1, dtype=np.float64)
    n = lib.shape[0]
    indptr = np.zeros(n + 1, np.int64)
    cap = max(n * 2048, 1024)
    indices = np.empty(cap, np.int32)
    data = np.empty(cap, np.int32)
    pos = 0
    for c in range(n):
        a0 = active_ptr[codes[c]]
        a1 = active_ptr[codes[c] + 1]
        if pos + (a1 - a0) > cap:
            cap = max(cap + cap // 2, pos + (a1 - a0))
            new_indices = np.empty(cap, np.int32)
            new_data = np.empty(cap, np.int32)
            new_indices[:pos] = indices[:pos]
            new_data[:pos] = data[:pos]
            indices, data = new_indices, new_data
        size = lib[c]
        for j in range(a0, a1):
            mu = size * active_probs[j]
            r = active_r[j]
            if mu > inv_max:
                x = rng.poisson(mu * rng.standard_gamma(r) / r)
            else:
                u = _uniform(state)
                # P(x=0) >= exp(-mu) >= 1 - mu for any NB with mean mu: settles most entries
                # without evaluating the CDF.
                if u < 1.0 - mu:
                    continue
                # Inversion of the NB CDF with the same u (exact: x = F^-1(u) either way).
                inv = 1.0 / (mu + r)
                q = mu * inv
                p = np.exp(r * np.log(r * inv))          # P(x=0) = (r / (mu + r))^r
                f = p
                k = 0
                while u >= f:
                    # The table of 1/(k+1) keeps a division out of this loop's dependency chain.
                    p *= (k + r) * q * (inv_table[k] if k < _INV_TABLE_SIZE else 1.0 / (k + 1))
                    k += 1
                    f += p
                    # Rounding can leave f just below u ~ 1; the remaining mass is negligible.
                    if k > mu and p < 1e-17 * f:
                        break
                x = k
            if x > 0:
                indices[pos] = active_genes[j]
                data[pos] = min(x, 2147483647)
                pos += 1
        indptr[c + 1] = pos
    return indptr, indices[:pos].copy(), data[:pos].copy()


def _generate_block(model: SyntheticModel, seed: int, block: int, n: int,
                    median_library_size: float) -> tuple[sp.csr_matrix, np.ndarray]:
    """Cells ``block * BLOCK_CELLS`` .. ``+ n - 1``: [n, n_genes] int32 CSR and type codes [n]."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(1, block))))
    # Always draw a full block so that a partial last block is a prefix of the full one.
    codes = rng.choice(model.n_cell_types, size=BLOCK_CELLS, p=model.type_proportions).astype(np.int32)
    if model.library_median is None:
        lib = median_library_size * np.exp(_LIB_SIGMA * rng.standard_normal(BLOCK_CELLS))
        lib = np.clip(lib, median_library_size / 8, median_library_size * 8)
    else:
        median = model.library_median[codes]
        lib = np.clip(median * np.exp(model.library_sigma[codes] * rng.standard_normal(BLOCK_CELLS)), median / 8,
                      median * 8)
    state = rng.integers(0, np.iinfo(np.uint64).max, size=4, dtype=np.uint64, endpoint=True)
    state[0] |= np.uint64(1)       # xoshiro's state must not be all zero
    codes, lib = codes[:n], lib[:n]
    indptr, indices, data = _sample_block(lib, codes, model.active_ptr, model.active_genes,
                                          model.active_probs, model.active_r, state, rng,
                                          _INVERSION_MAX_MU)
    m = sp.csr_matrix((data, indices, indptr), shape=(n, model.n_genes))
    m.has_sorted_indices = True
    return m, codes


def iter_synthetic_chunks(n_cells: int, n_genes: int = 20000, n_cell_types: int = 8, seed: int = 0,
                          median_library_size: float = 5000, *, chunk_cells: int = BLOCK_CELLS,
                          model: SyntheticModel | None = None, first_cell: int = 0
                          ) -> Iterator[tuple[int, sp.csr_matrix, np.ndarray]]:
    """Yield ``(start_row, counts, cell_type_codes)`` covering cells ``first_cell..first_cell +
    n_cells - 1`` of the data set in order (``start_row`` counts from ``first_cell``).

    ``counts``: [rows, n_genes] int32 CSR (indices sorted within rows, no explicit zeros);
    ``cell_type_codes``: [rows] int32 indices into ``synthetic_model(...).type_names``.
    ``rows`` is ``chunk_cells`` except for the last chunk. The values do not depend on
    ``chunk_cells`` nor on how the cells are split over calls (``first_cell``). ``model``: another
    generator than ``synthetic_model(n_genes, n_cell_types, seed)`` (`synthetic_atlas`).
    """
    _check_args(n_cells, n_genes, n_cell_types, seed, median_library_size)
    if chunk_cells < 1 or first_cell < 0:
        raise ValueError(f"chunk_cells must be >= 1 and first_cell >= 0, got {chunk_cells} and {first_cell}")
    model = model or synthetic_model(n_genes, n_cell_types, seed)
    stop_cell = first_cell + n_cells
    pending: list[tuple[sp.csr_matrix, np.ndarray]] = []
    pending_rows = 0
    out_start = 0
    first_block, n_blocks = first_cell // BLOCK_CELLS, -(-stop_cell // BLOCK_CELLS)
    for block in range(first_block, n_blocks):
        n = min(BLOCK_CELLS, stop_cell - block * BLOCK_CELLS)
        m, codes = _generate_block(model, seed, block, n, median_library_size)
        skip = first_cell - block * BLOCK_CELLS if block == first_block else 0
        if skip > 0:  # a call that starts inside a block: the block's tail (the rows are drawn alike)
            m, codes, n = m[skip:], codes[skip:], n - skip
            m.has_sorted_indices = True
        if chunk_cells == BLOCK_CELLS and not pending and skip <= 0:
            yield out_start, m, codes
            out_start += n
            continue
        pending.append((m, codes))
        pending_rows += n
        last = block == n_blocks - 1
        while pending_rows >= chunk_cells or (last and pending_rows > 0):
            if len(pending) == 1:
                m_all, c_all = pending[0]
            else:
                m_all = sp.vstack([p[0] for p in pending], format="csr", dtype=np.int32)
                c_all = np.concatenate([p[1] for p in pending])
            take = min(chunk_cells, pending_rows)
            head = m_all[:take]
            head.has_sorted_indices = True
            yield out_start, head, c_all[:take]
            out_start += take
            pending_rows -= take
            pending = [(m_all[take:], c_all[take:])] if pending_rows else []


# ----------------------------------------------------------------------------- h5ad writer

def _write_elem():
    try:
        from anndata.io import write_elem
    except ImportError:       # anndata < 0.11
        from anndata.experimental import write_elem
    return write_elem


def write_synthetic_h5ad(path: str | os.PathLike, n_cells: int, n_genes: int = 20000, n_cell_types: int = 8,
                         seed: int = 0, median_library_size: float = 5000, progress: bool = False, *,
                         model: SyntheticModel | None = None, first_cell: int = 0, id_width: int = 7) -> dict:
    """Write ``n_cells`` synthetic cells to ``path`` as an `.h5ad` with CSR ``X`` [n_cells, n_genes]:
    cells ``first_cell..`` of the data set of ``model`` (default ``synthetic_model(n_genes,
    n_cell_types, seed)``), named ``syn-<index in the data set>`` (at least ``id_width`` digits).

    Memory is bounded by one block of cells plus per-cell summaries (the matrix is appended
    block by block). The file appears atomically (temporary name, fsync, rename). Returns
    ``{"path", "n_cells", "n_genes", "nnz", "median_genes_per_cell", "median_library_size"}``,
    the medians measured on the written counts.
    """
    _check_args(n_cells, n_genes, n_cell_types, seed, median_library_size)
    write_elem = _write_elem()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    model = model or synthetic_model(n_genes, n_cell_types, seed)
    n_genes = model.n_genes
    codes_all = np.empty(n_cells, np.int32)
    genes_per_cell = np.empty(n_cells, np.int32)
    totals = np.empty(n_cells, np.int64)
    t0 = last_report = time.perf_counter()
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            x = f.create_group("X")
            x.attrs["encoding-type"] = "csr_matrix"
            x.attrs["encoding-version"] = "0.1.0"
            x.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
            kw = dict(shape=(0,), maxshape=(None,), chunks=(_H5_CHUNK,))
            data_ds = x.create_dataset("data", dtype=np.int32, **kw)
            indices_ds = x.create_dataset("indices", dtype=np.int32, **kw)
            indptr_ds = x.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
            indptr_ds[0] = 0
            nnz = 0
            for start, m, codes in iter_synthetic_chunks(n_cells, n_genes, model.n_cell_types, seed,
                                                         median_library_size, model=model, first_cell=first_cell):
                stop = start + m.shape[0]
                k = m.nnz
                data_ds.resize((nnz + k,))
                indices_ds.resize((nnz + k,))
                data_ds[nnz:nnz + k] = m.data.astype(np.int32, copy=False)
                indices_ds[nnz:nnz + k] = m.indices.astype(np.int32, copy=False)
                indptr_ds[start + 1:stop + 1] = nnz + m.indptr[1:].astype(np.int64)
                nnz += k
                codes_all[start:stop] = codes
                genes_per_cell[start:stop] = np.diff(m.indptr)
                csum = np.concatenate(([0], np.cumsum(m.data, dtype=np.int64)))
                totals[start:stop] = csum[m.indptr[1:]] - csum[m.indptr[:-1]]
                now = time.perf_counter()
                if progress and (now - last_report > 5 or stop == n_cells):
                    last_report = now
                    log.info(f"synthetic: {stop:,}/{n_cells:,} cells, {stop / (now - t0):,.0f} cells/s")
            width = max(id_width, len(str(max(first_cell + n_cells - 1, 0))))
            write_elem(f, "obs", synthetic_obs(codes_all, model.type_names, start=first_cell, width=width))
            write_elem(f, "var", synthetic_var(n_genes))
            for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
                write_elem(f, name, {})
        fsync_file(tmp)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "path": str(path),
        "n_cells": int(n_cells),
        "n_genes": int(n_genes),
        "nnz": int(nnz),
        "median_genes_per_cell": float(np.median(genes_per_cell)) if n_cells else 0.0,
        "median_library_size": float(np.median(totals)) if n_cells else 0.0,
    }

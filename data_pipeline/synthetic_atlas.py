"""A synthetic atlas: cells whose depth, genes per cell and vocabulary follow real files, written as
many `.h5ad` files the way atlases ship (``python -m data_pipeline synthetic --preset atlas``).

`synthetic.py`'s default generator gives every cell one library-size law and ~4,000 active genes
per type (a median of ~1,400 genes per cell, none past ~4,200). Real collections mix tissues of
very different depth: PBMC at 700-2,300 genes per cell, tumour cells at 4,200 with a tail past
8,000. Here each *profile* stands for one real reference file (`ATLAS_PROFILES`): its cell types
draw library sizes from the file's own log-normal (median and log-sd of its cells' UMI totals) and
express an active set sized so that a cell at the file's median depth expresses the file's median
number of genes. The fit (`fit_profile`, on the shared files: `fit_atlas_profiles`) is kept in
`ATLAS_PROFILES` with the numbers it gave; `tests/test_synthetic_atlas.py` refits them from the
files and compares the generated cells' genes per cell with the real ones.

Gene weights: a log-normal background over the vocabulary (log-sd `ATLAS_GENE_SIGMA`) shared by
every tissue (housekeeping genes are high everywhere), a per-profile shift (log-sd 0.8) and a
per-type one (0.3); 50-200 marker genes per type, disjoint, at the background's top-5 % level.
Counts are the default generator's negative binomial with gene-wise dispersion (`synthetic.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .synthetic import (
    _DISPERSION_MEDIAN,
    _MARKER_QUANTILE,
    _MARKERS,
    SyntheticModel,
    write_synthetic_h5ad,
)

ATLAS_GENES = 28000           # vocabulary: CELLxGENE-style human atlases use ~20,000-30,000 genes
ATLAS_GENE_SIGMA = 1.8        # log-sd of background gene weights: fitted with the profiles
_PROFILE_SHIFT, _TYPE_SHIFT = 0.8, 0.3
_CORE_SHARE = 0.8             # of a type's active set shared by its profile's types
MANIFEST = "synthetic_atlas.json"


@dataclass(frozen=True)
class AtlasProfile:
    """One tissue of the atlas, fitted to a real file (`fit_profile`)."""

    name: str                # the reference file
    share: float             # of the atlas's cells
    cell_types: int
    library_median: float    # UMIs per cell
    library_sigma: float     # log-sd of UMIs per cell
    active_genes: int        # genes a type of this profile can express


# `fit_atlas_profiles("../shared/data/h5ad")` on 2026-12-05 (sigma 1.8 of 1.0-2.0; the five
# whole-transcriptome files there: gene-filtered ones would understate genes per cell), equal shares
ATLAS_PROFILES = (
    AtlasProfile("pisces_pbmc1k", 0.2, 4, 6270.5, 0.43, 13020),
    AtlasProfile("mudan_pbmcA", 0.2, 4, 2115.0, 0.26, 3500),
    AtlasProfile("celltypist_sample559", 0.2, 4, 3829.0, 1.1, 5250),
    AtlasProfile("copykat_tumor302", 0.2, 4, 18216.0, 0.66, 13710),
    AtlasProfile("cider_baron_pancreas350", 0.2, 4, 4079.0, 0.61, 8440),
)


def expected_genes(log_weights: np.ndarray, dispersion: np.ndarray, library: float) -> float:
    """Expected number of expressed genes of a cell with ``library`` UMIs whose type has these
    active genes' log weights [n_active] and dispersions [n_active]: sum of P(NB > 0)."""
    p = np.exp(log_weights - log_weights.max())
    mu = library * p / p.sum()
    return float(np.sum(1.0 - (1.0 + mu * dispersion) ** (-1.0 / dispersion)))


def _laws(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standard normal draws [ATLAS_GENES] for the log weights and the dispersions [ATLAS_GENES]
    the fit uses, the same for every size and sigma (a monotone curve to bisect)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(ATLAS_GENES)
    return z, np.clip(np.exp(rng.normal(np.log(_DISPERSION_MEDIAN), 0.5, ATLAS_GENES)), 0.02, 5.0)


def fit_profile(name: str, totals: np.ndarray, genes_per_cell: np.ndarray, share: float, sigma: float,
                cell_types: int = 4) -> tuple[AtlasProfile, float]:
    """The profile of one real file under gene log-weight sd ``sigma``: the log-normal of its cells'
    UMI totals [n] (median; log-sd as 1.4826 x the median absolute deviation of log totals, so
    that a few empty droplets do not widen it) and the active set size at which a cell of median
    depth expresses the file's median genes per cell [n] (bisection on `expected_genes`). Also the
    misfit over the file's depths: the median |log(expected / real genes per cell)| over the
    deciles of depth (how well one weight law follows the file's genes-versus-UMIs curve; the
    median, since a file's shallowest decile can be debris, e.g. 113 genes at 1,177 UMIs)."""
    totals = np.asarray(totals, np.float64)
    genes_per_cell = np.asarray(genes_per_cell)
    median = float(np.median(totals))
    target = float(np.median(genes_per_cell))
    z, phi = _laws()
    sd = np.sqrt(sigma**2 + _PROFILE_SHIFT**2 + _TYPE_SHIFT**2)
    lo, hi = int(target), ATLAS_GENES // 2
    if expected_genes(sd * z[:hi], phi[:hi], median) < target:
        raise ValueError(f"{name}: {target:.0f} genes per cell at {median:.0f} UMIs needs more than {hi} active "
                         f"genes at gene log-sd {sigma}")
    while hi - lo > 10:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if expected_genes(sd * z[:mid], phi[:mid], median) < target else (lo, mid)
    order = np.argsort(totals)
    misfit = []
    for chunk in np.array_split(order, 10):  # deciles of depth: their median depth and genes
        expected = expected_genes(sd * z[:hi], phi[:hi], float(np.median(totals[chunk])))
        misfit.append(abs(np.log(expected / max(float(np.median(genes_per_cell[chunk])), 1.0))))
    logs = np.log(totals[totals > 0])
    spread = 1.4826 * float(np.median(np.abs(logs - np.median(logs))))
    profile = AtlasProfile(name, share, cell_types, round(median, 1), round(spread, 2), int(round(hi, -1)))
    return profile, float(np.median(misfit))


def fit_atlas_profiles(folder: str | os.PathLike, names: tuple[str, ...] = tuple(p.name for p in ATLAS_PROFILES),
                       sigmas: tuple[float, ...] = tuple(round(1.0 + 0.1 * i, 1) for i in range(11))
                       ) -> tuple[float, tuple[AtlasProfile, ...]]:
    """The gene log-weight sd (of ``sigmas``) whose profiles follow the named `.h5ad` files of
    ``folder`` best (least summed `fit_profile` misfit; a sigma that cannot reach a file's genes
    per cell is out), and those profiles, equal shares."""
    import anndata
    import scipy.sparse as sp

    cells = {}
    for name in names:
        x = sp.csr_matrix(anndata.read_h5ad(Path(folder) / f"{name}.h5ad").X)
        cells[name] = np.asarray(x.sum(axis=1)).ravel(), np.diff(x.indptr)
    best = None
    for sigma in sigmas:
        try:
            fits = [fit_profile(name, *cells[name], 1 / len(names), sigma) for name in names]
        except ValueError:
            continue
        misfit = sum(m for _, m in fits)
        if best is None or misfit < best[0]:
            best = misfit, sigma, tuple(p for p, _ in fits)
    if best is None:
        raise ValueError(f"no gene log-sd of {sigmas} reaches every file's genes per cell")
    return best[1], best[2]


def atlas_model(seed: int = 0, profiles: tuple[AtlasProfile, ...] = ATLAS_PROFILES,
                n_genes: int = ATLAS_GENES) -> SyntheticModel:
    """The generator of the atlas: ``cell_types`` types per profile, each with its profile's
    library-size law and an active set of its profile's size (see the module docstring)."""
    n_types = sum(p.cell_types for p in profiles)
    largest = max(p.active_genes for p in profiles)
    if n_genes < largest + n_types * _MARKERS[1]:
        raise ValueError(f"n_genes={n_genes} is too few for active sets of {largest} genes and {n_types} "
                         f"marker programs: use at least {largest + n_types * _MARKERS[1]}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(2,))))
    log_w = rng.normal(0.0, ATLAS_GENE_SIGMA, n_genes)
    dispersion = np.clip(np.exp(rng.normal(np.log(_DISPERSION_MEDIAN), 0.5, n_genes)), 0.02, 5.0)
    marker_level = float(np.quantile(log_w, _MARKER_QUANTILE))
    perm = rng.permutation(n_genes)
    n_markers = rng.integers(_MARKERS[0], _MARKERS[1] + 1, n_types)
    bounds = np.concatenate([[0], np.cumsum(n_markers)])
    markers = [np.sort(perm[bounds[t]:bounds[t + 1]]) for t in range(n_types)]
    pool = perm[bounds[-1]:]  # genes no type uses as a marker
    ptr, genes, probs, names, proportions, medians, sigmas = [0], [], [], [], [], [], []
    for profile in profiles:
        shift = rng.normal(0.0, _PROFILE_SHIFT, n_genes)
        core = rng.choice(pool, size=int(_CORE_SHARE * profile.active_genes), replace=False)
        rest = np.setdiff1d(pool, core, assume_unique=True)
        for k in range(profile.cell_types):
            t = len(names)
            extra = rng.choice(rest, size=profile.active_genes - len(core) - len(markers[t]), replace=False)
            idx = np.concatenate([core, extra, markers[t]])
            lw = np.concatenate([log_w[core] + shift[core], log_w[extra] + shift[extra],
                                 np.full(len(markers[t]), marker_level)]) + rng.normal(0.0, _TYPE_SHIFT, len(idx))
            order = np.argsort(idx, kind="stable")
            idx, lw = idx[order], lw[order]
            w = np.exp(lw - lw.max())
            genes.append(idx.astype(np.int32))
            probs.append(w / w.sum())
            ptr.append(ptr[-1] + len(idx))
            names.append(f"{profile.name}_type_{k}")
            proportions.append(profile.share / profile.cell_types)
            medians.append(profile.library_median)
            sigmas.append(profile.library_sigma)
    active_genes = np.concatenate(genes)
    proportions = np.asarray(proportions)
    return SyntheticModel(
        n_genes=n_genes, type_names=tuple(names), type_proportions=proportions / proportions.sum(),
        active_ptr=np.asarray(ptr, np.int64), active_genes=active_genes, active_probs=np.concatenate(probs),
        active_r=1.0 / dispersion[active_genes], markers=tuple(m.astype(np.int64) for m in markers),
        dispersion=dispersion, library_median=np.asarray(medians), library_sigma=np.asarray(sigmas))


def write_atlas(folder: str | os.PathLike, n_cells: int, cells_per_file: int = 250_000, seed: int = 0,
                progress: bool = False) -> dict:
    """Write the atlas's first ``n_cells`` cells into ``folder`` as ``part-00000.h5ad``, ... of
    ``cells_per_file`` cells each (the last one shorter), one file at a time, each appearing whole
    (written beside, then renamed): memory is one file's per-cell summaries, not the matrix. A rerun
    with the same arguments keeps the files already there and writes the rest (a killed run
    resumes); other arguments in the same folder are refused. The cells do not depend on
    ``cells_per_file``: the files concatenated are one data set. -> the run's summary (also in
    ``folder/synthetic_atlas.json``)."""
    if n_cells < 1 or cells_per_file < 1:
        raise ValueError(f"n_cells and cells_per_file must be >= 1, got {n_cells} and {cells_per_file}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    asked = {"preset": "atlas", "n_cells": n_cells, "cells_per_file": cells_per_file, "seed": seed,
             "n_genes": ATLAS_GENES, "profiles": [asdict(p) for p in ATLAS_PROFILES]}
    manifest = folder / MANIFEST
    if manifest.exists():
        before = json.loads(manifest.read_text())
        if {k: before.get(k) for k in asked} != asked:
            raise ValueError(f"{folder} holds an atlas written with other arguments ({manifest}): pass another "
                             "folder, or delete this one to write it anew")
    else:
        manifest.write_text(json.dumps(asked, indent=1))
    model = atlas_model(seed)
    width = len(str(n_cells - 1))
    files = []
    for i, first in enumerate(range(0, n_cells, cells_per_file)):
        path = folder / f"part-{i:05d}.h5ad"
        n = min(cells_per_file, n_cells - first)
        if not path.exists():
            write_synthetic_h5ad(path, n, seed=seed, model=model, first_cell=first, id_width=width,
                                 progress=progress)
        files.append({"path": path.name, "first_cell": first, "n_cells": n})
    summary = {**asked, "files": files}
    manifest.write_text(json.dumps(summary, indent=1))
    return summary

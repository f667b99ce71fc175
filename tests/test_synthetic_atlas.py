"""The synthetic atlas: many files that are one data set, resumable, refit from the real files, and
genes per cell like theirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from data_pipeline import synthetic_atlas as sa
from data_pipeline.synthetic import BLOCK_CELLS, iter_synthetic_chunks

REPO = Path(__file__).resolve().parents[1]


def _stack(chunks):
    parts = list(chunks)
    return sp.vstack([m for _, m, _ in parts], format="csr"), np.concatenate([c for _, _, c in parts])


@pytest.mark.parametrize("first, n", [(0, 10), (100, 50), (BLOCK_CELLS - 7, 20), (BLOCK_CELLS, 5)])
def test_any_range_of_cells_is_that_slice_of_the_data_set(first, n):
    model = sa.atlas_model(seed=1)
    whole, codes = _stack(iter_synthetic_chunks(BLOCK_CELLS + 30, model=model, seed=1))
    part, part_codes = _stack(iter_synthetic_chunks(n, model=model, seed=1, first_cell=first, chunk_cells=13))
    assert (part != whole[first:first + n]).nnz == 0 and np.array_equal(part_codes, codes[first:first + n])


def test_files_are_one_data_set_and_a_rerun_resumes(tmp_path):
    folder = tmp_path / "atlas"
    summary = sa.write_atlas(folder, 1000, cells_per_file=400, seed=2)
    assert [f["n_cells"] for f in summary["files"]] == [400, 400, 200]
    parts = [anndata.read_h5ad(folder / f["path"]) for f in summary["files"]]
    whole, codes = _stack(iter_synthetic_chunks(1000, model=sa.atlas_model(seed=2), seed=2))
    x = sp.vstack([sp.csr_matrix(p.X) for p in parts], format="csr")
    assert x.shape == (1000, sa.ATLAS_GENES) and (x != whole).nnz == 0
    names = np.concatenate([p.obs_names for p in parts])
    assert names[0] == "syn-000" and names[-1] == "syn-999" and len(set(names)) == 1000
    labels = np.concatenate([p.obs["cell_type"].astype(str) for p in parts])
    assert np.array_equal(labels, np.asarray(sa.atlas_model(seed=2).type_names)[codes])
    assert json.loads((folder / sa.MANIFEST).read_text())["files"] == summary["files"]

    kept = (folder / "part-00000.h5ad").stat().st_mtime_ns
    (folder / "part-00001.h5ad").unlink()  # as if killed while writing the second file
    sa.write_atlas(folder, 1000, cells_per_file=400, seed=2)
    assert (folder / "part-00000.h5ad").stat().st_mtime_ns == kept
    again = anndata.read_h5ad(folder / "part-00001.h5ad")
    assert (sp.csr_matrix(again.X) != whole[400:800]).nnz == 0
    with pytest.raises(ValueError, match="other arguments .* delete this one"):
        sa.write_atlas(folder, 1000, cells_per_file=400, seed=3)


def test_the_cli_writes_the_atlas_and_refuses_other_arguments_in_its_folder(tmp_path):
    out = tmp_path / "atlas"
    command = [sys.executable, "-m", "data_pipeline", "synthetic", "--preset", "atlas", "--cells", "300",
               "--cells-per-file", "128", "--out", str(out), "--no-progress"]
    r = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.h5ad")) == ["part-00000.h5ad", "part-00001.h5ad", "part-00002.h5ad"]
    r = subprocess.run(command[:-1] + ["--seed", "5", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "error:" in r.stderr and "other arguments" in r.stderr


def test_the_profiles_are_what_the_fit_gives_on_the_real_files(shared_data):
    sigma, profiles = sa.fit_atlas_profiles(shared_data / "h5ad")
    assert sigma == sa.ATLAS_GENE_SIGMA and profiles == sa.ATLAS_PROFILES


def test_generated_cells_have_the_real_files_depth_and_genes_per_cell(shared_data):
    """Per profile, the generated median UMIs and genes per cell within 10 % / 15 % of its real file;
    the atlas has the long tail (cells past 5,000 genes) and most of its vocabulary expressed."""
    model = sa.atlas_model(seed=0)
    x, codes = _stack(iter_synthetic_chunks(6000, model=model, seed=0))
    genes, totals = np.diff(x.indptr), np.asarray(x.sum(axis=1)).ravel()
    for i, profile in enumerate(sa.ATLAS_PROFILES):
        real = sp.csr_matrix(anndata.read_h5ad(shared_data / "h5ad" / f"{profile.name}.h5ad").X)
        mine = codes // profile.cell_types == i
        assert abs(np.median(totals[mine]) / np.median(np.asarray(real.sum(axis=1))) - 1) < 0.10, profile.name
        assert abs(np.median(genes[mine]) / np.median(np.diff(real.indptr)) - 1) < 0.15, profile.name
    assert 0.02 < np.mean(genes > 5000) < 0.15 and genes.max() > 6000
    assert (np.asarray((x > 0).sum(axis=0)).ravel() > 0).sum() > 20000

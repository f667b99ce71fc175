"""TileDB-SOMA experiments convert to the same cells as the .h5ad they were written from; an obs
filter keeps exactly its cells and the others are accounted as excluded_by_filter."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_pipeline import cli
from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.merge import format_report
from data_pipeline.conversion.plan import PLAN_VERSION, ConvertError, ConvertOptions, plan_hash
from data_pipeline.conversion.readers import SourceError, open_source
from data_pipeline.conversion.soma_source import SomaSelection
from data_pipeline.corpus import Corpus, verify
from tests.corpus_helpers import corpus_cells, corpus_files, ensembl, random_counts
from tests.source_writers import write_anndata, write_soma

N_CELLS, N_GENES = 600, 70
REPO = Path(__file__).resolve().parents[1]


def _obs(n: int) -> pd.DataFrame:
    i = np.arange(n)
    return pd.DataFrame({"cell_type": pd.Categorical(np.array(["T", "B", "NK"])[i % 3]),
                         "is_primary_data": i % 4 != 0,
                         "disease": pd.Categorical(np.where(i % 5 == 0, "COVID-19", "normal"))},
                        index=[f"cell{k}" for k in i])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """(SOMA experiment folder, the .h5ad it was written from, obs)."""
    d = tmp_path_factory.mktemp("soma")
    x = random_counts(N_CELLS, N_GENES, seed=24, density=0.12)
    obs = _obs(N_CELLS)
    exp = write_soma(d / "exp", x, [ensembl(g) for g in range(N_GENES)], [f"SYM{g}" for g in range(N_GENES)],
                     list(obs.index), obs=obs)
    return exp, exp.with_suffix(".h5ad"), obs


def _options(path, **kw) -> ConvertOptions:
    return ConvertOptions([str(path)], unit_cells=256, block_cells=64, label_columns=["cell_type"], **kw)


def test_experiment_converts_to_the_same_cells_as_its_h5ad(experiment, tmp_path):
    exp, h5ad, _ = experiment
    want = convert(tmp_path / "h5ad", _options(h5ad), progress=False)
    got = convert(tmp_path / "soma", _options(exp), progress=False)
    assert corpus_cells(tmp_path / "soma") == corpus_cells(tmp_path / "h5ad")
    assert (tmp_path / "soma" / "vocab.tsv").read_text() == (tmp_path / "h5ad" / "vocab.tsv").read_text()
    assert got["label_columns"] == want["label_columns"]
    assert got["accounting"] == want["accounting"] and got["accounting"]["cells_written"] == N_CELLS
    src = got["sources"][0]
    assert (src["format"], src["matrix"], src["gene_identity"]) == ("soma", "RNA/X/raw", "var['gene_ids']")
    assert "obs_filter" not in src and src["checksum"].startswith("xxh3_128:")
    blocks = {b: blk for b, blk in Corpus(tmp_path / "h5ad").iter_blocks()}
    for b, blk in Corpus(tmp_path / "soma").iter_blocks():
        assert blk.cell_ids == blocks[b].cell_ids
        np.testing.assert_array_equal(blk.labels, blocks[b].labels)
    assert verify(tmp_path / "soma") == []


@pytest.mark.slow
def test_worker_processes_read_the_experiment(experiment, tmp_path):
    """TileDB hangs in a child forked after the parent read an experiment, and the parent reads it
    to plan: pools reading SOMA inputs are spawned instead, and make the same bytes."""
    exp = experiment[0]
    opts = dict(soma_filter="cell_type != 'T'")
    convert(tmp_path / "one", _options(exp, **opts), progress=False)
    convert(tmp_path / "two", _options(exp, **opts), workers=2, progress=False)
    assert corpus_files(tmp_path / "two") == corpus_files(tmp_path / "one")


def test_obs_filter_keeps_exactly_the_matching_cells(experiment, tmp_path):
    exp, h5ad, obs = experiment
    convert(tmp_path / "h5ad", _options(h5ad), progress=False)
    everything = corpus_cells(tmp_path / "h5ad")
    flt = "is_primary_data == True and disease == 'normal'"
    manifest = convert(tmp_path / "soma", _options(exp, soma_filter=flt), progress=False)
    keep = np.flatnonzero(obs.is_primary_data.to_numpy() & (obs.disease == "normal").to_numpy())
    assert 0 < len(keep) < N_CELLS
    # source row r of the filtered experiment is the r-th matching cell
    assert corpus_cells(tmp_path / "soma") == {(0, r): everything[(0, int(j))] for r, j in enumerate(keep)}
    ids = [c for _, blk in Corpus(tmp_path / "soma").iter_blocks() for c in blk.cell_ids]
    assert ids == list(obs.index[keep])
    src, acc = manifest["sources"][0], manifest["accounting"]
    assert src["obs_filter"] == flt
    assert src["cells_read"] == N_CELLS and src["cells_written"] == len(keep)
    assert src["cells_skipped"]["excluded_by_filter"] == N_CELLS - len(keep)
    assert acc["cells_skipped"]["excluded_by_filter"] == N_CELLS - len(keep) and acc["balanced"]
    assert verify(tmp_path / "soma") == []


def test_reader_rows_and_metadata_of_a_filtered_selection(experiment):
    exp, h5ad, obs = experiment
    x = random_counts(N_CELLS, N_GENES, seed=24, density=0.12)
    keep = np.flatnonzero((obs.cell_type == "B").to_numpy())
    with open_source(str(exp), soma=SomaSelection(obs_filter="cell_type == 'B'")) as src:
        assert (src.n_cells, src.cells_excluded, src.n_vars) == (len(keep), N_CELLS - len(keep), N_GENES)
        assert (src.read_rows(5, 60) != x[keep[5:60]]).nnz == 0
        assert list(src.obs_names(5, 60)) == list(obs.index[keep[5:60]])
        assert set(src.obs_values("cell_type")) == {"B"}
        assert list(src.obs_values("is_primary_data", 0, 3)) == [str(v) for v in obs.is_primary_data.iloc[keep[:3]]]
        assert src.read_rows(7, 7).shape == (0, N_GENES)


def test_real_file_as_a_soma_experiment(shared_data, tmp_path):
    import anndata as ad
    import tiledbsoma.io

    h5ad = shared_data / "h5ad" / "cider_baron_pancreas350.h5ad"
    exp = tmp_path / "exp"
    tiledbsoma.io.from_h5ad(str(exp), str(h5ad), measurement_name="RNA", X_layer_name="raw")
    convert(tmp_path / "h5ad", ConvertOptions([str(h5ad)], label_columns=["cell_type"]), progress=False)
    flt = "cell_type == 'beta'"
    manifest = convert(tmp_path / "soma", ConvertOptions([str(exp)], label_columns=["cell_type"], soma_filter=flt),
                       progress=False)
    everything = corpus_cells(tmp_path / "h5ad")
    beta = np.flatnonzero(ad.read_h5ad(h5ad, backed="r").obs.cell_type.to_numpy() == "beta")
    assert len(beta) and corpus_cells(tmp_path / "soma") == {(0, r): everything[(0, int(j))]
                                                            for r, j in enumerate(beta) if (0, int(j)) in everything}
    assert manifest["sources"][0]["cells_skipped"]["excluded_by_filter"] == 350 - len(beta)


@pytest.mark.parametrize("selection, message", [
    (SomaSelection(measurement="ATAC"), r"no measurement 'ATAC' \(measurements: RNA\); choose one with --soma-measurement"),
    (SomaSelection(layer="counts"), r"has no X layer 'counts' \(layers: raw\); choose one with --soma-layer"),
    (SomaSelection(obs_filter="cell_type = = 'B'"),
     r"--soma-filter .* cannot be applied to obs \(Could not parse.*obs columns: obs_id, cell_type.*such as"),
    (SomaSelection(obs_filter="tissue == 'blood'"), r"cannot be applied to obs \(.*tissue does not exist"),
])
def test_bad_selection_names_the_problem_and_the_flag(experiment, selection, message):
    with pytest.raises(SourceError, match=message):
        open_source(str(experiment[0]), soma=selection)


def test_not_an_experiment(experiment, tmp_path):
    with pytest.raises(SourceError, match=r"not a TileDB-SOMA experiment.*pass the experiment itself"):
        open_source(str(experiment[0] / "ms" / "RNA"))
    with pytest.raises(SourceError, match=r"no TileDB-SOMA object there"):
        open_source(f"file://{tmp_path}/nothing")


def test_missing_tiledbsoma_names_the_install(experiment, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # import tiledbsoma raises ImportError
    with pytest.raises(SourceError, match=r"needs the tiledbsoma package: pip install tiledbsoma"):
        open_source(str(experiment[0]))


def test_filter_without_a_soma_input_is_refused(tmp_path):
    h5ad = write_anndata(tmp_path / "a.h5ad", random_counts(20, 8, seed=1), [ensembl(g) for g in range(8)],
                         [f"S{g}" for g in range(8)], [f"c{i}" for i in range(20)])
    with pytest.raises(ConvertError, match="--soma-filter applies to TileDB-SOMA experiments only"):
        convert(tmp_path / "c", ConvertOptions([str(h5ad)], soma_filter="x == 1"), progress=False)


def test_cli_flags_and_errors(experiment, tmp_path, capfd):
    exp = str(experiment[0])
    assert cli.main(["convert", exp, "--out", str(tmp_path / "c"), "--soma-filter", "cell_type == 'NK'",
                     "--label-columns", "cell_type", "--workers", "1", "--no-progress"]) == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["sources"][0]["cells_written"] == N_CELLS // 3
    assert m["conversion"]["soma_filter"] == "cell_type == 'NK'"
    report = format_report(m)
    assert "200/600 cells" in report
    assert "400 left out by --soma-filter \"cell_type == 'NK'\"" in report
    capfd.readouterr()
    assert cli.main(["convert", exp, "--out", str(tmp_path / "d"), "--soma-layer", "data", "--no-progress"]) == 2
    assert "has no X layer 'data' (layers: raw); choose one with --soma-layer" in capfd.readouterr().err


def test_plan_hash_of_other_inputs_is_unchanged_by_the_soma_options(tmp_path):
    """Corpora made before the SOMA options existed still match their command (resume, 'complete')."""
    options = ConvertOptions(["a.h5ad"])
    before = {k: v for k, v in asdict(options).items() if not k.startswith("soma_")}
    keys = [{"path": str(Path("a.h5ad").resolve()), "missing": True}]
    blob = json.dumps({"version": PLAN_VERSION, "options": before, "inputs": keys}, sort_keys=True)
    assert plan_hash(options) == hashlib.sha256(blob.encode()).hexdigest()
    assert plan_hash(ConvertOptions(["a.h5ad"], soma_layer="data")) != plan_hash(options)


def test_cli_does_not_import_tiledbsoma_without_a_soma_input(tmp_path):
    h5ad = write_anndata(tmp_path / "a.h5ad", random_counts(20, 8, seed=1), [ensembl(g) for g in range(8)],
                         [f"S{g}" for g in range(8)], [f"c{i}" for i in range(20)])
    code = ("import sys; from data_pipeline import cli; "
            f"rc = cli.main(['convert', {str(h5ad)!r}, '--out', {str(tmp_path / 'c')!r}, '--no-progress', "
            "'--workers', '1']); print(rc, 'tiledbsoma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["0", "False"], out.stderr

"""End to end on real cells (../shared/data; skipped without it): convert a PBMC file, pretrain a
tiny model for 20 steps on one CPU process, export it, and embed another PBMC file with
launch/embed.py; inputs without usable gene identifiers are refused."""

from __future__ import annotations

import importlib.util
import json
import math

import anndata as ad
import numpy as np
import pytest

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.plan import ConvertOptions
from tests.train_helpers import ROOT, TINY, export, metrics, run_pretrain, summary

pytestmark = pytest.mark.slow


def _embed_main():
    spec = importlib.util.spec_from_file_location("launch_embed", ROOT / "launch" / "embed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "h5ad").is_dir():
        pytest.skip("../shared/data is not present (real-data tests run where it is)")
    folder = tmp_path_factory.mktemp("real")
    corpus = folder / "corpus"
    convert(corpus, ConvertOptions([str(SHARED_DATA / "h5ad" / "mudan_pbmcA.h5ad")]), progress=False)
    run = folder / "run"
    run_pretrain([*TINY, f"data.corpus={corpus}", f"run.out={run}", "schedule.max_steps=20", "run.log_every=5",
                  "run.checkpoint_every=0", "objectives.label_weight=0"])
    history = metrics(run)
    assert [h["step"] for h in history] == list(range(1, 21)) and summary(run)["skipped_steps"] == 0
    assert all(math.isfinite(h[k]) for h in history for k in ("loss", "mlm", "contrastive"))
    # a 20-step tiny model still learns something: the masked-bin loss falls
    assert np.mean([h["mlm"] for h in history[-5:]]) < np.mean([h["mlm"] for h in history[:5]])
    return export(run, folder / "bundle")


def test_embedding_a_real_file_keeps_every_cell_in_order(shared_data, bundle, tmp_path, capsys):
    source = shared_data / "h5ad" / "mudan_zheng_sorted_ref.h5ad"
    out = tmp_path / "embedded.h5ad"
    _embed_main()([str(bundle), str(source), "--out", str(out), "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    cells = ad.read_h5ad(source, backed="r")
    assert report["n_cells"] == cells.n_obs == 2140 and report["dim"] == 32 and report["key"] == "X_scfm"
    assert report["input_genes"] == cells.n_vars
    assert 0 < report["mapped_genes"] <= report["input_genes"]
    assert report["input_fraction"] == pytest.approx(report["mapped_genes"] / report["input_genes"])
    assert report["input_fraction"] > 0.8 and report["count_fraction"] > 0.8  # both PBMC, mostly the same genes
    assert 0 < report["vocab_fraction"] <= 1
    embedded = ad.read_h5ad(out)
    x = embedded.obsm["X_scfm"]
    assert x.shape == (2140, 32) and x.dtype == np.float32 and np.isfinite(x).all()
    assert list(embedded.obs_names) == list(cells.obs_names)
    assert list(embedded.obs["cell_type"]) == list(cells.obs["cell_type"])  # the input, plus obsm
    assert np.unique(x.round(5), axis=0).shape[0] > 2000  # one embedding per cell, not a constant


def test_a_file_without_gene_identifiers_is_refused(shared_data, bundle, tmp_path, capsys):
    out = tmp_path / "embedded.h5ad"
    with pytest.raises(SystemExit) as exited:  # one error line, exit 2
        _embed_main()([str(bundle), str(shared_data / "h5ad" / "scdcc_10X_PBMC_top2000.h5ad"), "--out", str(out)])
    said = capsys.readouterr().err
    assert exited.value.code == 2 and "error: " in said and "no gene identifiers" in said
    assert "Ensembl ids or gene symbols" in said  # the advice is the embedder's, not the converter's
    assert not out.exists()

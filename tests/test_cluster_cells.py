"""scHybridBERT clustering end to end (issue 23, point 2): on synthetic cells of separable types the
pipeline finds the types, deterministically; `launch/cluster_cells.py` on a tiny bundle writes the
clusters in the input's cell order with ARI/NMI beside the baselines; a real labelled file (skipped
without ../shared/data) runs through."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from data_pipeline.conversion.vocab import Vocabulary
from data_pipeline.loading.normalize import Normalization
from pretrain.config import ModelConfig
from pretrain.downstream import clustering
from pretrain.downstream.clustering import assign_clusters, graph_communities, knn_adjacency, scores
from pretrain.downstream.expression import hvg_expression
from pretrain.downstream.hybrid import (
    HybridConfig,
    cluster_with_baselines,
    expression_clusters,
    hybrid_representation,
)
from pretrain.downstream.token_cells import label_strings
from pretrain.downstream.vae import VAEConfig
from pretrain.export import write_bundle
from pretrain.model import CellModel
from tests.model_helpers import one_thread  # noqa: F401 (autouse: one torch thread; two spin on a loaded 2-core machine)

ROOT = Path(__file__).resolve().parents[1]
FAST = HybridConfig(n_top_genes=0, vae=VAEConfig(steps=400), epochs=60)


def _separable_counts(n: int, n_genes: int, n_types: int, seed: int, marked: float = 0.15,
                      depth: float = 1.0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Poisson counts: every type raises its own random ``marked`` share of the genes 3-6 fold; depths vary 3x."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % n_types)  # types interleaved in the file's order
    base = rng.gamma(0.5, 2.0 * depth, size=n_genes)
    means = np.stack([base * np.where(rng.random(n_genes) < marked, rng.uniform(3, 6, n_genes), 1)
                      for _ in range(n_types)])
    counts = rng.poisson(means[labels] * rng.uniform(0.5, 1.5, n)[:, None])
    return sp.csr_matrix(counts.astype(np.int32)), labels


def test_pipeline_finds_separable_types_deterministically():
    counts, labels = _separable_counts(240, 150, 3, seed=0)
    noise = np.random.default_rng(1).normal(size=(240, 16)).astype(np.float32)  # an embedding that knows nothing
    report, result = cluster_with_baselines(counts, noise, labels, n_clusters=3, config=FAST)
    methods = report["methods"]
    assert methods["schybridbert"]["ari"] > 0.95 and methods["schybridbert"]["nmi"] > 0.9
    assert methods["embedding_kmeans"]["ari"] < 0.1  # the noise view alone finds nothing
    assert report["graph_isolated_cells"] == 0
    fused = result["hybrid"].fused
    np.testing.assert_array_equal(hybrid_representation(counts, noise, FAST).fused, fused)
    # communities of the fused representation's kNN graph instead of k-means
    communities, method = assign_clusters(fused, None, resolution=0.5)
    assert scores(labels, communities)["ari"] > 0.9, method


@pytest.mark.parametrize("louvain", [False, True], ids=["leiden", "louvain"])
def test_graph_communities_find_planted_groups(louvain, monkeypatch):
    """Both community paths (Leiden where leidenalg is installed, networkx's Louvain without it) recover
    well-separated groups, numbered by decreasing size, and say which one ran."""
    if louvain:
        monkeypatch.setattr(clustering, "community_method", lambda: "louvain (networkx; install leidenalg and igraph "
                                                                     "for Leiden)")
    elif not clustering.community_method().startswith("leiden"):
        pytest.skip("leidenalg and igraph are not installed (requirements.txt installs them)")
    rng = np.random.default_rng(4)
    sizes = [90, 60, 30]
    truth = np.repeat(np.arange(3), sizes)
    x = rng.normal(size=(len(truth), 8)) + 12 * rng.normal(size=(3, 8))[truth]
    got, method = graph_communities(knn_adjacency(x, 10), resolution=0.5, seed=0)  # 1.0 splits the 90
    assert method.split()[0] == ("louvain" if louvain else "leiden")
    assert scores(truth, got)["ari"] == pytest.approx(1.0)
    np.testing.assert_array_equal(got, truth)  # the largest community is 0
    np.testing.assert_array_equal(graph_communities(knn_adjacency(x, 10), 0.5, seed=0)[0], got)


def test_expression_baseline_is_scanpys_pipeline_on_hvg_expression():
    """The PCA-50 baseline's clusters from raw counts: HVG log1p-CP10k, PCA-50, then k-means with k or
    communities of its kNN graph; the separable types are found either way."""
    counts, labels = _separable_counts(240, 150, 3, seed=2)
    expression = hvg_expression(counts, 100)
    with_k, how = expression_clusters(expression, 3)
    assert how == "k-means (k=3)" and scores(labels, with_k)["ari"] > 0.95
    found, how = expression_clusters(expression, None, resolution=0.5)
    assert "resolution 0.5, 15 neighbours" in how and scores(labels, found)["ari"] > 0.9
    report, _ = cluster_with_baselines(counts, np.zeros((240, 4), np.float32), labels, n_clusters=3,
                                       config=replace(FAST, n_top_genes=100))
    assert report["methods"]["pca50"]["ari"] == pytest.approx(scores(labels, with_k)["ari"])


def test_scores_leave_unlabelled_cells_out():
    """Missing labels as NaN or None, and as the texts a column through astype(str) or a CSV holds."""
    truth = np.array(["a", "a", None, "b", "b", np.nan, "", "nan", "NA", "None", "<NA>"], dtype=object)
    got = scores(truth, np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1]))
    assert got["n_labelled"] == 4 and got["ari"] == pytest.approx(1.0)
    assert label_strings(pd.Series(truth).astype(str)).tolist() == ["a", "a"] + [""] + ["b", "b"] + [""] * 6


N_GENES = 150
GENES = [f"ENSG{100000000 + i:011d}" for i in range(N_GENES)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle as `launch/export.py` writes it, from a randomly initialized tiny model."""
    vocab = Vocabulary.from_genes(GENES, [f"GENE{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(N_GENES)])
    config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention="sdpa", n_bins=7,
                         dropout=0.0)
    model = CellModel.initial(config, seed=0)
    return write_bundle(tmp_path_factory.mktemp("bundle") / "bundle", model.state_dict(), config, vocab.to_tsv(),
                        Normalization(mode="log1p_bins", n_bins=7), "# test bundle\n")


def _cluster_command(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "cluster_cells.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_command_writes_clusters_in_input_order(bundle, tmp_path):
    counts, labels = _separable_counts(150, N_GENES, 3, seed=2)
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"type{t}" for t in labels])},
                       index=[f"cell{i:03d}" for i in range(150)])
    obs.loc["cell007", "cell_type"] = np.nan  # an unlabelled cell is left out of the scores
    source = tmp_path / "cells.h5ad"
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=GENES)).write_h5ad(source)
    out, report_path = tmp_path / "clustered.h5ad", tmp_path / "report.json"
    proc = _cluster_command(bundle, source, "--out", out, "--n-clusters", 3, "--label-column", "cell_type",
                            "--vae-steps", 300, "--epochs", 40, "--n-top-genes", 0, "--report", report_path,
                            "--threads", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = ad.read_h5ad(out)
    assert list(result.obs_names) == list(obs.index)
    assert result.obsm["X_schybrid"].shape == (150, HybridConfig().fused_dim)
    assert np.allclose(result.obsm["X_schybrid_view_weights"].sum(axis=1), 1, atol=1e-5)
    from pretrain.embed import embed_h5ad
    from pretrain.export import load_pretrained

    embed_h5ad(load_pretrained(bundle), source, tmp_path / "embedded.h5ad", progress=False)
    embedded = ad.read_h5ad(tmp_path / "embedded.h5ad").obsm["X_scfm"]
    np.testing.assert_allclose(result.obsm["X_schybrid_embedding"], embedded, rtol=0, atol=1e-5)  # row for row
    # the clusters follow the types in the file's own (interleaved) order
    clusters = result.obs["schybrid_cluster"].astype(str).to_numpy()
    report = json.loads(report_path.read_text())
    assert report == json.loads(result.uns["schybrid_report"])
    assert report["methods"]["schybridbert"]["n_labelled"] == 149
    assert scores(labels, clusters)["ari"] > 0.9
    assert report["methods"]["schybridbert"]["ari"] == pytest.approx(scores(obs["cell_type"], clusters)["ari"])
    assert set(report["methods"]) == {"schybridbert", "pca50", "embedding_kmeans"}
    for column in ("schybrid_pca50_cluster", "schybrid_embedding_kmeans_cluster"):
        assert result.obs[column].nunique() == 3
    # a missing label column is named, with the columns there are
    proc = _cluster_command(bundle, source, "--out", out, "--label-column", "celltype")
    assert proc.returncode != 0 and "no obs column 'celltype'" in proc.stderr and "cell_type" in proc.stderr
    proc = _cluster_command(bundle, source, "--out", out, "--n-clusters", 151)
    assert proc.returncode != 0 and "only 150 cells" in proc.stderr
    proc = _cluster_command(bundle, source, "--out", source, "--n-clusters", 3)
    assert proc.returncode != 0 and "is the input" in proc.stderr
    # the embedding's encoder block as `embed --encoder-layer` takes it: this one-block model has only -1
    assert report["encoder_layer"] == -1
    proc = _cluster_command(bundle, source, "--out", tmp_path / "other.h5ad", "--encoder-layer", -2)
    assert proc.returncode != 0 and "--encoder-layer: encoder layer -2: give -1" in proc.stderr
    # written through a temp file of its own, renamed when whole: nothing else is left beside the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "clustered.h5ad", "embedded.h5ad", "report.json"]


def test_bench_cluster_runs(bundle, tmp_path):
    """benchmarks/bench_cluster.py writes its JSON: both runs, each method's scores, the options passed on."""
    counts, labels = _separable_counts(90, N_GENES, 3, seed=4)
    source = tmp_path / "cells.h5ad"
    obs = pd.DataFrame({"cell_type": [f"type{t}" for t in labels]}, index=[f"c{i}" for i in range(90)])
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=GENES)).write_h5ad(source)
    out = tmp_path / "cluster.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cluster.py"), "--bundle", str(bundle),
                           "--input", str(source), "--label-column", "cell_type", "--n-clusters", "3", "--out", str(out),
                           "--vae-steps", "200", "--epochs", "20", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["options"] == ["--vae-steps", "200", "--epochs", "20", "--threads", "1"]
    assert [run["args"][0] for run in result["runs"]] == ["--n-clusters", "--leiden-resolution"]
    for run in result["runs"]:
        assert set(run["report"]["methods"]) == {"schybridbert", "pca50", "embedding_kmeans"}
        assert all(0 <= m["nmi"] <= 1 for m in run["report"]["methods"].values())


def test_real_labelled_file(shared_data, tmp_path):
    """A random-init tiny bundle over a real labelled file's genes (350 pancreas cells of 5 types,
    human and mouse; a pretraining file, not one of the evaluation files): the run completes, the
    PCA-50 baseline finds real structure (a check on the data path), and scHybridBERT (whose graph
    view sees the same expression) is far from chance although its embedding view is random."""
    source = shared_data / "h5ad" / "cider_baron_pancreas350.h5ad"
    if not source.is_file():
        pytest.skip(f"{source.name} is not in ../shared/data")
    full = ad.read_h5ad(source)
    ids = full.var["ensembl_id"]
    keep = (ids.notna() & (ids.astype(str) != "") & ~ids.duplicated()).to_numpy()
    subset = full[:, keep].copy()
    vocab = Vocabulary.from_genes(list(ids[keep].astype(str)))
    torch.manual_seed(0)
    model = CellModel(ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention="sdpa",
                                  n_bins=11, dropout=0.0)).eval()
    model.normalization = Normalization(mode="log1p_bins", n_bins=11, max_genes=256)
    model.vocab = vocab
    from pretrain.embed import embed_counts, gene_tokens, token_csr

    tokens, _ = gene_tokens(subset.var, vocab, source.name)
    embedding = embed_counts(model, *token_csr(subset.X, tokens, len(vocab)))
    config = HybridConfig(vae=VAEConfig(steps=500), epochs=100)
    report, _ = cluster_with_baselines(subset.X, embedding, subset.obs["cell_type"].to_numpy(), 5, config=config)
    print(json.dumps(report["methods"]))
    methods = report["methods"]
    assert methods["pca50"]["ari"] > 0.3
    assert methods["schybridbert"]["ari"] > 0.2 and methods["schybridbert"]["nmi"] > 0.3


def test_layer_names_the_matrix_the_embedding_read():
    """--layer X, raw.X (raw/X) and a layer name give those matrices; a missing one exits at once,
    naming the layers, before any cell is embedded."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from launch.cluster_cells import layer_counts

    x = sp.random(6, 4, density=0.5, format="csr", random_state=0)
    adata = ad.AnnData(X=x, layers={"counts": x * 2})
    adata.raw = ad.AnnData(X=x * 3)
    source = Path("in.h5ad")
    assert layer_counts(adata, None, source) is adata.X and layer_counts(adata, "X", source) is adata.X
    for name in ("raw.X", "raw/X"):
        assert (layer_counts(adata, name, source) != x * 3).nnz == 0
    for name in ("counts", "layers/counts"):
        assert (layer_counts(adata, name, source) != x * 2).nnz == 0
    with pytest.raises(SystemExit, match="no such layer \\(layers: counts; or X, raw.X\\)"):
        layer_counts(adata, "spliced", source)
    adata.raw = None
    with pytest.raises(SystemExit, match="has no raw"):
        layer_counts(adata, "raw.X", source)

"""What `embed` writes opens in the ecosystem's tools (issue 24, point 2): a ``.zarr`` output is an
AnnData zarr store that `anndata.read_zarr` opens (obs and var kept, the embedding in
``obsm["X_scfm"]``, chunked by cells) and scanpy's neighbors use; an ``.h5ad`` output is the input
plus that obsm; and the command streams: its memory grows by a fraction of the input's matrix.

One tiny bundle (random weights, sdpa attention, 40 genes); inputs of a few dozen cells, except the
memory test's file (~260 MB of X, written once, embedded in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipeline.conversion.vocab import Vocabulary
from data_pipeline.loading.normalize import Normalization
from pretrain.config import ModelConfig
from pretrain.export import load_pretrained, write_bundle
from pretrain.model import CellModel

ROOT = Path(__file__).resolve().parents[1]
N_GENES = 40
GENES = [f"ENSG{100000000 + i:011d}" for i in range(N_GENES)]
N_CELLS = 50


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    vocab = Vocabulary.from_genes(GENES, [f"GN{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(N_GENES)])
    config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention="sdpa", n_bins=7,
                         dropout=0.0)
    model = CellModel.initial(config, seed=0)
    return write_bundle(tmp_path_factory.mktemp("bundle") / "bundle", model.state_dict(), config, vocab.to_tsv(),
                        Normalization(mode="log1p_bins", n_bins=7), "# test bundle\n")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Cells with obs columns (categorical, numeric), a var column, a layer and uns: what a user's file holds."""
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.poisson(2.0, (N_CELLS, N_GENES)) * (rng.random((N_CELLS, N_GENES)) < 0.6))
                      .astype(np.float32))
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["T", "B", "NK"], N_CELLS)),
                        "n_counts": np.asarray(x.sum(axis=1)).ravel()},
                       index=[f"cell{i:03d}" for i in range(N_CELLS)])
    var = pd.DataFrame({"gene_symbol": [f"S{i}" for i in range(N_GENES)]}, index=GENES)
    adata = ad.AnnData(X=x, obs=obs, var=var, layers={"counts": x.copy()}, uns={"study": "test"})
    path = tmp_path_factory.mktemp("source") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def _embed(bundle: Path, source: Path, out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "embed.py"), str(bundle), str(source), "--out",
                           str(out), "--device", "cpu", "--threads", "1", *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.fixture(scope="module")
def embedded(bundle, source, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("out")
    _embed(bundle, source, folder / "cells.h5ad")
    _embed(bundle, source, folder / "cells.zarr")
    return folder / "cells.h5ad", folder / "cells.zarr"


def test_zarr_output_is_an_anndata_store_with_obs_var_and_the_embedding(source, embedded):
    import zarr

    original = ad.read_h5ad(source)
    store = ad.read_zarr(embedded[1])
    assert store.obsm["X_scfm"].shape == (N_CELLS, 32) and store.obsm["X_scfm"].dtype == np.float32
    assert np.isfinite(store.obsm["X_scfm"]).all() and np.abs(store.obsm["X_scfm"] - store.obsm["X_scfm"][0]).max() > 0
    assert list(store.obs_names) == list(original.obs_names) and list(store.var_names) == list(original.var_names)
    pd.testing.assert_frame_equal(store.obs, original.obs)
    pd.testing.assert_frame_equal(store.var, original.var)
    assert store.X is None  # the store holds no copy of the matrix
    # the same embedding as the .h5ad output
    np.testing.assert_array_equal(store.obsm["X_scfm"], ad.read_h5ad(embedded[0]).obsm["X_scfm"])
    # chunked by cells: every chunk holds whole embedding rows
    array = zarr.open_group(str(embedded[1]), mode="r")["obsm"]["X_scfm"]
    assert array.chunks[1] == 32


def test_zarr_output_feeds_scanpy_neighbors(embedded):
    import scanpy as sc  # a test requirement (and tiledbsoma's)

    store = ad.read_zarr(embedded[1])
    sc.pp.neighbors(store, use_rep="X_scfm", n_neighbors=5)
    assert store.obsp["connectivities"].shape == (N_CELLS, N_CELLS)
    sc.tl.umap(store, random_state=0)
    assert store.obsm["X_umap"].shape == (N_CELLS, 2) and np.isfinite(store.obsm["X_umap"]).all()


def test_h5ad_output_is_the_input_plus_the_embedding(source, embedded, bundle, tmp_path):
    original, out = ad.read_h5ad(source), ad.read_h5ad(embedded[0])
    assert (out.X != original.X).nnz == 0 and (out.layers["counts"] != original.layers["counts"]).nnz == 0
    pd.testing.assert_frame_equal(out.obs, original.obs)
    pd.testing.assert_frame_equal(out.var, original.var)
    assert out.uns["study"] == "test" and out.obsm["X_scfm"].shape == (N_CELLS, 32)
    # an output embedded again keeps one obsm entry per name: the new one replaces the old
    again = tmp_path / "again.h5ad"
    _embed(bundle, embedded[0], again, "--name", "scfm")
    np.testing.assert_array_equal(ad.read_h5ad(again).obsm["X_scfm"], out.obsm["X_scfm"])


def test_refusals_leave_no_output(bundle, source, tmp_path):
    model = load_pretrained(bundle)
    from pretrain.embed import embed_h5ad

    with pytest.raises(ValueError, match="is the input"):
        embed_h5ad(model, source, source, progress=False)
    with pytest.raises(ValueError, match=r"write \.h5ad .* or \.zarr"):
        embed_h5ad(model, source, tmp_path / "out.csv", progress=False)
    with pytest.raises(ValueError, match="choose with --layer"):
        embed_h5ad(model, source, tmp_path / "out.h5ad", layer="missing", progress=False)
    ad.read_h5ad(source).write_zarr(tmp_path / "input.zarr")
    with pytest.raises(ValueError, match="a zarr input; this command reads .h5ad files: write one first"):
        embed_h5ad(model, tmp_path / "input.zarr", tmp_path / "out.h5ad", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.zarr"]


def test_a_layer_is_read_as_x_is(bundle, source, embedded, tmp_path):
    from pretrain.embed import embed_h5ad

    embed_h5ad(load_pretrained(bundle), source, tmp_path / "layer.zarr", layer="counts", progress=False,
               chunk_cells=16)
    np.testing.assert_array_equal(ad.read_zarr(tmp_path / "layer.zarr").obsm["X_scfm"],
                                  ad.read_zarr(embedded[1]).obsm["X_scfm"])
    import zarr

    # stored in chunks of the cells embedded at a time (whole rows: a read of some cells touches their chunks)
    assert zarr.open_group(str(tmp_path / "layer.zarr"), mode="r")["obsm"]["X_scfm"].chunks == (16, 32)


def test_encoder_layer_picks_the_block_whose_states_are_pooled(source, tmp_path):
    """``--encoder-layer -2`` (Geneformer's embedding layer) embeds from the second-to-last block,
    as `embed_h5ad` does in-process; a layer the model lacks is one line naming the range, before any
    output is written."""
    from pretrain.embed import embed_h5ad

    vocab = Vocabulary.from_genes(GENES, [f"GN{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(N_GENES)])
    config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=3, n_heads=2, attention="sdpa", n_bins=7,
                         dropout=0.0, norm_position="post", activation="relu")
    bundle = write_bundle(tmp_path / "bundle", CellModel.initial(config, seed=1).state_dict(), config,
                          vocab.to_tsv(), Normalization(mode="log1p_bins", n_bins=7), "# test bundle\n")
    report = _embed(bundle, source, tmp_path / "second.h5ad", "--encoder-layer", "-2")
    assert report["encoder_layer"] == -2
    model = load_pretrained(bundle)
    embed_h5ad(model, source, tmp_path / "in_process.h5ad", progress=False, encoder_layer=-2)
    embed_h5ad(model, source, tmp_path / "last.h5ad", progress=False)
    second = ad.read_h5ad(tmp_path / "second.h5ad").obsm["X_scfm"]
    np.testing.assert_array_equal(second, ad.read_h5ad(tmp_path / "in_process.h5ad").obsm["X_scfm"])
    assert np.abs(second - ad.read_h5ad(tmp_path / "last.h5ad").obsm["X_scfm"]).max() > 1e-3
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "embed.py"), str(bundle), str(source), "--out",
                           str(tmp_path / "refused.h5ad"), "--encoder-layer", "-4"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "encoder layer -4: give -1" in proc.stderr and "down to -3" in proc.stderr
    assert not (tmp_path / "refused.h5ad").exists()


# --- streaming: memory grows by a fraction of the matrix ------------------------------------------------

BIG_CELLS, OFF_GENES = 8000, 4000  # every cell: its 40 vocabulary genes + 4000 others of count 1 (~260 MB of X)

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import runpy
big, outs = sys.argv[1], sys.argv[2:]

def embed(source, out):
    sys.argv = ["embed.py", {bundle!r}, source, "--out", out, "--min-coverage", "0", "--chunk-cells", "128",
                "--threads", "1"]
    runpy.run_path({script!r}, run_name="__main__")

# a small input first, to both outputs: what does not grow with the input (imports, torch's first
# forward, the writers' first use) is in the baseline
embed({small!r}, {warm!r} + ".h5ad")
embed({small!r}, {warm!r} + ".zarr")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for out in outs:
    embed(big, out)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("GROWTH", json.dumps((after - before) * 1024))
"""

def _big_source(path: Path) -> int:
    """An .h5ad of BIG_CELLS cells, written by h5py in row blocks (the test's own memory stays small);
    returns the bytes of its X."""
    n_vars = N_GENES + OFF_GENES
    per_cell = n_vars
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (BIG_CELLS, n_vars)})
        nnz = BIG_CELLS * per_cell
        data = x.create_dataset("data", (nnz,), np.int32)
        indices = x.create_dataset("indices", (nnz,), np.int32)
        x.create_dataset("indptr", data=np.arange(BIG_CELLS + 1, dtype=np.int64) * per_cell)
        rng = np.random.default_rng(0)
        block = 500
        cols = np.tile(np.arange(n_vars, dtype=np.int32), block)
        for a in range(0, BIG_CELLS, block):
            values = np.ones((block, n_vars), np.int32)
            values[:, :N_GENES] = rng.integers(1, 30, (block, N_GENES))
            data[a * per_cell:(a + block) * per_cell] = values.ravel()
            indices[a * per_cell:(a + block) * per_cell] = cols
    from anndata.io import write_elem

    with h5py.File(path, "r+") as f:
        write_elem(f, "obs", pd.DataFrame(index=[f"c{i}" for i in range(BIG_CELLS)]))
        write_elem(f, "var", pd.DataFrame(index=GENES + [f"ENSG{900000000 + i:011d}" for i in range(OFF_GENES)]))
        for key in ("obsm", "varm", "layers", "obsp", "varp", "uns"):
            write_elem(f, key, {})
    return nnz * 8


@pytest.mark.slow
def test_embed_streams_an_input_larger_than_its_memory_growth(bundle, source, tmp_path):
    big = tmp_path / "big.h5ad"
    x_bytes = _big_source(big)
    child = CHILD.format(root=str(ROOT), script=str(ROOT / "launch" / "embed.py"), bundle=str(bundle),
                         small=str(source), warm=str(tmp_path / "warm"))
    outs = [tmp_path / "big_out.h5ad", tmp_path / "big_out.zarr"]
    proc = subprocess.run([sys.executable, "-c", child, str(big), *map(str, outs)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.split("GROWTH", 1)[1])
    assert growth < x_bytes / 4, f"peak memory grew by {growth / 2**20:.0f} MiB for {x_bytes / 2**20:.0f} MiB of X"
    # and both outputs are whole
    with h5py.File(outs[0], "r") as f:
        assert f["obsm"]["X_scfm"].shape == (BIG_CELLS, 32) and f["X"]["data"].shape == (BIG_CELLS * 4040,)
    assert ad.read_zarr(outs[1]).obsm["X_scfm"].shape == (BIG_CELLS, 32)



@pytest.mark.parametrize("layout", ["current", "anndata<0.7"])
def test_annotated_copy_adds_columns_and_keeps_the_rest(layout, tmp_path, monkeypatch):
    """Predict's writer: the input copied with obs columns, obsm and uns entries added; X, obs and
    its index as they were. A file in anndata < 0.7's layout (obs a compound dataset) too."""
    import scipy.sparse as sp

    from pretrain.embed_output import annotated_copy

    given = ad.AnnData(X=sp.random(6, 4, density=0.5, format="csr", dtype=np.float32, random_state=0),
                            obs=pd.DataFrame({"n": np.arange(6)}, index=[f"c{i}" for i in range(6)]))
    source = tmp_path / "in.h5ad"
    given.write_h5ad(source)
    if layout != "current":
        with h5py.File(source, "r+") as f:
            del f["obs"]
            f.create_dataset("obs", data=np.array([(f"c{i}".encode(), i) for i in range(6)],
                                                  dtype=[("index", "S4"), ("n", "<i8")]))
    out = tmp_path / "out.h5ad"
    read_whole = ad.read_h5ad
    if layout == "current":  # X is copied as bytes: the file is never read whole
        monkeypatch.setattr(ad, "read_h5ad", lambda *a, **k: pytest.fail("read the whole input"))
    annotated_copy(source, out, obs={"p": pd.Categorical(list("abcabc"))}, obsm={"q": np.ones((6, 2), np.float32)},
                   uns={"k": np.array(["x", "y"], dtype=object)})
    got = read_whole(out)
    assert list(got.obs_names) == [f"c{i}" for i in range(6)] and list(got.obs["n"]) == list(range(6))
    assert list(got.obs["p"]) == list("abcabc") and got.obsm["q"].shape == (6, 2) and list(got.uns["k"]) == ["x", "y"]
    assert (got.X != given.X).nnz == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out.h5ad"]  # no temporary file left

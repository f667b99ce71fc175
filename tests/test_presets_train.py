"""Each faithful preset (scBERT, CellLM, Geneformer, scGPT) trains 20 steps and exports on CPU, in tiny
shapes (the preset's recipe: its normalization, masking, norm position, label objective, gene2vec
wiring; only the sizes shrunk)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.corpus import Corpus
from tests.train_helpers import TINY, export, make_corpus, metrics, run_pretrain, steps_logged

pytestmark = pytest.mark.slow

SHRUNK = [o for o in TINY if not o.startswith("data.max_genes")] + ["data.max_genes=32", "data.views=false",
                                                                    "objectives.contrastive_weight=0",
                                                                    "schedule.max_steps=20", "schedule.warmup_steps=2",
                                                                    "run.checkpoint_every=0", "run.log_every=1",
                                                                    "deepspeed.chunks_per_step=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("presets"), n_cells=300, n_genes=300)


def _gene2vec(corpus, path, width: int):
    """A gene2vec file in word2vec text form (header line, a gene per row) for the corpus's genes (the
    synthetic vocabulary's Ensembl ids stand in for gene2vec's symbols)."""
    vocab = Corpus(corpus).vocab
    symbols = [g for g in vocab.ensembl_ids if g.startswith("ENSG")]
    rng = np.random.default_rng(0)
    with open(path, "w") as fh:
        fh.write(f"{len(symbols)} {width}\n")
        for s in symbols:
            fh.write(s + " " + " ".join(f"{x:.5f}" for x in rng.normal(0, 0.3, width)) + "\n")
    return path


RECIPES = {
    "scbert": lambda corpus, tmp: ["data.token_budget=4096",
                                   f"model.gene_embedding_file={_gene2vec(corpus, tmp / 'g2v.txt', 32)}"],
    # the synthetic corpus's label column stands in for the tumour / normal one
    "celllm": lambda corpus, tmp: ["objectives.label_weight=0.5", "objectives.labels={tumor_normal: cell_type}"],
    "geneformer-10m": lambda corpus, tmp: ["model.max_rank=64"],
    # flash needs CUDA; sdpa takes scGPT's generative attention mask, which the run exercises here
    "scgpt": lambda corpus, tmp: ["model.attention=sdpa", "model.attention_mask=generative"],
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_preset_trains_twenty_steps_and_exports(corpus, tmp_path, name):
    run = tmp_path / "run"
    run_pretrain([f"preset={name}", f"data.corpus={corpus}", f"run.out={run}", *SHRUNK,
                  *RECIPES[name](corpus, tmp_path)])
    assert steps_logged(run) == 20
    bundle = export(run, tmp_path / "bundle")
    model = json.loads((bundle / "config.json").read_text())["model"]
    norm = json.loads((bundle / "normalization.json").read_text())
    if name == "scbert":
        assert norm["mode"] == "log2_floor_bins" and norm["n_bins"] == 6 and model["freeze_gene_embedding"]
    elif name == "celllm":
        assert norm["mode"] == "log2_floor_bins" and norm["n_bins"] == 6 and model["label_classes"] == [8]
    elif name == "scgpt":
        assert norm["mode"] == "quantile_bins" and (model["bin_embedding"], model["bin_loss"]) == ("mlp", "mse")
        mvc = [record["mvc"] for record in metrics(run)]
        assert model["mvc_head"] and model["attention_mask"] == "generative" and all(v > 0 for v in mvc)  # the MVC / GEPC loss trained every step
    else:
        assert (model["norm_position"], model["activation"]) == ("post", "relu")


def test_celllm_corpus_recipe_labels_tumour_and_normal_files(tmp_path):
    """The README's CellLM corpus recipe on real files: each source h5ad gets an obs column tumor_normal
    (here per file: the copykat breast tumour sample "tumor", PBMC "normal"; per cell where a malignancy
    call exists), the corpus is converted with --label-columns tumor_normal, and the celllm preset's
    [cls] task then has one two-class head whose labels are the files' ones."""
    import anndata as ad

    from data_pipeline.conversion.convert import convert
    from data_pipeline.conversion.plan import ConvertOptions
    from data_pipeline.loading.loader import CellLoader
    from pretrain.config import load_config
    from pretrain.train import resolve_model_config
    from tests.conftest import SHARED_DATA

    sources = {"copykat_tumor302.h5ad": "tumor", "mudan_pbmcA.h5ad": "normal"}
    if not all((SHARED_DATA / "h5ad" / f).exists() for f in sources):
        pytest.skip("../shared/data is absent")
    paths = []
    for name, label in sources.items():
        adata = ad.read_h5ad(SHARED_DATA / "h5ad" / name)
        adata.obs["tumor_normal"] = label
        paths.append(tmp_path / name)
        adata.write_h5ad(paths[-1])
    out = tmp_path / "corpus"
    convert(out, ConvertOptions([str(p) for p in paths], label_columns=["tumor_normal"]), workers=1, progress=False)
    corpus = Corpus(out)
    config = resolve_model_config(load_config(None, ["preset=celllm", f"data.corpus={out}"]), corpus)
    assert config.model.label_classes == [2]
    codes = {c: i for i, c in enumerate(corpus.label_columns[0].categories)}
    loader = CellLoader(corpus, seed=0, label_columns=config.label_column_indices(["tumor_normal"]))
    labels = np.concatenate([b.labels.numpy() for b in loader])
    assert labels.shape == (302 + 2896, 1)
    assert (labels[:, 0] == codes["tumor"]).sum() == 302 and (labels[:, 0] == codes["normal"]).sum() == 2896

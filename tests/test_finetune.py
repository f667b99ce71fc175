"""Fine-tuning for cell-type annotation and prediction (issue 23, point 1): `launch/finetune.py`,
`launch/predict.py`, `pretrain.downstream.finetune`.

A tiny bundle (random weights, 1 layer x 32, sdpa, 80 genes) is written once for the module; the
labelled cells are hand-made: three types, each with its own marker genes, and a random number
of background genes per cell (5 to 45), so that cells differ in length and the embedding's
length-sorted batches scramble the order (what `test_predictions_come_back_in_input_order` checks
is undone). Each fine-tuning run takes a second or two on one core.
"""

from __future__ import annotations

import json
import runpy
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
from pretrain.config import FinetuneConfig, ModelConfig
from pretrain.downstream.finetune import (
    CHECKPOINT_FILE,
    HEAD_FILE,
    LABELS_FILE,
    UNASSIGNED,
    ClassifierHead,
    class_probabilities,
    finetune,
    finetune_split,
    labelled_split,
    load_finetuned,
    make_split,
    predict_h5ad,
    scores,
    stratified_split,
)
from pretrain.export import load_pretrained, write_bundle
from pretrain.model import CellModel

ROOT = Path(__file__).resolve().parents[1]
N_GENES = 80
GENES = [f"ENSG{100000000 + i:011d}" for i in range(N_GENES)]
SYMBOLS = [f"GN{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(N_GENES)]
TYPES = ["B cell", "monocyte", "T cell"]
MARKERS = {t: list(range(8 * i, 8 * i + 8)) for i, t in enumerate(TYPES)}  # genes 0..23; the rest background


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A pretrained bundle as `launch/export.py` writes it, from a randomly initialized model."""
    vocab = Vocabulary.from_genes(GENES, SYMBOLS)
    config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention="sdpa", n_bins=7,
                         dropout=0.1, pooling="mean")
    model = CellModel.initial(config, seed=0)
    return write_bundle(tmp_path_factory.mktemp("pretrained") / "bundle", model.state_dict(), config, vocab.to_tsv(),
                        Normalization(mode="log1p_bins", n_bins=7), "# test bundle\n")


def cells(n: int, seed: int, types=TYPES, proportions=None) -> ad.AnnData:
    """``n`` cells, obs['cell_type'] drawn from ``types``; each cell expresses its type's markers
    (counts 3-12; a type outside `MARKERS` has none) and 5-45 random background genes (counts 1-3)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(types, size=n, p=proportions)
    x = np.zeros((n, N_GENES), np.int32)
    for i, t in enumerate(labels):
        x[i, MARKERS.get(t, [])] = rng.integers(3, 13, size=len(MARKERS.get(t, [])))
        background = rng.choice(np.arange(24, N_GENES), size=rng.integers(5, 46), replace=False)
        x[i, background] = rng.integers(1, 4, size=len(background))
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels), "batch": "b1"},
                       index=[f"c{seed}-{i:04d}" for i in range(n)])
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame({"gene_symbol": SYMBOLS}, index=GENES))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cells") / "train.h5ad"
    cells(240, seed=1).write_h5ad(path)
    return path


def config(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"label_column": "cell_type", "epochs": 3, "batch_size": 32, "hidden": [32],
                             "lr": 1e-2, "val_fraction": 0.25, **kw})


@pytest.fixture(scope="module")
def head_run(bundle, labelled, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("head_run")
    finetune(bundle, [labelled], out, config(epochs=8))
    return out


def test_head_mode_learns_a_separable_label(head_run):
    report = json.loads((head_run / "report.json").read_text())
    assert report["classes"] == sorted(TYPES) and report["n_val"] == 60 and report["n_train"] == 180
    assert report["macro_f1"] > 0.9 and report["accuracy"] > 0.9  # chance: ~0.33
    assert set(report["per_class_f1"]) == set(TYPES)
    confusion = np.array(report["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == 60
    assert report["best_epoch"] == max(range(len(report["history"])),
                                       key=lambda i: (report["history"][i]["val_macro_f1"], -i)) + 1
    labels = json.loads((head_run / "bundle" / LABELS_FILE).read_text())
    assert labels["classes"] == sorted(TYPES) and labels["threshold"] == 0.5
    assert (head_run / "confusion.png").stat().st_size > 0


def test_full_mode_changes_the_encoder_and_head_mode_does_not(bundle, labelled, head_run, tmp_path):
    from safetensors.torch import load_file

    pretrained = load_file(str(bundle / "model.safetensors"))
    frozen = load_file(str(head_run / "bundle" / "model.safetensors"))
    assert set(frozen) == set(pretrained)
    assert all(torch.equal(frozen[k], pretrained[k]) for k in pretrained)
    report = finetune(bundle, [labelled], tmp_path, config(mode="full", epochs=2, encoder_lr_scale=0.1))
    tuned = load_file(str(tmp_path / "bundle" / "model.safetensors"))
    changed = [k for k in pretrained if not torch.equal(tuned[k], pretrained[k])]
    assert any(k.startswith("encoder.") for k in changed) and "gene_embedding.weight" in changed
    assert report["macro_f1"] > 0.6
    # the fine-tuned bundle loads without DeepSpeed, as a plain bundle and with its head
    assert isinstance(load_pretrained(tmp_path / "bundle"), CellModel)
    model, head, labels = load_finetuned(tmp_path / "bundle")
    assert labels["mode"] == "full" and head.net[-1].out_features == 3


@pytest.mark.parametrize("mode", ["head", "full"])
def test_a_resumed_run_equals_an_uninterrupted_one(bundle, labelled, tmp_path, mode):
    from safetensors.torch import load_file

    settings = config(mode=mode, patience=0, dropout=0.3)
    finetune(bundle, [labelled], tmp_path / "whole", replace(settings, epochs=3))
    finetune(bundle, [labelled], tmp_path / "resumed", replace(settings, epochs=1))  # "killed" after epoch 1
    first = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert first["epochs_run"] == 1
    finetune(bundle, [labelled], tmp_path / "resumed", replace(settings, epochs=3))
    whole, resumed = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("whole", "resumed"))
    assert resumed["epochs_run"] == 3 and resumed["history"][0] == first["history"][0]
    assert resumed == whole
    for name in (HEAD_FILE, "model.safetensors"):
        a, b = (load_file(str(tmp_path / d / "bundle" / name)) for d in ("whole", "resumed"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoints themselves (the state a further epoch would start from) match too
    a, b = (torch.load(tmp_path / d / CHECKPOINT_FILE, weights_only=True) for d in ("whole", "resumed"))
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["shuffle"], b["rng"]["shuffle"])


def test_the_head_scales_the_embedding_by_the_training_cells_mean_and_sd():
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 0.05, size=(40, 6))
    x[:, 2] = 1.5  # constant over the training cells: only shifted
    head = ClassifierHead(6, [8], 3, 0.0, standardize=True)
    head.standardize_by(torch.from_numpy(x).float())
    mean, sd = x.mean(axis=0), x.std(axis=0)
    sd[2] = 1.0
    np.testing.assert_allclose(head.shift.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(head.scale.numpy(), sd, rtol=1e-5)
    fresh = rng.normal(5.0, 0.05, size=(9, 6)).astype(np.float32)
    plain = ClassifierHead(6, [8], 3, 0.0)  # the same layers fed the scaled cells by hand
    plain.net.load_state_dict(head.net.state_dict())
    with torch.no_grad():
        expected = plain(torch.from_numpy(((fresh - mean) / sd).astype(np.float32)))
        np.testing.assert_allclose(head(torch.from_numpy(fresh)).numpy(), expected.numpy(), atol=1e-4)
    head.standardize_by(torch.from_numpy(x[:1]).float())  # one training cell: no spread, only shifted
    np.testing.assert_allclose(head.shift.numpy(), x[0], rtol=1e-6)
    assert torch.equal(head.scale, torch.ones(6))


@pytest.mark.parametrize("mode", ["head", "full"])
def test_a_fine_tuned_head_holds_the_scaling_of_its_training_cells(bundle, labelled, tmp_path, mode):
    from pretrain.embed import embed_counts

    settings = config(mode=mode, epochs=1, patience=0)
    model = load_pretrained(bundle)
    split = labelled_split([labelled], model, settings)
    t = split.train
    # before any step: in full mode, the encoder as loaded
    before = embed_counts(model, t.indptr, t.genes, t.counts, t.totals).astype(np.float64)
    finetune(bundle, [labelled], tmp_path, settings)
    tuned, head, labels = load_finetuned(tmp_path / "bundle")
    assert labels["head"]["standardize"] is True
    np.testing.assert_allclose(head.shift.numpy(), before.mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head.scale.numpy(), before.std(axis=0), rtol=1e-4, atol=1e-6)
    if mode == "full":  # the tuned encoder embeds the cells otherwise: the scaling is the start's
        after = embed_counts(tuned, t.indptr, t.genes, t.counts, t.totals).astype(np.float64)
        assert not np.allclose(after.mean(axis=0), before.mean(axis=0), rtol=1e-4, atol=1e-6)


def test_heads_fine_tuned_before_the_scaling_load_and_resume_unscaled(bundle, labelled, head_run, tmp_path):
    from safetensors.torch import load_file, save_file

    settings = config(epochs=2, patience=0, standardize=False)
    finetune(bundle, [labelled], tmp_path / "old", replace(settings, epochs=1))
    _, head, labels = load_finetuned(tmp_path / "old" / "bundle")
    assert not head.standardize and "shift" not in load_file(str(tmp_path / "old" / "bundle" / HEAD_FILE))
    # a bundle and a checkpoint as written before the setting existed: without the key
    labels["head"].pop("standardize")
    (tmp_path / "old" / "bundle" / LABELS_FILE).write_text(json.dumps(labels))
    _, legacy, _ = load_finetuned(tmp_path / "old" / "bundle")
    x = torch.randn(5, legacy.net[0].in_features)
    assert not legacy.standardize and torch.equal(legacy(x), head(x))
    saved = torch.load(tmp_path / "old" / CHECKPOINT_FILE, weights_only=False)
    saved["config"].pop("standardize")
    torch.save(saved, tmp_path / "old" / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match=r"standardize: False in the checkpoint, True now"):
        finetune(bundle, [labelled], tmp_path / "old", replace(settings, standardize=True))
    assert finetune(bundle, [labelled], tmp_path / "old", settings)["epochs_run"] == 2
    # a scaled head's weights written into an unscaled head are refused, not read half
    scaled = load_file(str(head_run / "bundle" / HEAD_FILE))
    assert {"shift", "scale"} <= set(scaled)
    save_file(scaled, str(tmp_path / "old" / "bundle" / HEAD_FILE))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_finetuned(tmp_path / "old" / "bundle")


def test_early_stopping_keeps_the_best_epoch_and_a_rerun_stays_stopped(bundle, labelled, tmp_path):
    # lr 0: the validation score never improves on epoch 1's, so patience 2 stops after epoch 3
    report = finetune(bundle, [labelled], tmp_path, config(epochs=10, patience=2, lr=0.0))
    assert report["stopped_early"] and report["epochs_run"] == 3 and report["best_epoch"] == 1
    again = finetune(bundle, [labelled], tmp_path, config(epochs=20, patience=2, lr=0.0))
    assert again == {**report, "config": {**report["config"], "epochs": 20}}
    # a larger patience goes on from where it stopped
    longer = finetune(bundle, [labelled], tmp_path, config(epochs=20, patience=4, lr=0.0))
    assert longer["stopped_early"] and longer["epochs_run"] == 5 and longer["best_epoch"] == 1


def test_a_stopped_run_resumed_with_more_patience_equals_an_uninterrupted_one(bundle, labelled, tmp_path):
    """Weights, optimizer and random states carry on: the same history and head as a run that had
    the larger patience from the start."""
    from safetensors.torch import load_file

    first = finetune(bundle, [labelled], tmp_path / "resumed", config(epochs=12, patience=1, lr=0.05, hidden=[8]))
    assert first["stopped_early"] and first["epochs_run"] < 12  # otherwise there is nothing to resume
    resumed = finetune(bundle, [labelled], tmp_path / "resumed", config(epochs=12, patience=4, lr=0.05, hidden=[8]))
    whole = finetune(bundle, [labelled], tmp_path / "whole", config(epochs=12, patience=4, lr=0.05, hidden=[8]))
    assert resumed["epochs_run"] > first["epochs_run"]
    assert resumed["history"] == whole["history"] and resumed["best_epoch"] == whole["best_epoch"]
    heads = [load_file(tmp_path / run / "bundle" / HEAD_FILE) for run in ("resumed", "whole")]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_folds_chosen_by_the_caller_train_as_a_split_read_from_files(bundle, labelled, tmp_path):
    """`finetune_split` on a `make_split` of cells already read (what cross-validation does) gives
    what `finetune` gives on the same cells."""
    settings = config(epochs=2)
    model = load_pretrained(bundle)
    split = labelled_split([labelled], model, settings)
    fold = make_split(split.train, split.val, "fold 1 of 1")
    a = finetune(bundle, [labelled], tmp_path / "files", settings)
    b = finetune_split(bundle, model, fold, tmp_path / "fold", settings)
    assert b["validation"] == "fold 1 of 1" and b["classes"] == a["classes"]
    for key in ("macro_f1", "accuracy", "confusion", "history", "n_train", "n_val"):
        assert b[key] == a[key], key
    # head mode on the caller's embeddings of those cells (computed once for every fold) is the same run
    from pretrain.embed import embed_counts

    given = tuple(embed_counts(model, c.indptr, c.genes, c.counts, c.totals) for c in (fold.train, fold.val))
    c = finetune_split(bundle, model, fold, tmp_path / "given", settings, embeddings=given, plot=False)
    for key in ("macro_f1", "accuracy", "confusion", "history"):
        assert c[key] == a[key], key
    # without the plot (a caller's many folds): the report keeps the matrix, no confusion.png is drawn
    assert (tmp_path / "fold" / "confusion.png").exists() and not (tmp_path / "given" / "confusion.png").exists()
    assert json.loads((tmp_path / "given" / "report.json").read_text())["confusion"] == a["confusion"]


def test_a_rerun_with_other_settings_is_refused(bundle, labelled, head_run):
    with pytest.raises(ValueError, match=r"other settings.*lr: 0.01 in the checkpoint, 0.02 now.*another --out"):
        finetune(bundle, [labelled], head_run, config(epochs=8, lr=2e-2))


def test_predictions_come_back_in_input_order(bundle, head_run, tmp_path):
    fresh = cells(90, seed=7)
    order = np.random.default_rng(0).permutation(len(fresh))
    fresh.write_h5ad(tmp_path / "a.h5ad")
    fresh[order].copy().write_h5ad(tmp_path / "b.h5ad")
    lengths = np.diff(fresh.X.indptr)
    assert len(set(lengths.tolist())) > 20  # batches by length reorder these cells
    summary = predict_h5ad(head_run / "bundle", tmp_path / "a.h5ad", tmp_path / "a_out.h5ad", threshold=0.0,
                           label_column="cell_type")
    assert summary["n_cells"] == 90 and summary["unassigned"] == 0
    predict_h5ad(head_run / "bundle", tmp_path / "b.h5ad", tmp_path / "b_out.h5ad", threshold=0.0)
    a, b = ad.read_h5ad(tmp_path / "a_out.h5ad"), ad.read_h5ad(tmp_path / "b_out.h5ad")
    assert list(a.obs_names) == list(fresh.obs_names) and list(b.obs_names) == list(fresh.obs_names[order])
    # each row's prediction is its own cell's: right nearly everywhere (a scrambled order would be right ~1/3)
    right = (a.obs["cell_type_prediction"].astype(str) == a.obs["cell_type"].astype(str)).mean()
    assert right > 0.9 and summary["scores"]["accuracy"] == pytest.approx(right)
    assert summary["scores"]["not_scored"] == 0 and np.sum(summary["scores"]["confusion"]) == 90
    np.testing.assert_allclose(b.obsm["cell_type_probabilities"], a.obsm["cell_type_probabilities"][order], atol=1e-5)
    assert list(b.obs["cell_type_prediction"]) == list(a.obs["cell_type_prediction"].iloc[order])
    assert list(a.uns["cell_type_classes"]) == sorted(TYPES)
    np.testing.assert_allclose(a.obs["cell_type_confidence"], a.obsm["cell_type_probabilities"].max(axis=1))
    model, head, _ = load_finetuned(head_run / "bundle")
    embeddings = np.random.default_rng(0).normal(size=(50, model.config.cell_dim)).astype(np.float32)
    np.testing.assert_allclose(class_probabilities(head, embeddings, "cpu", chunk=7), class_probabilities(head, embeddings, "cpu"),
                               rtol=0, atol=1e-6)  # chunks of cells change nothing but float rounding
    # and against the model run on each cell alone (no batching at all)
    from pretrain.embed import embed_counts, token_csr

    for row in (0, int(np.argmax(lengths)), int(np.argmin(lengths))):
        indptr, genes, counts, totals = token_csr(fresh.X[row], model.vocab.lookup(GENES), model.config.vocab_size)
        with torch.no_grad():
            p = torch.softmax(head(torch.from_numpy(embed_counts(model, indptr, genes, counts, totals))), -1)
        np.testing.assert_allclose(a.obsm["cell_type_probabilities"][row], p[0].numpy(), atol=1e-5)


def test_threshold_marks_low_confidence_cells_unassigned(head_run, tmp_path):
    fresh = cells(60, seed=8)
    fresh.write_h5ad(tmp_path / "in.h5ad")
    every = predict_h5ad(head_run / "bundle", tmp_path / "in.h5ad", tmp_path / "all.h5ad", threshold=1.0)
    assert every["unassigned"] == 60 and every["predicted"][UNASSIGNED] == 60  # no probability reaches 1 exactly
    default = predict_h5ad(head_run / "bundle", tmp_path / "in.h5ad", tmp_path / "out.h5ad")
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    low = out.obs["cell_type_confidence"].to_numpy() < 0.5
    assert default["threshold"] == 0.5 and default["unassigned"] == int(low.sum())
    assert (out.obs["cell_type_prediction"].astype(str).to_numpy()[low] == UNASSIGNED).all()
    assert (out.obs["cell_type_prediction"].astype(str).to_numpy()[~low] != UNASSIGNED).all()
    # a cell type the model never saw: cells with no marker genes at all are mostly unassigned
    novel = cells(40, seed=9)
    novel.X = novel.X.multiply(np.arange(N_GENES) >= 24).tocsr()
    novel.write_h5ad(tmp_path / "novel.h5ad")
    mid = predict_h5ad(head_run / "bundle", tmp_path / "novel.h5ad", tmp_path / "novel_out.h5ad", threshold=0.9)
    known = predict_h5ad(head_run / "bundle", tmp_path / "in.h5ad", tmp_path / "known_out.h5ad", threshold=0.9)
    assert mid["unassigned"] / 40 > known["unassigned"] / 60


def test_scores_of_the_written_labels_count_unassigned_cells_wrong():
    """The argmax scores, and those of the column predict writes, where a cell under the threshold
    is `unassigned`: no class's true positive, a miss of its own class."""
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.55, 0.45], [0.2, 0.8]])
    y = np.array([0, 1, 0, 1])
    got = scores(y, probs, ["a", "b"], threshold=0.7)
    assert got["accuracy"] == 1.0 and got["macro_f1"] == 1.0 and got["unassigned"] == 2
    assert got["thresholded"]["accuracy"] == 0.5
    assert got["thresholded"]["macro_f1"] == pytest.approx(2 / 3)  # each class: 1 hit, 1 miss, no false alarm
    assert scores(y, probs, ["a", "b"], threshold=0.0)["thresholded"] == {"macro_f1": 1.0, "accuracy": 1.0}


def test_a_small_label_gets_validation_cells(caplog):
    """sklearn's stratified split can give all of a small label's cells to training: one moves to
    validation, with a warning, so that early stopping and the report see the label."""
    labels = np.array(["a"] * 997 + ["b"] * 3)
    for fraction, side in ((0.1, "validation"), (0.9, "training")):  # the mirror: a label with no training cell
        caplog.clear()
        with caplog.at_level("WARNING"):
            train, val = stratified_split(labels, fraction, seed=0)
        assert set(labels[val]) == set(labels[train]) == {"a", "b"}
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(1000))
        assert f"1 label(s) without {side} cells; one cell of each moved there: b" in caplog.text


def test_an_output_folder_that_does_not_exist_is_refused_before_any_cell_is_read(head_run, tmp_path):
    with pytest.raises(ValueError, match="does not exist; create it first"):
        predict_h5ad(head_run / "bundle", tmp_path / "in_missing.h5ad", tmp_path / "no" / "out.h5ad")


def test_report_counts_unassigned_validation_cells(bundle, labelled, tmp_path):
    report = finetune(bundle, [labelled], tmp_path, config(epochs=1, threshold=1.0))
    assert report["unassigned"] == report["n_val"] and report["threshold"] == 1.0


def test_a_validation_file_and_several_inputs(bundle, labelled, tmp_path):
    cells(60, seed=2).write_h5ad(tmp_path / "second.h5ad")
    extra = cells(50, seed=3, types=[*TYPES, "platelet"], proportions=[0.3, 0.3, 0.2, 0.2])
    extra.write_h5ad(tmp_path / "val.h5ad")
    report = finetune(bundle, [labelled, tmp_path / "second.h5ad"], tmp_path / "run", config(epochs=1),
                      validation=tmp_path / "val.h5ad")
    n_platelet = int((extra.obs["cell_type"] == "platelet").sum())
    assert report["n_train"] == 300 and report["n_val"] == 50 - n_platelet
    assert report["left_out"] == {"validation label not in training": n_platelet}
    assert report["validation"] == f"file {tmp_path / 'val.h5ad'}"


# --- errors that name the fix ---------------------------------------------------------------------------


def test_missing_label_column_lists_the_obs_columns(bundle, labelled, tmp_path):
    with pytest.raises(ValueError, match=r"no obs column 'celltype'.*obs columns: cell_type, batch.*--label-column"):
        finetune(bundle, [labelled], tmp_path, config(label_column="celltype"))


def test_a_label_with_one_cell_names_the_fix(bundle, tmp_path):
    data = cells(60, seed=4)
    data.obs["cell_type"] = data.obs["cell_type"].cat.add_categories(["rare"])
    data.obs.iloc[0, 0] = "rare"
    data.write_h5ad(tmp_path / "rare.h5ad")
    with pytest.raises(ValueError, match=r"at least 2 cells of every label.*'rare': 1.*--min-class-cells 2"):
        finetune(bundle, [tmp_path / "rare.h5ad"], tmp_path / "run", config())
    report = finetune(bundle, [tmp_path / "rare.h5ad"], tmp_path / "run", config(epochs=1, min_class_cells=2))
    assert "rare" not in report["classes"] and report["left_out"] == {"rare label": 1}


def test_predict_with_a_pretrained_bundle_says_to_fine_tune_first(bundle, labelled, tmp_path):
    with pytest.raises(ValueError, match=r"not a fine-tuned bundle.*scfm finetune"):
        predict_h5ad(bundle, labelled, tmp_path / "out.h5ad")


def test_genes_outside_the_vocabulary_are_refused(bundle, tmp_path):
    data = cells(40, seed=5)
    data.var_names = [f"ENSG{900000000 + i:011d}" for i in range(N_GENES)]
    data.var["gene_symbol"] = [f"OTHER{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(N_GENES)]
    data.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(ValueError, match=r"0% of the counts fall on genes of the model's vocabulary.*--gene-column"):
        finetune(bundle, [tmp_path / "other.h5ad"], tmp_path / "run", config())


def _run_cli(script: str, argv: list[str], monkeypatch) -> None:
    """``launch/<script>`` in this process (the imports are paid once), as `python launch/<script> argv`."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(ROOT / "launch" / script), run_name="__main__")


def test_cli_finetune_then_predict(bundle, labelled, tmp_path, monkeypatch, capsys, caplog):
    argv = [str(bundle), str(labelled), "--label-column", "cell_type", "--out", str(tmp_path / "run"), "--epochs", "2",
            "--hidden", "16", "--val-fraction", "0.25", "--no-class-weights", "--threads", "1"]
    # once as users run it (a fresh interpreter: the script finds the repository's packages itself)
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), *argv], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs_run"] == 2
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["class_weights"] is False and report["config"]["hidden"] == [16]
    with caplog.at_level("INFO"):
        _run_cli("predict.py", [str(tmp_path / "run" / "bundle"), str(labelled), "--out", str(tmp_path / "pred.h5ad"),
                                "--name", "ct", "--threads", "1"], monkeypatch)
    assert json.loads(capsys.readouterr().out)["columns"] == ["ct_prediction", "ct_confidence"]
    assert "unassigned" in caplog.text
    predicted, given = ad.read_h5ad(tmp_path / "pred.h5ad"), ad.read_h5ad(labelled)
    assert "ct_prediction" in predicted.obs and set(given.obs) < set(predicted.obs)  # the input, plus the columns
    assert (predicted.X != given.X).nnz == 0 if hasattr(given.X, "nnz") else np.array_equal(predicted.X, given.X)
    assert predicted.obs_names.equals(given.obs_names) and list(predicted.obs["cell_type"]) == list(given.obs["cell_type"])
    classes = list(predicted.uns["ct_classes"])
    assert predicted.obsm["ct_probabilities"].shape == (given.n_obs, len(classes))
    assert set(predicted.obs["ct_prediction"].cat.categories) == {*classes, "unassigned"}
    # a CLI error is one line naming the fix, exit status 2
    with pytest.raises(SystemExit) as stop:
        _run_cli("finetune.py", [*argv[:2], "--label-column", "nope", "--out", str(tmp_path / "run2")], monkeypatch)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "obs columns: cell_type, batch" in err and "Traceback" not in err


def test_real_pbmc_subset_fine_tunes(shared_data, tmp_path):
    """A few hundred labelled PBMC cells (mudan_zheng_sorted_ref), a tiny random bundle over their
    genes: the pipeline runs on real files (gene ids, labels, lengths) and predicts every cell."""
    full = ad.read_h5ad(shared_data / "h5ad" / "mudan_zheng_sorted_ref.h5ad")
    ids = full.var["ensembl_id"].astype(str)
    keep = ((ids != "") & ~ids.duplicated()).to_numpy()
    pick = np.random.default_rng(0).choice(full.n_obs, size=300, replace=False)
    subset = full[np.sort(pick)][:, keep].copy()
    subset.write_h5ad(tmp_path / "pbmc.h5ad")
    vocab = Vocabulary.from_genes(list(ids[keep]), list(subset.var["gene_symbol"].astype(str)))
    model_config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention="sdpa", n_bins=7,
                               pooling="mean")
    bundle = write_bundle(tmp_path / "bundle", CellModel.initial(model_config, seed=0).state_dict(), model_config,
                          vocab.to_tsv(), Normalization(mode="log1p_bins", n_bins=7, max_genes=256), "# test\n")
    report = finetune(bundle, [tmp_path / "pbmc.h5ad"], tmp_path / "run",
                      config(epochs=2, min_class_cells=4, val_fraction=0.3))
    assert report["n_train"] + report["n_val"] + sum(report["left_out"].values()) == 300
    assert 0 <= report["macro_f1"] <= 1 and len(report["classes"]) >= 3
    summary = predict_h5ad(tmp_path / "run" / "bundle", tmp_path / "pbmc.h5ad", tmp_path / "pred.h5ad")
    assert summary["n_cells"] == 300


def test_a_file_holding_some_of_the_classes_is_scored_on_those(head_run, tmp_path):
    """A held-out file with two of the bundle's three types: macro-F1 averages over the types it holds
    (or that are predicted), not counting the absent type as an F1 of 0; a file with none of the
    bundle's labels is written and left unscored instead of failing in sklearn."""
    from pretrain.downstream.finetune import scores

    two = cells(90, seed=8, types=TYPES[:2])
    two.write_h5ad(tmp_path / "two.h5ad")
    summary = predict_h5ad(head_run / "bundle", tmp_path / "two.h5ad", tmp_path / "two_out.h5ad", threshold=0.0,
                           label_column="cell_type")
    s = summary["scores"]
    held = s["scored"]
    assert set(TYPES[:2]) <= set(held)
    assert s["macro_f1"] == pytest.approx(np.mean([s["per_class_f1"][c] for c in held]))
    assert all(s["per_class_f1"][c] is None for c in TYPES if c not in held)
    perfect = scores(np.array([0, 0, 1]), np.eye(3)[[0, 0, 1]], ["a", "b", "c"], 0.5)
    assert perfect["macro_f1"] == 1.0 and perfect["accuracy"] == 1.0 and perfect["per_class_f1"]["c"] is None
    other = two.copy()
    other.obs["cell_type"] = pd.Categorical(["neuron"] * len(other))
    other.write_h5ad(tmp_path / "other.h5ad")
    summary = predict_h5ad(head_run / "bundle", tmp_path / "other.h5ad", tmp_path / "other_out.h5ad",
                           label_column="cell_type")
    assert summary["scores"] is None and (tmp_path / "other_out.h5ad").exists()


def test_a_label_named_unassigned_is_refused_for_cells_the_caller_chose(bundle, labelled):
    from pretrain.downstream.token_cells import read_token_cells

    model = load_pretrained(bundle)
    chosen = read_token_cells(labelled, model, label_column="cell_type")
    chosen = replace(chosen, labels=np.where(chosen.labels == TYPES[0], UNASSIGNED, chosen.labels))
    with pytest.raises(ValueError, match="rename it"):
        make_split(chosen, chosen, "the caller's cells")


def test_predict_refuses_to_write_over_its_input_and_leaves_no_temporary_file(head_run, tmp_path):
    source = tmp_path / "cells.h5ad"
    cells(30, seed=9).write_h5ad(source)
    before = source.read_bytes()
    with pytest.raises(ValueError, match="is the input"):
        predict_h5ad(head_run / "bundle", source, source)
    assert source.read_bytes() == before
    predict_h5ad(head_run / "bundle", source, tmp_path / "out.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "out.h5ad"]


def test_fine_tuning_on_a_cpu_keeps_a_gpu_bundles_backend_and_preset(labelled, tmp_path):
    """A bundle trained with varlen (CUDA only) runs as sdpa on a CPU; the fine-tuned bundle keeps
    varlen and the preset, so that on a GPU it runs what its source ran."""
    vocab = Vocabulary.from_genes(GENES, SYMBOLS)
    gpu_config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention="varlen", n_bins=7,
                             dropout=0.1, pooling="mean")
    source = write_bundle(tmp_path / "gpu_bundle", CellModel.initial(gpu_config, seed=0).state_dict(), gpu_config,
                          vocab.to_tsv(), Normalization(mode="log1p_bins", n_bins=7), "# test bundle\n",
                          preset="geneformer-10m")
    finetune(source, [labelled], tmp_path / "run", config(epochs=1))
    written = json.loads((tmp_path / "run" / "bundle" / "config.json").read_text())
    assert written["model"]["attention"] == "varlen" and written["preset"] == "geneformer-10m"
    model, _, _ = load_finetuned(tmp_path / "run" / "bundle", "cpu")  # and it still loads here, as sdpa
    assert model.config.attention == "sdpa"

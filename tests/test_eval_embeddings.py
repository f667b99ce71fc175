"""The evaluation benchmark's parts (probes, masked modelling, batching, verdicts, the validation
split) and one short end-to-end run on the real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import eval_embeddings as ev  # noqa: E402

from data_pipeline.loading.batching import TokenCost  # noqa: E402
from data_pipeline.loading.normalize import Normalization  # noqa: E402
from pretrain.config import FinetuneConfig, ModelConfig  # noqa: E402
from pretrain.embed import length_batches  # noqa: E402
from pretrain.model import CellModel  # noqa: E402


@pytest.mark.parametrize("mix", list(ev.MIXES))
def test_every_mix_is_a_valid_training_config(mix):
    """A mix's overrides load over eval.yaml into a config the trainer accepts (a typo in a key, or a value
    out of range, is caught here, not an hour into a phase)."""
    from pretrain.config import load_config

    config = load_config(str(ev.CONFIG), ev.MIXES[mix])
    config.validate()
    assert (config.objectives.contrastive_weight > 0) == config.data.views == ("contrastive" in mix)


def test_probe_separates_clusters_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(["a", "b", "c", "d"]), 60)
    centers = rng.normal(size=(4, 16)) * 4
    x = centers[np.searchsorted(["a", "b", "c", "d"], labels)] + rng.normal(size=(240, 16))
    folds = list(ev.fold_split(labels))
    assert len(folds) == ev.FOLDS and all(set(labels[test]) == set(labels) for _, test in folds)
    clear = ev.probe(x, labels, folds)
    noise = ev.probe(rng.normal(size=(240, 16)), labels, folds)
    for key in ("knn_macro_f1", "logreg_macro_f1"):
        assert clear[key] > 0.95
        assert noise[key] < 0.45  # chance is 0.25


def test_length_batches_cover_every_cell_once_within_budget():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 90, 200)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    genes = rng.integers(3, 50, indptr[-1])
    values = rng.integers(1, 7, indptr[-1])
    mask = rng.random(indptr[-1]) < 0.2
    seen = []
    for cells, batch in length_batches(indptr, genes, values, 256, TokenCost(extra_tokens=1, padded=True),
                                       mlm_mask=mask, targets=values):
        seen += cells.tolist()
        assert len(cells) == 1 or (batch.max_seqlen + 1) * len(cells) <= 256
        for i, c in enumerate(cells):  # each sequence holds its own cell's tokens, in order
            a, b = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
            assert batch.gene_ids[a:b].tolist() == genes[indptr[c]:indptr[c + 1]].tolist()
            assert batch.mlm_mask[a:b].tolist() == mask[indptr[c]:indptr[c + 1]].tolist()
    assert sorted(seen) == list(range(200))


def _model(n_bins=7, **overrides):
    config = ModelConfig(vocab_size=60, d_model=32, n_layers=1, n_heads=2, favor_features=16, n_bins=n_bins,
                         use_cls=False, pooling="mean", dropout=0.0, **overrides)
    torch.manual_seed(0)
    model = CellModel(config).eval()
    model.normalization = Normalization(mode="log1p_bins", n_bins=n_bins)
    return model


def _cells(rng, n=40):
    lengths = rng.integers(5, 30, n)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    genes = np.concatenate([np.sort(rng.choice(np.arange(3, 60), k, replace=False)) for k in lengths])
    counts = rng.integers(1, 20, indptr[-1]).astype(np.float64)
    totals = np.array([counts[a:b].sum() for a, b in zip(indptr[:-1], indptr[1:])]) * 3
    return indptr, genes, counts, totals


@pytest.mark.parametrize("bin_loss", ["cross_entropy", "mse"])
def test_masked_modelling_counts_the_heads_argmax_and_its_loss(bin_loss):
    """Logits: the argmax bin; a regressing head (scGPT's squared error on bins): the nearest bin.
    The loss: the mean cross-entropy (or squared error) over masked positions."""
    rng = np.random.default_rng(2)
    model = _model(bin_loss=bin_loss)
    csr = _cells(rng)
    with torch.no_grad():  # a head that always says bin 3: accuracy = the share of masked targets in bin 3
        last = model.mlm_head[-1]
        last.weight.zero_()
        if bin_loss == "mse":
            last.bias.fill_(3.3)
        else:
            last.bias.fill_(-10.0)
            last.bias[3] = 10.0
        bias = last.bias.clone()
    out = ev.masked_modelling(model, csr, cap="none", seed=5)
    from data_pipeline.loading.masking import Masking, apply_masking
    from data_pipeline.loading.normalize import normalize

    rng = np.random.default_rng(5)
    norm = normalize(model.normalization, *csr, rng)
    _, mlm, targets = apply_masking(Masking(ratio=0.15), norm.indptr, norm.values, 7, (1, 7), rng)
    assert out["masked_positions"] == int(mlm.sum())
    assert out["masked_bin_accuracy"] == pytest.approx(float(np.mean(targets[mlm] == 3)))
    assert out["majority_bin_accuracy"] == pytest.approx(float(np.max(np.bincount(targets[mlm])) / mlm.sum()))
    t = torch.as_tensor(targets[mlm])
    expected = (((3.3 - t) ** 2).mean() if bin_loss == "mse"
                else (torch.logsumexp(bias, 0) - bias[t]).mean())
    assert out["masked_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert "accuracy_ceiling" not in out  # fixed bins: no random ties


def test_masked_modelling_ceiling_under_random_quantile_ties():
    """With scGPT's random ties a tied gene's bin is a coin no head can call: the ceiling is the
    mean of 1/span over the masked genes, below 1 on cells with repeated counts."""
    from data_pipeline.loading.normalize import Normalization as Norm

    rng = np.random.default_rng(3)
    model = _model()
    model.normalization = Norm(mode="quantile_bins", n_bins=7, quantile_ties="random")
    indptr, genes, counts, totals = _cells(rng)
    out = ev.masked_modelling(model, (indptr, genes, np.minimum(counts, 3), totals), cap="none")
    assert 0 < out["accuracy_ceiling"] < 0.9


def test_verdicts_against_the_twin_pca_and_the_previous_gap():
    def row(knn, logreg, loss):
        return {"knn_macro_f1": {"mean": knn}, "logreg_macro_f1": {"mean": logreg}, "masked_loss": {"mean": loss}}

    summary = {"good": {"0": {"f": row(0.4, 0.5, 2.0)}, "100": {"f": row(0.6, 0.7, 1.5)}},
               "bad": {"0": {"f": row(0.4, 0.5, 2.0)}, "100": {"f": row(0.3, 0.7, 2.5)}}}
    v = ev.verdicts(summary, {"f": {"PCA-50": {"knn_macro_f1": 0.8}}}, 100, {"f": 0.4})
    assert v["good"]["f"]["knn_macro_f1_beats_random_init"] and v["good"]["f"]["knn_minus_pca50"] == -0.2
    assert v["good"]["f"]["share_of_previous_gap_closed"] == 0.5
    assert not v["bad"]["f"]["knn_macro_f1_beats_random_init"] and not v["bad"]["f"]["masked_loss_below_random_init"]
    assert v["all_beat_random_init"] is False


def test_summary_is_mean_and_range_over_seeds():
    runs = {"mlm": {"0": {"steps": {"0": {"f": {"knn_macro_f1": 0.2}}, "5": {"f": {"knn_macro_f1": 0.5}}}},
                    "1": {"steps": {"0": {"f": {"knn_macro_f1": 0.4}}, "5": {"f": {"knn_macro_f1": 0.7}}}}}}
    out = ev.summarize(runs)
    assert out["mlm"]["5"]["f"]["knn_macro_f1"] == {"mean": 0.6, "min": 0.5, "max": 0.7, "n": 2}
    assert out["mlm"]["0"]["f"]["knn_macro_f1"]["mean"] == pytest.approx(0.3)


def test_validation_split_is_stratified_and_disjoint(shared_data, tmp_path):
    import anndata

    pre, val = ev.split_validation(tmp_path)
    a, b = anndata.read_h5ad(pre), anndata.read_h5ad(val)
    assert not set(a.obs_names) & set(b.obs_names) and a.n_obs + b.n_obs == 350
    for part in (a, b):
        sizes = part.obs.groupby(["species", "cell_type"], observed=True).size()
        assert len(sizes) == 10 and sizes.min() >= 17 and sizes.max() <= 18
    assert ev.split_validation(tmp_path) == (pre, val)  # written once, reused


def test_run_folder_changes_with_the_config_and_overrides(tmp_path, monkeypatch):
    """A rerun reuses a finished mix only when it was trained from the same config and overrides:
    editing a setting, an override, the steps or the mix gives a new folder; a comment does not."""
    config = tmp_path / "eval.yaml"
    config.write_text("data:\n  normalization: quantile_bins\n")
    monkeypatch.setattr(ev, "CONFIG", config)
    base = ev.run_name("mlm", 250, 0, ["run.seed=0"])
    assert base.startswith("mlm-250-seed0-") and base == ev.run_name("mlm", 250, 0, ["run.seed=0"])
    others = {ev.run_name("mlm", 250, 0, ["run.seed=0", "optimizer.lr=3e-3"]), ev.run_name("mlm", 251, 0, ["run.seed=0"]),
              ev.run_name("mlm+contrastive", 250, 0, ["run.seed=0"])}
    config.write_text("# a comment changes no setting\ndata:\n  normalization: quantile_bins\n")
    assert ev.run_name("mlm", 250, 0, ["run.seed=0"]) == base
    config.write_text("data:\n  normalization: log1p_bins\n")
    others.add(ev.run_name("mlm", 250, 0, ["run.seed=0"]))
    assert base not in others and len(others) == 4


def test_random_init_twin_is_the_trainers_initial_model(tmp_path):
    """The twin has the weights `pretrain.train` starts from (`CellModel.initial`), whatever the
    global RNG held before."""
    model = _model()
    seed = 3
    start = CellModel.initial(model.config, seed)
    torch.manual_seed(99)  # whatever the global RNG holds before, the twin is the same
    from safetensors.torch import save_file

    from pretrain.export import load_pretrained

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    trained = _model()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(bundle / "model.safetensors"))
    _write_bundle_meta(bundle, trained)
    twin = ev.random_init_twin(bundle, seed)
    assert torch.equal(twin.gene_embedding.weight, start.gene_embedding.weight)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), start.state_dict().values()))
    assert not torch.equal(load_pretrained(bundle).gene_embedding.weight, start.gene_embedding.weight)


def test_label_subset_is_a_stratified_share_with_every_class():
    labels = np.repeat(np.array(["a", "b", "c"]), [500, 90, 10])
    rows = np.arange(0, 600, 2)  # a fold's training rows: 250 a, 45 b, 5 c
    sub = ev.label_subset(rows, labels, 0.1, seed=0)
    assert set(sub) <= set(rows) and np.all(np.diff(sub) > 0)
    assert [int((labels[sub] == c).sum()) for c in "abc"] == [25, 4, 1]  # round(4.5) = 4; c: at least one
    assert not np.array_equal(sub, ev.label_subset(rows, labels, 0.1, seed=1))
    assert np.array_equal(ev.label_subset(rows, labels, 1.0, seed=0), rows)


def test_twin_bundle_holds_the_initial_weights(tmp_path):
    from safetensors.torch import save_file

    from pretrain.export import load_pretrained

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    trained = _model()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(bundle / "model.safetensors"))
    _write_bundle_meta(bundle, trained)
    twin = load_pretrained(ev.twin_bundle(bundle, seed=4))
    start = CellModel.initial(trained.config, 4)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), start.state_dict().values()))
    assert twin.normalization.mode == trained.normalization.mode
    assert np.array_equal(twin.normalization.edges, trained.normalization.edges)


def _write_bundle_meta(bundle: Path, model: CellModel) -> None:
    from dataclasses import asdict

    from pretrain.export import BUNDLE_FORMAT, normalization_record

    (bundle / "config.json").write_text(json.dumps({"bundle_format": BUNDLE_FORMAT, "model": asdict(model.config)}))
    (bundle / "normalization.json").write_text(json.dumps(normalization_record(model.normalization)))
    special = ["<pad>", "<cls>", "<mask>"]
    rows = ["token_id\tensembl_id\tsymbol"] + [f"{i}\t{t}\t{t}" for i, t in enumerate(special)]
    rows += [f"{i}\tENSG{i:011d}\tG{i}" for i in range(3, model.config.vocab_size)]
    (bundle / "vocab.tsv").write_text("\n".join(rows) + "\n")


# the pipeline, not the model, is under test: eval.yaml's model at a quarter of the width and one layer
SMALL_MODEL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.favor_features=32"]


def test_eval_embeddings_end_to_end(shared_data, tmp_path):
    """A few steps of one mix on the real files: the JSON has every file, the baselines, each curve
    step's probes and masked modelling, and the figure; the verdicts are whatever they are after 3
    steps."""
    out = tmp_path / "eval.json"

    def run(result: Path, plot: Path, modes="head", *more):
        return subprocess.run([sys.executable, "benchmarks/eval_embeddings.py", "--phase", "final", "--steps", "3",
                               "--curve", "3", "--seeds", "0", "--mixes", "mlm", "--max-cells", "150",
                               "--finetune", modes, *more, "--fractions", "0.1,1", "--finetune-epochs", "1",
                               "--cluster-vae-steps", "30", "--cluster-epochs", "10",
                               "--work", str(tmp_path / "work"), "--result", str(result), "--plot", str(plot),
                               *SMALL_MODEL], cwd=REPO, capture_output=True, text=True, timeout=900)

    r = run(out, tmp_path / "eval.png")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["files"]) == set(ev.EVAL_FILES) and result["phase"] == "final"
    assert result["corpus"]["cells"] > 5000 and result["runs"]["mlm"]["0"]["train"]["steps"] == 3
    spent = result["runs"]["mlm"]["0"]["evaluation_seconds"]  # what sizes a longer run
    assert set(spent) == {"embed_probe_masked", "cluster", "finetune"} and all(v > 0 for v in spent.values())
    for name in ev.EVAL_FILES:
        assert result["files"][name]["gene_coverage"]["count_fraction"] > 0.5
        assert set(result["baselines"][name]) == {"PCA-50", "HVG-2000", "PCA-50 (model input)", "label fractions",
                                                  "clustering"}
        scanpy = result["baselines"][name]["clustering"]["PCA-50 communities"]  # its own number of clusters
        assert scanpy["clustering"].endswith("resolution 1.0, 15 neighbours") and scanpy["n_clusters"] >= 2
        assert -1 <= scanpy["ari"] <= 1 and 0 <= scanpy["nmi"] <= 1
        for step in ("0", "3"):
            row = result["summary"]["mlm"][step][name]
            assert 0 <= row["knn_macro_f1"]["mean"] <= 1 and row["masked_loss"]["n"] == 1
            assert row["masked_bin_accuracy"]["mean"] <= row["accuracy_ceiling"]["mean"] + 0.05
            assert 0 <= row["finetuned head 0.1"]["mean"] <= 1 and 0 <= row["finetuned head 1"]["mean"] <= 1
            assert all(-1 <= row[f"cluster {m} ari"]["mean"] <= 1 for m in ("schybridbert", "pca50", "embedding_kmeans"))
        assert set(result["baselines"][name]["label fractions"]) == {
            f"{rep} LR {x}" for rep in ("PCA-50", "HVG-2000") for x in ("0.1", "1")}
        chance = 1 / result["files"][name]["classes"]  # real cell types are findable in 150 cells
        assert result["baselines"][name]["PCA-50"]["knn_macro_f1"] > 2 * chance
    v = result["verdicts"]
    every = [ok for row in v["mlm"].values() for k, ok in row.items() if k.endswith("random_init")]
    # kNN, LR, loss, 2 fine-tuned rows, scHybridBERT and embedding-alone ARI
    assert len(every) == 3 * 7 and v["all_beat_random_init"] == all(every)
    assert all("cluster_schybridbert_minus_pca50_ari" in row for row in v["mlm"].values())
    assert all("finetuned_0.1_minus_hvg2000_lr" in row for row in v["mlm"].values())
    assert (tmp_path / "eval.png").stat().st_size > 10_000
    # a rerun of the same settings and one more fine-tuned row takes the run's saved evaluation (a killed
    # phase resumes at its seed) and computes that row only: full fine-tuning at 10 % of the labels
    again = run(tmp_path / "again.json", tmp_path / "again.png", "head,full", "--full-fractions", "0.1")
    assert again.returncode == 0 and "mlm seed 0: fine-tuned rows added" in again.stderr, again.stderr[-3000:]
    assert "mlm seed 0: evaluated before" in again.stderr
    second = json.loads((tmp_path / "again.json").read_text())
    assert second["settings"]["finetune"]["modes"] == ["head", "full"] and second["files"] == result["files"]
    assert second["settings"]["finetune"]["full_fractions"] == [0.1]
    for step in ("0", "3"):
        for name in ev.EVAL_FILES:
            before, after = result["runs"]["mlm"]["0"]["steps"][step][name], second["runs"]["mlm"]["0"]["steps"][step][name]
            assert {k: v for k, v in after.items() if k != "finetuned full 0.1"} == before
            assert 0 <= after["finetuned full 0.1"] <= 1
    taken = second["runs"]["mlm"]["0"]["evaluation_seconds"]
    assert taken["finetune"] > spent["finetune"] and taken["cluster"] == spent["cluster"]
    assert all(second["baselines"][n]["PCA-50 (model input)"] == result["baselines"][n]["PCA-50 (model input)"]
               for n in ev.EVAL_FILES)
    assert (tmp_path / "again.png").stat().st_size > 10_000  # every panel, from the saved embeddings
    assert result["figure_seeds"] == second["figure_seeds"] == {"random init": 0, "mlm": 0}
    # seed 0 taken from that result, seed 1 computed: the figure shows seed 1's panels, not none
    third = run(tmp_path / "third.json", tmp_path / "third.png", "head,full", "--full-fractions", "0.1",
                "--seeds", "0,1", "--reuse", str(tmp_path / "again.json"))
    assert third.returncode == 0 and "mlm seed 0: taken from again.json" in third.stderr, third.stderr[-3000:]
    combined = json.loads((tmp_path / "third.json").read_text())
    assert set(combined["runs"]["mlm"]) == {"0", "1"} and "reused" in combined["runs"]["mlm"]["0"]
    assert combined["figure_seeds"] == {"random init": 1, "mlm": 1}
    assert (tmp_path / "third.png").stat().st_size > 10_000


def test_saved_evaluation_is_taken_only_for_its_settings(tmp_path):
    settings = _settings()
    key = ev.evaluation_key(settings, ["f"])
    path = tmp_path / "run" / "evaluation-final.json"
    path.parent.mkdir()
    record, arrays = {"entry": {"steps": {"0": {"f": {"knn_macro_f1": 0.5}}}}}, {"random init/f": np.eye(3)}
    ev.save_evaluation(path, settings, ["f"], record, arrays)
    saved, loaded = ev.saved_evaluation(path, key)
    assert saved["entry"] == record["entry"] and np.array_equal(loaded["random init/f"], np.eye(3))
    assert saved["files"] == ["f"] and saved["settings"] == {k: v for k, v in settings.items() if k != "seeds"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["evaluation-final.json", "evaluation-final.npz"]
    for other in (ev.evaluation_key(_settings(steps=3000), ["f"]), ev.evaluation_key(settings, ["f", "g"])):
        assert other != key and ev.saved_evaluation(path, other) is None
    assert ev.evaluation_key(_settings(seeds=[0, 1, 2]), ["f"]) == key  # one run's evaluation holds for any seed list
    path.with_suffix(".npz").unlink()
    assert ev.saved_evaluation(path, key) is None


def _save_keyed_only(path: Path, settings: dict, record: dict, arrays: dict) -> None:
    """A run's evaluation as saved before evaluations kept their settings: under their key only."""
    np.savez(path.with_suffix(".npz"), **arrays)
    path.write_text(json.dumps({**record, "key": ev.evaluation_key(settings, ["f"])}))


def test_an_evaluation_saved_with_a_key_only_is_taken_for_fewer_finetuned_rows(tmp_path):
    """A call adding full fine-tuning (at some label shares) to a saved head-only evaluation extends it;
    one that changes anything else, or asks for fewer rows than were saved, does not."""
    path = tmp_path / "evaluation-final.json"
    record = {"entry": {"steps": {}}}
    _save_keyed_only(path, _settings(), record, {"random init/f": np.eye(2)})
    more = _settings(finetune={**_settings()["finetune"], "modes": ["head", "full"], "full_fractions": [0.1]})
    saved, arrays = ev.narrower_evaluation(path, more, ["f"])
    assert saved["entry"] == record["entry"] and np.array_equal(arrays["random init/f"], np.eye(2))
    assert saved["finetuned_with"] == {"head": {"recipe": ev.finetune_recipe([]), "epochs": 10}}
    assert ev.narrower_evaluation(path, {**more, "steps": 3000}, ["f"]) is None
    assert ev.narrower_evaluation(path, more, ["f", "g"]) is None
    assert ev.narrower_evaluation(path, _settings(), ["f"]) is None  # the same rows: the saved one, taken as it is
    assert ev.reusable_evaluation(path, _settings(), ["f"]) is not None
    fewer = _settings(finetune={**_settings()["finetune"], "modes": []})
    assert ev.narrower_evaluation(path, fewer, ["f"]) is None
    # full fine-tuning saved at 10 %: asking for it at 10 % and 100 % extends that one
    _save_keyed_only(path, more, record, {})
    every = _settings(finetune={**_settings()["finetune"], "modes": ["head", "full"]})
    assert ev.narrower_evaluation(path, every, ["f"]) is not None
    assert ev.finetune_rows(["head", "full"], [0.1, 1.0], [0.1]) == [("head", 0.1), ("head", 1.0), ("full", 0.1)]


def test_an_evaluation_saved_before_the_recipe_was_recorded_keeps_its_rows_but_the_fine_tuned(tmp_path):
    """Saved before the settings held the fine-tuning recipe (its rows are `UNRECORDED_RECIPE`'s): a call
    with another recipe takes the rest of it and computes the fine-tuned rows again; one with that
    recipe takes it whole."""
    path = tmp_path / "evaluation-final.json"
    before = _settings(finetune={k: v for k, v in _settings()["finetune"].items() if k != "recipe"})
    rows = {"knn_macro_f1": 0.5, "finetuned head 0.1": 0.3, "finetuned head 1": 0.4}
    record = {"entry": {"steps": {"0": {"f": dict(rows)}, "3": {"f": dict(rows)}},
                        "evaluation_seconds": {"cluster": 2.0, "finetune": 9.0}}}
    _save_keyed_only(path, before, record, {"random init/f": np.eye(2)})
    assert ev.finetune_recipe([])["standardize"] is True
    saved, arrays = ev.reusable_evaluation(path, _settings(), ["f"])
    assert saved["entry"]["steps"] == {"0": {"f": {"knn_macro_f1": 0.5}}, "3": {"f": {"knn_macro_f1": 0.5}}}
    assert saved["finetuned_with"] == {} and np.array_equal(arrays["random init/f"], np.eye(2))
    unscaled = ev.finetune_recipe(["standardize=false"])
    assert unscaled == ev.UNRECORDED_RECIPE
    same = _settings(finetune={**_settings()["finetune"], "recipe": unscaled})
    saved, _ = ev.reusable_evaluation(path, same, ["f"])
    assert saved["entry"] == record["entry"]
    # saved again (as `extend_finetuning` does) under this call's settings: found by its key
    key = ev.evaluation_key(_settings(), ["f"])
    ev.save_evaluation(path, _settings(), ["f"], saved, arrays)
    assert ev.saved_evaluation(path, key) is not None


def test_an_evaluation_saved_with_its_settings_keeps_the_rows_each_mode_trained_alike(tmp_path):
    """Head fine-tuning made longer: its rows are dropped, full fine-tuning's kept; a head-only call takes
    the head+full evaluation and reports the head rows alone; other pretraining settings or files: not taken."""
    path = tmp_path / "evaluation-final.json"
    both = _settings(finetune={**_settings()["finetune"], "modes": ["head", "full"]})
    rows = {"knn_macro_f1": 0.5, "finetuned head 0.1": 0.3, "finetuned head 1": 0.4, "finetuned full 0.1": 0.35,
            "finetuned full 1": 0.45}
    record = {"entry": {"steps": {"0": {"f": dict(rows)}}}, "finetuned_with": ev.mode_settings(both["finetune"])}
    ev.save_evaluation(path, both, ["f"], record, {"random init/f": np.eye(2)})
    longer = _settings(finetune={**both["finetune"], "epochs": 30, "full_epochs": 10})
    assert ev.mode_settings(longer["finetune"])["full"] == ev.mode_settings(both["finetune"])["full"]
    saved, _ = ev.reusable_evaluation(path, longer, ["f"])
    assert saved["entry"]["steps"]["0"]["f"] == {k: v for k, v in rows.items() if "head" not in k}
    assert set(saved["finetuned_with"]) == {"full"}
    head_only = ev.reusable_evaluation(path, _settings(), ["f"])[0]
    assert head_only["entry"]["steps"]["0"]["f"] == rows  # the full rows stay saved ...
    shown = ev.result_entry(head_only["entry"], ev.finetune_rows(["head"], [0.1, 1.0], [0.1, 1.0]))
    assert shown["steps"]["0"]["f"] == {k: v for k, v in rows.items() if "full" not in k}  # ... and out of the result
    assert ev.reusable_evaluation(path, _settings(steps=3000), ["f"]) is None
    assert ev.reusable_evaluation(path, _settings(), ["f", "g"]) is None
    assert ev.reusable_evaluation(tmp_path / "none.json", _settings(), ["f"]) is None


def test_finetune_settings_are_parsed_and_each_recipe_and_length_trains_in_its_own_folder():
    recipe = ev.finetune_recipe(["lr=3e-4", "hidden=[64]", "standardize=false"])
    assert recipe["lr"] == 3e-4 and recipe["hidden"] == [64] and recipe["standardize"] is False
    assert recipe["batch_size"] == FinetuneConfig().batch_size
    assert ev.recipe_folder(recipe, 10) != ev.recipe_folder(ev.finetune_recipe([]), 10)
    assert ev.recipe_folder(recipe, 10) != ev.recipe_folder(recipe, 30)
    assert ev.recipe_folder(recipe, 10) == ev.recipe_folder(dict(reversed(list(recipe.items()))), 10)
    for bad, named in ((["epochs=3"], "key=value with a key of"), (["lr"], "key=value"),
                       (["lr=fast"], "lr='fast' should be a number")):
        with pytest.raises(SystemExit, match=named):
            ev.finetune_recipe(bad)


def _settings(**changed) -> dict:
    settings = {"steps": 1000, "curve": [250, 1000], "seeds": [0], "cap": "auto", "cluster": None,
                "finetune": {"modes": ["head"], "fractions": [0.1, 1.0], "epochs": 10, "how": ".",
                             "recipe": ev.finetune_recipe([])},
                "config_text": "data: {}\n", "overrides": [], "max_cells": 2000}
    return {**settings, **changed}


def test_reuse_takes_runs_of_the_same_settings_and_refuses_others(tmp_path):
    """--reuse: an earlier result's runs are taken with where they came from, its model-input PCA fills
    the baselines, fine-tuning modes widen to the taken runs'; other settings or phase: an exit naming them."""
    entry = {"train": {"overrides": ev.MIXES["mlm"] + ["run.seed=0"]},
             "steps": {"0": {"f": {"knn_macro_f1": 0.2, "finetuned full 1": 0.5}}}}
    earlier = {"date": "2026-12-05T05:44:09+00:00", "command": "benchmarks/eval_embeddings.py --mixes mlm",
               "phase": "validation", "baselines": {"f": {"PCA-50 (model input)": {"knn_macro_f1": 0.9}}},
               "settings": _settings(finetune={**_settings()["finetune"], "modes": ["head", "full"]}, seeds=[0, 1]),
               "runs": {"mlm": {"0": entry}}}
    path = tmp_path / "eval_validation.json"
    path.write_text(json.dumps(earlier))
    settings, baselines = _settings(), {"f": {}}
    taken = ev.reusable_runs(path, "validation", settings, baselines)
    assert taken["mlm"]["0"]["steps"] == entry["steps"]
    assert taken["mlm"]["0"]["reused"] == {"file": path.name, "date": earlier["date"], "command": earlier["command"]}
    assert baselines["f"]["PCA-50 (model input)"] == {"knn_macro_f1": 0.9}
    assert settings["finetune"]["modes"] == ["head", "full"]
    # a run taken twice keeps the result it was first computed for
    again = {**earlier, "date": "2026-12-06T00:00:00+00:00", "runs": taken}
    path.write_text(json.dumps(again))
    assert ev.reusable_runs(path, "validation", _settings(), {"f": {}})["mlm"]["0"]["reused"]["date"] == earlier["date"]
    for settings, phase, named in ((_settings(steps=3000), "validation", "steps"),
                                   (_settings(config_text="data: {x: 1}\n"), "validation", "config_text"),
                                   (_settings(finetune={**_settings()["finetune"], "epochs": 3}), "validation", "finetune"),
                                   (_settings(), "final", "phase")):
        with pytest.raises(SystemExit, match=f"other settings \\({named} differ"):
            ev.reusable_runs(path, phase, settings, {"f": {}})

"""The training entry point on one CPU process: non-finite steps are skipped (and too many in a row
stop the run), MLflow records the run, and the typed configuration (YAML files, key.sub=value
overrides, the resolved config.yaml a run saves)."""

from __future__ import annotations

import json
import math
import re
import sys
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import yaml

from data_pipeline.corpus import Corpus
from data_pipeline.loading.masking import Masking
from pretrain.config import TrainConfig, load_config
from pretrain.train import VALUE_MODE_OF, build_loader, resolve_model_config
from tests.train_helpers import (
    LOSS_KEYS,
    ROOT,
    TINY,
    TINY_CONFIG,
    complete_steps,
    export,
    make_corpus,
    metrics,
    mlflow_ui,
    run_pretrain,
    same_number,
    summary,
    weights,
)

CONFIGS = sorted((ROOT / "launch" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def nan_overrides(corpus: Path, run: Path) -> list[str]:
    return [*TINY, f"data.corpus={corpus}", f"run.out={run}", "schedule.max_steps=6", "run.checkpoint_every=0",
            "run.log_every=2", "run.mlflow=true", "run.inject_nan_steps=[2, 3]"]


@pytest.fixture(scope="module")
def nan_run(corpus, tmp_path_factory) -> Path:
    """6 steps, steps 2 and 3 poisoned, MLflow on, metrics logged every 2 steps."""
    run = tmp_path_factory.mktemp("nan") / "run"
    run_pretrain(nan_overrides(corpus, run))
    return run


# --- non-finite steps ------------------------------------------------------------------------------

@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_training_goes_on(nan_run, tmp_path):
    history = metrics(nan_run)  # every step, though only every 2nd was logged on the way
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    for h in history:
        if h["step"] in (2, 3):
            assert math.isnan(h["loss"]), h
        else:
            assert all(math.isfinite(h[k]) for k in LOSS_KEYS), h
    assert [h["skipped_steps"] for h in history] == [0, 1, 2, 2, 2, 2]
    done = summary(nan_run)
    assert done["steps"] == 6 and done["skipped_steps"] == 2
    assert math.isfinite(done["final"]["loss"])  # the mean of the finite steps
    assert complete_steps(nan_run) == [6]
    bundle = weights(export(nan_run, tmp_path / "bundle"))
    assert bundle and all(torch.isfinite(w).all() for w in bundle.values())


@pytest.mark.slow
def test_too_many_non_finite_steps_in_a_row_stop_the_run(corpus, tmp_path):
    """Counted across a resume: the run that ended on two skipped steps stops at the next one."""
    run = tmp_path / "run"
    args = [*TINY, f"data.corpus={corpus}", f"run.out={run}", "run.log_every=1",
            "run.inject_nan_steps=[2, 3, 4]", "run.max_nan_steps=3"]
    run_pretrain([*args, "schedule.max_steps=3"])
    assert summary(run)["skipped_steps"] == 2
    proc = run_pretrain([*args, "schedule.max_steps=8"], resume="auto", check=False)
    assert proc.returncode != 0
    assert "3 non-finite losses in a row (step 4)" in proc.stderr, proc.stderr[-3000:]
    history = metrics(run)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [math.isnan(h["loss"]) for h in history] == [False, True, True, True]
    # the first run's summary is set aside when the resume starts; the failed resume writes none, so no
    # summary.json says the run finished
    assert not (run / "summary.json").exists()
    assert json.loads((run / "summary-step3.json").read_text())["skipped_steps"] == 2


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_only_checkpoints_with_their_marker_count(tmp_path):
    from pretrain import checkpoint
    from pretrain.export import export_bundle

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000099").mkdir(parents=True)  # a save cut short: no COMPLETE
    (run / "checkpoints" / "step-00000099" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (run / "config.yaml").write_text("{}")
    assert checkpoint.latest_complete(run) is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        export_bundle(run, tmp_path / "bundle")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.load(None, run / "checkpoints" / "step-00000099")
    for step in (3, 10):
        folder = run / "checkpoints" / checkpoint.tag_of(step)
        folder.mkdir()
        (folder / checkpoint.MARKER).write_text("{}")
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step-00000003", "step-00000010"]
    assert checkpoint.latest_complete(run).name == "step-00000010"


# --- throughput --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cell_rate_counts_a_cell_of_two_views_once(nan_run):
    config = load_config(str(nan_run / "config.yaml"))
    assert config.data.views  # tiny.yaml: every cell is two sequences (its two views)
    longest_sequence = config.data.max_genes + 2  # capped genes plus at most two special tokens
    history = metrics(nan_run)
    summary_rates = summary(nan_run)["final"]
    for h in history:
        # tokens per cell more than one sequence can hold: the rate counts cells, not sequences
        assert h["tokens_per_s"] / h["cells_per_s"] > longest_sequence, h
        assert h["sequences_per_s"] == pytest.approx(2 * h["cells_per_s"], rel=1e-9), h
    assert summary_rates["sequences_per_s"] == pytest.approx(2 * summary_rates["cells_per_s"], rel=1e-9)


# --- MLflow ----------------------------------------------------------------------------------------

MLFLOW_METRICS = ("loss", "mlm", "contrastive", "label", "lr", "grad_norm", "cells_per_s", "sequences_per_s", "tokens_per_s",
                  "padding_waste", "peak_memory_bytes")


def _mlflow(run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    return client, client.get_run((run / "mlflow_run_id").read_text().strip())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # mlflow's SQLAlchemy store
def test_mlflow_records_params_metrics_and_artifacts(nan_run, corpus):
    client, record = _mlflow(nan_run)
    assert record.info.status == "FINISHED" and record.info.run_name == "run"
    params = record.data.params
    assert params["model.d_model"] == "32" and params["model.n_layers"] == "1"
    assert float(params["optimizer.lr"]) == 2e-3 and params["data.corpus"] == str(corpus)
    assert params["deepspeed.zero_stage"] == "2" and params["run.inject_nan_steps"] == "[2, 3]"
    assert int(params["model.vocab_size"]) > 2000  # resolved from the corpus before logging
    by_step = {h["step"]: h for h in metrics(nan_run)}
    for key in MLFLOW_METRICS:
        history = sorted(client.get_metric_history(record.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [2, 4, 6], key  # run.log_every=2 (and the last step)
        for m in history:  # MLflow stores an infinite value (a skipped step's grad_norm) as the largest float
            value = math.copysign(math.inf, m.value) if abs(m.value) == sys.float_info.max else m.value
            assert same_number(value, float(by_step[m.step][key])), (key, m.step, m.value)
    artifacts = {a.path for a in client.list_artifacts(record.info.run_id)}
    assert {"loss.png", "metrics.json", "summary.json", "config.json"} <= artifacts


@pytest.mark.slow
def test_mlflow_artifacts_are_kept_in_the_run_directory(nan_run):
    _, record = _mlflow(nan_run)
    # beside the store, not in ./mlruns of the directory the job was started in (here nan_run.parent)
    where = Path(urlparse(record.info.artifact_uri).path)
    assert where.resolve().is_relative_to(nan_run.resolve()), record.info.artifact_uri
    assert (where / "loss.png").is_file() and (where / "metrics.json").is_file()
    assert not (nan_run.parent / "mlruns").exists()


@pytest.mark.slow
def test_the_mlflow_ui_serves_the_run(nan_run, tmp_path):
    """The README's `mlflow ui` command (the full `mlflow` package: mlflow-skinny has no UI) serves
    the UI page and, through its REST API, the run with its metrics."""
    run_id = (nan_run / "mlflow_run_id").read_text().strip()
    with mlflow_ui(nan_run, tmp_path / "mlflow-ui.log") as url:
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200 and b"mlflow-ui-container" in page.read()
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=scfm-pretrain",
                                    timeout=30) as answer:
            experiment = json.load(answer)["experiment"]["experiment_id"]
        search = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", method="POST",
                                        data=json.dumps({"experiment_ids": [experiment]}).encode(),
                                        headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(search, timeout=30) as answer:
            runs = {r["info"]["run_id"]: r for r in json.load(answer)["runs"]}
    assert run_id in runs, runs.keys()
    record = runs[run_id]
    assert record["info"]["status"] == "FINISHED" and record["info"]["run_name"] == "run"
    served = {m["key"]: m for m in record["data"]["metrics"]}  # each metric's last value
    assert served["loss"]["step"] == 6
    assert same_number(served["loss"]["value"], metrics(nan_run)[-1]["loss"])


# --- configuration ---------------------------------------------------------------------------------

def test_overrides_are_parsed_as_yaml_and_coerced_to_the_field_types():
    config = load_config(str(TINY_CONFIG), [
        "optimizer.lr=1e-3",              # YAML reads this as a string: coerced to float
        "model.ffn_multiplier=2",         # int for a float field
        "schedule.max_steps=12",
        "deepspeed.bf16=true",
        "data.max_genes=null",
        "run.inject_nan_steps=[2, 3]",
        "model.d_model=32",
        "deepspeed.overrides.zero_optimization={stage: 1}",
    ])
    assert config.optimizer.lr == 1e-3 and type(config.optimizer.lr) is float
    assert config.model.ffn_multiplier == 2.0 and type(config.model.ffn_multiplier) is float
    assert config.schedule.max_steps == 12 and type(config.schedule.max_steps) is int
    assert config.deepspeed.bf16 is True and config.data.max_genes is None
    assert config.run.inject_nan_steps == [2, 3]
    assert config.deepspeed.overrides == {"zero_optimization": {"stage": 1}}
    # defaults < YAML < overrides
    assert config.model.d_model == 32                       # override over the YAML's 64
    assert config.model.n_layers == 2 and config.data.views  # from the YAML
    assert config.model.dropout == 0.1 and config.schedule.decay == "cosine"  # defaults
    assert isinstance(config, TrainConfig)
    with pytest.raises(ValueError, match="run.out cannot be null"):  # an empty value is null
        load_config(str(TINY_CONFIG), ["run.out="])


def test_preset_fills_the_model_under_the_yaml_and_overrides():
    from pretrain.presets import preset

    chosen = preset("celllm")
    config = load_config(None, ["preset=celllm", "model.n_layers=2"])
    assert config.model.n_layers == 2
    assert config.model.d_model == chosen.model.d_model and config.model.attention == chosen.model.attention
    assert config.data.normalization == chosen.normalization and config.data.max_genes == chosen.max_genes
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(None, ["preset=nope"])


@pytest.mark.parametrize(("override", "named", "listed"), [
    ("model.d_modle=32", "model.d_modle", ["d_model", "n_heads", "favor_features"]),
    ("optimiser.lr=0.1", "optimiser", ["optimizer", "schedule", "deepspeed", "run"]),
    ("model.decoder.width=3", "model.decoder.width", ["n_layers", "d_model", "attention"]),
])
def test_unknown_keys_are_refused_with_the_known_ones_listed(override, named, listed):
    with pytest.raises(ValueError, match="unknown config key") as error:
        load_config(str(TINY_CONFIG), [override])
    message = str(error.value)
    assert named in message and all(name in message for name in listed), message


def test_unknown_keys_in_a_yaml_file_are_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY_CONFIG.read_text().replace("  log_every: 10", "  log_evry: 10"))
    with pytest.raises(ValueError, match=r"run\.log_evry.*log_every"):
        load_config(str(path))


@pytest.mark.parametrize(("override", "message"), [
    ("schedule.max_steps=ten", "schedule.max_steps='ten' should be int"),
    ("schedule.max_steps=2.5", "should be int"),
    ("schedule.max_steps=true", "should be int"),
    ("optimizer.lr=fast", "optimizer.lr='fast' should be a number"),
    ("run.mlflow=maybe", "should be bool"),
    ("deepspeed.bf16=1", "should be bool"),
    ("model.label_classes=3", "should be list"),
    ("deepspeed.overrides=3", "should be dict"),
    ("data=3", "should be a mapping"),
    ("model.d_model.x=1", "d_model"),
    ("schedule.max_steps", "key.sub=value"),
])
def test_values_of_the_wrong_type_are_refused(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(str(TINY_CONFIG), [override])


@pytest.mark.parametrize("override", ["schedule.decay=cosinus", "run.log_every=0", "data.quantile_ties=low",
                                      "data.mask_replace_prob=0.95", "data.mask_random_prob=-0.1"])
def test_values_out_of_range_are_refused_when_loading(override):
    with pytest.raises(ValueError):
        load_config(str(TINY_CONFIG), [override])


def test_nonzero_only_masking_needs_bins():
    assert load_config(str(TINY_CONFIG), ["data.mask_nonzero_only=true"]).data.mask_nonzero_only
    with pytest.raises(ValueError, match="data.mask_nonzero_only=true skips bin 0.*or set data.mask_nonzero_only=false"):
        load_config(str(TINY_CONFIG), ["data.mask_nonzero_only=true", "data.normalization=continuous",
                                       "model.value_mode=continuous"])


def test_input_normalization_survives_the_bundle_record():
    """The loader's normalization (from the config) is the one an exported bundle embeds with;
    a bundle written before quantile_ties existed reads as the old behaviour ("high")."""
    from pretrain.export import normalization_from_record, normalization_record

    default = load_config(str(TINY_CONFIG), ["data.normalization=quantile_bins"]).input_normalization()
    assert default.quantile_ties == "random"  # scGPT's tie-breaking
    config = load_config(str(TINY_CONFIG), ["data.normalization=quantile_bins", "data.quantile_ties=high",
                                            "data.max_genes=300"])
    norm = config.input_normalization()
    assert (norm.mode, norm.quantile_ties, norm.max_genes, norm.n_bins) == ("quantile_bins", "high", 300,
                                                                           config.model.n_bins)
    assert normalization_from_record(normalization_record(norm)) == norm
    assert normalization_from_record(normalization_record(default)) == default
    old = {k: v for k, v in normalization_record(default).items() if k != "quantile_ties"}
    assert normalization_from_record(old).quantile_ties == "high"


def _fake_corpus(n_labels: int = 5):
    """What resolve_model_config reads of a Corpus: special tokens, vocabulary size, label classes."""
    return SimpleNamespace(special_tokens={"<pad>": 0, "<cls>": 1, "<mask>": 2}, vocab_size=20003,
                           label_classes=[n_labels], label_columns=[SimpleNamespace(name="tumor_normal")])


def test_geneformer_config_carries_its_optimizer_and_schedule():
    """examples/pretraining_new_model/pretrain_geneformer_w_deepspeed.py: AdamW through transformers'
    Trainer (betas 0.9 / 0.999), max_lr 1e-3, weight_decay 0.001, warmup_steps 10,000, lr_scheduler_type
    linear (to 0 at the end)."""
    config = load_config(str(ROOT / "launch" / "configs" / "geneformer-10m.yaml"), [])
    assert (config.optimizer.lr, config.optimizer.weight_decay, config.optimizer.betas) == (1e-3, 1e-3, [0.9, 0.999])
    assert (config.schedule.warmup_steps, config.schedule.decay, config.schedule.min_lr_ratio) == (10_000, "linear", 0)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(str(path), ["data.corpus=/some/corpus"])
    model = replace(config.model, vocab_size=20003)
    assert model.validate() is model
    resolved = resolve_model_config(config, _fake_corpus())  # what train() checks before building the model
    assert resolved.model.vocab_size == 20003 and resolved.model.label_classes == [5]
    assert VALUE_MODE_OF[resolved.data.normalization] == resolved.model.value_mode
    assert resolved.deepspeed.zero_stage in (1, 2, 3) or resolved.deepspeed.bf16
    assert resolved.schedule.decay in ("cosine", "linear", "constant")
    assert resolved.schedule.warmup_steps < resolved.schedule.max_steps
    if resolved.objectives.contrastive_weight > 0:
        assert resolved.data.views
    raw = yaml.safe_load(path.read_text())
    if raw.get("preset"):
        assert config.preset == raw["preset"]


@pytest.mark.slow
def test_saved_config_reloads_to_the_resolved_config(nan_run, corpus):
    saved = nan_run / "config.yaml"
    reloaded = load_config(str(saved))
    assert asdict(reloaded) == yaml.safe_load(saved.read_text())
    original = load_config(str(TINY_CONFIG), nan_overrides(corpus, nan_run))
    loader = build_loader(original, torch.device("cpu"))
    assert reloaded == resolve_model_config(original, loader.corpus)
    assert reloaded.model.vocab_size == loader.corpus.vocab_size and reloaded.model.label_classes == [8]
    assert reloaded != original  # the corpus filled in what the YAML left open
    np.testing.assert_equal(reloaded.optimizer.betas, [0.9, 0.98])


def test_named_label_objective_trains_its_column_only():
    """objectives.labels names the corpus label column of an objective (CellLM's [cls] tumour / normal
    task: the celllm preset reads column tumor_normal); only those columns get heads. Empty (the
    default, every other preset): every label column, as before."""
    corpus = SimpleNamespace(special_tokens={"<pad>": 0, "<cls>": 1, "<mask>": 2}, vocab_size=20003,
                             label_classes=[9, 2], label_columns=[SimpleNamespace(name="cell_type"),
                                                                  SimpleNamespace(name="tumor_normal")])
    celllm = load_config(None, ["preset=celllm", "data.corpus=/some/corpus"])
    assert celllm.objectives.labels == {"tumor_normal": "tumor_normal"}
    assert resolve_model_config(celllm, corpus).model.label_classes == [2]
    other = load_config(None, ["preset=scgpt", "data.corpus=/some/corpus"])
    assert resolve_model_config(other, corpus).model.label_classes == [9, 2]
    renamed = load_config(None, ["preset=celllm", "data.corpus=/some/corpus", "objectives.labels={tumor_normal: cell_type}"])
    assert resolve_model_config(renamed, corpus).model.label_classes == [9]
    unlabelled = SimpleNamespace(**{**vars(corpus), "label_classes": [9], "label_columns": corpus.label_columns[:1]})
    with pytest.raises(ValueError, match=r"objectives.labels.tumor_normal reads label column 'tumor_normal'.*"
                                         r"--label-columns tumor_normal.*objectives.labels=\{\}"):
        resolve_model_config(celllm, unlabelled)
    with pytest.raises(ValueError, match="objectives.labels"):
        load_config(None, ["objectives.labels={tumor_normal: 3}"])


def test_loader_batches_hold_the_chosen_label_columns(corpus):
    from data_pipeline.loading.loader import CellLoader

    def first_labels(**kwargs):
        loader = CellLoader(corpus, seed=0, **kwargs)
        return next(iter(loader)).labels

    every = first_labels()
    assert every.shape[1] == 1 and (every >= 0).any()
    assert first_labels(label_columns=[0]).equal(every)
    assert first_labels(label_columns=[]).shape == (len(every), 0)
    with pytest.raises(ValueError, match="label columns"):
        CellLoader(corpus, label_columns=[1])


def test_presets_carry_their_recipes():
    """The scBERT / CellLM / Geneformer / scGPT recipes, number by number from their code (see presets.py)."""
    scbert = load_config(None, ["preset=scbert"])
    assert (scbert.data.normalization, scbert.model.n_bins) == ("log2_floor_bins", 6)
    assert scbert.input_masking() == Masking(0.15, mask_prob=0.9, random_prob=0.0, nonzero_only=True)
    assert scbert.model.freeze_gene_embedding and scbert.model.d_model == 200
    # performer-pytorch's defaults, which scBERT and CellLM keep: heads 64 wide, no dropout anywhere
    assert (scbert.model.attention_head_dim, scbert.model.dropout) == (64, 0.0)
    celllm = load_config(None, ["preset=celllm"])
    assert (celllm.data.normalization, celllm.model.n_bins, celllm.model.n_heads) == ("log2_floor_bins", 6, 16)
    assert celllm.model.n_bins + 2 == 8  # CellLM's num_tokens: bins 0..5, <cls> and <pad>
    assert (celllm.model.attention_head_dim, celllm.model.dropout) == (64, 0.0)
    # contrastive between two views and the [cls] task: what trains the pooled <cls>
    assert (celllm.data.views, celllm.objectives.contrastive_weight, celllm.objectives.label_weight) == (True, 1.0, 0.1)
    geneformer = load_config(None, ["preset=geneformer-10m"])
    assert (geneformer.model.norm_position, geneformer.model.activation) == ("post", "relu")
    scgpt = load_config(None, ["preset=scgpt"]).model  # FlashTransformerEncoderLayer, whole-human args.json
    assert (scgpt.norm_position, scgpt.activation, scgpt.ffn_multiplier, scgpt.dropout) == ("post", "relu", 1.0, 0.2)
    scfoundation = load_config(None, ["preset=scfoundation"]).model
    assert (scfoundation.norm_position, scfoundation.activation) == ("pre", "gelu")
    # scFoundation masks 30 % of values (training_hyperparameter.txt value_mask_prob), BERT's 80/10/10, and 3 % of
    # the unexpressed genes (zero_mask_prob)
    assert load_config(None, ["preset=scfoundation"]).input_masking() == Masking(0.3, zero_prob=0.03)
    # scGPT (scgpt/data_collator.py): mlm_probability [0.25, 0.5, 0.75], every masked input set to mask_value
    scgpt = load_config(None, ["preset=scgpt"])
    assert scgpt.input_masking() == Masking(0.15, mask_prob=1.0, random_prob=0.0, ratios=(0.25, 0.5, 0.75))
    assert (scgpt.model.bin_embedding, scgpt.model.bin_loss, scgpt.model.mvc_head) == ("mlp", "mse", True)


@pytest.mark.slow
def test_a_resume_on_another_worker_count_is_refused_unless_the_epoch_restarts(corpus, tmp_path):
    """data.num_workers may change on resume, but the loader's position then has another layout:
    refused with rc 2 naming --restart-epoch (before, a bare ValueError after the engine was built);
    with it, the run goes on from the checkpoint's step."""
    import subprocess

    from tests.train_helpers import _cwd, job_env, pretrain_cmd

    run = tmp_path / "run"
    base = [*TINY, f"data.corpus={corpus}", f"run.out={run}", "run.checkpoint_every=2", "run.mlflow=false",
            "data.num_workers=0"]
    run_pretrain([*base, "schedule.max_steps=2"])
    # 0 workers and 1 worker are both one stream per rank: 2 workers lay the epoch out otherwise
    more = [*base[:-1], "data.num_workers=2", "schedule.max_steps=4"]
    refused = run_pretrain(more, resume="auto", check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "--restart-epoch" in refused.stderr and "1 streams per rank" in refused.stderr
    done = subprocess.run(pretrain_cmd(more, resume="auto") + ["--restart-epoch"], env=job_env(), cwd=_cwd(more),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(run)["resumed_from_step"] == 2 and summary(run)["steps"] == 4


def test_raw_normalization_trains_continuous_values(corpus):
    """data.normalization=raw: the counts as continuous values (masked with -1), with
    model.value_mode=continuous; bins refused naming the key."""
    config = load_config(str(TINY_CONFIG), [f"data.corpus={corpus}", "data.normalization=raw",
                                            "model.value_mode=continuous"])
    batch = next(iter(build_loader(config, torch.device("cpu"))))
    assert batch.values.dtype == torch.float32
    kept = ~batch.mlm_mask
    assert (batch.values[kept] >= 1).all() and (batch.values[kept] == batch.values[kept].round()).all()
    masked = batch.values[batch.mlm_mask]
    assert (masked == -1).float().mean() > 0.5  # 80 % become -1, 10 % a random value, 10 % stay
    binned = load_config(str(TINY_CONFIG), [f"data.corpus={corpus}", "data.normalization=raw", "model.value_mode=bins"])
    with pytest.raises(ValueError, match="model.value_mode=continuous"):
        resolve_model_config(binned, Corpus(corpus))

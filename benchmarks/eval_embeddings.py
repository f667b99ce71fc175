"""Does pretraining learn anything? Cell-type probes of the embeddings on held-out real files.

    python benchmarks/eval_embeddings.py --phase validation       # choose recipes here (validation file only)
    python benchmarks/eval_embeddings.py --phase final            # the held-out evaluation files: the report
    python benchmarks/eval_embeddings.py --steps 20 --curve 20 --seeds 0 --mixes mlm \
        --result /tmp/eval.json --plot /tmp/eval.png              # a try-out (minutes)

Needs the real data beside the checkout (``../shared/data/h5ad``); exits with a message when it is
absent. What it does:

1. Splits ``cider_baron_pancreas350`` in two halves, stratified by species and cell type (seed 0,
   the same for every run): one half joins pretraining (the label mix's labelled cells), the other
   is the validation file (`VALIDATION`). Converts it with the unlabeled real files (PBMC, tumour;
   `PRETRAIN_FILES`) into one corpus. Files that share cells with an evaluation file (`EXCLUDED`)
   stay out.
2. Pretrains `benchmarks/configs/eval.yaml` once per objective mix (`MIXES`) and pretraining seed
   (``--seeds``), the same steps and token budget each, through `launch/pretrain.py`, keeping a
   checkpoint at every step of the learning curve (``--curve``; step 0 is the initialization, the
   "random-init twin": the trainer's seed gives every mix the same initial encoder). A killed run
   resumes; a finished one is reused, and so is its evaluation (``evaluation-<phase>.json`` in the
   run folder, for the same settings), so a killed phase goes on from the seed it was evaluating.
   ``--reuse RESULT.json`` takes the runs an earlier result computed with the same settings as they
   are (neither trained nor evaluated again). A call that only adds fine-tuned rows (a mode, or full
   fine-tuning at more label shares) computes those and keeps the rest of the saved evaluation.
3. ``--phase validation`` evaluates on the validation file only: recipes (normalization, pooling,
   objectives' weights, ...) are chosen there. ``--phase final`` evaluates on the held-out files
   (`EVAL_FILES`, never in pretraining), touched only for the report.
4. Embeds every file with each checkpoint (`pretrain.embed.embed_counts`; ``--cap``: by default
   every expressed gene for a FAVOR+ model, no random subset) and probes cell type with 5-fold
   stratified cross-validation, the folds fixed and shared by every row: kNN (k = 10) and
   logistic regression (standardized features), macro-F1. Baselines in the same run: PCA-50 of
   log1p-CP10k over all the file's genes, PCA-50 over the model's own input genes (its
   vocabulary, its cap), and the 2,000 highly variable genes (scanpy's seurat flavour).
5. Clustering (``--cluster``): the scHybridBERT pipeline of `launch/cluster_cells.py` on each
   file, ARI / NMI beside PCA-50 and k-means on the embedding alone (k = the number of labels), and
   scanpy's default clustering of the file (Leiden on PCA-50, its own number of clusters; a baseline
   row computed once per call, `clustering_baseline`).
6. Masked modelling on the held-out cells (15 % masked as in training): masked-bin accuracy
   against its ceiling (quantile bins with random ties draw a tied gene's bin uniformly from its
   span: no predictor beats the mean of 1/span) and the most frequent bin, and the masked loss.
7. Fine-tuning (``--finetune head,full``; `pretrain.downstream.finetune`, the path of
   `launch/finetune.py`) of the last checkpoint and of the random-init twin on 1 %, 10 % and 100 %
   of each fold's training labels (``--fractions``; full fine-tuning at ``--full-fractions`` of them),
   scored on the fold's test cells, beside logistic regression on HVG-2000 and PCA-50 trained on the
   same cells. The runs train with `FinetuneConfig`'s defaults, ``--finetune-set key=value`` over
   them, for ``--finetune-epochs`` (full fine-tuning for ``--full-epochs`` where given). A run's
   saved evaluation records what each mode's rows were trained with: a call that trains a mode
   otherwise keeps the other rows and fine-tunes that mode again.
8. Mean and spread (min, max) over the seeds of every number; verdicts against the goals.

Writes ``--result`` (JSON) and a t-SNE figure (``--plot``): the baselines, the random-init twin and
each mix at the last curve step, coloured by cell type. Each model's panel shows the first seed this call
has embeddings of, computed or saved in its run folder (``figure_seeds`` in the JSON); a run taken by
``--reuse`` has none, so a mix whose every seed is taken has no panel (nor has the random-init twin when
the first mix's seeds all are).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import NO_GENE_IDS, RESULTS, SHARED_H5AD, device_record, result_record, versions, write_result  # noqa: E402

from data_pipeline.corpus import Corpus  # noqa: E402

CONFIG = REPO / "benchmarks" / "configs" / "eval.yaml"
SPLIT_SOURCE = "cider_baron_pancreas350"  # half pretrains (its labels feed the label mix), half validates
PRETRAIN_FILES = ["mudan_pbmcA", "asurat_pbmc4k_subset", "pisces_pbmc1k", "celltypist_sample559", "copykat_tumor302"]
EXCLUDED = {"harmony_kang_ctrl_stim": "shares cells with muscat_kang_se (an evaluation file)",
            NO_GENE_IDS.removesuffix(".h5ad"): "no gene identifiers",
            "mudan_zheng_sorted_ref": "evaluation file", "scminer_pbmc14k_derived": "evaluation file",
            "muscat_kang_se": "evaluation file"}
EVAL_FILES = {"mudan_zheng_sorted_ref": "cell_type", "scminer_pbmc14k_derived": "cell_type", "muscat_kang_se": "cluster_id"}
VALIDATION = {"cider_validation_half": "cell_type"}
LABEL_COLUMN = "cell_type"  # in the corpus only the pretraining half of cider_baron_pancreas350 has it
MIXES = {
    "mlm": ["objectives.contrastive_weight=0", "objectives.label_weight=0", "data.views=false"],
    "mlm+contrastive": ["objectives.contrastive_weight=0.5", "objectives.label_weight=0", "data.views=true"],
    "mlm+contrastive+label": ["objectives.contrastive_weight=0.5", "objectives.label_weight=0.5", "data.views=true"],
    # issue 23's lever "a loss on the pooled embedding": scGPT's MVC / GEPC predicts each masked gene's value
    # from the cell embedding alone, so the embedding the probes read must hold the cell's expression. Its
    # squared error over 51 quantile bins starts near their variance (~200) against the masked-bin
    # cross-entropy's ~4: at weight 1 it held the loss at ~200 while the cross-entropy stalled (3.96 -> 3.90
    # in 50 steps), so 0.02 puts the two on one scale
    "mlm+mvc": ["objectives.contrastive_weight=0", "objectives.label_weight=0", "data.views=false",
                "model.mvc_head=true", "objectives.mvc_weight=0.02"],
    # issue 23's lever "an ordinal value encoding": scGPT's value MLP over the bin index in place of a table of
    # 51 unrelated bin vectors, so neighbouring bins start with neighbouring embeddings
    "mlm+ordinal": ["objectives.contrastive_weight=0", "objectives.label_weight=0", "data.views=false",
                    "model.bin_embedding=mlp"],
    # issue 23's lever "more contrastive negatives through the gradient cache": 8 loader batches per step
    # (eval.yaml has 2) make one contrastive batch 4x as large, so each cell meets 4x the negatives. Compared
    # with `mlm+contrastive` at equal steps it also sees 4x the cells (and costs ~4x the time): a gain is
    # from negatives and data together
    "mlm+contrastive-8chunks": ["objectives.contrastive_weight=0.5", "objectives.label_weight=0", "data.views=true",
                                "deepspeed.chunks_per_step=8"],
}
# settings of a result that may differ from this run's and still let --reuse take its runs
REUSE_FREE = ("seeds", "finetune")
FOLDS, K = 5, 10
PREVIOUS = RESULTS / "eval.json"  # the report before issue 23 (250 steps, random 512-gene cap): "today's gap"


def split_validation(work: Path) -> tuple[Path, Path]:
    """(pretraining half, validation half) of `SPLIT_SOURCE`, written once into ``work``."""
    import anndata

    folder = work / "validation_split"
    halves = folder / "cider_pretrain_half.h5ad", folder / "cider_validation_half.h5ad"
    if all(h.exists() for h in halves):
        return halves
    adata = anndata.read_h5ad(SHARED_H5AD / f"{SPLIT_SOURCE}.h5ad")
    strata = (adata.obs["species"].astype(str) + "/" + adata.obs["cell_type"].astype(str)).to_numpy()
    rng = np.random.default_rng(0)
    held = np.zeros(adata.n_obs, bool)
    for stratum in np.unique(strata):
        rows = np.flatnonzero(strata == stratum)
        held[rng.choice(rows, len(rows) // 2, replace=False)] = True
    folder.mkdir(parents=True, exist_ok=True)
    for half, rows in zip(halves, (~held, held)):
        partial = half.with_suffix(".partial.h5ad")
        adata[rows].copy().write_h5ad(partial)
        partial.replace(half)
    return halves


def build_corpus(work: Path) -> Path:
    """The pretraining corpus (converted once; a rerun reuses it)."""
    from data_pipeline.conversion.convert import convert
    from data_pipeline.conversion.plan import ConvertOptions

    corpus = work / "corpus_split"  # not "corpus": that one held all of cider_baron_pancreas350
    if not Corpus.is_finished(corpus):
        inputs = [str(SHARED_H5AD / f"{name}.h5ad") for name in PRETRAIN_FILES] + [str(split_validation(work)[0])]
        convert(corpus, ConvertOptions(inputs, label_columns=[LABEL_COLUMN]), workers=2, progress=False)
    return corpus


def pretrain(corpus: Path, run: Path, mix: str, steps: int, curve: list[int], extra: list[str]) -> dict:
    """Train one mix through the CLI users run (resumes a killed run), keeping a checkpoint at every
    curve step; the run's summary plus its first and last logged losses."""
    every = int(np.gcd.reduce([c for c in curve if c > 0] + [steps]))
    command = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(CONFIG), "--resume", "auto",
               f"data.corpus={corpus}", f"run.out={run}", f"schedule.max_steps={steps}",
               f"schedule.warmup_steps={max(1, steps // 10)}", f"run.experiment=eval-{mix}",
               f"run.checkpoint_every={every}", f"run.keep_checkpoints={steps // every + 1}", *MIXES[mix], *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    started = time.perf_counter()
    finished = (run / "summary.json").exists() and json.loads((run / "summary.json").read_text()).get("steps") == steps
    if not finished:  # a finished run (an evaluation killed after its training) is not started again
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    summary = json.loads((run / "summary.json").read_text())
    history = json.loads((run / "metrics.json").read_text())
    keys = ("loss", "mlm", "contrastive", "label")
    # a finished run's time is its own record's (first to last logged step), not this call's
    seconds = time.perf_counter() - started if not finished else history[-1]["time"] - history[0]["time"]
    return {"steps": summary["steps"], "seconds_this_call": round(seconds, 1),
            "first_losses": {k: round(history[0][k], 4) for k in keys if history[0].get(k) is not None},
            "last_losses": {k: round(summary["final"][k], 4) for k in keys if k in summary["final"]},
            "cells_per_s": round(summary["final"].get("cells_per_s", 0.0), 1),
            "overrides": MIXES[mix] + extra}


def run_name(mix: str, steps: int, seed: int, extra: list[str]) -> str:
    """The run folder of one mix: a rerun resumes or reuses it only when it was trained from the same
    config settings and overrides (their digest is in the name; comments do not count), never a stale
    run of an edited config."""
    import yaml

    settings = yaml.safe_load(CONFIG.read_text())
    digest = hashlib.sha256(json.dumps([settings, MIXES[mix], extra, steps], sort_keys=True).encode()).hexdigest()[:10]
    return f"{mix}-{steps}-seed{seed}-{digest}"


def checkpoint_bundle(run: Path, step: int) -> Path:
    """The bundle of the run's checkpoint at ``step`` (exported once)."""
    from pretrain.checkpoint import tag_of
    from pretrain.export import export_bundle

    bundle = run / "bundles" / tag_of(step)
    if not (bundle / "model.safetensors").exists():
        export_bundle(run / "checkpoints" / tag_of(step), bundle)
    return bundle


class EvalFile:
    """One labeled file: raw counts [n, genes] (CSR), var and labels (cells without a label, and
    classes with fewer cells than folds, left out)."""

    def __init__(self, path: Path, label_key: str, max_cells: int | None, seed: int = 0):
        import anndata
        import scipy.sparse as sp

        from pretrain.downstream.token_cells import label_strings

        adata = anndata.read_h5ad(path)
        labels = label_strings(adata.obs[label_key])  # "" where missing, as fine-tuning reads them
        known = labels != ""
        classes, counts = np.unique(labels[known], return_counts=True)
        keep = known & np.isin(labels, classes[counts >= FOLDS])
        rows = np.flatnonzero(keep)
        if max_cells and len(rows) > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
        self.name, self.label_key = path.stem, label_key
        self.counts = sp.csr_matrix(adata.X[rows])
        self.var = adata.var
        self.labels = labels[rows]
        self.unlabeled_or_rare = int(adata.n_obs - keep.sum())
        self.not_sampled = int(keep.sum() - len(rows))
        self.folds = list(fold_split(self.labels))

    def baselines(self) -> dict[str, np.ndarray]:
        """PCA-50 of log1p-CP10k over all the file's genes, and those values on its 2,000 highly
        variable genes (every gene in a file of fewer; the features a linear model gets: Boiarsky et al.
        2023's baseline)."""
        from pretrain.downstream.expression import hvg_expression, log1p_cp10k, pca

        return {"PCA-50": pca(log1p_cp10k(self.counts), 50), "HVG-2000": hvg_expression(self.counts, 2000)}


def fold_split(labels: np.ndarray):
    """The stratified folds every row of a file is probed on (fixed: seed 0)."""
    from sklearn.model_selection import StratifiedKFold

    return StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(np.zeros(len(labels)), labels)


def model_csr(model, data: EvalFile):
    """The file's cells over the model's vocabulary tokens, and the gene coverage report."""
    from pretrain.embed import gene_tokens, token_csr

    tokens, report = gene_tokens(data.var, model.vocab, data.name)
    csr = token_csr(data.counts, tokens, model.config.vocab_size)
    report["count_fraction"] = float(csr[2].sum() / max(data.counts.sum(), 1))
    return csr, report


def embed_cells(model, csr, cap: str) -> np.ndarray:
    from pretrain.embed import embed_counts

    return embed_counts(model, *csr, token_budget=16384, seed=0, cap=cap)


def model_input_pca(model, csr, cap: str) -> np.ndarray:
    """PCA-50 of log1p-CP10k over what the model sees (`pretrain.embed.model_input`: its vocabulary
    genes, its cap as the embedding draws it), each cell's total over all its genes."""
    import scipy.sparse as sp

    from pretrain.downstream.expression import pca
    from pretrain.embed import model_input

    indptr, genes, counts, totals = csr
    shape = (len(indptr) - 1, model.config.vocab_size)
    values = np.log1p(np.asarray(counts, np.float64) / np.repeat(np.asarray(totals, np.float64), np.diff(indptr)) * 1e4)
    every = sp.csr_matrix((values, genes, indptr), shape=shape)
    seen, _ = model_input(model, *csr, cap=cap)
    return pca(every.multiply(sp.csr_matrix((np.ones(len(seen.genes)), seen.genes, seen.indptr), shape=shape)), 50)


def masked_modelling(model, csr, cap: str, seed: int = 0) -> dict:
    """The masked-expression head on held-out cells, masked as in training (ratio 0.15, 80 % mask /
    10 % random / 10 % kept): accuracy of the predicted bin, its ceiling under random quantile ties
    (the mean of 1/span: a tied gene's bin is a uniform draw over its span), the most frequent bin's
    accuracy, and the mean masked loss (cross-entropy over bins, or squared error)."""
    import torch

    from data_pipeline.loading.masking import Masking, mask_for_mode
    from data_pipeline.loading.normalize import quantile_tie_spans
    from pretrain.embed import embedding_normalization, length_batches, model_input
    from pretrain.objectives import mlm_loss_sum

    rng = np.random.default_rng(seed)
    norm = embedding_normalization(model, cap)
    if norm.max_genes is not None and norm.cap == "random":
        raise ValueError("masked modelling needs a deterministic cap (none or top)")
    normalized, _ = model_input(model, *csr, cap=cap)  # the cells as the embedding sees them
    _, values, mlm, targets = mask_for_mode(Masking(ratio=0.15), norm.mode, norm.n_bins, normalized.indptr,
                                            normalized.genes, normalized.values, model.config.mask_token,
                                            model.gene_range, rng)
    cost = model.config.token_cost(norm.max_genes)
    right = total = 0
    loss = 0.0
    with torch.inference_mode():
        for _, batch in length_batches(normalized.indptr, normalized.genes, values, 16384, cost, mlm, targets):
            head = model(batch).mlm
            loss += float(mlm_loss_sum(head, batch, model.config.mlm_regresses)[0])
            # a regressing head (model.bin_loss=mse, scGPT) predicts the bin index as a value: its nearest bin
            predicted = (head.round().clamp(0, model.config.n_bins - 1) if model.config.mlm_regresses
                         else head.argmax(-1))
            right += int((predicted == batch.mlm_targets[batch.mlm_mask].long()).sum())
            total += int(batch.mlm_mask.sum())
    masked = targets[mlm].astype(np.int64)
    out = {"masked_bin_accuracy": right / total, "masked_loss": loss / total,
           "majority_bin_accuracy": float(np.mean(masked == np.bincount(masked).argmax())), "masked_positions": total}
    if norm.mode == "quantile_bins" and norm.quantile_ties == "random":
        spans = quantile_tie_spans(norm, *csr).values
        out["accuracy_ceiling"] = float(np.mean(1.0 / spans[mlm]))
    return out


def label_subset(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified share of training ``rows``: per class round(fraction x its cells), at least one
    (a class without a cell could not be learned at all), ascending."""
    if fraction >= 1:
        return np.sort(rows)
    rng = np.random.default_rng(seed)
    keep = [rng.choice(rows[labels[rows] == c], max(1, round(fraction * int((labels[rows] == c).sum()))), replace=False)
            for c in np.unique(labels[rows])]
    return np.sort(np.concatenate(keep))


def fraction_probes(features: dict[str, np.ndarray], f: EvalFile, fractions: list[float]) -> dict[str, float]:
    """Logistic regression on each baseline's features trained on each label fraction of every fold's
    training cells (the subsets fine-tuning gets), macro-F1 on the fold's test cells, mean over
    folds.  -> {"<features> LR <fraction>": macro-F1}"""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    for name, x in features.items():
        for fraction in fractions:
            scores = []
            for k, (train, test) in enumerate(f.folds):
                rows = label_subset(train, f.labels, fraction, seed=k)
                clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[rows], f.labels[rows])
                scores.append(f1_score(f.labels[test], clf.predict(x[test]), average="macro"))
            out[f"{name} LR {fraction:g}"] = round(float(np.mean(scores)), 4)
    return out


def twin_bundle(bundle: Path, seed: int) -> Path:
    """A bundle of the random-init twin (the weights `pretrain.train` starts from), beside ``bundle``,
    so that it fine-tunes through the same path."""
    from pretrain.export import write_bundle

    folder = bundle.parent / f"{bundle.name}-random-init"
    if not (folder / "model.safetensors").exists():
        twin = random_init_twin(bundle, seed)
        write_bundle(folder, twin.state_dict(), twin.config, (bundle / "vocab.tsv").read_bytes(), twin.normalization,
                     f"# Random-init twin\n\nThe initial weights (seed {seed}) of the run that trained {bundle}.\n")
    return folder


def finetune_rows(modes: list[str], fractions: list[float], full_fractions: list[float]) -> list[tuple[str, float]]:
    """The fine-tuned rows a call computes: (mode, share of labels), full fine-tuning at its own shares
    (``--full-fractions``: it costs the encoder's backward pass on every training cell)."""
    return [(mode, x) for mode in modes for x in (full_fractions if mode == "full" else fractions)]


# the `FinetuneConfig` keys that shape every fold's training, recorded with the result (``--finetune-set``)
RECIPE_KEYS = ("batch_size", "lr", "encoder_lr_scale", "weight_decay", "hidden", "dropout", "class_weights",
               "standardize")


def finetune_recipe(sets: list[str]) -> dict:
    """The fine-tuning settings of every fold's run: `FinetuneConfig`'s defaults of `RECIPE_KEYS`,
    ``sets`` (``key=value``, values read as YAML) over them. Exits naming the keys on a bad one."""
    import yaml

    from pretrain.config import FinetuneConfig, from_dict

    given = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or key.strip() not in RECIPE_KEYS:
            sys.exit(f"--finetune-set {item!r}: write key=value with a key of {', '.join(RECIPE_KEYS)}")
        given[key.strip()] = yaml.safe_load(text)
    try:
        config = from_dict(FinetuneConfig, given)
    except ValueError as e:
        sys.exit(f"--finetune-set: {e}")
    return {k: getattr(config, k) for k in RECIPE_KEYS}


def recipe_folder(recipe: dict, epochs: int) -> str:
    """The fine-tuning runs' folder of a recipe and number of epochs in a pretraining run's folder: a
    fold's run resumes only under the settings it was trained with, and one of more epochs would
    give its best epoch to a call asking for fewer."""
    text = json.dumps({**recipe, "epochs": epochs}, sort_keys=True)
    return "finetune-" + hashlib.sha256(text.encode()).hexdigest()[:10]


def release_freed_memory() -> None:
    """Hand back to the OS the heap glibc keeps after a fold's run. Fold after fold in one process,
    an evaluation's resident set otherwise grew from 9 to 12 GB in 1.5 hours (and one beside another
    was killed for memory). It is the allocator holding freed blocks, not a leak: a trim after each
    fold brought a process back to 0.78 GB every time, from 1.60-1.79 GB (full fine-tuning on
    mudan_zheng_sorted_ref, 5 folds)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def finetuned(bundle: Path, f: EvalFile, csr, embedding: np.ndarray, rows_wanted: list[tuple[str, float]],
              how: dict[str, dict], work: dict[str, Path]) -> dict[str, float]:
    """Fine-tuned cell-type macro-F1 (`pretrain.downstream.finetune`, the path `launch/finetune.py`
    runs) over the file's fixed folds, per (mode, share of each fold's training labels) of
    ``rows_wanted``: trained on that share with ``how[mode]`` (`mode_settings`: the recipe and the
    epochs), the epoch kept by training macro-F1 (the fold's test cells are never seen before the
    final prediction), scored on the test cells. Each fold's run resumes from its folder under
    ``work[mode]``. ``embedding``: the bundle's embedding of the file's cells, which head mode trains
    on (what it would compute itself).
    -> {"finetuned <mode> <fraction>": macro-F1 mean over folds}"""
    from sklearn.metrics import f1_score

    from pretrain.config import FinetuneConfig
    from pretrain.downstream.finetune import (
        class_probabilities,
        finetune_split,
        load_finetuned,
        make_split,
        predict_cells,
    )
    from pretrain.downstream.token_cells import TokenCells
    from pretrain.export import load_pretrained

    cells = TokenCells(*csr, obs_names=np.arange(len(f.labels)).astype(str), labels=f.labels, coverage=[])
    out = {}
    for mode, fraction in rows_wanted:
        scores = []
        for k, (train, test) in enumerate(f.folds):
            rows = label_subset(train, f.labels, fraction, seed=k)
            split = make_split(cells.subset(rows), cells.subset(rows), "the training cells (the fold's test "
                               "cells unseen until the final prediction)")
            folder = work[mode] / f"{mode}-{fraction:g}-fold{k}"
            config = FinetuneConfig(label_column=f.label_key, mode=mode, epochs=how[mode]["epochs"], patience=0,
                                    seed=k, **how[mode]["recipe"])
            given = (embedding[rows], embedding[rows]) if mode == "head" else None
            finetune_split(bundle, load_pretrained(bundle), split, folder, config, embeddings=given, plot=False)
            model, head, labels = load_finetuned(folder / "bundle")
            if mode == "head":  # the frozen encoder's embedding of the test cells, as predict_cells computes it
                probs = class_probabilities(head, embedding[test])
            else:
                probs = predict_cells(model, head, cells.subset(test))
            predicted = np.asarray(labels["classes"], dtype=object)[probs.argmax(axis=1)]
            scores.append(f1_score(f.labels[test], predicted, average="macro"))
            del model, head, probs
            release_freed_memory()
        out[f"finetuned {mode} {fraction:g}"] = round(float(np.mean(scores)), 4)
    return out


def step_finetuned(run: Path, bundle: Path, seed: int, step: int, f: EvalFile, csr, embedding: np.ndarray,
                   rows_wanted: list[tuple[str, float]], how: dict[str, dict]) -> dict[str, float]:
    """`finetuned` for one curve step of ``run`` on one file: step 0 fine-tunes the random-init twin of
    ``bundle`` (the last step's), each step, recipe and number of epochs in its own folder of the run."""
    tuned = twin_bundle(bundle, seed) if step == 0 else bundle
    work = {mode: run / recipe_folder(h["recipe"], h["epochs"]) / f"step{step}" / f.name for mode, h in how.items()}
    return finetuned(tuned, f, csr, embedding, rows_wanted, how, work)


def mode_settings(finetune: dict) -> dict[str, dict]:
    """What each fine-tuning mode of a call's ``settings["finetune"]`` trains with: {mode: {"recipe",
    "epochs"}} (full fine-tuning for ``full_epochs`` where given; a result written before recipes were
    recorded: `UNRECORDED_RECIPE`)."""
    recipe = finetune.get("recipe", UNRECORDED_RECIPE)
    return {mode: {"recipe": recipe, "epochs": finetune.get("full_epochs", finetune["epochs"]) if mode == "full"
                   else finetune["epochs"]} for mode in finetune["modes"]}


def clustered(f: EvalFile, embedding: np.ndarray, vae_steps: int, epochs: int, seed: int) -> dict[str, float]:
    """ARI and NMI of the scHybridBERT pipeline (`pretrain.downstream.hybrid`, the path of
    `launch/cluster_cells.py`) on the file's cells and this embedding, beside the same run's PCA-50
    and k-means on the embedding alone; k-means with k = the file's number of labels everywhere.
    -> {"cluster <method> ari" / "... nmi": score}"""
    from dataclasses import replace

    from pretrain.downstream.hybrid import HybridConfig, cluster_with_baselines

    base = HybridConfig(seed=seed, epochs=epochs)
    config = replace(base, vae=replace(base.vae, steps=vae_steps))
    report, _ = cluster_with_baselines(f.counts, embedding, f.labels, len(set(f.labels)), config=config)
    return {f"cluster {name} {key}": round(float(m[key]), 4) for name, m in report["methods"].items()
            for key in ("ari", "nmi")}


def clustering_baseline(f: EvalFile) -> dict[str, dict]:
    """What a user gets without a model: scanpy's default clustering (communities of the PCA-50 kNN
    graph of the HVG log1p-CP10k, resolution 1; Leiden where leidenalg is installed), which picks its
    own number of clusters, on the same expression as `clustered`'s PCA-50 row with k given.
    -> {"PCA-50 communities": {"clustering": how, "ari", "nmi", "n_clusters"}}"""
    from pretrain.downstream.clustering import scores
    from pretrain.downstream.expression import hvg_expression
    from pretrain.downstream.hybrid import HybridConfig, expression_clusters

    predicted, how = expression_clusters(hvg_expression(f.counts, HybridConfig().n_top_genes))
    found = scores(f.labels, predicted)
    return {"PCA-50 communities": {"clustering": how, "ari": round(found["ari"], 4), "nmi": round(found["nmi"], 4),
                                   "n_clusters": found["n_clusters"]}}


def probe(x: np.ndarray, labels: np.ndarray, folds: list) -> dict:
    """Cell-type macro-F1 over the file's fixed folds: kNN (k=10) and logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = {"knn": [], "logreg": []}
    for train, test in folds:
        models = {"knn": KNeighborsClassifier(K),
                  "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))}
        for name, clf in models.items():
            clf.fit(x[train], labels[train])
            scores[name].append(f1_score(labels[test], clf.predict(x[test]), average="macro"))
    return {f"{name}_macro_f1": round(float(np.mean(v)), 4) for name, v in scores.items()}


def random_init_twin(bundle: Path, seed: int):
    """The bundle's model with the weights its training run started from (`CellModel.initial`, as
    `pretrain.train` builds it), with its normalization and vocabulary."""
    from pretrain.export import load_pretrained
    from pretrain.model import CellModel

    model = load_pretrained(bundle)
    model.load_state_dict(CellModel.initial(model.config, seed).state_dict())
    return model.eval()


def spread(values: list[float]) -> dict:
    """Mean and range over seeds."""
    return {"mean": round(float(np.mean(values)), 4), "min": round(float(np.min(values)), 4),
            "max": round(float(np.max(values)), 4), "n": len(values)}


def reusable_runs(path: Path, phase: str, settings: dict, baselines: dict) -> dict:
    """The runs of an earlier result (``--reuse``) that this call would compute again: same phase and
    settings (all but the seeds, the reuse record and the fine-tuning modes, of which it must hold at
    least this call's), same overrides per mix and seed. Their embeddings are not kept: a model's panel in
    the t-SNE figure is the first seed this call has embeddings of, none where every seed is taken. Fills ``baselines`` with its PCA of the model
    input (computed from a model otherwise) and widens ``settings``' fine-tuning modes to the taken
    runs'. Exits naming what differs when the settings do.
    -> {mix: {seed: run entry, with "reused": where it came from}}"""
    old = json.loads(Path(path).read_text())
    theirs, ours = old.get("settings", {}), settings
    differ = sorted(k for k in set(theirs) | set(ours) if k not in REUSE_FREE and theirs.get(k) != ours.get(k))
    ft_old, ft_new = theirs.get("finetune") or {}, ours.get("finetune") or {}
    if {k: v for k, v in ft_old.items() if k != "modes"} != {k: v for k, v in ft_new.items() if k != "modes"} \
            or not set(ft_new.get("modes", [])) <= set(ft_old.get("modes", [])):
        differ.append("finetune")
    if old.get("phase") != phase:
        differ.append("phase")
    if differ:
        sys.exit(f"--reuse {path}: its runs were made with other settings ({', '.join(differ)} differ): run with the "
                 "same settings, or drop --reuse to compute everything")
    for name, rows in old.get("baselines", {}).items():
        if name in baselines and "PCA-50 (model input)" in rows:
            baselines[name].setdefault("PCA-50 (model input)", rows["PCA-50 (model input)"])
    # the modes of the runs taken (a reused run keeps its rows of modes this call does not compute)
    settings["finetune"]["modes"] = [m for m in ("head", "full") if m in ft_new["modes"] + ft_old["modes"]]
    origin = {"file": Path(path).name, "date": old["date"], "command": old["command"]}
    return {mix: {seed: {**entry, "reused": entry.get("reused", origin)} for seed, entry in per_seed.items()}
            for mix, per_seed in old.get("runs", {}).items()}


def evaluation_key(settings: dict, files: list[str]) -> str:
    """What a run's saved evaluation depends on besides its run folder (which names its training):
    the settings but the seeds (the fine-tuning modes as this call computes them) and the files."""
    kept = {k: v for k, v in settings.items() if k != "seeds"}
    return hashlib.sha256(json.dumps([kept, sorted(files)], sort_keys=True).encode()).hexdigest()[:16]


def saved_evaluation(path: Path, key: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """A run's evaluation written by `save_evaluation` for the same ``key``, with its arrays (the
    figure's embeddings): a killed final phase resumes after its last evaluated seed. None when
    there is none, or it was computed for other settings."""
    if not (path.exists() and path.with_suffix(".npz").exists()):
        return None
    saved = json.loads(path.read_text())
    return (saved, saved_arrays(path)) if saved.get("key") == key else None


def saved_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays saved beside a run's evaluation ``path``."""
    with np.load(path.with_suffix(".npz")) as z:
        return {name: z[name] for name in z.files}


def save_evaluation(path: Path, settings: dict, files: list[str], record: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write one run's evaluation beside it (arrays first, each file whole or not at all), under
    `evaluation_key` of ``settings`` and ``files``, with both (the settings but the seeds): what a
    later call with other fine-tuning settings needs to tell which rows still hold."""
    from data_pipeline.conversion.fsio import atomic_write_json, atomic_write_with

    atomic_write_with(path.with_suffix(".npz"), lambda fh: np.savez(fh, **arrays), durable=False)
    # a record read back holds the key and settings it was saved under: these replace them
    atomic_write_json(path, {**record, "key": evaluation_key(settings, files),
                             "settings": {k: v for k, v in settings.items() if k != "seeds"}, "files": sorted(files)})


# the fine-tuning recipe of the evaluations saved before their settings recorded one (FinetuneConfig's
# defaults then: the head fed the embedding unscaled)
UNRECORDED_RECIPE = {"batch_size": 32, "lr": 1e-3, "encoder_lr_scale": 0.1, "weight_decay": 0.01, "hidden": [512, 128],
                     "dropout": 0.1, "class_weights": True, "standardize": False}


def narrower_evaluation(path: Path, settings: dict, files: list[str]) -> tuple[dict, dict[str, np.ndarray]] | None:
    """A run's saved evaluation from before evaluations kept their settings (a key only) for these
    settings but fewer fine-tuned rows (fewer modes, or full fine-tuning at fewer label shares), or
    with fine-tuned rows of the recipe of before recipes were recorded (`UNRECORDED_RECIPE`), with
    ``finetuned_with`` set to what its rows were trained with. None when there is none."""
    from itertools import chain, combinations

    ft = settings["finetune"]
    full = ft.get("full_fractions", ft["fractions"])
    exact = evaluation_key(settings, files)
    for recorded in (True, False):
        for modes in chain.from_iterable(combinations(ft["modes"], k) for k in range(len(ft["modes"]) + 1)):
            shares = ([list(c) for k in range(1, len(full) + 1) for c in combinations(full, k)] if "full" in modes
                      else [None])
            for share in shares:
                narrower = {k: v for k, v in ft.items() if k != "full_fractions" and (recorded or k != "recipe")}
                narrower["modes"] = list(modes)
                if share is not None and share != ft["fractions"]:
                    narrower["full_fractions"] = share
                key = evaluation_key({**settings, "finetune": narrower}, files)
                if key == exact or (saved := saved_evaluation(path, key)) is None:
                    continue
                saved[0]["finetuned_with"] = mode_settings(narrower)  # without "recipe": the unrecorded one
                return saved
    return None


def drop_finetuned(record: dict, mode: str) -> None:
    """Remove a saved evaluation's fine-tuned rows of ``mode``, and their record in ``finetuned_with``."""
    for rows in (r for per_step in record["entry"]["steps"].values() for r in per_step.values()):
        for name in [n for n in rows if n.startswith(f"finetuned {mode} ")]:
            del rows[name]
    record["finetuned_with"].pop(mode, None)


def reusable_evaluation(path: Path, settings: dict, files: list[str]) -> tuple[dict, dict[str, np.ndarray]] | None:
    """A run's saved evaluation this call can take: saved with its settings, which equal this call's
    but for fine-tuning, for the same files; or saved before settings were kept (a key only) for
    these settings or by `narrower_evaluation`'s rules. Its fine-tuned rows of a mode this call
    trains otherwise (another recipe or number of epochs: ``finetuned_with``, `mode_settings`) are
    dropped; rows of modes or shares this call does not ask for stay in it (`result_entry` leaves
    them out of the result). `extend_finetuning` then adds the rows it lacks. None when there is none."""
    if not (path.exists() and path.with_suffix(".npz").exists()):
        return None
    saved = json.loads(path.read_text())
    if "settings" in saved:
        ours = {k: v for k, v in settings.items() if k not in ("seeds", "finetune")}
        if saved["files"] != sorted(files) or {k: v for k, v in saved["settings"].items() if k != "finetune"} != ours:
            return None
        saved.setdefault("finetuned_with", mode_settings(saved["settings"]["finetune"]))
        found = saved, saved_arrays(path)
    elif saved.get("key") == evaluation_key(settings, files):
        found = {**saved, "finetuned_with": mode_settings(settings["finetune"])}, saved_arrays(path)
    elif (found := narrower_evaluation(path, settings, files)) is None:
        return None
    want = mode_settings(settings["finetune"])
    for mode, made in list(found[0]["finetuned_with"].items()):
        if mode in want and made != want[mode]:
            drop_finetuned(found[0], mode)
    return found


def result_entry(entry: dict, rows_wanted: list[tuple[str, float]]) -> dict:
    """A run's saved entry as this call reports it: the fine-tuned rows it asked for, no others."""
    keep = {f"finetuned {mode} {x:g}" for mode, x in rows_wanted}
    steps = {step: {name: {k: v for k, v in rows.items() if not k.startswith("finetuned ") or k in keep}
                    for name, rows in per_step.items()} for step, per_step in entry["steps"].items()}
    return {**entry, "steps": steps}


def extend_finetuning(saved: tuple[dict, dict[str, np.ndarray]], path: Path, settings: dict, run: Path, mix: str, seed: int,
                      last: int, files: dict, csrs: dict, rows_wanted: list[tuple[str, float]],
                      twin: bool) -> bool:
    """Add the fine-tuned rows of ``rows_wanted`` that a saved evaluation (`reusable_evaluation`)
    lacks: the last curve step's and, with ``twin``, the random-init twin's, each from the embedding
    saved with it, trained as ``settings`` say; saved again for ``settings`` (this call's) when any
    was added. -> whether any was"""
    from pretrain.export import load_pretrained

    record, arrays = saved
    entry = record["entry"]
    began = time.perf_counter()
    bundle = checkpoint_bundle(run, last)
    how = mode_settings(settings["finetune"])
    added = False
    for step in ([0] if twin else []) + [last]:
        panel = "random init" if step == 0 else mix
        for name, f in files.items():
            rows = entry["steps"][str(step)][name]
            missing = [(mode, x) for mode, x in rows_wanted if f"finetuned {mode} {x:g}" not in rows]
            if not missing:
                continue
            if name not in csrs:
                csrs[name] = model_csr(load_pretrained(bundle), f)[0]
            rows.update(step_finetuned(run, bundle, seed, step, f, csrs[name], arrays[f"{panel}/{name}"], missing,
                                       how))
            record["finetuned_with"].update({mode: how[mode] for mode, _ in missing})
            added = True
    if added:
        spent = entry.setdefault("evaluation_seconds", {})
        spent["finetune"] = round(spent.get("finetune", 0.0) + time.perf_counter() - began, 1)
        save_evaluation(path, settings, list(files), record, arrays)
    return added


@contextmanager
def timed(spent: dict, part: str):
    """Add the seconds the block takes to ``spent[part]``."""
    began = time.perf_counter()
    try:
        yield
    finally:
        spent[part] += time.perf_counter() - began


def summarize(runs: dict) -> dict:
    """runs[mix][seed][step][file][metric] -> summary[mix][step][file][metric] = `spread` over seeds."""
    out = {}
    for mix, seeds in runs.items():
        steps = sorted({int(step) for per_seed in seeds.values() for step in per_seed["steps"]})
        out[mix] = {}
        for step in steps:
            rows = [per_seed["steps"][str(step)] for per_seed in seeds.values() if str(step) in per_seed["steps"]]
            out[mix][str(step)] = {name: {metric: spread([row[name][metric] for row in rows])
                                          for metric in rows[0][name] if isinstance(rows[0][name][metric], float)}
                                   for name in rows[0]}
    return out


def verdicts(summary: dict, baselines: dict, last: int, previous: dict | None) -> dict:
    """The goals per mix and file, met or not: the pretrained model beats its random-init twin (kNN,
    logistic regression, masked loss, each fine-tuned row); how far kNN is from PCA-50; the share of
    the previous report's kNN gap to PCA-50 closed (goal: at least half); the best fine-tuned
    macro-F1 minus logistic regression on HVG-2000 at each label share (goals: >= 0 with every
    label, > 0 at 1 % and 10 %)."""
    out = {}
    for mix, steps in summary.items():
        final, twin = steps.get(str(last)), steps.get("0")
        if final is None or twin is None:
            continue
        out[mix] = {}
        for name, row in final.items():
            verdict = {f"{m}_beats_random_init": row[m]["mean"] > twin[name][m]["mean"]
                       for m in ("knn_macro_f1", "logreg_macro_f1")}
            verdict["masked_loss_below_random_init"] = row["masked_loss"]["mean"] < twin[name]["masked_loss"]["mean"]
            first_twin = next(iter(summary.values())).get("0", {}).get(name, {})  # the twin is fine-tuned once
            hvg = baselines[name].get("label fractions", {})
            tuned = {k: v["mean"] for k, v in row.items() if k.startswith("finetuned ")}
            for key, value in tuned.items():
                if key in first_twin:
                    verdict[f"{key}_beats_random_init"] = value > first_twin[key]["mean"]
            for key in ("cluster schybridbert ari", "cluster embedding_kmeans ari"):
                if key in row and key in first_twin:
                    verdict[f"{key}_beats_random_init"] = row[key]["mean"] > first_twin[key]["mean"]
            if "cluster schybridbert ari" in row:
                verdict["cluster_schybridbert_minus_pca50_ari"] = round(
                    row["cluster schybridbert ari"]["mean"] - row["cluster pca50 ari"]["mean"], 4)
            for fraction in sorted({k.rsplit(" ", 1)[1] for k in tuned}):
                best = max(v for k, v in tuned.items() if k.endswith(f" {fraction}"))
                baseline = hvg.get(f"HVG-2000 LR {fraction}")
                if baseline is not None:
                    verdict[f"finetuned_{fraction}_minus_hvg2000_lr"] = round(best - baseline, 4)
            pca = baselines[name]["PCA-50"]["knn_macro_f1"]
            verdict["knn_minus_pca50"] = round(row["knn_macro_f1"]["mean"] - pca, 4)
            before = (previous or {}).get(name)
            if before is not None and pca > before:
                verdict["previous_knn"] = before
                verdict["share_of_previous_gap_closed"] = round((row["knn_macro_f1"]["mean"] - before) / (pca - before), 3)
            out[mix][name] = verdict
    every = [v for rows in out.values() for row in rows.values() for k, v in row.items() if k.endswith("random_init")]
    out["all_beat_random_init"] = bool(every) and all(every)
    return out


def previous_knn() -> dict | None:
    """Per evaluation file, the best mix's kNN macro-F1 in the report before issue 23 (None without it)."""
    if not PREVIOUS.exists():
        return None
    old = json.loads(PREVIOUS.read_text())
    best = {}
    for entry in old.get("mixes", {}).values():
        for name, scores in entry["files"].items():
            best[name] = max(best.get(name, 0.0), scores["knn_macro_f1"]["mean"])
    return best


def figure_panel(panels: dict, figure_seeds: dict, panel: str, name: str, embedding: np.ndarray, seed: int) -> None:
    """Keep ``embedding`` as the figure's ``panel`` of file ``name`` unless it has one: each model's
    panel is the first seed this call has embeddings of (``figure_seeds`` records which)."""
    if name not in panels.setdefault(panel, {}):
        panels[panel][name] = embedding
        figure_seeds.setdefault(panel, seed)


def plot(panels: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray], path: Path, seed: int = 0) -> None:
    """t-SNE of each representation (columns) of each evaluation file (rows), coloured by cell type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    files = list(labels)
    names = list(panels)
    fig, axes = plt.subplots(len(files), len(names), figsize=(3.2 * len(names), 3.2 * len(files)), squeeze=False)
    for i, name in enumerate(files):
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(labels[name]), min(3000, len(labels[name])), replace=False))
        classes = sorted(set(labels[name][rows]))
        colour = np.array([classes.index(c) for c in labels[name][rows]])
        for j, rep in enumerate(names):
            xy = TSNE(2, random_state=seed, init="pca").fit_transform(panels[rep][name][rows])
            ax = axes[i, j]
            ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap="tab10", s=2, linewidths=0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(rep, fontsize=9)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=("validation", "final"), default="validation",
                        help="validation: the validation half of cider_baron_pancreas350, where recipes are chosen "
                             "(default); final: the three held-out evaluation files, for the report only")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "data" / "eval",
                        help="corpus and runs (reused by a rerun: a finished run is not retrained)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per run (default 3000)")
    parser.add_argument("--curve", default="250,1000,3000",
                        help="steps evaluated along each run, besides 0 (the random-init twin); default 250,1000,3000")
    parser.add_argument("--seeds", default="0,1,2", help="pretraining seeds (run.seed), comma-separated (default 0,1,2)")
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated subset of {', '.join(MIXES)}")
    parser.add_argument("--cap", default="auto", help="genes of a long cell the model sees (launch/embed.py --cap; "
                                                      "default auto: all of them for FAVOR+)")
    parser.add_argument("--finetune", default="head,full",
                        help="fine-tuning modes evaluated at the last curve step and on the random-init twin "
                             "(comma-separated: head, full; empty: none; default head,full)")
    parser.add_argument("--fractions", default="0.01,0.1,1",
                        help="shares of each fold's training labels fine-tuning and the baselines' logistic "
                             "regression get (default 0.01,0.1,1)")
    parser.add_argument("--full-fractions",
                        help="the shares full fine-tuning gets, a subset of --fractions (default: all of them); on "
                             "CPU, where it trains the encoder on every training cell, 0.01,0.1 keeps it to hours")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    parser.add_argument("--full-epochs", type=int,
                        help="full fine-tuning's epochs where they differ from --finetune-epochs (head fine-tuning "
                             "is cheap, full fine-tuning costs the encoder's backward pass per epoch)")
    parser.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a fine-tuning setting other than its default, one of {', '.join(RECIPE_KEYS)} "
                             "(repeatable; e.g. standardize=false)")
    parser.add_argument("--cluster", action=argparse.BooleanOptionalAction, default=True,
                        help="scHybridBERT clustering (ARI / NMI) at the last curve step and on the random-init twin, "
                             "beside PCA-50 and k-means on the embedding (default on)")
    parser.add_argument("--cluster-vae-steps", type=int, default=1500, help="the cell graph's VAE steps (default 1500)")
    parser.add_argument("--cluster-epochs", type=int, default=300, help="the fusion's training steps (default 300)")
    parser.add_argument("--max-cells", type=int, default=2000,
                        help="evaluate a random subset of at most this many labeled cells per file (default 2000; "
                             "0: all)")
    parser.add_argument("--reuse", type=Path,
                        help="an earlier result JSON (e.g. benchmarks/results/eval_validation.json) whose runs of the "
                             "same settings and overrides are taken as they are, not trained and evaluated again; "
                             "its runs not asked for here are dropped")
    parser.add_argument("--result", type=Path, help="default benchmarks/results/eval_<phase>.json")
    parser.add_argument("--plot", type=Path, help="default benchmarks/results/eval_<phase>.png")
    parser.add_argument("overrides", nargs="*", help="extra pretraining overrides, key.sub=value")
    args = parser.parse_args()
    if not SHARED_H5AD.is_dir():
        sys.exit(f"{SHARED_H5AD} is not here: this evaluation needs the real data folder beside the checkout")
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = sorted(set(mixes) - set(MIXES))
    if unknown:
        sys.exit(f"--mixes: unknown {', '.join(unknown)}; choose from {', '.join(MIXES)}")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    asked = {m.strip() for m in args.finetune.split(",") if m.strip()}
    modes = [m for m in ("head", "full") if m in asked]
    fractions = sorted({float(x) for x in args.fractions.split(",") if x.strip()})
    full_fractions = (fractions if args.full_fractions is None
                      else sorted({float(x) for x in args.full_fractions.split(",") if x.strip()}))
    if asked - {"head", "full"} or not all(0 < x <= 1 for x in fractions):
        sys.exit("--finetune takes head and/or full; --fractions shares in (0, 1]")
    if not full_fractions or not set(full_fractions) <= set(fractions):
        sys.exit(f"--full-fractions: give a subset of --fractions ({','.join(f'{x:g}' for x in fractions)}), whose "
                 "baselines it is compared with")
    wanted = finetune_rows(modes, fractions, full_fractions)
    recipe = finetune_recipe(args.finetune_set)
    curve = sorted({int(x) for x in args.curve.split(",") if x.strip()} | {args.steps})
    if curve[0] <= 0 or curve[-1] > args.steps:
        sys.exit(f"--curve: steps must lie in 1..--steps ({args.steps})")
    result_path = args.result or RESULTS / f"eval_{args.phase}.json"
    plot_path = args.plot or RESULTS / f"eval_{args.phase}.png"
    from pretrain.export import load_pretrained

    started = time.perf_counter()
    corpus = build_corpus(args.work)
    made = Corpus(corpus)
    paths = ({"cider_validation_half": split_validation(args.work)[1]} if args.phase == "validation"
             else {name: SHARED_H5AD / f"{name}.h5ad" for name in EVAL_FILES})
    keys = VALIDATION if args.phase == "validation" else EVAL_FILES
    files = {name: EvalFile(path, keys[name], args.max_cells) for name, path in paths.items()}
    labels = {name: f.labels for name, f in files.items()}
    panels: dict[str, dict[str, np.ndarray]] = {}
    figure_seeds: dict[str, int] = {}  # the pretraining seed each model's panel shows (a reused run has no embeddings)
    baselines: dict[str, dict] = {name: {} for name in files}
    for name, f in files.items():
        features = f.baselines()
        for rep, x in features.items():
            panels.setdefault(rep, {})[name] = x
            baselines[name][rep] = probe(x, f.labels, f.folds)
        baselines[name]["label fractions"] = fraction_probes(features, f, fractions)
        if args.cluster:
            baselines[name]["clustering"] = clustering_baseline(f)
        print(f"baselines {name}: {json.dumps(baselines[name])}", file=sys.stderr)
    settings = {
        "steps": args.steps, "curve": curve, "seeds": seeds, "cap": args.cap,
        "cluster": {"vae_steps": args.cluster_vae_steps, "epochs": args.cluster_epochs,
                    "how": "pretrain.downstream.hybrid.cluster_with_baselines; k-means with k = the file's number "
                           "of labels for scHybridBERT, PCA-50 and the embedding alone"} if args.cluster else None,
        "finetune": {"modes": modes, "fractions": fractions, "epochs": args.finetune_epochs, "recipe": recipe,
                     "how": "pretrain.downstream.finetune on each fold's training cells (a stratified share, at least "
                            "one cell per class), the epoch kept by training macro-F1, argmax predictions on the "
                            "fold's test cells; the baselines' logistic regression on the same shares"}
                    | ({"full_fractions": full_fractions} if "full" in modes and full_fractions != fractions else {})
                    | ({"full_epochs": args.full_epochs} if "full" in modes and args.full_epochs is not None
                       and args.full_epochs != args.finetune_epochs else {}),
        "config": str(CONFIG.relative_to(REPO)), "config_text": CONFIG.read_text(), "overrides": args.overrides,
        "probe": f"{FOLDS}-fold stratified CV (folds fixed per file, seed 0, shared by every row); kNN k={K} "
                 "Euclidean; logistic regression (lbfgs, max_iter 2000) on standardized features; macro-F1",
        "baselines": {"PCA-50": "log1p(CP10k) over all the file's genes, centred, 50 components",
                      "PCA-50 (model input)": "the same over the model's vocabulary genes and cap",
                      "HVG-2000": "log1p(CP10k) of the 2,000 highly variable genes (scanpy seurat flavour)"},
        "random_init": "step 0: the trained model's architecture and seed at initialization",
        "max_cells": args.max_cells}
    keyed = json.loads(json.dumps(settings))  # before --reuse widens the modes to the taken runs'
    reused = reusable_runs(args.reuse, args.phase, settings, baselines) if args.reuse else {}
    runs: dict = {}
    coverage, csrs = {}, {}
    for mix in mixes:
        runs[mix] = {}
        for seed in seeds:
            extra = [*args.overrides, f"run.seed={seed}"]
            earlier = reused.get(mix, {}).get(str(seed))
            if earlier is not None and earlier["train"]["overrides"] == MIXES[mix] + extra:
                runs[mix][str(seed)] = earlier
                print(f"{mix} seed {seed}: taken from {earlier['reused']['file']} of {earlier['reused']['date']}",
                      file=sys.stderr)
                continue
            run = args.work / "runs" / run_name(mix, args.steps, seed, extra)
            saved_path = run / f"evaluation-{args.phase}.json"
            saved = reusable_evaluation(saved_path, keyed, list(files))
            if saved is not None and extend_finetuning(saved, saved_path, keyed, run, mix, seed, curve[-1], files, csrs,
                                                       wanted, twin=mix == mixes[0]):
                print(f"{mix} seed {seed}: fine-tuned rows added to its saved evaluation", file=sys.stderr)
            elif saved is not None and "settings" not in saved[0]:  # saved under a key only: kept with them now
                save_evaluation(saved_path, keyed, list(files), *saved)
            if saved is not None:
                record, arrays = saved
                runs[mix][str(seed)] = result_entry(record["entry"], wanted)
                for name in files:
                    coverage.setdefault(name, record["coverage"][name])
                    baselines[name].setdefault("PCA-50 (model input)", record["model_input_pca"][name])
                    if f"model input/{name}" in arrays:
                        panels.setdefault("PCA-50 (model input)", {}).setdefault(name, arrays[f"model input/{name}"])
                    for panel in ("random init", mix) if mix == mixes[0] else (mix,):
                        figure_panel(panels, figure_seeds, panel, name, arrays[f"{panel}/{name}"], seed)
                print(f"{mix} seed {seed}: evaluated before ({saved_path})", file=sys.stderr)
                continue
            arrays = {}
            train = pretrain(corpus, run, mix, args.steps, curve, extra)
            # where the time goes (seconds per part, summed over steps and files): sizes a final phase
            spent = {"embed_probe_masked": 0.0, "cluster": 0.0, "finetune": 0.0}
            entry = runs[mix][str(seed)] = {"train": train, "steps": {}}
            for step in [0, *curve]:
                bundle = checkpoint_bundle(run, curve[-1] if step == 0 else step)
                model = random_init_twin(bundle, seed) if step == 0 else load_pretrained(bundle)
                rows = entry["steps"][str(step)] = {}
                for name, f in files.items():
                    if name not in csrs:  # every run shares the corpus vocabulary: its tokens once per file
                        csrs[name], coverage[name] = model_csr(model, f)
                    csr = csrs[name]
                    if "PCA-50 (model input)" not in baselines[name]:
                        x = model_input_pca(model, csr, args.cap)
                        panels.setdefault("PCA-50 (model input)", {})[name] = x
                        baselines[name]["PCA-50 (model input)"] = probe(x, f.labels, f.folds)
                    with timed(spent, "embed_probe_masked"):
                        embedding = embed_cells(model, csr, args.cap)
                        rows[name] = {**probe(embedding, f.labels, f.folds), **masked_modelling(model, csr, args.cap)}
                    # the last curve step, and the random-init twin once per file
                    full_rows = step == curve[-1] or (step == 0 and mix == mixes[0])
                    if args.cluster and full_rows:
                        with timed(spent, "cluster"):
                            rows[name].update(clustered(f, embedding, args.cluster_vae_steps, args.cluster_epochs,
                                                        seed))
                    if modes and full_rows:
                        with timed(spent, "finetune"):
                            rows[name].update(step_finetuned(run, bundle, seed, step, f, csr, embedding, wanted,
                                                             mode_settings(keyed["finetune"])))
                    if step in (0, curve[-1]):
                        panel = "random init" if step == 0 else mix
                        arrays[f"{panel}/{name}"] = embedding
                        if step == curve[-1] or mix == mixes[0]:  # the report's random-init twin is the first mix's
                            figure_panel(panels, figure_seeds, panel, name, embedding, seed)
                    print(f"{mix} seed {seed} step {step} {name}: {rows[name]['knn_macro_f1']:.3f} knn, "
                          f"{rows[name]['masked_loss']:.3f} masked loss", file=sys.stderr)
            entry["evaluation_seconds"] = {part: round(sec, 1) for part, sec in spent.items()}
            for name, x in panels.get("PCA-50 (model input)", {}).items():  # for a rerun that starts here
                arrays.setdefault(f"model input/{name}", x)
            save_evaluation(saved_path, keyed, list(files), {"entry": entry, "coverage": coverage,
                                              "model_input_pca": {n: baselines[n]["PCA-50 (model input)"] for n in files},
                                              "finetuned_with": mode_settings(keyed["finetune"])}, arrays)
    summary = summarize(runs)
    record = result_record(
        "eval_embeddings", device=device_record(), versions=versions("torch", "sklearn", "deepspeed", "leidenalg"), phase=args.phase,
        settings=settings,
        corpus={"files": PRETRAIN_FILES + [f"{SPLIT_SOURCE} (pretraining half)"], "excluded": EXCLUDED,
                "cells": made.n_cells, "tokens": made.n_tokens, "vocab_genes": made.vocab.n_genes,
                "label_column": LABEL_COLUMN},
        files={name: {"label_key": f.label_key, "cells": len(f.labels), "classes": len(set(f.labels)),
                      "cells_unlabeled_or_rare_class": f.unlabeled_or_rare, "cells_not_sampled": f.not_sampled,
                      "gene_coverage": coverage.get(name)} for name, f in files.items()},
        baselines=baselines, summary=summary,
        verdicts=verdicts(summary, baselines, curve[-1], previous_knn() if args.phase == "final" else None),
        runs=runs, figure_seeds=figure_seeds, seconds=round(time.perf_counter() - started, 1))
    write_result(result_path, record)
    plot(panels, labels, plot_path)
    print(json.dumps(record["verdicts"], indent=1))


if __name__ == "__main__":
    main()

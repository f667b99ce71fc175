"""Does pretraining learn anything? Cell-type probes of the embeddings on held-out real files.

    python benchmarks/eval_embeddings.py                 # ~70 min on 2 CPU cores (3 mixes x 250 steps)
    python benchmarks/eval_embeddings.py --steps 20 --mixes mlm --result /tmp/eval.json   # a try-out
    python benchmarks/eval_embeddings.py --result benchmarks/results/eval_high_ties.json \
        --plot benchmarks/results/eval_embeddings_high_ties.png data.quantile_ties=high  # the other tie rule

Needs the real data beside the checkout (``../shared/data/h5ad``); exits with a message when it is
absent. What it does:

1. Converts the unlabeled real files (PBMC, tumour, pancreas; `PRETRAIN_FILES`) into one corpus.
   Files that share cells with an evaluation file (`EXCLUDED`) stay out.
2. Pretrains `benchmarks/configs/eval.yaml` once per objective mix (`MIXES`: masked bins alone;
   + InfoNCE between two views; + the cell-type head on the corpus's one labeled file), the same
   steps and token budget each, through `launch/pretrain.py`, and exports each run.
3. Embeds every evaluation file (`EVAL_FILES`, never seen in pretraining) with each pretrained
   model and with the same model at its initialization (the "random-init twin": the trainer's
   seed gives the same initial encoder for every mix), next to PCA-50 of log1p-CP10k.
4. Probes each representation for cell type with 5-fold stratified cross-validation: kNN
   (k = 10, Euclidean) and logistic regression (standardized features), macro-F1 per fold.
5. Masked-bin accuracy of the masked-expression head (15 % of each cell's genes masked as in
   training) against always predicting the file's most frequent masked bin.

Writes ``benchmarks/results/eval.json`` and a t-SNE figure (``eval_embeddings.png``): PCA, the
random-init twin and each mix, coloured by cell type.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import NO_GENE_IDS, RESULTS, SHARED_H5AD, device_record, result_record, versions, write_result  # noqa: E402

from data_pipeline.corpus import Corpus  # noqa: E402

CONFIG = REPO / "benchmarks" / "configs" / "eval.yaml"
PRETRAIN_FILES = ["mudan_pbmcA", "asurat_pbmc4k_subset", "pisces_pbmc1k", "celltypist_sample559", "copykat_tumor302",
                  "cider_baron_pancreas350"]
EXCLUDED = {"harmony_kang_ctrl_stim": "shares cells with muscat_kang_se (an evaluation file)",
            NO_GENE_IDS.removesuffix(".h5ad"): "no gene identifiers",
            "mudan_zheng_sorted_ref": "evaluation file", "scminer_pbmc14k_derived": "evaluation file",
            "muscat_kang_se": "evaluation file"}
EVAL_FILES = {"mudan_zheng_sorted_ref": "cell_type", "scminer_pbmc14k_derived": "cell_type", "muscat_kang_se": "cluster_id"}
LABEL_COLUMN = "cell_type"  # in the corpus only cider_baron_pancreas350 has it (5 pancreas types)
MIXES = {
    "mlm": ["objectives.contrastive_weight=0", "objectives.label_weight=0", "data.views=false"],
    "mlm+contrastive": ["objectives.contrastive_weight=0.5", "objectives.label_weight=0", "data.views=true"],
    "mlm+contrastive+label": ["objectives.contrastive_weight=0.5", "objectives.label_weight=0.5", "data.views=true"],
}
FOLDS, K = 5, 10


def build_corpus(work: Path) -> Path:
    """The pretraining corpus (converted once; a rerun reuses it)."""
    from data_pipeline.conversion.convert import convert
    from data_pipeline.conversion.plan import ConvertOptions

    corpus = work / "corpus"
    if not Corpus.is_finished(corpus):
        inputs = [str(SHARED_H5AD / f"{name}.h5ad") for name in PRETRAIN_FILES]
        convert(corpus, ConvertOptions(inputs, label_columns=[LABEL_COLUMN]), workers=2, progress=False)
    return corpus


def pretrain(corpus: Path, run: Path, mix: str, steps: int, extra: list[str]) -> dict:
    """Train one mix through the CLI users run (resumes a killed run); the run's summary plus its
    first and last logged losses."""
    command = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(CONFIG), "--resume", "auto",
               f"data.corpus={corpus}", f"run.out={run}", f"schedule.max_steps={steps}",
               f"schedule.warmup_steps={max(1, steps // 10)}", f"run.experiment=eval-{mix}", *MIXES[mix], *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    summary = json.loads((run / "summary.json").read_text())
    history = json.loads((run / "metrics.json").read_text())
    keys = ("loss", "mlm", "contrastive", "label")
    return {"steps": summary["steps"], "seconds_this_call": round(time.perf_counter() - started, 1),
            "first_losses": {k: round(history[0][k], 4) for k in keys if history[0].get(k) is not None},
            "last_losses": {k: round(summary["final"][k], 4) for k in keys if k in summary["final"]},
            "cells_per_s": round(summary["final"].get("cells_per_s", 0.0), 1),
            "sequences_per_s": round(summary["final"].get("sequences_per_s", summary["final"].get("cells_per_s", 0.0)), 1),
            "overrides": MIXES[mix] + extra}


def run_name(mix: str, steps: int, seed: int, extra: list[str]) -> str:
    """The run folder of one mix: a rerun resumes or reuses it only when it was trained from the same
    config settings and overrides (their digest is in the name; comments do not count), never a stale
    run of an edited config."""
    import yaml

    settings = yaml.safe_load(CONFIG.read_text())
    digest = hashlib.sha256(json.dumps([settings, MIXES[mix], extra, steps], sort_keys=True).encode()).hexdigest()[:10]
    return f"{mix}-{steps}-seed{seed}-{digest}"


class EvalFile:
    """One labeled evaluation file: raw counts [n, genes] (CSR), var and labels (cells without a
    label, and classes with fewer cells than folds, left out)."""

    def __init__(self, name: str, label_key: str, max_cells: int | None, seed: int):
        import anndata
        import scipy.sparse as sp

        adata = anndata.read_h5ad(SHARED_H5AD / f"{name}.h5ad")
        labels = adata.obs[label_key].astype(str).to_numpy()
        known = (adata.obs[label_key].notna().to_numpy()) & (labels != "nan")
        classes, counts = np.unique(labels[known], return_counts=True)
        keep = known & np.isin(labels, classes[counts >= FOLDS])
        rows = np.flatnonzero(keep)
        if max_cells and len(rows) > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
        self.name, self.label_key = name, label_key
        self.counts = sp.csr_matrix(adata.X[rows])
        self.var = adata.var
        self.labels = labels[rows]
        self.unlabeled_or_rare = int(adata.n_obs - keep.sum())
        self.not_sampled = int(keep.sum() - len(rows))

    def pca50(self) -> np.ndarray:
        """PCA-50 of log1p-CP10k over all the file's genes (centered, not scaled).  -> [n, 50]"""
        from sklearn.decomposition import PCA

        x = self.counts.astype(np.float64)
        totals = np.asarray(x.sum(axis=1)).ravel()
        x = x.multiply(1e4 / np.maximum(totals, 1)[:, None]).tocsr()
        x.data = np.log1p(x.data)
        return PCA(n_components=50, random_state=0).fit_transform(x.toarray()).astype(np.float32)


def model_csr(model, data: EvalFile):
    """The file's cells over the model's vocabulary tokens, and the gene coverage report."""
    from pretrain.embed import gene_tokens, token_csr

    tokens, report = gene_tokens(data.var, model.vocab, data.name)
    csr = token_csr(data.counts, tokens, model.config.vocab_size)
    report["count_fraction"] = float(csr[2].sum() / max(data.counts.sum(), 1))
    return csr, report


def embed(model, csr) -> np.ndarray:
    from pretrain.embed import embed_counts

    return embed_counts(model, *csr, token_budget=16384, seed=0)


def masked_bin_accuracy(model, csr, seed: int = 0) -> dict:
    """Accuracy of the masked-bin head on the file's cells, masked as in training (ratio 0.15,
    80 % mask token / 10 % random bin / 10 % kept), against the file's most frequent masked bin."""
    import torch

    from data_pipeline.loading.masking import Masking, mask_for_mode
    from data_pipeline.loading.normalize import normalize
    from pretrain.embed import length_batches

    rng = np.random.default_rng(seed)
    norm = normalize(model.normalization, *csr, rng)
    _, values, mlm, targets = mask_for_mode(Masking(ratio=0.15), model.normalization.mode, model.normalization.n_bins,
                                            norm.indptr, norm.genes, norm.values, model.config.mask_token,
                                            (model.n_special, model.config.vocab_size), rng)
    cost = model.config.token_cost(model.normalization.max_genes)
    right = total = 0
    with torch.inference_mode():
        for _, batch in length_batches(norm.indptr, norm.genes, values, 16384, cost, mlm, targets):
            head = model(batch).mlm
            # a regressing head (model.bin_loss=mse, scGPT) predicts the bin index as a value: its nearest bin
            predicted = (head.round().clamp(0, model.config.n_bins - 1) if model.config.mlm_regresses
                         else head.argmax(-1))
            right += int((predicted == batch.mlm_targets[batch.mlm_mask].long()).sum())
            total += int(batch.mlm_mask.sum())
    masked = targets[mlm]
    majority = int(np.bincount(masked).argmax())
    return {"masked_bin_accuracy": right / total, "majority_bin": majority,
            "majority_bin_accuracy": float(np.mean(masked == majority)), "masked_positions": int(total)}


def probe(x: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Cell-type macro-F1 over stratified folds: kNN (k=10) and logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = {"knn": [], "logreg": []}
    for train, test in StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(x, labels):
        models = {"knn": KNeighborsClassifier(K),
                  "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))}
        for name, clf in models.items():
            clf.fit(x[train], labels[train])
            scores[name].append(f1_score(labels[test], clf.predict(x[test]), average="macro"))
    return {f"{name}_macro_f1": {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4),
                                 "folds": [round(float(s), 4) for s in v]} for name, v in scores.items()}


def random_init_twin(bundle: Path, seed: int):
    """The bundle's model with the weights its training run started from (`CellModel.initial`, as
    `pretrain.train` builds it), with its normalization and vocabulary."""
    from pretrain.export import load_pretrained
    from pretrain.model import CellModel

    model = load_pretrained(bundle)
    model.load_state_dict(CellModel.initial(model.config, seed).state_dict())
    return model.eval()


def verdicts(result: dict) -> dict:
    """Per mix and file: does the pretrained model beat its random-init twin, and by how much is
    it above (+) or below (-) PCA-50, on each probe."""
    out = {}
    for mix, entry in result["mixes"].items():
        out[mix] = {}
        for name, scores in entry["files"].items():
            twin, pca = result["random_init"][name], result["pca50"][name]
            row = {}
            for metric in ("knn_macro_f1", "logreg_macro_f1"):
                row[f"{metric}_beats_random_init"] = scores[metric]["mean"] > twin[metric]["mean"]
                row[f"{metric}_minus_pca50"] = round(scores[metric]["mean"] - pca[metric]["mean"], 4)
            row["masked_bin_accuracy_beats_random_init"] = (scores["mlm"]["masked_bin_accuracy"]
                                                            > twin["mlm"]["masked_bin_accuracy"])
            row["masked_bin_accuracy_beats_majority"] = (scores["mlm"]["masked_bin_accuracy"]
                                                         > scores["mlm"]["majority_bin_accuracy"])
            out[mix][name] = row
    every = [row[k] for rows in out.values() for row in rows.values() for k in row if k.endswith("beats_random_init")]
    out["all_beat_random_init"] = bool(every) and all(every)
    return out


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
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "data" / "eval",
                        help="corpus and runs (reused by a rerun: a finished mix is not retrained)")
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps per mix (default 250)")
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated subset of {', '.join(MIXES)}")
    parser.add_argument("--max-cells", type=int, default=2000,
                        help="evaluate a random subset of at most this many labeled cells per file (default 2000; "
                             "0: all)")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed (run.seed)")
    parser.add_argument("--result", type=Path, default=RESULTS / "eval.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "eval_embeddings.png")
    parser.add_argument("overrides", nargs="*", help="extra pretraining overrides, key.sub=value")
    args = parser.parse_args()
    if not SHARED_H5AD.is_dir():
        sys.exit(f"{SHARED_H5AD} is not here: this evaluation needs the real data folder beside the checkout")
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = sorted(set(mixes) - set(MIXES))
    if unknown:
        sys.exit(f"--mixes: unknown {', '.join(unknown)}; choose from {', '.join(MIXES)}")
    from pretrain.export import export_bundle, load_pretrained

    started = time.perf_counter()
    corpus = build_corpus(args.work)
    made = Corpus(corpus)
    files = {name: EvalFile(name, key, args.max_cells, args.seed) for name, key in EVAL_FILES.items()}
    labels = {name: f.labels for name, f in files.items()}
    result = {"pca50": {}, "random_init": {}, "mixes": {}}
    panels: dict[str, dict[str, np.ndarray]] = {"PCA-50": {}}
    for name, f in files.items():
        panels["PCA-50"][name] = f.pca50()
        result["pca50"][name] = probe(panels["PCA-50"][name], f.labels)
        print(f"pca50 {name}: {result['pca50'][name]['knn_macro_f1']['mean']:.3f} knn", file=sys.stderr)
    coverage = {}
    extra = [*args.overrides, f"run.seed={args.seed}"]
    for i, mix in enumerate(mixes):
        run = args.work / "runs" / run_name(mix, args.steps, args.seed, extra)
        train = pretrain(corpus, run, mix, args.steps, extra)
        bundle = export_bundle(run, run / "bundle")
        # the twin first, so the figure's columns read PCA, untrained, then each mix
        models = {"random init": random_init_twin(bundle, args.seed)} if i == 0 else {}
        models[mix] = load_pretrained(bundle)
        for rep, model in models.items():
            panels[rep] = {}
            scores = {}
            for name, f in files.items():
                csr, report = model_csr(model, f)
                coverage[name] = report
                panels[rep][name] = embed(model, csr)
                scores[name] = {**probe(panels[rep][name], f.labels), "mlm": masked_bin_accuracy(model, csr)}
                print(f"{rep} {name}: {scores[name]['knn_macro_f1']['mean']:.3f} knn "
                      f"{scores[name]['mlm']['masked_bin_accuracy']:.3f} masked-bin acc", file=sys.stderr)
            if rep == "random init":
                result["random_init"] = scores
            else:
                result["mixes"][mix] = {"train": train, "files": scores}
    result["verdicts"] = verdicts(result)
    config_text = CONFIG.read_text()
    record = result_record(
        "eval_embeddings", device=device_record(), versions=versions("torch", "sklearn", "deepspeed"),
        settings={"steps_per_mix": args.steps, "seed": args.seed, "config": str(CONFIG.relative_to(REPO)),
                  "config_text": config_text, "probe": f"{FOLDS}-fold stratified CV; kNN k={K} Euclidean; "
                  "logistic regression (lbfgs, max_iter 2000) on standardized features; macro-F1",
                  "pca50": "log1p(CP10k) over all the file's genes, centered, PCA 50 components",
                  "random_init": "the trained model's architecture and seed at step 0 (same for every mix)",
                  "max_cells": args.max_cells},
        corpus={"files": PRETRAIN_FILES, "excluded": EXCLUDED, "cells": made.n_cells,
                "tokens": made.n_tokens, "vocab_genes": made.vocab.n_genes, "label_column": LABEL_COLUMN},
        eval_files={name: {"label_key": f.label_key, "cells": len(f.labels), "classes": len(set(f.labels)),
                           "cells_unlabeled_or_rare_class": f.unlabeled_or_rare,
                           "cells_not_sampled": f.not_sampled, "gene_coverage": coverage.get(name)}
                    for name, f in files.items()},
        **result, seconds=round(time.perf_counter() - started, 1))
    write_result(args.result, record)
    plot(panels, labels, args.plot, args.seed)
    print(json.dumps(record["verdicts"], indent=1))


if __name__ == "__main__":
    main()

"""The README's "Performance" and "Quality" sections, generated from the committed result JSONs.

    python benchmarks/report.py            # rewrite the generated blocks of README.md
    python benchmarks/report.py --check    # exit 1 if README.md differs from what the JSONs give (a test runs this)

Each generated block sits between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``; the text
around the blocks is written by hand. Every table names its file, device, date, versions and the
command that reproduces it; nothing here is typed in by hand, so the README cannot drift from the
measurements.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS  # noqa: E402


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def n(x, digits: int = 0) -> str:
    """A number with thousands separators (``-`` for None)."""
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{hours:,.1f} h"


def device_text(device) -> str:
    if isinstance(device, str):
        return device
    if device.get("gpu"):
        return f"{device['gpu']} ({device.get('gpu_memory_gib', '?')} GiB)"
    return f"{device.get('cpu', 'CPU')}, {device.get('cores', '?')} cores, no GPU"


def _commit(code: dict) -> str:
    """A result's ``code`` record (`common.code_version`) as text: the short commit, and whether the
    checkout had local changes."""
    return code["commit"][:10] + (" with local changes" if code.get("modified") else "")


def source(name: str, result: dict, reproduce: str | None = None) -> str:
    """The line that says where a table comes from."""
    versions = ", ".join(f"{k} {v}" for k, v in (result.get("versions") or {}).items() if v)
    date = result.get("date", "?")[:10]
    code = result.get("code") or {}  # recorded since 2026-12-06: which commit made it
    commit = f"; commit {_commit(code)}" if code.get("commit") else ""
    later = result.get("code_at_write") or {}  # the checkout moved on while it ran (recorded since 2026-12-07)
    if commit and later.get("commit"):
        commit += f" (the checkout was at {_commit(later)} when it wrote the file)"
    text = f"From `benchmarks/results/{name}` ({device_text(result.get('device', '?'))}; {date}{commit}; {versions})."
    return text + f" Reproduce: `{reproduce or 'python ' + result.get('command', '?')}`."


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- Quality ------------------------------------------------------------------------------------

def _score(entry: dict, key: str) -> str:
    s = entry[key]
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def _input(r: dict) -> str:
    """The pretraining input an eval result was trained on: the config's normalization, with the
    quantile tie rule (and any tie override the runs were given)."""
    data = yaml.safe_load(r["settings"]["config_text"])["data"]
    text = data["normalization"]
    overrides = [o for entry in r["mixes"].values() for o in entry["train"]["overrides"]]
    ties = next((o.split("=", 1)[1] for o in overrides if o.startswith("data.quantile_ties=")),
                data.get("quantile_ties"))
    return f"{text}, {ties} ties" if text == "quantile_bins" and ties else text


def _verdicts(r: dict) -> list[str]:
    """Whether each mix beats its random-init twin, and its distance to PCA-50."""
    v = r["verdicts"]
    out = []
    for mix, files in v.items():
        if mix == "all_beat_random_init":
            continue
        lost = [f"{f} ({k.removesuffix('_beats_random_init')})" for f, row in files.items() for k, ok in row.items()
                if k.endswith("beats_random_init") and not ok]
        gaps = [row["knn_macro_f1_minus_pca50"] for row in files.values()] + \
               [row["logreg_macro_f1_minus_pca50"] for row in files.values()]
        out.append(f"- `{mix}`: " + (f"not above random init on {', '.join(lost)}; " if lost else
                                     "above random init everywhere; ")
                   + f"against PCA-50 the macro-F1 differs by {min(gaps):+.3f} to {max(gaps):+.3f}.")
    return out


def _reps(r: dict) -> list[tuple[str, dict]]:
    return [("PCA-50", r["pca50"]), ("random init", r["random_init"])] + [
        (mix, entry["files"]) for mix, entry in r["mixes"].items()]


def _spread(row: dict, key: str) -> str:
    s = row.get(key)
    if s is None:
        return "-"
    return f"{s['mean']:.3f}" + (f" [{s['min']:.3f}, {s['max']:.3f}]" if s["n"] > 1 else "")


def _report(name: str, r: dict) -> str:
    """One run of the current `eval_embeddings.py`: baselines, the random-init twin and each mix at
    the last curve step per file (mean [min, max] over seeds), the learning curve, the verdicts."""
    s = r["settings"]
    corpus = r["corpus"]
    phase = {"validation": "Validation (recipes are chosen here)", "final": "Final report (held-out files)"}
    out = [f"**{phase[r['phase']]}.** {source(name, r)}", "",
           f"Pretraining corpus: {n(corpus['cells'])} real cells ({n(corpus['tokens'])} gene tokens) from "
           f"{', '.join(corpus['files'])}. Model `{s['config']}`, {s['steps']} steps, seeds "
           f"{', '.join(map(str, s['seeds']))}, curve at steps {', '.join(map(str, s['curve']))}, embedding cap "
           f"`{s['cap']}`, {r['device'].get('gpu') or 'CPU'}. Probes: {s['probe']}. Numbers: mean [min, max] over "
           "seeds.", ""]
    shown = r.get("figure_seeds")  # {panel: the seed it shows}; None in results from before it was recorded
    taken = [(mix, seed, e["reused"]) for mix, per_seed in r["runs"].items() for seed, e in per_seed.items()
             if "reused" in e]
    if taken:
        # before figure_seeds, a figure left out the mixes whose first seed was taken
        out += ["Taken unchanged from an earlier result of the same settings (`--reuse`"
                + ("" if shown is not None else "; not in the t-SNE figure") + "): "
                + "; ".join(f"`{mix}` seed {seed} ({w['date'][:10]}, `python {w['command']}`)" for mix, seed, w in taken)
                + ".", ""]
    last = str(s["curve"][-1])
    for file, meta in r["files"].items():
        out += [f"**{file}** ({n(meta['cells'])} cells, {meta['classes']} classes of `{meta['label_key']}`)", ""]
        rows = [[rep, f"{b['knn_macro_f1']:.3f}", f"{b['logreg_macro_f1']:.3f}", "-", "-"]
                for rep, b in r["baselines"][file].items() if rep not in ("label fractions", "clustering")]
        for mix, steps in r["summary"].items():
            for label, step in (("random init", "0"), (f"{mix} ({last} steps)", last)):
                if label == "random init" and mix != next(iter(r["summary"])):
                    continue
                row = steps[step][file]
                acc = _spread(row, "masked_bin_accuracy") + (f" (ceiling {row['accuracy_ceiling']['mean']:.3f})"
                                                            if "accuracy_ceiling" in row else "")
                rows.append([label, _spread(row, "knn_macro_f1"), _spread(row, "logreg_macro_f1"), acc,
                             _spread(row, "masked_loss")])
        out += [table(["representation", "kNN macro-F1", "logistic-regression macro-F1", "masked-bin accuracy",
                       "masked loss"], rows), ""]
        out += _finetuned_table(r, file, last)
        out += _cluster_table(r, file, last)
    curve_rows = [[mix, step, *(f"{steps[step][f]['knn_macro_f1']['mean']:.3f} / {steps[step][f]['masked_loss']['mean']:.3f}"
                                for f in r["files"])]
                  for mix, steps in r["summary"].items() for step in steps]
    out += ["Learning curve (kNN macro-F1 / masked loss, mean over seeds):", "",
            table(["mix", "step", *r["files"]], curve_rows), ""]
    v = r["verdicts"]
    out.append(f"Pretrained beats its random-init twin on every file, mix and probe (and in masked loss): "
               f"**{'yes' if v['all_beat_random_init'] else 'no'}**.")
    for mix, files in v.items():
        if mix == "all_beat_random_init":
            continue
        for file, row in files.items():
            lost = [k.removesuffix("_beats_random_init") for k, ok in row.items() if k.endswith("random_init") and not ok]
            closed = (f"; closes {row['share_of_previous_gap_closed']:.0%} of the previous report's kNN gap "
                      f"(goal: 50 %)" if "share_of_previous_gap_closed" in row else "")
            closed += "".join(f"; fine-tuned at {float(k.split('_')[1]):.0%} of labels {v:+.3f} against HVG-2000 + "
                              "logistic regression" for k, v in row.items() if k.endswith("_minus_hvg2000_lr"))
            if "cluster_schybridbert_minus_pca50_ari" in row:
                closed += f"; scHybridBERT ARI {row['cluster_schybridbert_minus_pca50_ari']:+.3f} against PCA-50"
            out.append(f"- `{mix}` on {file}: " + (f"not above random init in {', '.join(lost)}" if lost
                                                   else "above random init") + f"; kNN {row['knn_minus_pca50']:+.3f} "
                       f"against PCA-50{closed}.")
    figure = name.removesuffix(".json") + ".png"
    if (RESULTS / figure).exists():
        out += ["", f"![t-SNE of each representation, coloured by cell type](benchmarks/results/{figure})"]
        if shown is not None:
            said = []
            if any(seed != s["seeds"][0] for seed in shown.values()):
                said.append("The t-SNE shows " + ", ".join(f"{panel} of seed {seed}" for panel, seed in shown.items())
                            + ".")
            missing = [panel for panel in ("random init", *r["runs"]) if panel not in shown]
            if missing:
                said.append("Not in it (every seed taken with `--reuse`, whose embeddings are not kept): "
                            + ", ".join(f"`{panel}`" for panel in missing) + ".")
            out += ["", " ".join(said)] if said else []
    return "\n".join(out)


def _finetuned_table(r: dict, file: str, last: str) -> list[str]:
    """Macro-F1 by share of training labels: logistic regression on the baselines, then each
    fine-tuning mode of the random-init twin and of each mix (mean [min, max] over seeds)."""
    ft = r["settings"].get("finetune") or {}
    fractions = [f"{x:g}" for x in ft.get("fractions", [])]
    if not fractions or not ft.get("modes"):
        return []
    fixed = r["baselines"][file].get("label fractions", {})
    rows = [[f"{name} + logistic regression", *(f"{fixed[f'{name} LR {x}']:.3f}" for x in fractions)]
            for name in ("HVG-2000", "PCA-50") if f"{name} LR {fractions[0]}" in fixed]
    first = next(iter(r["summary"]))
    for mode in ft["modes"]:
        for mix, steps in r["summary"].items():
            for label, step in (("random init", "0"), (f"{mix} ({last} steps)", last)):
                row = steps.get(step, {}).get(file, {})
                if any(f"finetuned {mode} {x}" in row for x in fractions) and (step != "0" or mix == first):
                    rows.append([f"{label}, fine-tuned ({mode})",
                                 *(_spread(row, f"finetuned {mode} {x}") for x in fractions)])
    only = (f"; full fine-tuning at {', '.join(f'{x:.0%}' for x in ft['full_fractions'])} of labels only"
            if "full_fractions" in ft else "")
    recipe = ft.get("recipe")  # results written before it was recorded: the head fed the embedding unscaled
    scaling = ("the head's input scaled by the training cells' mean and sd" if recipe and recipe.get("standardize")
               else "the head's input unscaled")
    settings = f"; {', '.join(f'{k} {v}' for k, v in recipe.items() if k != 'standardize')}" if recipe else ""
    epochs = (f"head {ft['epochs']} epochs, full {ft['full_epochs']}" if "full_epochs" in ft
              else f"{ft['epochs']} epochs")
    return [f"Fine-tuned cell-type macro-F1 by share of each fold's training labels ({epochs}; "
            f"{ft['how']}; {scaling}{settings}{only}):", "",
            table(["model", *(f"{float(x):.0%} of labels" for x in fractions)], rows), ""]


def _cluster_table(r: dict, file: str, last: str) -> list[str]:
    """ARI / NMI of scHybridBERT and k-means on the embedding (the random-init twin, each mix), and
    PCA-50 of the same runs."""
    c = r["settings"].get("cluster")
    if not c:
        return []
    first = next(iter(r["summary"]))
    k = r["files"][file]["classes"]
    rows = []
    for b in r["baselines"][file].get("clustering", {}).values():  # it finds its own number of clusters
        rows.append([f"PCA-50 of log1p-CP10k (HVG): {b['clustering']} (scanpy's default pipeline)",
                     b["n_clusters"], f"{b['ari']:.3f}", f"{b['nmi']:.3f}"])
    pca = r["summary"][first].get(last, {}).get(file, {})
    if "cluster pca50 ari" in pca:
        rows.append(["PCA-50 of log1p-CP10k (HVG): k-means", k, _spread(pca, "cluster pca50 ari"),
                     _spread(pca, "cluster pca50 nmi")])
    for mix, steps in r["summary"].items():
        for label, step in (("random init", "0"), (f"{mix} ({last} steps)", last)):
            row = steps.get(step, {}).get(file, {})
            if "cluster schybridbert ari" not in row or (step == "0" and mix != first):
                continue
            for method, name in (("schybridbert", "scHybridBERT"), ("embedding_kmeans", "embedding alone")):
                rows.append([f"{label}: {name}", k, _spread(row, f"cluster {method} ari"),
                             _spread(row, f"cluster {method} nmi")])
    return [f"Clustering ({c['how']}; VAE {c['vae_steps']} steps, fusion {c['epochs']}):", "",
            table(["representation", "clusters", "ARI", "NMI"], rows), ""]


RECIPE_FRACTIONS = ("0.01", "0.1", "1")  # the label shares of the head columns, as the results key them
RECIPE_COLUMNS = (("knn_macro_f1", "kNN"), ("logreg_macro_f1", "logistic regression"),
                  *((f"finetuned head {x}", f"head {float(x):.0%}".replace("%", " %")) for x in RECIPE_FRACTIONS),
                  ("cluster schybridbert ari", "scHybridBERT ARI"),
                  ("cluster embedding_kmeans ari", "k-means ARI"), ("masked_loss", "masked loss"))


def _recipes(reports: list[tuple[str, dict]]) -> str:
    """Each final result's mixes at their last curve step, side by side per held-out file (means over
    seeds), under the file's PCA-50 and HVG-2000 rows (logistic regression at the same label shares
    in the head columns): the recipes the report has measured, compared where the goals are judged."""
    r0 = reports[0][1]  # the baselines are the same cells in every result: the report's are shown
    rows = []
    for file in r0["files"]:
        first = r0["baselines"][file]
        fractions = first.get("label fractions", {})
        pca = next(iter(r0["summary"].values()))[str(r0["settings"]["curve"][-1])][file]
        for rep in ("PCA-50", "HVG-2000"):
            kmeans = f"{pca['cluster pca50 ari']['mean']:.3f}" if rep == "PCA-50" and "cluster pca50 ari" in pca else "-"
            cells = [f"{first[rep]['knn_macro_f1']:.3f}", f"{first[rep]['logreg_macro_f1']:.3f}",
                     *(f"{fractions[f'{rep} LR {x}']:.3f}" if f"{rep} LR {x}" in fractions else "-"
                       for x in RECIPE_FRACTIONS), "-", kmeans, "-"]
            rows.append([file, f"{rep} (logistic regression in the head columns)", *cells])
        for name, r in reports:
            if file not in r["files"]:
                continue
            last = str(r["settings"]["curve"][-1])
            seeds = len(r["settings"]["seeds"])
            for mix, steps in r["summary"].items():
                row = steps[last][file]
                rows.append([file, f"`{mix}`, {n(int(last))} steps, {seeds} seed{'s' if seeds > 1 else ''} "
                                   f"(`{name}`)",
                             *(f"{row[k]['mean']:.3f}" if k in row else "-" for k, _ in RECIPE_COLUMNS)])
    return ("**The recipes on the held-out files** (means over seeds at each run's last step; head: fine-tuned "
            "head macro-F1 at 1 / 10 / 100 % of each fold's training labels; k-means with k = the file's number of labels, on "
            "the model's embedding or on PCA-50):\n\n"
            + table(["file", "model", *(label for _, label in RECIPE_COLUMNS)], rows))


# the report's result first, then the earlier recipes' final results (their full tables are in the files)
FINAL_REPORTS = ("eval_final.json", "eval_final_mlm.json")
LEGACY_EVAL = "ec04922"  # the last commit whose eval_embeddings.py wrote eval.json and eval_high_ties.json
LEGACY_RUN = f"git worktree add ../eval-{LEGACY_EVAL} {LEGACY_EVAL} && cd ../eval-{LEGACY_EVAL} &&"


def quality() -> str:
    out = []
    finals = [(name, r) for name in FINAL_REPORTS if (r := load(name)) is not None]
    if len(finals) > 1:
        out += [_recipes(finals), ""]
    for name in ("eval_final.json", "eval_validation.json"):
        current = load(name)
        if current is not None:
            out += [_report(name, current), ""]
    r = load("eval.json")
    if r is None:
        return "\n".join(out) or ("No evaluation results yet: run `python benchmarks/eval_embeddings.py --phase "
                                  "validation`, then `--phase final`.")
    if not out:
        out = ["No run of the current evaluation yet (`python benchmarks/eval_embeddings.py --phase validation`, then "
               "`--phase final`: 3 seeds, curve to 3,000 steps, hours on 2 CPU cores).", ""]
    s = r["settings"]
    out += [f"**The previous evaluation** (250 steps, one seed, a random 512-gene subset of each cell, and its "
            f"recipe chosen on these same files). {source('eval.json', r, LEGACY_RUN + ' python benchmarks/eval_embeddings.py')}", ""]
    corpus = r["corpus"]
    out.append(f"Pretraining corpus: {n(corpus['cells'])} real cells ({n(corpus['tokens'])} gene tokens) from "
               f"{', '.join(corpus['files'])}; left out: "
               + "; ".join(f"{k}: {v}" for k, v in corpus["excluded"].items() if v != "evaluation file") + ". "
               f"Model `{s['config']}` ({_input(r)} input), {s['steps_per_mix']} steps per objective mix, "
               f"seed {s['seed']}, {r['device'].get('gpu') or 'CPU'}. Probes: {s['probe']}. PCA-50: {s['pca50']}. "
               f"Random init: {s['random_init']}.")
    out.append("")
    for name, meta in r["eval_files"].items():
        out.append(f"**{name}** ({n(meta['cells'])} cells, {meta['classes']} classes of `{meta['label_key']}`"
                   + (f", a random subset; {n(meta['cells_not_sampled'])} more not sampled" if meta["cells_not_sampled"]
                      else "") + ")")
        out.append("")
        rows = []
        for rep, scores in _reps(r):
            f = scores[name]
            mlm = f.get("mlm")
            acc = f"{mlm['masked_bin_accuracy']:.3f} (majority {mlm['majority_bin_accuracy']:.3f})" if mlm else "-"
            rows.append([rep, _score(f, "knn_macro_f1"), _score(f, "logreg_macro_f1"), acc])
        out.append(table(["representation", "kNN macro-F1", "logistic-regression macro-F1", "masked-bin accuracy"],
                         rows))
        out.append("")
    out.append(f"Pretrained beats its random-init twin on every file, mix and probe: "
               f"**{'yes' if r['verdicts']['all_beat_random_init'] else 'no'}**.")
    out += _verdicts(r)
    out.append("")
    out.append("![t-SNE of each representation, coloured by cell type](benchmarks/results/eval_embeddings.png)")
    other = load("eval_high_ties.json")
    if other is not None:
        out += ["", _tie_comparison(r, other)]
    return "\n".join(out)


def _tie_comparison(r: dict, other: dict) -> str:
    """The same benchmark with the other quantile tie rule, side by side (kNN / logistic regression)."""
    out = [f"**The other tie rule.** {source('eval_high_ties.json', other, LEGACY_RUN + ' python ' + other['command'])} "
           "The same corpus, model, steps, seed "
           f"and probes, {_input(other)} input. kNN / logistic-regression macro-F1 (masked-bin accuracy, majority):",
           ""]
    rows = []
    ours, theirs = _input(r), _input(other)
    for name in r["eval_files"]:
        for (rep, a), (_, b) in zip(_reps(r)[1:], _reps(other)[1:]):
            cells = []
            for x in (a[name], b[name]):
                m = x["mlm"]
                cells.append(f"{x['knn_macro_f1']['mean']:.3f} / {x['logreg_macro_f1']['mean']:.3f} "
                             f"({m['masked_bin_accuracy']:.2f}, {m['majority_bin_accuracy']:.2f})")
            rows.append([name, rep, *cells])
    out.append(table(["file", "representation", ours, theirs], rows))
    out += ["", f"With {theirs}, pretrained beats its random-init twin on every file, mix and probe: "
            f"**{'yes' if other['verdicts']['all_beat_random_init'] else 'no'}**.", *_verdicts(other)]
    if (RESULTS / "eval_embeddings_high_ties.png").exists():
        out += ["", "Its t-SNE: [`benchmarks/results/eval_embeddings_high_ties.png`]"
                "(benchmarks/results/eval_embeddings_high_ties.png)."]
    return "\n".join(out)


# --- Performance --------------------------------------------------------------------------------

def conversion() -> str:
    r = load("convert.json")
    if r is None:
        return ""
    names = {"real_replicated_gzip": "real, gzip h5ad", "real_replicated_plain": "real, plain h5ad",
             "synthetic": "synthetic, 1M cells"}
    rows = []
    for run in r["runs"]:
        scaling = r["scaling_efficiency"].get(f"{run['dataset']}/w{run['workers']}") \
            if run["process"] == "shared" and run["vocab"].startswith("built") else None
        rows.append([names.get(run["dataset"], run["dataset"]), run["vocab"], run["workers"], run["process"],
                     n(run["cells_per_s"]), n(run["cells_per_s_per_worker"]), n(run["cells_per_cpu_s"]),
                     f"{scaling:.2f}" if scaling is not None else ""])
    return "\n".join([f"**Conversion.** {source('convert.json', r)}", "",
                      table(["input", "vocabulary", "workers", "process", "cells/s", "cells/s per worker",
                             "cells per CPU-second", "scaling (vs 1 worker)"], rows)])


def loader() -> str:
    r = load("loader.json")
    if r is None:
        return ""
    rows = [[run["dataset"].replace("_replicated", ""), run["mode"].replace("+", " + "), run["workers"],
             n(run["cells_per_s"]), f"{run['tokens_per_s'] / 1e6:.1f} M"] for run in r["runs"]]
    waste = r["padding_waste"]["real_replicated"]
    return "\n".join([f"**Loader.** {source('loader.json', r)} Token budget {n(r['batching']['token_budget'])}, "
                      f"megabatches of {n(r['batching']['megabatch_cells'])} cells.", "",
                      table(["cells", "mode", "workers", "cells/s", "tokens/s"], rows), "",
                      f"Padding a `[B, max_len]` layout would carry on the real cells: "
                      f"{waste['random_batches_padded']:.1%} with random batches of {waste['cells_per_batch']} cells, "
                      f"{waste['length_grouped_padded']:.1%} with length-grouped batches; packed batches carry none."]
                     + integrity_cost())


def epoch_plan() -> str:
    """What planning an epoch costs each process of a rank, now and at the baseline commit."""
    r = load("epoch_plan_cpu.json")
    if r is None:
        return ""
    before = {(b["cells"], b["world_size"]): b for b in r["baseline"]["rows"]}
    rows = []
    for row in r["rows"]:
        b = before.get((row["cells"], row["world_size"]))
        now, old = row["worker_shared_plan"], (b or {}).get("worker_whole_plan")
        rows.append([n(row["cells"]), f"{row['world_size']} × {row['workers_per_rank']}",
                     f"{row['loader_process']['plan_s']:.2f}",
                     f"{now['seconds']:.2f}" + (f" ({old['seconds']:.2f})" if old else ""),
                     f"+{now['peak_rss_added_mb']:.0f} MB" + (f" (+{old['peak_rss_added_mb']:.0f} MB)" if old else ""),
                     f"{row['full_plans_per_rank_epoch']['shared_plan']} "
                     f"({row['full_plans_per_rank_epoch']['whole_plan_in_every_worker']})"])
    base = r["baseline"]
    return "\n".join([f"**Epoch plan.** {source('epoch_plan_cpu.json', r)} Synthetic index "
                      f"({r['config']['lengths']}), blocks of {n(r['config']['block_cells'])} cells, median of "
                      f"{r['config']['repeats']} repeats, load average {r['load_average_1min']['before']}. In brackets: "
                      f"the same script at commit {base['commit']} ({base['date'][:10]}), where every worker planned "
                      f"the whole epoch (its `--baseline` JSON is made first by running this script on that commit's "
                      f"code: `git archive {base['commit']} | tar -x -C /tmp/old`, copy the script there and run it "
                      "with `--out`, as its docstring shows).", "",
                      table(["cells", "ranks × workers", "loader's plan (s)", "slowest worker (s)",
                             "worker peak RSS added", "full plans per rank and epoch"], rows)])


def loader_peers() -> str:
    """The loader against annbatch, scDataset and backed AnnData on the same cells, one core."""
    r = load("loader_peers_cpu.json")
    if r is None:
        return ""
    setup, cells, peer = r["setup"], r["cells"], r["peer_interpreter"]
    what = {"project raw": "raw counts, unmasked", "project log1p_cp10k": "log1p-CP10k (`continuous`), unmasked",
            "project log1p_bins + masking": "`log1p_bins` + 15 % masking", "annbatch raw": "raw CSR",
            "annbatch log1p_cp10k": "log1p-CP10k of each CSR batch", "scDataset raw": "raw CSR",
            "anndata backed raw": "raw CSR, X[sorted random rows]"}
    annbatch = r["results"]["annbatch raw"]["cells_per_cpu_s"]
    rows = [[name, what.get(name, ""), n(x["cells_per_round"]), n(x["cells_per_cpu_s"]),
             "-".join(n(f(x.get("cells_per_cpu_s_rounds") or [x["cells_per_cpu_s"]])) for f in (min, max)),
             n(x["nonzeros_per_cpu_s"]), n(x["cells_per_s_wall"]), f"{x['cells_per_cpu_s'] / annbatch:.2f}x"]
            for name, x in r["results"].items()]
    la = r.get("load_average") or {}
    busy = (f" The machine was shared (1-minute load average {la['before'][0]:.1f} before, {la['after'][0]:.1f} "
            "after, on 2 cores): CPU time is less disturbed by other processes than wall time, but not immune, "
            "hence the spread of the rounds.") if la.get("before") and la.get("after") else ""
    def paired(key: str) -> str:  # the ratio round by round: how far the rounds' spread leaves the median ratio
        ours, peer = (r["results"][name].get("cells_per_cpu_s_rounds") for name in key.split(" / "))
        return ", ".join(f"{a / b:.2f}" for a, b in zip(ours, peer)) if ours and peer else "-"

    goals = "; ".join(f"{k}: {v:.2f}x ({'met' if v >= 1 else 'not met'}; round by round {paired(k)})"
                      for k, v in r["ratios"].items())
    versions = ", ".join(f"{k} {v}" for k, v in r["peer_versions"].items() if v)
    return "\n".join([
        f"**Loader against its peers** (issue 24). {source('loader_peers_cpu.json', r, 'python benchmarks/bench_loader_peers.py --peer-python PYTHON3.12')} "
        f"The same {n(cells['peer_cells'])} real cells ({len(cells['files'])} shared files, {cells['copies_of_each']} "
        f"copies each) for everyone, batches of {n(setup['batch_cells'])} cells, 0 workers, one core "
        f"({setup['one_core']}); cells per CPU-second of the process making the batches, median of "
        f"{setup['rounds']} interleaved rounds. The peers ran in python {r['peer_versions']['python']} ({versions}), "
        f"{peer['run_as']}. The project's corpus keeps the genes with gene ids, so its cells carry "
        f"{r['results']['project raw']['nonzeros_per_cell']:.0f} nonzeros on average against the peers' "
        f"{r['results']['annbatch raw']['nonzeros_per_cell']:.0f}.{busy}", "",
        table(["loader", "values", "cells per round", "cells per CPU-second", "rounds (min-max)",
               "nonzeros per CPU-second", "cells/s (wall)", "vs annbatch raw"], rows), "",
        f"Against annbatch: {goals}."])


def integrity_cost() -> list[str]:
    """The block checks' share of loader throughput: epochs with and without them, alternating in one run."""
    r = load("loader_integrity.json")
    if r is None:
        return []
    rows = [[run["dataset"].replace("_replicated", ""), run["mode"].replace("+", " + "), run["workers"],
             n(run["wall"]["cells_per_s_checked"]), n(run["wall"]["cells_per_s_unchecked"]),
             f"{run['wall']['cost']:.1%}", f"{run['reads']['share_of_checked_epoch']:.1%}"]
            for run in r["integrity_check"]]
    la = r.get("load_average") or {}
    busy = (f" (1-minute load average {la['before'][0]:.1f} before the run, {la['after'][0]:.1f} after: rows "
            "timed while other jobs ran are noise, e.g. a negative cost)") if la.get("before") and la.get("after") else ""
    return ["", f"**Block checks.** Every block the loader reads is checked (xxh3 checksum, then structure) "
                f"before use; the cost, epochs with and without the checks alternating in one run on the same "
                f"corpus (median epoch), and the checks timed alone as a share of a checked epoch{busy}. "
                f"{source('loader_integrity.json', r)}", "",
            table(["cells", "mode", "workers", "checked cells/s", "unchecked cells/s", "cost", "checks alone"], rows)]


def contrastive() -> str:
    parts = []
    for path in sorted(RESULTS.glob("contrastive_*.json")):
        r = json.loads(path.read_text())
        c = r["config"]
        rows = []
        for cmp in r.get("comparison") or []:  # a partial file (its run cut short) has rows only
            cached = next(x for x in r["rows"] if x["mode"] == "cached" and x["batch_cells"] == cmp["batch_cells"])
            plain = next((x for x in r["rows"] if x["mode"] == "uncached" and x["batch_cells"] == cmp["batch_cells"]), {})
            rows.append([n(cmp["batch_cells"]), cached.get("n_chunks", "-"), n(cached.get("ms_per_cell"), 1),
                         n(plain.get("ms_per_cell"), 1), n(cmp.get("time_per_cell_ratio"), 2),
                         n((cached.get("step_peak_bytes") or 0) / 2**20),
                         n((plain.get("step_peak_bytes") or 0) / 2**20) if plain else "-"])
        m = c["model"]
        parts.append("\n".join([
            f"**Gradient-cached contrastive step.** {source(path.name, r)} Width {m['d_model']}, {m['layers']} layers, "
            f"{m['attention']}, {c['genes_per_view']} genes per view, two views per cell, masked bins + InfoNCE, "
            f"ZeRO-{c['zero_stage']}, {c['dtype']}; chunks of {c['chunk_cells']} cells; median step per configuration.",
            "", table(["cells per batch", "chunks", "ms per cell, cached", "ms per cell, uncached", "time ratio",
                       "step memory, cached (MiB)", "step memory, uncached (MiB)"], rows),
            "", f"Largest batch that ran: cached {n((r.get('largest_batch_fits') or {}).get('cached'))}, uncached "
                f"{n((r.get('largest_batch_fits') or {}).get('uncached'))} (first out of memory: cached "
                f"{n((r.get('first_oom_batch') or {}).get('cached'))}, uncached "
                f"{n((r.get('first_oom_batch') or {}).get('uncached'))})."]))
    return "\n\n".join(parts)


def demo() -> str:
    r = load("demo_cpu.json")
    if r is None:
        return ""
    first, last, t = r["first_losses"], r["final_losses"], r["seconds"]
    losses = ", ".join(f"{k} {first[k]:.2f} → {last[k]:.2f}" for k in ("mlm", "contrastive", "label") if k in first)
    threads = ""
    if r.get("threads"):  # recorded since the entry points choose torch's threads themselves
        th = r["threads"]
        env = f"OMP_NUM_THREADS={th['OMP_NUM_THREADS']}" if th.get("OMP_NUM_THREADS") else "OMP_NUM_THREADS unset"
        threads = (f"; {env}, torch on {th['torch']} thread(s) of {th['usable_cores']} usable cores, machine load "
                   f"{th['load_avg_1min_at_start']} at the start")
    rate = f"{n(r['cells_per_s'])} cells/s"
    if r.get("sequences_per_s") and r["sequences_per_s"] != r["cells_per_s"]:
        rate += f" = {n(r['sequences_per_s'])} sequences/s of two views per cell"
    corrected = ""
    if r.get("cells_per_s_corrected"):  # recorded before the trainer counted a cell's views once (issue 21)
        corrected = (f" The cell rate is the logged {n(r['sequences_per_s'])} halved: until issue 21 the trainer "
                     "counted a cell's two views as two cells.")
    reused = ""
    if "pretrain" in r.get("reused", []):  # a rerun over a finished run trained nothing: not a measurement
        reused = " (pretraining reused from an earlier invocation: these rates were not measured by this run)"
    return (f"**The demo.** From `benchmarks/results/demo_cpu.json` ({r['device']}; {r['date'][:10]}; "
            f"`python {r['command']}`{threads}): {r.get('wall_s', sum(t.values())):.0f} s in all, "
            f"{t['pretrain']:.0f} s of it pretraining {r['steps']} steps ({rate}; {n(r['tokens_per_s'])} tokens/s "
            f"over the last 20 steps){reused}; losses from the first step to the "
            f"mean of the last 20: {losses}.{corrected}")


def gpu_status() -> str:
    gpu = sorted(p.name for p in RESULTS.glob("*.json") if not p.stem.endswith("_cpu") and p.stem.split("_", 1)[0]
                 in ("favor", "train", "contrastive", "gpu", "ceilings", "embed") and "_" in p.stem)
    if gpu:
        return "GPU result files: " + ", ".join(f"`{g}`" for g in gpu) + "."
    return ("**No GPU numbers yet.** No GPU was available to this project so far; every number below is from a "
            "2-core CPU VM. `python benchmarks/gpu_suite.py` on a GPU writes the FAVOR+ kernel, training "
            "throughput (bf16, per preset, backend and batching mode, with MFU) and contrastive-memory results, "
            "named by device; until then the GPU targets (≥ 40 % MFU for geneformer-10m and scgpt with packing; "
            "the kernel's speed-ups) are unmeasured.")


# published per-GPU training rates (A100, dense bf16 peak 312 TFLOP/s) that the issue anchors on
ANCHORS = [("BioNeMo Geneformer-106M", "geneformer-10m", 20.0), ("scGPT", "scgpt", 24.0)]
A100_PEAK = 312.0


def anchors() -> str:
    """Cells/s per GPU normalized by the GPU's peak, against the published anchors."""
    from pretrain.metrics import PEAK_TFLOPS

    rows = []
    for path in _train_files("train"):
        r = json.loads(path.read_text())
        gpu = r["device"].get("gpu")
        peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
        for name, ours, rate in ANCHORS:
            for row in r["rows"]:
                if row["preset"] == ours and row["mode"] == "packed" and row.get("cells_per_s") and peak:
                    rows.append([name, f"{rate / A100_PEAK * 1000:.1f}", f"{ours} / {row['backend']} on {gpu}",
                                 f"{row['cells_per_s'] / peak * 1000:.1f}"])
    if not rows:
        return ("**Against published rates.** Anchors, in cells/s per PFLOP/s of dense bf16 peak (A100: 312 TFLOP/s): "
                + "; ".join(f"{name} {rate:g} cells/s per A100 = {rate / A100_PEAK * 1000:.1f}" for name, rate in
                            ((a, c) for a, _, c in ANCHORS))
                + ". Ours on a GPU: not measured yet (the CPU rows above have no peak to normalize by).")
    return "\n".join(["**Against published rates** (cells/s per PFLOP/s of dense bf16 peak; A100: 312 TFLOP/s).", "",
                      table(["anchor", "anchor, per PFLOP/s", "ours", "ours, per PFLOP/s"], rows)])


SCALE_STEPS = {"convert_built": "convert, built vocabulary", "convert_supplied": "convert, supplied vocabulary",
               "convert_4_nodes": "convert, 4 node ranks at once", "merge": "merge (after the 4 node ranks)",
               "verify": "verify", "inspect": "inspect", "loader_plan": "CellLoader construction + epoch plan",
               "loader_log1p_bins": "loader epoch, log1p_bins + mask", "loader_rank": "loader epoch, rank + mask"}


def _cells(c: float) -> str:
    return f"{c / 1e6:g}M"


def _gib(b) -> str:
    return "-" if b is None else (f"{b / 2**30:,.1f} GiB" if b >= 2**30 else f"{b / 2**20:,.0f} MiB")


def _hours(h) -> str:
    return "-" if h is None else duration(h)


def scale() -> str:
    """How conversion, statistics and the loader grow with cells, and the 30M/100M projection."""
    r = load("scale_cpu.json")
    if r is None or not r.get("sizes"):
        return ""
    sizes, fits, st = r["sizes"], r["fits"], r["settings"]
    head = sizes[-1]
    busy = [s["steps"][k]["other_cores_busy"] for s in sizes for k in s["steps"]
            if s["steps"][k].get("other_cores_busy") is not None]
    atlas = "; ".join(f"{_cells(s['cells'])}: {s['atlas']['files']} file{'s' if s['atlas']['files'] > 1 else ''}, {s['atlas']['bytes'] / 1e9:.1f} GB, "
                      f"{s['corpus']['nonzeros_per_cell']:,.0f} nonzeros per cell, corpus "
                      f"{s['corpus']['disk_bytes'] / 1e9:.1f} GB ({s['corpus']['bytes_per_nonzero']:.2f} bytes per "
                      f"nonzero, {s['corpus']['n_shards']} shards)" for s in sizes if s.get("corpus"))
    rows = []
    for key, what in SCALE_STEPS.items():
        have = [s for s in sizes if key in s["steps"]]
        if not have:
            continue
        f = fits.get(key, {})
        per_size = "; ".join(f"{_cells(s['cells'])}: {s['steps'][key]['wall_s']:,.0f} s / "
                             f"{s['steps'][key]['cpu_s']:,.0f} s" for s in have)
        def peaks(row: dict, suffix: str = "") -> str:
            return _gib(row[f"main_peak_rss{suffix}"]) + (f" / {_gib(row[f'worker_peak_rss{suffix}'])}"
                                                         if row.get("worker_peak_rss") else "")

        rss = "; ".join(f"{_cells(s['cells'])}: {peaks(s['steps'][key])}"
                        + (f" (anonymous {peaks(s['steps'][key], '_anon')})" if s["steps"][key].get("main_peak_rss_anon")
                           else "") for s in have)
        us = ", ".join(f"{x:,.1f}" for x in f.get("cpu_us_per_cell", []))
        slope = f.get("cpu_s_slope")
        if key.startswith("loader_") and key != "loader_plan" and f.get("cpu_slope_per_cell_read") is not None:
            slope = f["cpu_slope_per_cell_read"] + 1
        which = "worker_peak_rss" if have[-1]["steps"][key].get("worker_peak_rss") else "main_peak_rss"
        grow = f.get(f"{which}_anon_bytes_per_added_cell", f.get(f"{which}_bytes_per_added_cell"))
        rows.append([what, per_size, us, "-" if slope is None else f"{slope:.2f}", rss,
                     "-" if grow is None else f"{grow:+,.0f}"])
    ident = [s["multinode_identity"] for s in sizes if s.get("multinode_identity")]
    ident_text = "".join(
        f" **Multi-node identity:** {i['nodes']} node ranks (`--num-nodes {i['nodes']} --node-rank R`, run at once on "
        f"this machine's one filesystem, `--workers 1` each, built vocabulary) then `merge`, at {_cells(i['cells'])} "
        f"cells: {'byte-identical' if i['identical'] else 'NOT identical'} to the one-node corpus ({i['files_compared']} "
        f"files, {i['bytes_compared'] / 1e9:.1f} GB compared by sha256: shards, manifest, vocabulary, "
        "cell_lengths.npy, stats.zarr" + (f"; differing: {', '.join(i['differing_files'] + i['files_in_one_only'])}"
                                          if not i["identical"] else "") + ")." for i in ident)
    loader_note = ("full epochs" if not st.get("loader_max_batches") else
                   f"epochs capped at {st['loader_max_batches']} batches")
    out = [f"**Scaling with the number of cells** (issue 25). {source('scale_cpu.json', r)} The synthetic atlas "
           f"(`python -m data_pipeline synthetic --preset atlas`, files of {st['cells_per_file']:,} cells; {atlas}). "
           f"Each step is its own process, as a user runs it: conversion with {st['workers']} workers, the loader with "
           f"{st['loader_workers']} DataLoader workers ({loader_note}; token budget {st['token_budget']:,}, megabatches "
           f"of {st['megabatch_cells']:,} cells). CPU time: user + system of the step and every process it waited for "
           "(`getrusage`); " + ("each step starts with its inputs (the atlas, or the corpus it reads) dropped from "
                                "the page cache (`POSIX_FADV_DONTNEED`), as at atlas scale, where they outgrow memory; "
                                if "inputs_dropped_from_page_cache_bytes" in head["steps"].get("verify", {}) else "")
           + "peak RSS sampled per process with psutil every "
           f"{st['rss_sampling_s'] * 1000:.0f} ms, with its anonymous part (RssAnon: heap and private memory, "
           "without the file pages a process maps; a peak of RSS also catches transient file pages). The machine "
           "was shared: other processes kept "
           f"{min(busy):.1f}-{max(busy):.1f} of its {r['device']['cores']} cores busy during the steps, so wall times "
           "are inflated and the CPU times are the figures to read. Slope: of log CPU time against log cells (1 = "
           "linear; loader epochs per cell read); fixed start-up costs (imports, numba kernels) pull it below 1 "
           "at these sizes." + ident_text, "",
           table(["step", "wall / CPU time", "CPU µs per cell (one core)", "CPU slope",
                  "peak RSS: main / largest worker", "bytes per added cell (anonymous memory)"], rows)]
    traces = [(s["cells"], s["convert_worker_trace"]) for s in sizes if s.get("convert_worker_trace")]
    if traces:
        def reached(t: dict) -> int:  # units done when the worker's peak first came within 1 % of its final value
            return next(u for u, p in t["worker_anon_peak_by_units_done"] if p >= 0.99 * t["peak_at_end"])

        out += ["", "A conversion worker's anonymous memory against the work units finished (`bench_scale.py "
                    "--trace-workers`, the conversion run once more with the workers sampled every 0.1 s): "
                + "; ".join(f"{_cells(c)} cells: {_gib(t['peak_at_end'])}, reached at unit {reached(t)} of "
                            f"{t['units']} and {'flat' if t['plateau'] else 'still growing'} after"
                            for c, t in traces)
                + ". Units are cut to one size whatever the corpus size; the few MiB between the sizes go with "
                  "the input files a worker holds open (at most 8)." + (
                      " The projection takes the conversion worker's memory as flat." if traces[-1][1]["plateau"]
                      else "")]
    windows = [(s["cells"], s["merge_window"]) for s in sizes if s.get("merge_window")]
    if windows:
        w = windows[-1][1]
        out += ["", "The statistics merge (in `merge`, and at the end of a one-node `convert`) adds every unit's "
                    "median sketch into a dense window per gene, from its lowest to its highest value bucket: "
                    + ", ".join(f"{_gib(x['bytes'])} at {_cells(c)} cells" for c, x in windows)
                    + f" ({w['tokens']:,} genes, at most {w['widest_token_buckets']:,} buckets for one gene). It grows "
                      "with the range of values a gene takes, which saturates, not with cells, and is capped at "
                      f"{_gib(w['cap_bytes'])} (`stats._DENSE_MERGE_MAX`; past it the merge goes pairwise)."]
    if r.get("defects"):
        out += ["", "Flagged by the benchmark's rule (`defects` in the JSON: CPU time growing faster than cells^1.15, or "
                    "memory that should be flat, the conversion and loader workers', the merge's and verify's, growing "
                    "by more than 10 %), each with what bounds or explains it where the JSON records that:"] + \
               [f"- {d}" for d in r["defects"]]
    else:
        out += ["", "No step's CPU time grew faster than linearly, and no memory that should be flat grew "
                    f"(conversion workers, merge, verify, loader workers), from {_cells(sizes[0]['cells'])} to "
                    f"{_cells(head['cells'])} cells" + (", but for the bounded growth below." if r.get("bounded")
                                                         else ".")]
    if r.get("bounded"):
        out += ["", "Memory that grows and has a bound independent of the number of cells (`bounded` in the JSON):"] + \
               [f"- {d}" for d in r["bounded"]]
    p = r.get("projection") or {}
    if p.get("targets"):
        a = p["assumptions"]
        n = a["nodes"]
        prow = []
        for t in p["targets"]:
            b, s = t.get("convert_built", {}), t.get("convert_supplied", {})
            prow.append([_cells(t["cells"]), f"{t['input_h5ad_bytes'] / 1e12:.2f} TB", f"{t['corpus_disk_bytes'] / 1e12:.2f} TB",
                         f"{b.get('cpu_hours', 0):,.1f} h", f"{_hours(b.get('cpu_bound_one_node_hours'))} / "
                         f"{_hours(b.get('io_bound_one_node_hours'))} / {_hours(b.get(f'io_bound_{n}_nodes_hours'))}",
                         _hours(b.get("one_node_hours")),
                         _hours(s.get("one_node_hours")), _hours(b.get(f"{n}_nodes_hours")),
                         _hours(s.get(f"{n}_nodes_hours")), _hours(b.get("merge_hours")),
                         f"{_gib(b.get('worker_rss_bytes'))} / {_gib(t.get('merge_rss_bytes'))}"
                         + (" (sketch bound)" if t.get("merge_rss_bounded_by_sketch") else ""),
                         f"{_gib((t.get('loader_log1p_bins') or {}).get('worker_rss_bytes'))} / "
                         f"{_gib((t.get('loader_rank') or {}).get('worker_rss_bytes'))}"])
        disk = ", ".join(f"{k} {v / 1e9:,.0f} GB" for k, v in p.get("disk_needed_for_sizes", {}).items())
        out += ["", f"**Projection to 30M and 100M cells (a projection, not a measurement).** From "
                    f"`scale_cpu.json`: {p['basis']}. One node of {a['node_cores']} cores, and {n} nodes "
                    f"(conversion as a SLURM array of {n} `--num-nodes` ranks, then `merge` on one node), cores "
                    f"used at {a['core_efficiency']:.2f} of linear (the 2-worker conversion scaling of `convert.json`); "
                    f"disks assumed, not measured: {a.get('node_disk_gbs', '?'):g} GB/s per node, "
                    f"{a.get('shared_fs_gbs', '?'):g} GB/s for the shared filesystem. "
                    f"{a['text']} Memory: conversion worker (the node holds {a['node_cores']} of them: at most "
                    f"{_gib(p['targets'][-1].get('convert_built', {}).get('node_rss_bytes_upper_bound'))} at "
                    f"{_cells(p['targets'][-1]['cells'])}, forked workers sharing pages) and merge; loader worker "
                    f"RSS with the epoch plan in it. Disk this benchmark needs per size ({p['disk_needed_what']}): "
                    f"{disk}.", "",
                table(["cells", "input h5ad", "corpus", "convert CPU", f"CPU-bound 1 node / disk-bound 1 node / {n} nodes",
                       "1 node, built vocabulary", "1 node, supplied",
                       f"{n} nodes, built (incl. merge)", f"{n} nodes, supplied", "merge",
                       "RSS: convert worker / merge", "RSS per loader worker: log1p_bins / rank"], prow)]
    if (RESULTS / "scale_cpu.png").exists():
        out += ["", "Time and peak RSS against cells, log-log: [`benchmarks/results/scale_cpu.png`]"
                    "(benchmarks/results/scale_cpu.png)."]
    return "\n".join(out)


def performance() -> str:
    blocks = [gpu_status(), training(), anchors(), scaling(), train_loop(), contrastive(), conversion(), scale(),
              loader(), epoch_plan(), loader_peers(), demo()]
    return "\n\n".join(b for b in blocks if b)


def train_loop() -> str:
    """The training loop's own overhead: steps/s reading the device every step vs every N."""
    parts = []
    for path in sorted(RESULTS.glob("train_loop_*.json")):
        r = json.loads(path.read_text())
        st, s = r["settings"], r.get("summary") or {}
        if not s:  # a run cut short: no medians to quote
            continue
        runs = [f"every step {n(s['steps_per_s_log_every_1'], 1)}", f"every {st['log_every']}th step "
                f"{n(s['steps_per_s_log_every_' + str(st['log_every'])], 1)}"]
        if s.get(f"steps_per_s_baseline_{st.get('baseline')}"):
            runs.append(f"the loop of `{st['baseline']}` (before issue 21, several reads per step) "
                        f"{n(s['steps_per_s_baseline_' + st['baseline']], 1)}")
        spread = "; ".join(f"{k.removeprefix('this ')} {n(lo, 1)}-{n(hi, 1)}"
                           for k, (lo, hi) in (s.get("min_max") or {}).items())
        load_avg = r.get("load_avg_1min") or {}
        parts.append(
            f"**The training loop's overhead.** {source(path.name, r)} The real "
            f"trainer on {st['config']} shrunk to a step of tens of milliseconds, {st['steps']} steps, median of "
            f"{st['repeats']} alternating runs, steps/s over {st['span']}, {st['threads']}: reading the device "
            + ", ".join(runs) + f" steps/s (paired ratio every {st['log_every']}th / every step "
            f"{n(s.get('paired_ratio'), 2)}; range over the runs: {spread}; machine load {n(load_avg.get('start'), 1)} "
            f"at the start). On a CPU nothing runs asynchronously, so a read costs only its host work; the GPU "
            "suite measures what the reads cost a launch queue.")
    return "\n\n".join(parts)


def _train_files(kind: str) -> list[Path]:
    """train_<device>.json (kind "train") or train_scaling_<device>.json (kind "scaling")."""
    files = sorted(f for f in RESULTS.glob("train_*.json") if not f.stem.startswith("train_loop_"))
    return [f for f in files if f.stem.startswith("train_scaling_") == (kind == "scaling")]


def training() -> str:
    parts = []
    for path in _train_files("train"):
        r = json.loads(path.read_text())
        st = r["settings"]
        speedup = {(x["preset"], x["backend"]): x["speedup_vs_random_padded"] for x in r["speedups"]}
        # against Geneformer's baseline (every cell padded to the cap), where the file measured it
        vs_cap = {(x["preset"], x["backend"]): x["speedup_vs_padded_to_cap"] for x in r["speedups"]
                  if x.get("speedup_vs_padded_to_cap")}
        # MFU against the device's measured bf16 matrix-product rate, where the run had one (GPU suite)
        measured = any(row.get("mfu_measured_gemm") is not None for row in r["rows"])
        rows, skipped = [], {}
        for row in r["rows"]:
            if row.get("skipped") or row.get("error") or row.get("oom"):
                why = row.get("skipped") or ("out of memory" if row.get("oom") else row.get("error"))
                skipped.setdefault(why, []).append(f"{row['preset']} / {row['backend']} / {row['mode']}")
                continue
            gain = speedup.get((row["preset"], row["backend"]), {}).get(row["mode"])
            cap_gain = vs_cap.get((row["preset"], row["backend"]), {}).get(row["mode"])
            rows.append([row["preset"], f"{row['d_model']} x {row['n_layers']}, {row['params'] / 1e6:.2f} M",
                         row["backend"], row["mode"], n(row["cells_per_step"], 1), n(row["cells_per_s"], 1),
                         n(row["tokens_per_s"]), f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-",
                         *([f"{row['mfu_measured_gemm']:.1%}" if row.get("mfu_measured_gemm") is not None else "-"]
                           if measured else []),
                         n(row["peak_memory_bytes"] / 2**20), f"{row['padding_waste']:.1%}",
                         f"{gain:.2f}x" if gain else ("1.00x" if row["mode"] == "random_padded" else "-"),
                         *([f"{cap_gain:.2f}x" if cap_gain else ("1.00x" if row["mode"] == "padded_to_cap" else "-")]
                           if vs_cap else [])])
        lengths = st["length_source"]
        pct = lengths.get("percentiles", {})
        text = [f"**Training throughput.** {source(path.name, r)} "
                + ("Presets shrunk for the CPU (width / " + f"{st['width_div']}, at most {st['max_layers']} layers, "
                   f"at most {st['max_genes_cap']} genes per cell); " if st.get("shrunk") else "Full-size presets; ")
                + f"{'bf16' if st['bf16'] else 'fp32'}, ZeRO-{st['zero_stage']}, token budget "
                f"{n(st['token_budget'])} per step, {st['world_size']} rank(s), {st['threads_per_rank']} thread(s) per "
                f"rank; {st['warmup_steps']} warm-up and {st['timed_steps']} timed steps per row; {st['loss']}. "
                f"Cell lengths: {st['lengths']} ({n(lengths.get('n_cells'))} cells; median {n(pct.get('50'))}, "
                f"90th percentile {n(pct.get('90'))}, max {n(pct.get('100'))} genes). Speed-up: cells/s against "
                "random batches padded to their longest cell, at the same token budget"
                + ("; vs padded to cap: against every cell padded to the preset's cap (Geneformer's baseline)"
                   if vs_cap else "")
                + (". Padded batches are measured under sdpa (exact attention with a key mask); packed rows of "
                   "other backends are compared with those (for favor, a ratio that also holds the change to "
                   "linear attention)." if any(
                       set((x.get("baseline_backend") or {}).values()) - {x["backend"]} for x in r["speedups"])
                   else "."), "",
                table(["preset", "shape (width x layers, params)", "attention", "batches", "cells/step", "cells/s",
                       "tokens/s", "MFU", *(["MFU (measured GEMM)"] if measured else []), "peak memory (MiB)",
                       "padding", "speed-up", *(["vs padded to cap"] if vs_cap else [])], rows)]
        if skipped:
            text += ["", "Not measured:"] + [f"- {', '.join(where)}: {why}." for why, where in skipped.items()]
        parts.append("\n".join(text))
    return "\n\n".join(parts)


def scaling() -> str:
    parts = []
    for path in _train_files("scaling"):
        r = json.loads(path.read_text())
        sc = r["scaling"]
        rows = [[run["world_size"], ", ".join(n(x, 1) for x in run["per_rank_cells_per_s"]),
                 n(run["aggregate_cells_per_s"], 1), f"{run['efficiency']:.2f}"] for run in sc["runs"]]
        parts.append("\n".join([
            f"**Data-parallel scaling.** {source(path.name, r)} {sc['preset']} (shrunk as above), {sc['backend']}, "
            f"{sc['mode']} batches, launched with `{sc['launcher']}`, {sc['threads_per_rank']} thread per rank on a "
            f"{sc['cpu_count']}-core machine (more ranks than cores share them). Efficiency: {sc['efficiency']}.", "",
            table(["ranks", "cells/s per rank", "aggregate cells/s", "efficiency"], rows)]))
    for path in sorted(RESULTS.glob("projection_*.json")):
        r = json.loads(path.read_text())
        a = r["assumptions"]
        grouped: dict[tuple, dict] = {}
        for p in r["projections"]:  # one row per preset, backend and basis; a column per ZeRO stage
            key = (p["preset"] + (" (shrunk)" if p.get("shrunk") else ""), p["backend"], p["basis"])
            grouped.setdefault(key, {"rate": p["cells_per_s_per_device"], "steps": p["steps_per_epoch"]})[p["zero_stage"]] = (
                f"{duration(p['epoch_hours_full_overlap'])} - {duration(p['epoch_hours_no_overlap'])}")
        rows = [[*key, n(g["rate"], 1), n(g["steps"]), g.get(1, "-"), g.get(2, "-"), g.get(3, "-")]
                for key, g in grouped.items()]
        parts.append("\n".join([
            f"**Projection: {a['cells_per_epoch'] / 1e6:.0f} M cells on {a['nodes']} nodes x {a['gpus_per_node']} "
            f"devices.** From `benchmarks/results/{path.name}` (`python {r['command']}`), built on the measured "
            f"per-device rate of `{r['measured_file']}` ({device_text(r['measured_device'])}, "
            f"{r['measured_date'][:10]}); {a['inter_node_gbs']:g} GB/s per rank across nodes, {a['micro_steps']} "
            "micro-step(s) per step; the ZeRO traffic model is in `benchmarks/README.md`. A projection, not a "
            "measurement: it is only as good as the per-device rate it starts from. Rows whose basis is a target "
            "show what the MFU target would give on full-size presets; they are not measured.", "",
            table(["preset", "attention", "basis", "cells/s per device", "steps per epoch",
                   "epoch, ZeRO-1 (full overlap - none)", "ZeRO-2", "ZeRO-3"], rows)]))
    return "\n\n".join(parts)


# --- Clustering -----------------------------------------------------------------------------------

def clustering() -> str:
    """The cluster command on the demo's labelled synthetic cells: ARI / NMI of scHybridBERT and the
    two baselines of the same run, with k given and with graph communities."""
    r = load("cluster_demo_cpu.json")
    if r is None:
        return ("No `benchmarks/results/cluster_demo_cpu.json` yet: run `python launch/demo.py --out demo`, then "
                "`python benchmarks/bench_cluster.py --bundle demo/bundle --input demo/held_out.h5ad --label-column "
                "cell_type --n-clusters 8 --out benchmarks/results/cluster_demo_cpu.json`.")
    names = {"schybridbert": "scHybridBERT (fused)", "pca50": "PCA-50 of log1p-CP10k", "embedding_kmeans":
             "the bundle embedding alone"}
    rows = []
    for run in r["runs"]:
        methods = run["report"]["methods"]
        how = "k-means" if "--n-clusters" in run["args"] else "communities"
        for key, label in names.items():
            m = methods[key]
            rows.append([" ".join(run["args"]), label, m["clustering"], m["n_clusters"], f"{m['ari']:.3f}",
                         f"{m['nmi']:.3f}"])
        rows[-3][0] = f"{rows[-3][0]} ({run['wall_s']:.0f} s; {how})"
    threads = f"OMP_NUM_THREADS={r['omp_num_threads']}" if r.get("omp_num_threads") else "the threads the command picks"
    return "\n".join([source("cluster_demo_cpu.json", r), "",
                      f"Input: `{Path(r['input']).name}` of `launch/demo.py` (2,000 synthetic labelled cells of 8 types) "
                      f"and its bundle; {threads}.", "",
                      table(["command flags", "representation", "clustering", "clusters", "ARI", "NMI"], rows)])


# --- Claims -------------------------------------------------------------------------------------

# the seeds' claims that a benchmark measures: (the claim, where it is from)
CLAIMS = {
    "input_cost": ("nonzero-only input cuts compute by more than 70 %", "CellLM (Zhao et al. 2023; OpenBioMed)"),
    "grouping": ("29.4x pretraining speed-up from length-grouped padding, against padding every cell to 2,048",
                 "Geneformer (Theodoris et al., Nature 2023)"),
    "embed": ("8 A100 process 100k cells per hour", "scBERT explainer (seed note)"),
}


def _measured_at(path: Path, r: dict) -> str:
    cut = " (a run cut short: the rows it finished)" if r.get("partial") else ""
    return f"{device_text(r['device'])}; {r['date'][:10]}; `benchmarks/results/{path.name}`{cut}"


def _median(settings: dict) -> str:
    pct = (settings.get("length_source") or {}).get("percentiles", {})
    return f"{settings['lengths']} cell lengths (median {n(pct.get('50'))} genes)"


def _input_cost_rows() -> list[list[str]]:
    rows = []
    for path in sorted(RESULTS.glob("input_cost_*.json")):
        r = json.loads(path.read_text())
        st, s, full, ms = r["settings"], r["summary"], r["settings"]["full_shape"], r["settings"]["measured_shape"]
        shrunk = (f" (counter and time on a shrunk shape, width {ms['d_model']} x {ms['n_layers']} layers; CPU-shrunk)"
                  if st["shrunk"] else "")
        rows.append([*CLAIMS["input_cost"],
                     f"scbert shape ({full['n_layers']} x {full['d_model']}, {full['attention']}), training step; "
                     f"all {n(st['n_genes'])} genes vs the cell's expressed genes; {_median(st)}",
                     f"cost model -{s['model_cost_median']:.1%} at the median cell, -{s['model_cost_distribution']:.1%}"
                     f" over the distribution; torch FLOP counter -{s['flop_counter_median']:.1%}, CPU time "
                     f"-{s['time_median']:.1%} at the median cell{shrunk}", _measured_at(path, r)])
    return rows


GENEFORMER_CAP = 2048  # the claim's baseline pads every cell to Geneformer's input size


def _grouping_rows() -> list[list[str]]:
    rows = []
    files = sorted(RESULTS.glob("geneformer_grouping_*.json")) + _train_files("train")
    for path in files:
        r = json.loads(path.read_text())
        st = r["settings"]
        for entry in r.get("speedups") or []:
            ratios = entry.get("speedup_vs_padded_to_cap") or {}
            # the claim is about batching: FAVOR+ rows also change the attention, so they are not its rows
            if entry["preset"] != "geneformer-10m" or entry["backend"] == "favor" or not any(ratios.values()):
                continue
            base = (entry.get("baseline_backend") or {}).get("padded_to_cap", entry["backend"])
            row = next(x for x in r["rows"] if (x["preset"], x["backend"], x["mode"]) ==
                       ("geneformer-10m", base, "padded_to_cap"))
            if row["max_genes"] != GENEFORMER_CAP:  # e.g. train_cpu.json's cap of 1,024: not the claim's baseline
                continue
            shrunk = (f"; CPU-shrunk (width {row['d_model']} x {row['n_layers']} layers)" if row.get("shrunk")
                      else "")
            backend = entry["backend"] + (f" (padded baselines under {base})" if base != entry["backend"] else "")
            bound = entry.get("padded_to_cap_flops_over_useful")
            bound = (f"; padding every cell to the cap costs {bound:.1f}x the cells' own FLOPs here, the most a "
                     "FLOP-bound step can gain" if bound else "")
            rows.append([*CLAIMS["grouping"],
                         f"geneformer-10m, {backend}, cap {n(row['max_genes'])} genes, token budget "
                         f"{n(st['token_budget'])}, {_median(st)}",
                         ", ".join(f"{mode} {v:.2f}x" for mode, v in ratios.items() if v) + " the cells/s of "
                         f"padded_to_cap (padding waste {row['padding_waste']:.0%}{bound}){shrunk}",
                         _measured_at(path, r)])
    return rows


def _embed_rows() -> list[list[str]]:
    rows = []
    for path in sorted(RESULTS.glob("embed_*.json")):
        r = json.loads(path.read_text())
        st, claim = r["settings"], r["claim"]
        shrunk = f"; CPU-shrunk (width / {st['width_div']}, at most {st['max_layers']} layers)" if st["shrunk"] else ""
        rows.append([CLAIMS["embed"][0] + f" ({claim['cells_per_s_per_device']:.1f} cells/s per A100)",
                     CLAIMS["embed"][1],
                     f"embedding (normalize, batch, encode), {st['dtype']}, token budget {n(st['token_budget'])}, "
                     f"{n(st['n_genes'])} vocabulary genes, {_median(st)}"
                     + (f", {st['threads']} CPU thread(s)" if st.get("threads") else ""),
                     "; ".join(f"{x['preset']} {n(x['cells_per_s'], 1)}" if x.get("cells_per_s") else
                               f"{x['preset']} failed ({x.get('error', '?')[:60]})" for x in r["rows"])
                     + f" cells/s per device{shrunk}", _measured_at(path, r)])
    return rows


def claims() -> str:
    """The seeds' claims beside what the benchmarks here measure of them."""
    rows = _input_cost_rows() + _grouping_rows() + _embed_rows()
    if not rows:
        return "**The seeds' claims.** Not measured yet."
    return "\n".join([
        "**The seeds' claims, measured.** Each claim, where it is from, the setting we measured it in and our "
        "number, with the device and date of the result file. A CPU-shrunk number compares shapes and ratios "
        "on a 2-core CPU, not the paper's hardware.", "",
        table(["claim", "source", "setting", "ours", "measured on"], rows)])


# --- README -------------------------------------------------------------------------------------

BLOCKS = {"quality": quality, "performance": performance, "claims": claims, "clustering": clustering}


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- report:{name} -->\n)(?:.*?\n)?(<!-- /report:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- report:{name} --> ... <!-- /report:{name} --> block")
        body = make()
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the JSONs give")
    args = ap.parse_args()
    current = README.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            sys.exit("README.md is out of date with benchmarks/results: run `python benchmarks/report.py`")
        return
    README.write_text(wanted)
    print("README.md updated" if wanted != current else "README.md already up to date", file=sys.stderr)


if __name__ == "__main__":
    main()

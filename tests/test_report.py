"""The README's generated sections are what the committed result JSONs give."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import report  # noqa: E402


def test_readme_matches_the_result_files():
    r = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_source_line_names_the_commit_where_the_result_has_it():
    base = {"device": "cpu", "date": "2026-12-06T18:00:00+00:00", "command": "benchmarks/x.py"}
    with_code = report.source("x.json", {**base, "code": {"commit": "0123456789abcdef", "modified": True}})
    assert "2026-12-06; commit 0123456789 with local changes;" in with_code
    assert "commit" not in report.source("x.json", base)  # results from before it was recorded
    moved = report.source("x.json", {**base, "code": {"commit": "0123456789abcdef", "modified": False},
                                     "code_at_write": {"commit": "fedcba9876543210", "modified": False}})
    assert "; commit 0123456789 (the checkout was at fedcba9876 when it wrote the file);" in moved


def test_render_replaces_only_the_blocks():
    text = ("intro\n<!-- report:quality -->\nstale\n<!-- /report:quality -->\nmiddle\n"
            "<!-- report:performance -->\n<!-- /report:performance -->\n"
            "<!-- report:claims -->\n<!-- /report:claims -->\n<!-- report:clustering -->\n<!-- /report:clustering -->"
            "\nend\n")
    out = report.render(text)
    assert out.startswith("intro\n<!-- report:quality -->\n") and "stale" not in out
    assert "\nmiddle\n" in out and out.endswith("<!-- /report:clustering -->\nend\n")
    assert report.render(out) == out  # idempotent


def _demo_record() -> dict:
    return {"device": "cpu", "date": "2026-12-04T15:00:00+00:00", "command": "launch/demo.py --out d", "wall_s": 90.4,
            "seconds": {"synthetic cells": 5.0, "convert": 5.0, "pretrain": 70.0, "export": 0.0, "embed": 4.0},
            "steps": 200, "cells_per_s": 150.0, "tokens_per_s": 20000, "reused": [],
            "threads": {"torch": 2, "OMP_NUM_THREADS": None, "usable_cores": 2, "load_avg_1min_at_start": 0.5},
            "first_losses": {"mlm": 3.0}, "final_losses": {"mlm": 1.0}}


def test_demo_line_says_threads_and_reuse(monkeypatch):
    r = _demo_record()
    monkeypatch.setattr(report, "load", lambda name: r)
    line = report.demo()
    assert "90 s in all" in line and "OMP_NUM_THREADS unset, torch on 2 thread(s) of 2 usable cores" in line
    assert "reused" not in line
    r["reused"] = ["synthetic cells", "convert", "pretrain"]
    assert "pretraining reused from an earlier invocation" in report.demo()


def test_demo_line_gives_cells_and_sequences_and_says_a_corrected_rate(monkeypatch):
    r = {**_demo_record(), "cells_per_s": 150.0, "sequences_per_s": 300.0}
    monkeypatch.setattr(report, "load", lambda name: r)
    assert "150 cells/s = 300 sequences/s of two views per cell" in report.demo()
    assert "halved" not in report.demo()
    r["cells_per_s_corrected"] = "halved from the 300.0 cells/s logged before issue 21"
    assert "The cell rate is the logged 300 halved" in report.demo()


def _claim_files(folder: Path) -> None:
    """One result file per claim, as bench_input_cost.py, bench_train.py and bench_embed.py write them."""
    import json

    cpu = {"cpu": "Test CPU", "cores": 2, "gpu": None}
    lengths = {"lengths": "real", "length_source": {"percentiles": {"50": 493.0}}}
    files = {
        "input_cost_cpu.json": {
            "device": cpu, "date": "2026-12-04T20:00:00+00:00", "partial": False,
            "settings": {**lengths, "n_genes": 16906, "shrunk": True,
                         "full_shape": {"d_model": 200, "n_layers": 6, "attention": "favor"},
                         "measured_shape": {"d_model": 50, "n_layers": 2}},
            "summary": {"model_cost_median": 0.971, "model_cost_distribution": 0.957, "flop_counter_median": 0.9706,
                        "time_median": 0.973}},
        "geneformer_grouping_cpu.json": {
            "device": cpu, "date": "2026-12-04T20:10:00+00:00", "partial": True,
            "settings": {**lengths, "token_budget": 8192},
            "rows": [{"preset": "geneformer-10m", "backend": "sdpa", "mode": "padded_to_cap", "max_genes": 2048,
                      "padding_waste": 0.67, "shrunk": True, "d_model": 64, "n_layers": 2}],
            "speedups": [{"preset": "geneformer-10m", "backend": "sdpa",
                          "speedup_vs_padded_to_cap": {"random_padded": 2.0, "grouped_padded": 4.5, "packed": None}},
                         {"preset": "geneformer-10m", "backend": "varlen",  # packed only: sdpa's padded baselines
                          "baseline_backend": {"random_padded": "sdpa", "padded_to_cap": "sdpa"},
                          "speedup_vs_padded_to_cap": {"packed": 3.5}, "padded_to_cap_flops_over_useful": 3.94},
                         {"preset": "geneformer-10m", "backend": "favor",  # linear attention: not the claim's row
                          "baseline_backend": {"random_padded": "sdpa", "padded_to_cap": "sdpa"},
                          "speedup_vs_padded_to_cap": {"packed": 6.0}, "padded_to_cap_flops_over_useful": None}]},
        "train_cpu.json": {  # bench_train's own CPU run caps cells at 1,024: not the claim's padding to 2,048
            "device": cpu, "date": "2026-12-06T20:00:00+00:00", "settings": {**lengths, "token_budget": 8192},
            "rows": [{"preset": "geneformer-10m", "backend": "sdpa", "mode": "padded_to_cap", "max_genes": 1024,
                      "padding_waste": 0.28, "shrunk": True, "d_model": 64, "n_layers": 2}],
            "speedups": [{"preset": "geneformer-10m", "backend": "sdpa",
                          "speedup_vs_padded_to_cap": {"grouped_padded": 1.62}}]},
        "embed_nvidia-h200.json": {
            "device": {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8}, "date": "2026-12-05T09:00:00+00:00",
            "settings": {**lengths, "shrunk": False, "dtype": "bf16 autocast", "token_budget": 65536,
                         "n_genes": 16906},
            "claim": {"cells_per_s_per_device": 100_000 / 3600 / 8},
            "rows": [{"preset": "scbert", "cells_per_s": 120.25}, {"preset": "scgpt", "cells_per_s": 9000.0}]},
    }
    for name, record in files.items():
        (folder / name).write_text(json.dumps(record))


def test_claims_table_puts_each_claim_beside_our_number(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert "Not measured yet" in report.claims()
    _claim_files(tmp_path)
    text = report.claims()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4
    cost, grouping, varlen, embed = rows
    assert "more than 70 %" in cost and "CellLM" in cost and "-97.1% at the median cell" in cost
    assert "-95.7% over the distribution" in cost and "CPU-shrunk" in cost and "Test CPU, 2 cores" in cost
    assert "29.4x" in grouping and "Geneformer" in grouping and "cap 2,048 genes" in grouping
    assert "grouped_padded 4.50x" in grouping and "packed" not in grouping.split("|")[4]  # a failed mode: no ratio
    assert "CPU-shrunk (width 64 x 2 layers)" in grouping and "a run cut short" in grouping
    assert "varlen (padded baselines under sdpa)" in varlen and "packed 3.50x the cells/s of padded_to_cap" in varlen
    assert "costs 3.9x the cells' own FLOPs" in varlen and "FLOPs" not in grouping  # an older file: no FLOP ratio
    assert "6.00x" not in text  # FAVOR+ changes the attention too: not a row of the batching claim
    assert "1.62x" not in text and "cap 1,024" not in text
    assert "3.5 cells/s per A100" in embed and "scbert 120.2; scgpt 9,000.0 cells/s per device" in embed
    assert "NVIDIA H200" in embed and "2026-12-05" in embed and "shrunk" not in embed


def test_claims_block_is_rendered_where_the_readme_has_it():
    text = ("<!-- report:quality -->\n<!-- /report:quality -->\n<!-- report:performance -->\n"
            "<!-- /report:performance -->\n<!-- report:claims -->\nstale claims row\n<!-- /report:claims -->\n"
            "<!-- report:clustering -->\n<!-- /report:clustering -->\n")
    out = report.render(text)
    assert "stale claims row" not in out and "**The seeds' claims" in out and report.render(out) == out


def _eval_record() -> dict:
    def row(knn, loss):
        return {"knn_macro_f1": {"mean": knn, "min": knn - 0.01, "max": knn + 0.01, "n": 3},
                "logreg_macro_f1": {"mean": knn + 0.1, "min": knn, "max": knn + 0.2, "n": 3},
                "masked_bin_accuracy": {"mean": 0.15, "min": 0.14, "max": 0.16, "n": 3},
                "accuracy_ceiling": {"mean": 0.21, "min": 0.21, "max": 0.21, "n": 3},
                "masked_loss": {"mean": loss, "min": loss, "max": loss, "n": 3},
                "finetuned head 0.1": {"mean": knn + 0.2, "min": knn + 0.2, "max": knn + 0.2, "n": 3},
                "finetuned head 1": {"mean": knn + 0.3, "min": knn + 0.3, "max": knn + 0.3, "n": 3},
                **{f"cluster {m} {k}": {"mean": v, "min": v, "max": v, "n": 3}
                   for m, v in (("schybridbert", knn), ("pca50", 0.7), ("embedding_kmeans", knn / 2)) for k in ("ari", "nmi")}}

    return {"device": {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "gpu": None}, "date": "2026-12-05T01:00:00+00:00", "command": "benchmarks/eval_embeddings.py --phase final",
            "versions": {}, "phase": "final",
            "settings": {"config": "benchmarks/configs/eval.yaml", "steps": 1000, "curve": [250, 1000], "seeds": [0, 1, 2],
                         "cap": "auto", "probe": "5-fold",
                         "finetune": {"modes": ["head"], "fractions": [0.1, 1.0], "epochs": 10, "how": "folds"},
                         "cluster": {"vae_steps": 1500, "epochs": 300, "how": "k = labels"}},
            "corpus": {"cells": 7000, "tokens": 9000000, "files": ["a", "b"]},
            "files": {"f": {"cells": 200, "classes": 4, "label_key": "cell_type"}},
            "baselines": {"f": {"PCA-50": {"knn_macro_f1": 0.8, "logreg_macro_f1": 0.85},
                                "HVG-2000": {"knn_macro_f1": 0.7, "logreg_macro_f1": 0.9},
                                "label fractions": {"HVG-2000 LR 0.1": 0.6, "HVG-2000 LR 1": 0.9,
                                                    "PCA-50 LR 0.1": 0.5, "PCA-50 LR 1": 0.85},
                                "clustering": {"PCA-50 communities": {
                                    "clustering": "leiden (leidenalg), resolution 1.0, 15 neighbours", "ari": 0.75,
                                    "nmi": 0.8, "n_clusters": 6}}}},
            "summary": {"mlm": {"0": {"f": row(0.2, 3.0)}, "250": {"f": row(0.4, 2.5)}, "1000": {"f": row(0.6, 2.0)}}},
            "verdicts": {"mlm": {"f": {"knn_macro_f1_beats_random_init": True, "logreg_macro_f1_beats_random_init": True,
                                       "masked_loss_below_random_init": True, "knn_minus_pca50": -0.2,
                                       "previous_knn": 0.4, "share_of_previous_gap_closed": 0.5,
                                       "finetuned_0.1_minus_hvg2000_lr": 0.2}},
                         "all_beat_random_init": True},
            "runs": {"mlm": {"0": {"reused": {"date": "2026-12-04T10:00:00+00:00",
                                              "command": "benchmarks/eval_embeddings.py --phase final --seeds 0"}},
                             "1": {}, "2": {}}}}


def test_quality_renders_the_current_evaluation_beside_the_previous_one(monkeypatch):
    current = _eval_record()
    monkeypatch.setattr(report, "load", lambda name: current if name == "eval_final.json" else None)
    text = report.quality()
    assert "**Final report (held-out files).**" in text and "seeds 0, 1, 2" in text
    assert "| PCA-50 | 0.800 | 0.850 | - | - |" in text and "| HVG-2000 | 0.700 | 0.900 | - | - |" in text
    assert "| random init | 0.200 [0.190, 0.210] |" in text
    assert "| mlm (1000 steps) | 0.600 [0.590, 0.610] | 0.700 [0.600, 0.800] | 0.150 [0.140, 0.160] (ceiling 0.210) |" in text
    assert "| mlm | 250 | 0.400 / 2.500 |" in text  # the learning curve
    assert "closes 50% of the previous report's kNN gap" in text and "**yes**" in text
    assert "| model | 10% of labels | 100% of labels |" in text
    assert "| HVG-2000 + logistic regression | 0.600 | 0.900 |" in text
    assert "| random init, fine-tuned (head) | 0.400 [0.400, 0.400] | 0.500 [0.500, 0.500] |" in text
    assert "| mlm (1000 steps), fine-tuned (head) | 0.800 [0.800, 0.800] | 0.900 [0.900, 0.900] |" in text
    assert "fine-tuned at 10% of labels +0.200 against HVG-2000" in text
    assert ("| PCA-50 of log1p-CP10k (HVG): leiden (leidenalg), resolution 1.0, 15 neighbours (scanpy's default "
            "pipeline) | 6 | 0.750 | 0.800 |") in text  # the clusters it found; the k-means rows have k = the classes
    assert "| PCA-50 of log1p-CP10k (HVG): k-means | 4 | 0.700 [0.700, 0.700] | 0.700 [0.700, 0.700] |" in text
    assert "| random init: scHybridBERT | 4 | 0.200 [0.200, 0.200] |" in text
    assert "| mlm (1000 steps): embedding alone | 4 | 0.300" in text
    assert "| clustering |" not in text  # not a probe row
    assert "previous evaluation" not in text  # no legacy file here
    assert "(10 epochs; folds; the head's input unscaled):" in text  # written before recipes were recorded
    current["settings"]["finetune"] |= {"modes": ["head", "full"], "epochs": 30, "full_epochs": 10,
                                        "recipe": {"lr": 0.001, "standardize": True}}
    assert ("(head 30 epochs, full 10; folds; the head's input scaled by the training cells' mean and sd; lr 0.001):"
            in report.quality())
    assert ("Taken unchanged from an earlier result of the same settings (`--reuse`; not in the t-SNE figure): `mlm` "
            "seed 0 (2026-12-04, `python benchmarks/eval_embeddings.py --phase final --seeds 0`)." in text)



def test_quality_compares_the_final_recipes_side_by_side(monkeypatch):
    current, earlier = _eval_record(), _eval_record()
    earlier["settings"] |= {"steps": 3000, "curve": [250, 1000, 3000], "seeds": [0, 1]}
    earlier["summary"]["mlm"]["3000"] = earlier["summary"]["mlm"].pop("1000")
    earlier["summary"]["mlm"]["3000"]["f"]["knn_macro_f1"]["mean"] = 0.45
    current["summary"] = {"mlm+contrastive": current["summary"]["mlm"]}
    files = {"eval_final.json": current}
    monkeypatch.setattr(report, "load", lambda name: files.get(name))
    assert "The recipes on the held-out files" not in report.quality()  # one final result: nothing to compare
    files["eval_final_mlm.json"] = earlier
    text = report.quality()
    assert text.index("The recipes on the held-out files") < text.index("**Final report (held-out files).**")
    assert "| f | PCA-50 (logistic regression in the head columns) | 0.800 | 0.850 | - | 0.500 | 0.850 | - | 0.700 | - |" in text
    assert "| f | HVG-2000 (logistic regression in the head columns) | 0.700 | 0.900 | - | 0.600 | 0.900 | - | - | - |" in text
    assert ("| f | `mlm+contrastive`, 1,000 steps, 3 seeds (`eval_final.json`) | 0.600 | 0.700 | - | 0.800 | 0.900 | "
            "0.600 | 0.300 | 2.000 |") in text
    assert "| f | `mlm`, 3,000 steps, 2 seeds (`eval_final_mlm.json`) | 0.450 | 0.700 | - | 0.800 |" in text


def test_quality_says_which_seeds_the_figure_shows(monkeypatch, tmp_path):
    current = _eval_record()
    monkeypatch.setattr(report, "load", lambda name: current if name == "eval_final.json" else None)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    (tmp_path / "eval_final.png").write_bytes(b"png")
    text = report.quality()  # a result from before figure_seeds: a taken seed's mix was not in the figure
    assert "(`--reuse`; not in the t-SNE figure): `mlm` seed 0" in text and "The t-SNE shows" not in text
    current["figure_seeds"] = {"random init": 1, "mlm": 1}  # seed 0 taken: the figure shows the seed computed
    text = report.quality()
    assert "same settings (`--reuse`): `mlm` seed 0" in text
    assert "The t-SNE shows random init of seed 1, mlm of seed 1." in text and "Not in it" not in text
    current["figure_seeds"] = {}  # every seed taken: no model panel
    assert "Not in it (every seed taken with `--reuse`, whose embeddings are not kept): `random init`, `mlm`." \
        in report.quality()
    current["figure_seeds"] = {"random init": 0, "mlm": 0}  # the usual case says nothing more
    assert "The t-SNE shows" not in report.quality() and "Not in it" not in report.quality()


def test_loader_peers_block_quotes_rates_and_says_which_goals_are_met(monkeypatch):
    row = lambda rate, nnz: {"cells_per_cpu_s": rate, "nonzeros_per_cpu_s": rate * nnz, "cells_per_s_wall": rate // 2,  # noqa: E731
                             "cells_per_round": 1000, "nonzeros_per_cell": nnz}
    r = {"date": "2026-12-05T09:00:00+00:00", "device": "cpu", "versions": {"python": "3.11.7"},
         "command": "benchmarks/bench_loader_peers.py --peer-python /somewhere/python3.12",
         "peer_versions": {"python": "3.12.1", "annbatch": "0.3.1"}, "peer_interpreter": {"run_as": "a child process"},
         "cells": {"files": ["a.h5ad", "b.h5ad"], "copies_of_each": 8, "peer_cells": 1000},
         "setup": {"batch_cells": 1024, "rounds": 3, "one_core": "core 0"},
         "results": {"project raw": row(300, 690), "project log1p_bins + masking": row(150, 690),
                     "annbatch raw": row(200, 730)},
         "ratios": {"project raw / annbatch raw": 1.5, "project log1p_bins + masking / annbatch raw": 0.75}}
    monkeypatch.setattr(report, "load", lambda name: r if name == "loader_peers_cpu.json" else None)
    block = report.loader_peers()
    assert "| project raw | raw counts, unmasked | 1,000 | 300 | 300-300 | 207,000 | 150 | 1.50x |" in block
    assert "project raw / annbatch raw: 1.50x (met; round by round -)" in block
    assert "project log1p_bins + masking / annbatch raw: 0.75x (not met; round by round -)" in block
    r["results"]["project raw"]["cells_per_cpu_s_rounds"] = [300, 330]
    r["results"]["annbatch raw"]["cells_per_cpu_s_rounds"] = [200, 300]
    assert "project raw / annbatch raw: 1.50x (met; round by round 1.50, 1.10)" in report.loader_peers()
    assert "/somewhere" not in block  # the reproduce line names no machine's path


def test_clustering_block_names_each_runs_method_and_the_threads(monkeypatch):
    method = lambda how, n, ari: {"clustering": how, "n_clusters": n, "ari": ari, "nmi": ari}  # noqa: E731
    r = {"date": "2026-12-07T10:00:00+00:00", "device": "cpu", "versions": {"python": "3.11.7"},
         "command": "benchmarks/bench_cluster.py --n-clusters 8", "input": "demo/held_out.h5ad",
         "omp_num_threads": None,
         "runs": [{"args": ["--n-clusters", "8"], "wall_s": 96.4,
                   "report": {"methods": {"schybridbert": method("k-means (k=8)", 8, 1.0),
                                          "pca50": method("k-means (k=8)", 8, 0.9),
                                          "embedding_kmeans": method("k-means (k=8)", 8, 0.1)}}},
                  {"args": ["--leiden-resolution", "1.0"], "wall_s": 88.0,
                   "report": {"methods": {"schybridbert": method("leiden (leidenalg), resolution 1.0", 26, 0.47),
                                          "pca50": method("leiden (leidenalg), resolution 1.0", 8, 1.0),
                                          "embedding_kmeans": method("k-means (k=26)", 26, 0.0)}}}]}
    monkeypatch.setattr(report, "load", lambda name: r if name == "cluster_demo_cpu.json" else None)
    block = report.clustering()
    assert "| --n-clusters 8 (96 s; k-means) | scHybridBERT (fused) | k-means (k=8) | 8 | 1.000 | 1.000 |" in block
    assert "| --leiden-resolution 1.0 | PCA-50 of log1p-CP10k | leiden (leidenalg), resolution 1.0 | 8 | 1.000 |" in block
    assert "| --leiden-resolution 1.0 (88 s; communities) | scHybridBERT (fused) |" in block
    assert "its bundle; the threads the command picks." in block
    r["omp_num_threads"] = "1"
    assert "its bundle; OMP_NUM_THREADS=1." in report.clustering()

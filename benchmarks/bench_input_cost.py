"""CellLM's claim, measured: "nonzero-only input cuts compute by more than 70 %". The scBERT shape
(`pretrain.presets` "scbert": FAVOR+ over every vocabulary gene, ``gene_set=all``) against the
same model fed only a cell's expressed genes (``gene_set=expressed``, CellLM's and xTrimoGene's
input), on the real distribution of genes per cell. Writes ``benchmarks/results/input_cost_cpu.json``.

    python benchmarks/bench_input_cost.py                        # CPU, a few minutes on one thread
    python benchmarks/bench_input_cost.py --smoke --result /tmp/c.json   # seconds: checks the script

Three measurements of training cost per cell (forward + backward), all-genes vs expressed-genes:

- ``model_cost``: `pretrain.model.flops.model_cost` (matrix multiplies, 3 x forward) at the full
  preset shape, per cell of the length distribution: at the median and 90th-percentile cell and
  summed over the whole distribution (the reduction of the total, i.e. of the mean cell);
- ``flop_counter``: torch's `torch.utils.flop_counter.FlopCounterMode` around a forward and
  backward pass of the actual `CellModel` (masked-expression loss) on one cell at the median and
  at the 90th-percentile length, at ``--width-div`` / ``--max-layers`` (a shrunk shape, recorded;
  ``--full`` for the preset's own) - with model_cost of that same shape beside it, so the two
  counts can be compared;
- ``time``: seconds per cell of the same forward + backward on CPU (``--cells`` cells of that
  length per batch, `common.time_ms` medians), same shape as the counter.

Every vocabulary gene: ``--n-genes`` (16,906, scBERT's gene2vec vocabulary). Lengths: the real
files in ``../shared/data/h5ad`` (bench_train's `length_distribution`), a ``--lengths-file``, or the
synthetic fallback (recorded as ``"lengths": "synthetic"``); capped at ``--n-genes``. Gene ids and
bins are random (the cost does not depend on them); 15 % of the expressed genes masked, as the
trainer's scBERT objective masks nonzero genes only.

JSON: ``benchmark`` "input_cost", ``date``, ``device``, ``versions``, ``settings`` (shapes, what
is shrunk, threads, lengths with percentiles), ``rows`` (one per method x cell: FLOPs or seconds
per cell, all-genes and expressed, and the ``reduction`` 1 - expressed / all), ``summary`` (the
reduction at the median cell by each method and over the distribution), ``command``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import MASK_RATIO, N_SPECIAL, length_distribution, make_batch, shrink_config  # noqa: E402
from common import RESULTS, SHARED_H5AD, ResultFile, device_record, time_ms, versions  # noqa: E402

SCBERT_GENES = 16906  # scBERT's gene2vec vocabulary (its Performer runs over all of them)
SMOKE = {"n_genes": 600, "width_div": 10, "max_layers": 1, "cells": 1}
CLAIM = 0.70


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-genes", type=int, default=SCBERT_GENES, help="vocabulary genes: the all-genes length")
    ap.add_argument("--width-div", type=int, default=4, help="measured shape: d_model (and FAVOR+ features) / this")
    ap.add_argument("--max-layers", type=int, default=2, help="measured shape: at most this many layers")
    ap.add_argument("--full", action="store_true", help="measure the preset's own shape (slow on CPU)")
    ap.add_argument("--cells", type=int, default=2, help="cells per timed batch (all of the same length)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a shared machine: 1)")
    ap.add_argument("--data", type=Path, default=SHARED_H5AD, help="folder of .h5ad files for the lengths")
    ap.add_argument("--lengths-file", type=Path, help="a .npy of genes per cell instead of --data")
    ap.add_argument("--smoke", action="store_true", help="tiny vocabulary and shape: checks the script")
    ap.add_argument("--result", type=Path, default=RESULTS / "input_cost_cpu.json")
    args = ap.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.full:
        args.width_div, args.max_layers = 1, None
    return args


def configs(args) -> dict:
    """{"full": (all-genes, expressed) ModelConfigs of the scbert preset, "measured": the same at
    the measured (maybe shrunk) shape}."""
    from pretrain.presets import preset

    base = preset("scbert", vocab_size=N_SPECIAL + args.n_genes, pad_token=0, cls_token=1, mask_token=2).model
    shrunk = shrink_config(base, args.width_div or 1, args.max_layers)
    return {name: (c.validate(), replace(c, gene_set="expressed").validate())
            for name, c in (("full", base), ("measured", shrunk))}


def cost_rows(full_all, full_expr, lengths: np.ndarray, points: dict) -> tuple[list[dict], float]:
    """model_cost at the named lengths and over the distribution.  -> (rows, reduction of the total)"""
    from pretrain.model.flops import model_cost

    rows = []
    for label, n in points.items():
        a, e = (model_cost(c, n, MASK_RATIO).flops_per_cell for c in (full_all, full_expr))
        rows.append({"method": "model_cost", "shape": "full", "cell": label, "genes": int(n), "all_genes": a,
                     "expressed": e, "reduction": 1 - e / a, "unit": "FLOPs per cell (training)"})
    values, counts = np.unique(lengths, return_counts=True)
    total_all = sum(model_cost(full_all, int(v), MASK_RATIO).flops_per_cell * int(c) for v, c in zip(values, counts))
    total_expr = sum(model_cost(full_expr, int(v), MASK_RATIO).flops_per_cell * int(c) for v, c in zip(values, counts))
    n = int(counts.sum())
    rows.append({"method": "model_cost", "shape": "full", "cell": "distribution mean", "genes": float(lengths.mean()),
                 "all_genes": total_all / n, "expressed": total_expr / n, "reduction": 1 - total_expr / total_all,
                 "unit": "FLOPs per cell (training), mean over the distribution"})
    return rows, 1 - total_expr / total_all


def training_step(model, batch):
    """Forward + backward of the masked-expression loss (what the trainer runs per micro-step)."""
    import torch.nn.functional as F

    out = model(batch)
    loss = F.cross_entropy(out.mlm.float(), batch.mlm_targets[batch.mlm_mask].long())
    loss.backward()
    model.zero_grad(set_to_none=True)


def measured_rows(pair, n_genes: int, points: dict, n_cells: int) -> list[dict]:
    """FlopCounterMode FLOPs and CPU seconds per cell, all-genes vs expressed, at each named length."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.model.cell_model import CellModel
    from pretrain.model.flops import model_cost

    models = [CellModel.initial(c, seed=0) for c in pair]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for label, n in points.items():
        one = make_batch(np.array([n]), pair[0], n_genes, generator)
        several = make_batch(np.full(n_cells, n), pair[0], n_genes, generator)
        flops, seconds = [], []
        for model in models:
            counter = FlopCounterMode(display=False)
            with counter:
                training_step(model, one)
            flops.append(float(counter.get_total_flops()))
            seconds.append(time_ms(lambda m=model, b=several: training_step(m, b), cuda=False, rep_ms=0, min_reps=5)
                           / 1e3 / n_cells)
        cost = [model_cost(c, n, MASK_RATIO).flops_per_cell for c in pair]
        shape = {"d_model": pair[0].d_model, "n_layers": pair[0].n_layers, "favor_features": pair[0].favor_features}
        rows.append({"method": "flop_counter", "shape": shape, "cell": label, "genes": int(n), "all_genes": flops[0],
                     "expressed": flops[1], "reduction": 1 - flops[1] / flops[0],
                     "model_cost_same_shape": {"all_genes": cost[0], "expressed": cost[1]},
                     "unit": "FLOPs per cell (forward + backward, torch FlopCounterMode)"})
        rows.append({"method": "time", "shape": shape, "cell": label, "genes": int(n), "all_genes": seconds[0],
                     "expressed": seconds[1], "reduction": 1 - seconds[1] / seconds[0], "cells_per_batch": n_cells,
                     "unit": "CPU seconds per cell (forward + backward, median of >= 5 batches)"})
        print(f"{label:>6} ({n} genes): FLOPs {flops[0]:.3g} -> {flops[1]:.3g} (-{1 - flops[1] / flops[0]:.1%}), "
              f"time {seconds[0]:.3g} s -> {seconds[1]:.3g} s (-{1 - seconds[1] / seconds[0]:.1%})", flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    lengths, source = length_distribution(args.data, args.lengths_file)
    lengths = np.minimum(lengths, args.n_genes)
    points = {"median": int(np.median(lengths)), "p90": int(np.percentile(lengths, 90))}
    pairs = configs(args)
    full, measured = pairs["full"], pairs["measured"]
    shrunk = measured[0].d_model != full[0].d_model or measured[0].n_layers != full[0].n_layers
    settings = {"preset": "scbert", "n_genes": args.n_genes, "mask_ratio": MASK_RATIO, "threads": args.threads,
                "full_shape": {"d_model": full[0].d_model, "n_layers": full[0].n_layers, "n_heads": full[0].n_heads,
                               "head_dim": full[0].attention_head_dim, "attention": full[0].attention,
                               "favor_features": full[0].favor_features},
                "measured_shape": {"d_model": measured[0].d_model, "n_layers": measured[0].n_layers,
                                   "head_dim": measured[0].attention_head_dim,
                                   "favor_features": measured[0].favor_features},
                "shrunk": shrunk, "shrink": (f"width / {args.width_div} (head width and FAVOR+ features too), at most "
                                             f"{args.max_layers} layers, for the FLOP counter and the timing; "
                                             "model_cost rows at the full shape") if shrunk else None,
                "lengths": source["kind"], "length_source": source, "points": points, "claim": CLAIM,
                "smoke": args.smoke}
    out = ResultFile(args.result, "input_cost", device=device_record(), versions=versions("torch"), settings=settings)
    rows, total = cost_rows(*full, lengths, points)
    for row in rows:
        out.add(row)
    for row in measured_rows(measured, args.n_genes, points, args.cells):
        out.add(row)
    at_median = {r["method"]: r["reduction"] for r in out.rows if r["cell"] == "median"}
    summary = {"median_genes": points["median"], "model_cost_median": at_median["model_cost"],
               "flop_counter_median": at_median["flop_counter"], "time_median": at_median["time"],
               "model_cost_distribution": total,
               "claim_holds": all(v > CLAIM for v in (*at_median.values(), total))}
    print(f"reduction at the median cell ({points['median']} genes): model_cost {at_median['model_cost']:.1%}, "
          f"FLOP counter {at_median['flop_counter']:.1%}, time {at_median['time']:.1%}; over the distribution "
          f"{total:.1%}", flush=True)
    out.finish(summary=summary)


if __name__ == "__main__":
    main()

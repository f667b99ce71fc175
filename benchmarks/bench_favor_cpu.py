"""The CPU FAVOR+ path (`kernels/favor/batched.py`): forward and forward+backward time of its layout
against the two other ways of computing the same definition in PyTorch, on packed batches of real
cell lengths. Writes ``benchmarks/results/favor_layouts_cpu.json``.

    python benchmarks/bench_favor_cpu.py              # about 2 minutes on one core
    python benchmarks/bench_favor_cpu.py --smoke --out /tmp/f.json   # tiny shapes: checks the script

Every CPU run (pretraining on a laptop, embedding, fine-tuning, the quality report) spends much of
its time here: in a fine-tuning step of the report's model on uncapped cells, FAVOR+ took two thirds
of the encoder's forward time in the padded layout. Layouts, each checked against the reference
(float64, relative error below 1e-10, output and gradients) before it is timed:

- ``grouped`` (the product): sequences in groups of about 1,024 tokens; in a group the features of
  every token at once, head-major ``[H, n, m]``, then one pair of matrix products per sequence over
  `torch.split` views; no padding.
- ``ungrouped``: the same with the whole batch as one group (``group_tokens=None``): its features,
  tens of MB, leave the cache between the elementwise passes.
- ``padded``: the features scattered into a zeroed ``[B, max_seqlen, H, m]`` batch and contracted
  with einsum over it (the path with several torch threads, and the only one before this
  benchmark). Its cost follows B x the longest sequence, not the tokens.
- ``reference``: `favor_attention_reference`, one sequence at a time (`kernels/favor/naive.py`, the
  definition the others are tested against).

Batches: ``--tokens`` (16,384, the report's token budget) of packed cells whose lengths are drawn
from each case's range, fp32, one torch thread (``--threads``): cells of 900-2,400 genes
(mudan_zheng_sorted_ref's 5th to 100th percentile, as the report embeds and fine-tunes them), cells
capped at 512 genes (pretraining with ``data.max_genes: 512``), short cells of 20-60 genes (the
synthetic demo's), and one cell of 4,000 genes among cells of 100-300. Shapes: the report's model
(``benchmarks/configs/eval.yaml``: 4 heads of 32, 64 features) and a wider one (8 heads of 64, 256
features). Times are `common.time_ms` medians (``time.perf_counter``; warm-up call first); forward
under ``no_grad``, forward+backward as ``autograd.grad`` of the output against a fixed random output
gradient. Each row records the 1-minute load average: other work on the machine slows every layout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS, ResultFile, device_record, time_ms, versions  # noqa: E402

CASES = {  # name: (shortest, longest) genes per cell, and a fixed first cell where one is given
    "eval cells 900-2400": ((900, 2400), None),
    "pretraining cap 512": ((300, 512), None),
    "short cells 20-60": ((20, 60), None),
    "one 4000 among 100-300": ((100, 300), 4000),
}
SHAPES = {"eval.yaml (H 4, D 32, m 64)": (4, 32, 64), "wide (H 8, D 64, m 256)": (8, 64, 256)}


def layouts() -> dict:
    from functools import partial

    from kernels.favor import favor_attention_batched, favor_attention_reference

    return {"grouped": partial(favor_attention_batched, layout="grouped"),
            "ungrouped": partial(favor_attention_batched, layout="grouped", group_tokens=None),
            "padded": partial(favor_attention_batched, layout="padded"), "reference": favor_attention_reference}


def cell_lengths(case: str, tokens: int, generator) -> list[int]:
    """Lengths drawn from the case's range until ``tokens`` are packed (the last one cut to fit)."""
    import torch

    (low, high), first = CASES[case]
    lengths = [first] if first else []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - tokens
    return [n for n in lengths if n > 0]


def batch(lengths: list[int], heads: int, dim: int, features: int, dtype, seed: int):
    import torch

    from kernels.favor import draw_projection

    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    q, k, v = (torch.randn(int(cu[-1]), heads, dim, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    return q, k, v, draw_projection(features, dim, seed=seed, dtype=dtype), cu, max(lengths)


def check_equal(fns: dict, lengths: list[int], heads: int, dim: int, features: int) -> dict[str, float]:
    """Each layout's largest relative error against the reference in float64 (output and the three
    gradients) on cells of ``lengths``."""
    import torch

    q, k, v, w, cu, longest = batch(lengths, heads, dim, features, torch.float64, seed=1)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = fns["reference"](q, k, v, w, cu, longest)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    errors = {}
    for name, fn in fns.items():
        out = fn(q, k, v, w, cu, longest)
        pairs = [(out, ref), *zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads)]
        errors[name] = max(float((a - b).norm() / b.norm()) for a, b in ((x.detach(), y.detach()) for x, y in pairs))
        if errors[name] > 1e-10:
            raise SystemExit(f"layout {name} differs from the reference by {errors[name]:.2e}: fix it before timing")
    return errors


def measure(fn, lengths, heads, dim, features, min_reps: int) -> dict:
    import torch

    q, k, v, w, cu, longest = batch(lengths, heads, dim, features, torch.float32, seed=0)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))

    def forward():
        with torch.no_grad():
            fn(q, k, v, w, cu, longest)

    def forward_backward():
        torch.autograd.grad(fn(q, k, v, w, cu, longest), (q, k, v), grad)

    fwd = time_ms(forward, cuda=False, min_reps=min_reps)
    fwd_bwd = time_ms(forward_backward, cuda=False, min_reps=min_reps)
    tokens = int(cu[-1])
    return {"fwd_ms": round(fwd, 2), "fwd_bwd_ms": round(fwd_bwd, 2),
            "fwd_tokens_per_s": round(tokens / fwd * 1e3), "fwd_bwd_tokens_per_s": round(tokens / fwd_bwd * 1e3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "favor_layouts_cpu.json")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per packed batch (default 16,384)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls at least (default 5)")
    parser.add_argument("--smoke", action="store_true", help="tiny batches and one shape: checks the script")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    tokens, shapes, reps = (600, dict(list(SHAPES.items())[:1]), 1) if args.smoke else (args.tokens, SHAPES, args.reps)
    fns = layouts()
    out = ResultFile(args.out, "favor_layouts_cpu", device=device_record(), versions=versions("torch"),
                     settings={"tokens": tokens, "threads": args.threads, "dtype": "float32", "min_reps": reps,
                               "smoke": args.smoke})
    for shape, (heads, dim, features) in shapes.items():
        for case in CASES:
            lengths = cell_lengths(case, tokens, torch.Generator().manual_seed(0))
            errors = check_equal(fns, lengths[:5], heads, dim, features)
            for name, fn in fns.items():
                row = {"shape": shape, "case": case, "layout": name, "cells": len(lengths),
                       "tokens": sum(lengths), "longest": max(lengths),
                       "padded_tokens": len(lengths) * max(lengths), "max_rel_error_fp64": errors[name],
                       **measure(fn, lengths, heads, dim, features, reps), "load_1min": round(os.getloadavg()[0], 2)}
                out.add(row)
                print(f"{shape:28s} {case:24s} {name:10s} fwd {row['fwd_ms']:8.1f} ms  fwd+bwd "
                      f"{row['fwd_bwd_ms']:8.1f} ms", flush=True)
    rows = out.rows
    speedups = {}
    for row in rows:
        if row["layout"] != "grouped":
            base = next(r for r in rows if r["shape"] == row["shape"] and r["case"] == row["case"]
                        and r["layout"] == "grouped")
            key = f"{row['layout']} / grouped"
            speedups.setdefault(key, {}).setdefault(row["shape"], {})[row["case"]] = {
                "fwd": round(row["fwd_ms"] / base["fwd_ms"], 2), "fwd_bwd": round(row["fwd_bwd_ms"] / base["fwd_bwd_ms"], 2)}
    out.finish(time_ratios=speedups)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference throughput: cells embedded per second per device, for each preset (the scBERT
explainer's claim: "8 A100 process 100k cells per hour", i.e. 3.5 cells/s per A100). Writes
``benchmarks/results/embed_<device>.json`` (``embed_cpu.json`` on CPU).

    python benchmarks/bench_embed.py                     # CUDA: full presets, bf16 autocast; CPU: shrunk
    python benchmarks/bench_embed.py --presets scbert --seconds 5
    python benchmarks/bench_embed.py --smoke --result /tmp/e.json   # seconds on CPU: checks the script

What is timed: `pretrain.embed.embed_counts`, the path ``launch/embed.py`` runs on an .h5ad's
cells once they are read and mapped to tokens: normalization of the raw counts (the preset's mode,
capped at its ``max_genes``), length-grouped packed batches cut by the model's
`ModelConfig.token_cost` within ``--token-budget`` (scBERT's cells cost the full gene set each),
the encoder (no heads, no decoder: the encoder-decoder's cell embedding is its encoder's), and the
copy of the embeddings back to host memory. Reading the .h5ad and mapping genes to tokens are not
timed (they are the loader's and the converter's business, measured in ``loader.json``).

Cells: genes per cell drawn (seeded) from the real distribution (``../shared/data/h5ad``, as
`bench_train.length_distribution` pools it; a ``--lengths-file``; else synthetic, recorded so),
capped at ``--n-genes``; distinct random gene ids and random counts (1 + a geometric draw; the
time does not depend on them). The vocabulary: ``--n-genes`` genes (16,906 as scBERT's gene2vec
set: the length of every scBERT sequence). Rank mode's corpus medians: all ones.

Per preset: one warm-up chunk, then chunks of cells (as many as cost ``--chunk-tokens`` on average,
as `ModelConfig.token_cost` counts them; at least 2) embedded until ``--seconds`` of embedding
have passed (at least one chunk); cells/s = cells embedded / seconds spent embedding them (each
chunk's random cells are drawn before its clock starts). CUDA: the
preset's own attention backend (flash falls back to varlen where flash-attn is absent), bf16
autocast, full size. CPU: exact attention as ``sdpa`` (flash and varlen are CUDA's), FAVOR+ as
batched PyTorch, fp32, shrunk like `bench_train.py`'s CPU rows (``--width-div`` 4, ``--max-layers``
2; every row records its shape and ``"shrunk"``), one torch thread.

JSON: ``benchmark`` "embed", ``date``, ``device``, ``versions``, ``settings``, ``rows`` (one per
preset: shape, backend, dtype, cells, seconds, ``cells_per_s``, ``cells_per_hour``, tokens/s; or
its ``error``),
``claim`` (the explainer's figure per device), ``command``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import N_SPECIAL, PRESET_NAMES, bench_config, length_distribution  # noqa: E402
from common import RESULTS, SHARED_H5AD, ResultFile, device_record, device_slug, versions  # noqa: E402

SCBERT_GENES = 16906
# the scBERT explainer: 8 A100 embed 100,000 cells in an hour
CLAIM = {"cells": 100_000, "hours": 1.0, "devices": 8, "device": "A100"}
CPU = {"width_div": 4, "max_layers": 2, "token_budget": 8192, "chunk_tokens": 32768, "seconds": 15.0}
GPU = {"width_div": None, "max_layers": None, "token_budget": 65536, "chunk_tokens": 2 << 20, "seconds": 5.0}
SMOKE = {"presets": ["geneformer-10m", "scbert"], "n_genes": 300, "width_div": 16, "max_layers": 1,
         "chunk_tokens": 4800, "seconds": 0.0}
MIN_CHUNK = 2


def parse_args(argv=None) -> Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda where available (cpu with --smoke)")
    ap.add_argument("--presets", nargs="+", choices=PRESET_NAMES, help="default: all")
    ap.add_argument("--n-genes", type=int, default=SCBERT_GENES, help="vocabulary genes (scBERT's sequence length)")
    ap.add_argument("--token-budget", type=int, help="tokens per batch as the model counts them (CUDA 65536, CPU 8192)")
    ap.add_argument("--width-div", type=int, help="shrunk presets: d_model / this (CPU 4)")
    ap.add_argument("--max-layers", type=int, help="shrunk presets: at most this many layers (CPU 2)")
    ap.add_argument("--full", action="store_true", help="CPU: the presets at full size (slow)")
    ap.add_argument("--chunk-tokens", type=int, help="tokens per embed_counts call as the model counts them "
                    "(CUDA 2M, CPU 32K; at least 2 cells): scBERT's cells cost the full gene set each")
    ap.add_argument("--seconds", type=float, help="time per preset after the warm-up (CUDA 5, CPU 15)")
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads (a shared machine: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=SHARED_H5AD, help="folder of .h5ad files for the lengths")
    ap.add_argument("--lengths-file", type=Path, help="a .npy of genes per cell instead of --data")
    ap.add_argument("--smoke", action="store_true", help="two tiny presets on CPU: checks the script")
    ap.add_argument("--result", type=Path, help="default benchmarks/results/embed_<device>.json")
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    defaults = dict(CPU if args.device == "cpu" and not args.full else GPU)
    if args.smoke:
        defaults.update(SMOKE)
        args.n_genes = SMOKE["n_genes"]
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.presets = args.presets or list(PRESET_NAMES)
    # bench_train's shrinking, without its per-cell cap below the preset's own
    args.max_genes, args.shrunk = None, bool(args.width_div and args.width_div > 1) or bool(args.max_layers)
    return args


def backend_for(name: str, device: str) -> str:
    """The preset's own attention; on CPU exact attention runs as sdpa (flash and varlen are CUDA's)."""
    from pretrain.presets import preset

    own = preset(name).model.attention
    return own if device == "cuda" or own == "favor" else "sdpa"


def embedding_model(name: str, args, device):
    """(CellModel in eval mode with its ``normalization``, ModelConfig, longest cell in genes)."""
    from pretrain.config import load_config
    from pretrain.model.cell_model import CellModel

    config, longest = bench_config(name, backend_for(name, args.device), args)
    norm = replace(load_config(None, [f"preset={name}"]).input_normalization(), n_bins=config.n_bins, max_genes=longest)
    if norm.mode == "rank":
        norm = replace(norm, medians=np.ones(config.vocab_size))
    model = CellModel.initial(config, seed=args.seed).to(device).eval()
    model.normalization = norm  # what load_pretrained attaches from the bundle's normalization.json
    return model, config, longest


def cells(lengths: np.ndarray, n: int, n_genes: int, rng: np.random.Generator):
    """CSR of ``n`` cells with genes per cell drawn from ``lengths``: (indptr, gene tokens, counts, totals)."""
    drawn = np.minimum(rng.choice(lengths, size=n), n_genes)
    indptr = np.zeros(n + 1, np.int64)
    indptr[1:] = np.cumsum(drawn)
    genes = np.concatenate([N_SPECIAL + np.sort(rng.choice(n_genes, size=k, replace=False)) for k in drawn])
    counts = 1 + rng.geometric(0.4, size=len(genes)).astype(np.int64) - 1
    totals = np.add.reduceat(counts, indptr[:-1]).astype(np.float64)
    return indptr, genes, counts, totals


def measure(model, chunks, longest: int, args, device) -> tuple[int, int, float]:
    """Embed chunks until ``args.seconds`` pass (the first chunk is the warm-up); ``longest``: the
    preset's cap on genes per cell.  -> (cells, expressed-gene tokens, seconds)"""
    import torch

    from pretrain.embed import embed_counts

    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def run(chunk):
        with autocast:
            # the preset's cap, as every row is counted (cap "auto" would let a FAVOR+ preset see every gene)
            out = embed_counts(model, *chunk, token_budget=args.token_budget, seed=args.seed, device=device,
                               cap="top")
        assert np.isfinite(out).all(), "non-finite embeddings"
        return out

    run(next(chunks))  # warm-up: allocator, kernels' first launches
    done = tokens = 0
    spent = 0.0
    while not done or spent < args.seconds:  # at least one chunk
        chunk = next(chunks)  # drawn outside the clock: making random cells is not embedding them
        started = time.perf_counter()
        run(chunk)
        spent += time.perf_counter() - started
        done += len(chunk[0]) - 1
        tokens += int(np.minimum(np.diff(chunk[0]), longest).sum())  # input genes, after the cap
    return done, tokens, spent


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lengths, source = length_distribution(args.data, args.lengths_file)
    path = args.result or RESULTS / f"embed_{'cpu' if args.device == 'cpu' else device_slug()}.json"
    per_device = CLAIM["cells"] / (CLAIM["hours"] * 3600) / CLAIM["devices"]
    settings = {"device": args.device, "n_genes": args.n_genes, "token_budget": args.token_budget,
                "chunk_tokens": args.chunk_tokens, "seconds_per_preset": args.seconds, "shrunk": args.shrunk,
                "width_div": args.width_div, "max_layers": args.max_layers,
                "dtype": "bf16 autocast" if args.device == "cuda" else "fp32",
                "threads": torch.get_num_threads() if args.device == "cpu" else None,
                "lengths": source["kind"], "length_source": source, "smoke": args.smoke,
                "cells": "genes per cell drawn from the length distribution; random gene ids and counts",
                "timed": "pretrain.embed.embed_counts: normalize, batch by token cost, encode, copy to host"}
    out = ResultFile(path, "embed", device=device_record(), versions=versions("torch"), settings=settings,
                     claim={**CLAIM, "cells_per_s_per_device": per_device,
                            "source": "scBERT explainer (seed note): 8 A100 process 100k cells per hour"})
    print(f"{'preset':<15}{'backend':<8}{'d':>5}{'L':>3}{'cells':>7}{'cells/s':>10}{'tokens/s':>11}", flush=True)
    for name in args.presets:
        model = None
        try:
            model, config, longest = embedding_model(name, args, device)
            rng = np.random.default_rng([args.seed, PRESET_NAMES.index(name)])
            per_cell = float(config.token_cost(longest).cells(np.minimum(lengths, args.n_genes)).mean())
            chunk_cells = max(MIN_CHUNK, int(args.chunk_tokens // per_cell))
            chunks = iter(lambda k=chunk_cells, r=rng: cells(lengths, k, args.n_genes, r), None)
            n, tokens, seconds = measure(model, chunks, longest, args, device)
        except Exception as err:  # noqa: BLE001 - recorded (e.g. a kernel that refuses a head width); the next preset runs
            traceback.print_exc()
            out.add({"preset": name, "error": f"{type(err).__name__}: {str(err)[:300]}", "cells_per_s": None})
            print(f"{name:<15}failed: {type(err).__name__}", flush=True)
            del model
            continue
        row = {"preset": name, "backend": config.attention, "d_model": config.d_model, "n_layers": config.n_layers,
               "n_heads": config.n_heads, "head_dim": config.attention_head_dim,
               "params": sum(p.numel() for p in model.parameters()), "max_genes": longest,
               "gene_set": config.gene_set, "architecture": config.architecture, "shrunk": args.shrunk,
               "chunk_cells": chunk_cells, "cells": n, "seconds": seconds, "cells_per_s": n / seconds, "cells_per_hour": n / seconds * 3600,
               "tokens_per_s": tokens / seconds, "vs_claim": n / seconds / per_device, "error": None}
        out.add(row)
        print(f"{name:<15}{config.attention:<8}{config.d_model:>5}{config.n_layers:>3}{n:>7}{row['cells_per_s']:>10.1f}"
              f"{row['tokens_per_s']:>11.0f}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.finish()


if __name__ == "__main__":
    main()

"""Time per epoch on a cluster, projected from a measured per-device training throughput.

    python benchmarks/scale_projection.py --train benchmarks/results/train_cpu.json   # -> projection_cpu.json
    python benchmarks/scale_projection.py --train benchmarks/results/train_<gpu>.json --nodes 8 --gpus-per-node 8

A step on N data-parallel ranks = each rank's compute for its cells (the measured single-device
step time: same model, same batch per rank) + the ZeRO stage's collective traffic at a stated bus
bandwidth, between two bounds: none of it hidden behind compute, or all of it (DeepSpeed's
``overlap_comm`` overlaps gradient reduction with the backward pass). Per optimizer step with
``k`` micro-steps (gradient-cache chunks), P parameters, 2-byte (bf16) gradients and parameters,
``f = (N - 1) / N`` (ring collectives), bytes each rank sends:

- ZeRO-1: reduce-scatter of gradients and all-gather of parameters once per step: ``2 f 2P``.
- ZeRO-2: gradients reduce-scattered at every micro-step, parameters gathered once: ``(k + 1) f 2P``.
- ZeRO-3: parameters gathered for forward and again for backward, gradients reduce-scattered,
  at every micro-step: ``3 k f 2P``.

Bandwidth across nodes is the bottleneck of a multi-node ring: the default 40 GB/s per GPU is
80 % of eight 400 Gb/s InfiniBand NDR links per 8-GPU node (H100/H200 DGX-class); within a
node, 300 GB/s (NVLink). With ``--target-mfu`` it also projects the full-size presets as if each GPU ran
at that fraction of ``--peak-tflops`` (FLOPs per cell from `pretrain.model.model_cost` over the real
length distribution): a planning figure from the target, labelled as such, never a measurement. Loading is assumed to keep up (the loader's measured per-core rate in
``loader.json`` is far above any per-GPU training rate here). Assumptions are arguments and are
written into the JSON next to the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS, SHARED_H5AD, result_record, write_result  # noqa: E402


def traffic_bytes(stage: int, params: int, world: int, micro_steps: int, bytes_per_value: int = 2) -> float:
    """Bytes each rank sends per optimizer step for ZeRO ``stage`` (see the module docstring)."""
    if world <= 1:
        return 0.0
    f = (world - 1) / world
    size = bytes_per_value * params
    return {0: 2 * f * size, 1: 2 * f * size, 2: (micro_steps + 1) * f * size, 3: 3 * micro_steps * f * size}[stage]


def project(cells_per_s: float, cells_per_step: float, params: int, cells: float, nodes: int, gpus_per_node: int,
            stage: int, micro_steps: int, inter_gbs: float, intra_gbs: float) -> dict:
    """Epoch time for ``cells`` on ``nodes x gpus_per_node`` ranks, each running at the measured
    single-device ``cells_per_s`` with ``cells_per_step`` cells per optimizer step."""
    world = nodes * gpus_per_node
    compute_s = cells_per_step / cells_per_s
    bandwidth = (inter_gbs if nodes > 1 else intra_gbs) * 1e9
    comm_s = traffic_bytes(stage, params, world, micro_steps) / bandwidth
    steps = cells / (world * cells_per_step)
    slow, fast = compute_s + comm_s, max(compute_s, comm_s)
    return {"ranks": world, "zero_stage": stage, "steps_per_epoch": round(steps), "compute_s_per_step": compute_s,
            "comm_s_per_step": comm_s, "epoch_hours_no_overlap": steps * slow / 3600,
            "epoch_hours_full_overlap": steps * fast / 3600,
            "aggregate_cells_per_s": [world * cells_per_step / slow, world * cells_per_step / fast],
            "scaling_efficiency": [compute_s / slow, compute_s / fast]}


def target_rows(presets: list[str], mfu: float, peak_tflops: float, token_budget: int, vocab_genes: int) -> list[dict]:
    """Per full-size preset: params, cells per step (token budget over the mean cell cost) and the
    cells/s one GPU would reach at ``mfu`` of ``peak_tflops``, over the real (or synthetic) lengths."""
    from bench_train import length_distribution, useful_flops

    from pretrain.model.flops import model_cost
    from pretrain.presets import preset

    lengths, where = length_distribution(SHARED_H5AD)
    rows = []
    for name in presets:
        p = preset(name, vocab_size=vocab_genes + 3)
        capped = np.minimum(lengths, p.max_genes) if p.max_genes else lengths
        flops_per_cell = useful_flops(p.model, capped) / len(capped)
        cells_per_step = token_budget / float(np.mean(p.model.token_cost(p.max_genes).cells(capped)))
        rows.append({"preset": name, "backend": p.model.attention, "params": model_cost(p.model, 1.0).params,
                     "cells_per_step": cells_per_step, "cells_per_s": mfu * peak_tflops * 1e12 / flops_per_cell,
                     "flops_per_cell": flops_per_cell, "lengths": where["kind"], "shrunk": False})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, default=RESULTS / "train_cpu.json", help="a bench_train.py result")
    ap.add_argument("--mode", default="packed", help="batching mode row to project from (default packed)")
    ap.add_argument("--cells", type=float, default=30e6, help="cells per epoch (default 30 million)")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--micro-steps", type=int, default=1, help="micro-steps (gradient-cache chunks) per step")
    ap.add_argument("--inter-node-gbs", type=float, default=40.0, help="bus bandwidth per rank across nodes, GB/s")
    ap.add_argument("--intra-node-gbs", type=float, default=300.0, help="bus bandwidth per rank within a node, GB/s")
    ap.add_argument("--target-mfu", type=float, default=0.4,
                    help="also project full-size presets at this MFU (0: off); labelled a target, not a measurement")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the target's device peak (H100/H200 dense bf16)")
    ap.add_argument("--target-presets", nargs="+", default=["geneformer-10m", "scgpt"])
    ap.add_argument("--token-budget", type=int, default=65536, help="the target rows' tokens per step per GPU")
    ap.add_argument("--vocab-genes", type=int, default=25424, help="the target rows' vocabulary (Geneformer's)")
    ap.add_argument("--out", type=Path, help="default benchmarks/results/projection_<device of --train>.json")
    args = ap.parse_args()
    measured = json.loads(args.train.read_text())
    rows = [{**r, "basis": "measured"} for r in measured["rows"] if r.get("mode") == args.mode and r.get("cells_per_s")]
    if not rows:
        sys.exit(f"{args.train}: no measured rows in mode {args.mode!r} to project from")
    if args.target_mfu > 0:
        rows += [{**r, "basis": f"target: {args.target_mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s, not measured"}
                 for r in target_rows(args.target_presets, args.target_mfu, args.peak_tflops, args.token_budget,
                                      args.vocab_genes)]
    projections = []
    for row in rows:
        for stage in (1, 2, 3):
            p = project(row["cells_per_s"], row["cells_per_step"], row["params"], args.cells, args.nodes,
                        args.gpus_per_node, stage, args.micro_steps, args.inter_node_gbs, args.intra_node_gbs)
            projections.append({"preset": row["preset"], "backend": row["backend"], "basis": row["basis"],
                                "cells_per_s_per_device": row["cells_per_s"],
                                "cells_per_step": row["cells_per_step"], "params": row["params"],
                                "shrunk": row.get("shrunk", False), **p})
    out = args.out or RESULTS / args.train.name.replace("train_", "projection_")
    write_result(out, result_record(
        "scale_projection", measured_file=str(args.train.relative_to(REPO) if args.train.is_relative_to(REPO) else args.train),
        measured_device=measured.get("device"), measured_date=measured.get("date"),
        assumptions={"cells_per_epoch": args.cells, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                     "micro_steps": args.micro_steps, "inter_node_gbs": args.inter_node_gbs,
                     "intra_node_gbs": args.intra_node_gbs, "bytes_per_value": 2,
                     "model": "see benchmarks/scale_projection.py docstring"},
        projections=projections))


if __name__ == "__main__":
    main()

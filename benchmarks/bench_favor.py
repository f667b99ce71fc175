"""FAVOR+ kernel benchmark: forward and forward+backward time of the fused Triton kernel against
performer-pytorch's eager FastAttention (the same projection), exact attention over packed
sequences (`torch.nn.attention.varlen.varlen_attn`, torch's FlashAttention) and padded torch SDPA;
achieved TFLOP/s and GB/s against the device's MEASURED ceilings (a ``ceilings_<device>.json`` from
`gpu_suite.py`'s setup part: bf16 / TF32 matrix-product rate and copy bandwidth). Writes
``favor_<device>.json`` row by row (each row as soon as it is measured) and a PNG at the end.

    python benchmarks/bench_favor.py --ceilings ceilings.json     # on a CUDA GPU, bf16 (about 1 min)
    python benchmarks/bench_favor.py --dtype fp32 --impls favor_triton   # our kernel on fp32 inputs (TF32 products)
    python benchmarks/bench_favor.py --counts                      # the FLOP and byte counts per size (no device)
    python benchmarks/bench_favor.py --smoke                       # tiny shapes on CPU (Triton's interpreter)

Shapes: H = 8 heads, head dim D = 64, m = 256 features; sequences of L in {256, 1,024, 2,048,
8,192, 16,906} (16,906: scBERT's whole gene set), one sequence per batch row, B = round(65,536 / L)
of them packed together (about 64K tokens: enough to fill the chip). Times: `triton.testing.do_bench`
medians (warm-up first; it flushes L2 between calls) after one untimed call that compiles; inputs
rotate among several sets when one set fits in L2 (60 MB). Forward is timed under ``no_grad``,
forward+backward as ``autograd.grad`` of the output with a random output gradient; backward is
their difference. Peak memory: ``max_memory_allocated`` over one forward+backward.

The two numbers (METHOD.md) per kernel and size come from one function, `attention_cost`
(``--counts`` prints them as a table):
- FAVOR+ forward, per token and head: key features ``2 m D`` (projection), state ``2 m Dv``, query
  features ``2 m D``, output ``2 m Dv``, normalizer ``3 m``; ``2 m`` exponentials (counted apart);
  backward ``2.5 x`` forward.
- exact attention forward ``4 B H L^2 D``, backward ``2.5 x`` forward (FlashAttention's convention).
- bytes, the fewest that must move: forward q, k, v read once and the output written once;
  backward q, k, v and the output gradient read once, dq, dk, dv written once.
performer-pytorch is charged FAVOR+'s counts (it materializes the features: its true traffic is
larger). Every row gives its floor ``max(FLOP / GEMM rate, bytes / copy bandwidth)`` and its gap
(time over floor) against the measured ceilings (TF32 rate for fp32 inputs). The floor takes every
FLOP at the inputs' GEMM rate, for every implementation alike: on bf16 inputs the FAVOR+ kernel
runs 6 of its 11 dots (the feature side) at the TF32 rate, half of bf16's, by design (see
kernels/favor/launch.py), so its gap includes up to that factor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import (  # noqa: E402
    RESULTS,
    ResultFile,
    device_kernel_ms,
    device_record,
    device_slug,
    read_ceilings,
    time_ms,
    versions,
)

IMPLS = ("favor_triton", "performer_pytorch", "varlen", "sdpa", "favor_reference")
# ours last at each length: a CUDA fault in a kernel that never ran on a GPU is sticky (the process
# is lost), so the baselines at that length are recorded before it
GPU_IMPLS = ["performer_pytorch", "varlen", "sdpa", "favor_triton"]
SMOKE_IMPLS = ["favor_triton", "favor_reference", "performer_pytorch", "varlen", "sdpa"]
LENGTHS = [256, 1024, 2048, 8192, 16906]
L2_BYTES = 60 << 20  # H100 / H200 (read off the device where it says)
FAVOR_KINDS = ("favor_triton", "favor_reference", "performer_pytorch")


def attention_cost(kind: str, length: int, batch: int, heads: int = 8, head_dim: int = 64, features: int = 256,
                   value_dim: int | None = None, elem_bytes: int = 2) -> dict:
    """FLOPs and the fewest bytes of one call over ``batch`` sequences of ``length`` (module
    docstring). kind: "favor" (linear attention) or "exact" (softmax)."""
    dv = value_dim or head_dim
    t = batch * length
    if kind == "favor":
        fwd = t * heads * (2 * features * head_dim + 2 * features * dv + 2 * features * head_dim
                           + 2 * features * dv + 3 * features)
        special = 2 * t * heads * features  # exp per query and key feature
    elif kind == "exact":
        fwd = batch * heads * length**2 * (2 * head_dim + 2 * dv)
        special = batch * heads * length**2
    else:
        raise ValueError(f"kind {kind!r}: favor or exact")
    bwd = 2.5 * fwd
    fwd_bytes = t * heads * (2 * head_dim + 2 * dv) * elem_bytes  # q, k, v read; out written
    bwd_bytes = t * heads * (2 * head_dim + dv + dv + 2 * head_dim + dv) * elem_bytes  # q k v dO read; dq dk dv written
    return {"kind": kind, "L": length, "batch": batch, "tokens": t, "fwd_flops": float(fwd), "bwd_flops": float(bwd),
            "fwd_bwd_flops": float(fwd + bwd), "fwd_bytes": float(fwd_bytes), "bwd_bytes": float(bwd_bytes),
            "fwd_bwd_bytes": float(fwd_bytes + bwd_bytes), "fwd_special_ops": float(special),
            "fwd_intensity_flop_per_byte": fwd / fwd_bytes}


def floors(cost: dict, gemm_tflops: float | None, copy_gbps: float | None, what: str) -> dict:
    """Time floor of ``what`` (fwd, fwd_bwd) from the ceilings: the larger of arithmetic and bytes."""
    if not gemm_tflops or not copy_gbps:
        return {}
    arith = cost[f"{what}_flops"] / (gemm_tflops * 1e12) * 1e3
    mem = cost[f"{what}_bytes"] / (copy_gbps * 1e9) * 1e3
    return {f"{what}_floor_ms": max(arith, mem), f"{what}_bound": "arithmetic" if arith >= mem else "bytes"}


def counts_table(lengths, tokens, heads, head_dim, features, elem_bytes, ceilings: dict | None) -> str:
    """The two numbers of each kernel and size as a markdown table (the notes' table)."""
    gemm = (ceilings or {}).get("gemm_bf16_tflops" if elem_bytes == 2 else "gemm_tf32_tflops")
    copy = (ceilings or {}).get("copy_gbps")
    lines = ["| kernel | L | B | T | fwd GFLOP | fwd MB | fwd+bwd GFLOP | fwd+bwd MB | FLOP/byte (fwd) | "
             "fwd floor ms | fwd bound |", "|" + "---|" * 11]
    for length in lengths:
        b = max(1, round(tokens / length))
        for kind in ("favor", "exact"):
            c = attention_cost(kind, length, b, heads, head_dim, features, elem_bytes=elem_bytes)
            f = floors(c, gemm, copy, "fwd")
            lines.append(f"| {kind} | {length:,} | {b} | {c['tokens']:,} | {c['fwd_flops'] / 1e9:,.1f} | "
                         f"{c['fwd_bytes'] / 1e6:,.1f} | {c['fwd_bwd_flops'] / 1e9:,.1f} | {c['fwd_bwd_bytes'] / 1e6:,.1f} | "
                         f"{c['fwd_intensity_flop_per_byte']:,.0f} | "
                         f"{f['fwd_floor_ms']:.3f} | {f['fwd_bound']} |" if f else
                         f"| {kind} | {length:,} | {b} | {c['tokens']:,} | {c['fwd_flops'] / 1e9:,.1f} | "
                         f"{c['fwd_bytes'] / 1e6:,.1f} | {c['fwd_bwd_flops'] / 1e9:,.1f} | {c['fwd_bwd_bytes'] / 1e6:,.1f} | "
                         f"{c['fwd_intensity_flop_per_byte']:,.0f} | - | - |")
    return "\n".join(lines)


# --- one implementation at one size -----------------------------------------------------------------
def implementation(name: str, length: int, batch: int, h: int, d: int, m: int, projection, device: str):
    """(fn(q, k, v) -> out, layout "packed" [T, H, D] or "padded" [B, H, L, D], cost kind)."""
    import torch

    cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * length
    if name == "favor_triton":
        from kernels.favor import favor_attention

        return (lambda q, k, v: favor_attention(q, k, v, projection, cu, length)), "packed", "favor"
    if name == "favor_reference":
        from kernels.favor import favor_attention_reference as reference

        return (lambda q, k, v: reference(q, k, v, projection, cu, length)), "packed", "favor"
    if name == "performer_pytorch":
        from performer_pytorch import FastAttention

        peer = FastAttention(dim_heads=d, nb_features=m, causal=False).to(device)
        peer.projection_matrix.copy_(projection)  # the same features as ours
        return (lambda q, k, v: peer(q, k, v)), "padded", "favor"
    if name == "varlen":
        if device != "cuda":
            raise _Skip("varlen_attn runs on CUDA only")
        from torch.nn.attention.varlen import varlen_attn

        return (lambda q, k, v: varlen_attn(q, k, v, cu, cu, length, length)), "packed", "exact"
    if name == "sdpa":
        from torch.nn.functional import scaled_dot_product_attention

        return (lambda q, k, v: scaled_dot_product_attention(q, k, v)), "padded", "exact"
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")


class _Skip(Exception):
    """This implementation does not run here (the reason is recorded)."""


def input_sets(layout: str, length: int, batch: int, h: int, d: int, dtype, device: str, l2_bytes: int, smoke: bool):
    """Rotating input sets [(q, k, v, grad_out)]: as many as make about 4x the L2 cache (one set if
    a set alone is larger; 2 in smoke, to run the rotation)."""
    import torch

    shape = (batch * length, h, d) if layout == "packed" else (batch, h, length, d)
    one = 4 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    n = 2 if smoke else max(1, min(8, math.ceil(4 * l2_bytes / one)))
    gen = torch.Generator(device=device).manual_seed(length)

    def rand():
        return torch.randn(shape, device=device, dtype=dtype, generator=gen)

    return [tuple(rand().requires_grad_(i < 3) for i in range(4)) for _ in range(n)]


def measure(fn, sets, cuda: bool, warmup_ms: float, rep_ms: float, min_reps: int = 3) -> dict:
    """Median fwd and fwd+bwd ms (inputs rotating), and the peak memory of one fwd+bwd."""
    import torch

    turn = [0]

    def next_set():
        turn[0] = (turn[0] + 1) % len(sets)
        return sets[turn[0]]

    def forward():
        q, k, v, _ = next_set()
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        q, k, v, g = next_set()
        torch.autograd.grad(fn(q, k, v), (q, k, v), g)

    for call in (forward, forward_backward):  # compile / load / plan: kept out of the timings
        call()
    if cuda:
        torch.cuda.synchronize()
    out = {"fwd_ms": time_ms(forward, cuda, warmup_ms, rep_ms, min_reps),
           "fwd_bwd_ms": time_ms(forward_backward, cuda, warmup_ms, rep_ms, min_reps)}
    out["bwd_ms"] = out["fwd_bwd_ms"] - out["fwd_ms"]
    # the device's own time: a fwd_ms far above fwd_kernel_ms is the host's launches, not the kernels
    for what, call in (("fwd", forward), ("fwd_bwd", forward_backward)):
        try:
            got = device_kernel_ms(call, runs=5 if cuda else 1, cuda=cuda)
            out[f"{what}_kernel_ms"], out[f"{what}_launches"] = got["kernel_ms"], got["kernels_per_call"]
        except Exception as err:  # noqa: BLE001 - a profiler that cannot run here loses only these fields
            out[f"{what}_kernel_ms_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        out["peak_bytes_fwd_bwd"] = torch.cuda.max_memory_allocated() - base
    return out


def bench_one(name: str, length: int, args, projection, device: str, dtype, ceilings: dict | None) -> dict:
    import torch

    h, d, m = args.heads, args.head_dim, args.features
    b = max(1, round(args.tokens / length))
    row = {"impl": name, "dtype": str(dtype).removeprefix("torch."), "L": length, "batch": b, "tokens": b * length,
           "H": h, "D": d, "m": m}
    cuda = device == "cuda"
    started = time.perf_counter()
    sets = None
    try:
        fn, layout, kind = implementation(name, length, b, h, d, m, projection, device)
        sets = input_sets(layout, length, b, h, d, dtype, device, args.l2_bytes, args.smoke)
        row.update(layout=layout, input_sets=len(sets))
        row.update(measure(fn, sets, cuda, args.warmup_ms, args.rep_ms, 1 if args.smoke else 3))
        cost = attention_cost(kind, length, b, h, d, m, elem_bytes=torch.empty((), dtype=dtype).element_size())
        row["counts"] = cost
        gemm_key = "gemm_bf16_tflops" if dtype == torch.bfloat16 else "gemm_tf32_tflops"
        gemm, copy = (ceilings or {}).get(gemm_key), (ceilings or {}).get("copy_gbps")
        for what in ("fwd", "fwd_bwd"):
            seconds = row[f"{what}_ms"] * 1e-3
            row[f"{what}_tflops"] = cost[f"{what}_flops"] / seconds / 1e12
            row[f"{what}_gbps"] = cost[f"{what}_bytes"] / seconds / 1e9
            f = floors(cost, gemm, copy, what)
            if f:
                row.update(f)
                row[f"{what}_gap"] = row[f"{what}_ms"] / f[f"{what}_floor_ms"]
                row[f"{what}_of_gemm"] = row[f"{what}_tflops"] / gemm
                row[f"{what}_of_copy"] = row[f"{what}_gbps"] / copy
        row["error"] = None
    except _Skip as why:
        row.update(skipped=str(why), error=None)
    except torch.cuda.OutOfMemoryError:
        row.update(error="out of memory")
    except Exception as err:  # noqa: BLE001 - recorded; the next implementation runs
        traceback.print_exc()
        row.update(error=f"{type(err).__name__}: {str(err)[:400]}")
    finally:
        del sets
        if cuda:
            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # the device is gone (a fault above, already recorded): keep the row
                pass
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'impl':<18}{'dtype':<9}{'L':>6}{'B':>5}{'fwd ms':>9}{'f+b ms':>9}{'fwd TF/s':>9}{'fwd GB/s':>9}"
          f"{'fwd gap':>8}{'f+b TF/s':>9}{'f+b gap':>8}", flush=True)
    for r in rows:
        head = f"{r['impl']:<18}{r['dtype']:<9}{r['L']:>6}{r['batch']:>5}"
        if r.get("skipped") or r.get("error"):
            print(f"{head}  {'skipped: ' + r['skipped'] if r.get('skipped') else 'failed: ' + r['error'][:70]}",
                  flush=True)
            continue

        def g(key, fmt, r=r):
            return format(r[key], fmt) if r.get(key) is not None else "-".rjust(int(fmt.split(".")[0]))

        print(f"{head}{g('fwd_ms', '9.3f')}{g('fwd_bwd_ms', '9.3f')}{g('fwd_tflops', '9.1f')}{g('fwd_gbps', '9.0f')}"
              f"{g('fwd_gap', '8.1f')}{g('fwd_bwd_tflops', '9.1f')}{g('fwd_bwd_gap', '8.1f')}", flush=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter), to check the script")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), help="inputs (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, help=f"default on CUDA: {' '.join(GPU_IMPLS)}")
    ap.add_argument("--lengths", type=int, nargs="+", help=f"sequence lengths (default {LENGTHS})")
    ap.add_argument("--tokens", type=int, default=65_536, help="tokens per call (sequences of L packed)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up (ms)")
    ap.add_argument("--rep-ms", type=float, default=150, help="do_bench timed span (ms)")
    ap.add_argument("--ceilings", type=Path, help="ceilings_<device>.json (gpu_suite.py's setup part)")
    ap.add_argument("--counts", action="store_true", help="print the FLOP and byte counts per size and exit")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/favor_<device>[_fp32].json; "
                    "with --smoke, in $TMPDIR)")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    args.lengths = args.lengths or ([32, 64] if args.smoke else LENGTHS)
    ceilings = read_ceilings(args.ceilings)
    if args.counts:
        print(counts_table(args.lengths, args.tokens, args.heads, args.head_dim, args.features,
                           4 if args.dtype == "fp32" else 2, ceilings))
        return
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.tokens, args.heads, args.head_dim, args.features = 128, 2, 16, 32
        args.warmup_ms, args.rep_ms = 0, 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_favor.py measures GPU kernels: run it on a CUDA machine (or pass --smoke to check the script)")
    device = "cpu" if args.smoke else "cuda"
    dtype_name = args.dtype or ("fp32" if args.smoke else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True  # the eager baselines' products, as the kernel's
    impls = args.impls or (SMOKE_IMPLS if args.smoke else GPU_IMPLS)
    args.l2_bytes = L2_BYTES
    if device == "cuda":
        args.l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or L2_BYTES
    from kernels.favor import draw_projection

    projection = draw_projection(args.features, args.head_dim, seed=0, device=device)
    slug = "cpu" if args.smoke else device_slug()
    out = args.out or RESULTS / f"favor_{slug}{'_fp32' if dtype_name == 'fp32' and not args.smoke else ''}.json"
    if args.smoke and not args.out:
        out = Path(os.environ.get("TMPDIR", "/tmp")) / out.name
    result = ResultFile(
        out, "favor", device=device_record(), smoke=args.smoke,
        versions=versions("torch", "triton", "performer_pytorch"),
        dtype=dtype_name, heads=args.heads, head_dim=args.head_dim, features=args.features, tokens=args.tokens,
        impls=impls, lengths=args.lengths, ceilings=ceilings, ceilings_file=str(args.ceilings) if args.ceilings else None,
        timing="triton.testing.do_bench median (warm-up, L2 flushed between calls), inputs rotated; *_kernel_ms: "
               "the device time of the kernels launched, torch.profiler, mean of 5 calls" if device == "cuda"
        else "time.perf_counter median (CPU smoke)",
        flop_counts="attention_cost(): FAVOR+ fwd per token-head 4mD + 4mDv + 3m (+2m exp), exact fwd 4BHL^2D; "
                    "bwd 2.5x fwd; bytes: q,k,v read + out written (fwd), q,k,v,dO read + dq,dk,dv written (bwd)")
    for length in args.lengths:
        for name in impls:
            row = bench_one(name, length, args, projection, device, dtype, ceilings)
            result.add(row)
            print(json.dumps({k: v for k, v in row.items() if k != "counts"}), file=sys.stderr, flush=True)
    result.finish()
    if not args.no_plot:
        try:
            _plot(result.record, out.with_suffix(".png"))
        except Exception as err:  # noqa: BLE001 - the JSON is what matters
            print(f"plot failed: {type(err).__name__}: {err}", file=sys.stderr)
    print_table(result.rows)
    # the part fails when our kernel fails; a baseline that cannot run here is recorded and passed over
    sys.exit(1 if any(r.get("error") for r in result.rows if r["impl"] == "favor_triton") else 0)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl in sorted({r["impl"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["impl"] == impl and r.get("fwd_bwd_ms") is not None]
        axes[0].plot([r["L"] for r in rows], [r["fwd_bwd_ms"] for r in rows], marker="o", label=impl)
        mem = [r for r in rows if r.get("peak_bytes_fwd_bwd")]
        axes[1].plot([r["L"] for r in mem], [r["peak_bytes_fwd_bwd"] / 2**30 for r in mem], marker="o", label=impl)
    for ax, label in zip(axes, ("forward+backward ms per call", "peak memory GiB (fwd+bwd)")):
        ax.set_xscale("log")
        ax.set_xlabel(f"sequence length L (about {result['tokens']:,} tokens per call)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    device = result["device"].get("gpu") or "CPU (smoke)"
    fig.suptitle(f"FAVOR+ on {device} ({result['dtype']}, H={result['heads']}, D={result['head_dim']}, "
                 f"m={result['features']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""FAVOR+ kernel benchmark: forward, backward and forward+backward time, achieved TFLOP/s and
peak memory of the fused Triton kernel against the plain-PyTorch reference, performer-pytorch's
eager FastAttention, exact softmax attention (torch SDPA, flash/efficient backend) and
flash-attn varlen where importable. Writes ``benchmarks/results/favor_<device>.json`` and a PNG.

    python benchmarks/bench_favor.py                # on a CUDA GPU (about 5 minutes)
    python benchmarks/bench_favor.py --smoke        # tiny shapes on CPU (Triton's interpreter): checks the script

Shapes: H = 8 heads, D = 64, m = 256 features, sequences of L in {512, 1024, 2048, 4096, 16906}
(scBERT's whole gene set), as many as make about 65,536 tokens per batch, bf16. Times are medians
of CUDA-event timings after warm-up.

FLOP counts (matrix products only, the kernel's recomputations not counted): FAVOR+ forward
``8 T H m D`` (key features, state, query features, output), backward ``16 T H m D``; softmax
attention forward ``4 B H L^2 D``, backward ``10 B H L^2 D`` (flash-attention's convention).
The bf16 matmul rate of the device is measured in the same run (a 8192^3 product), for the
forward's share of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS, device_record, device_slug, result_record, versions, write_result  # noqa: E402


def _timer(device: str):
    import torch

    if device == "cuda":
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
    else:
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)
    return run


def matmul_rate(device: str, dtype, repeats: int) -> float:
    import torch

    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    run = _timer(device)
    run(lambda: a @ b, 3)
    return 2 * n ** 3 / run(lambda: a @ b, repeats) / 1e12


def measure(name: str, fwd, inputs, device: str, repeats: int, flops_fwd: float, flops_bwd: float) -> dict:
    """fwd(*inputs) -> out; times forward, backward (of sum(out * g)) and both, and peak memory."""
    import torch

    run = _timer(device)
    out = fwd(*inputs)
    grad = torch.randn_like(out)

    def forward():
        with torch.no_grad():
            fwd(*inputs)

    def both():
        for x in inputs:
            x.grad = None
        fwd(*inputs).backward(grad)

    state = {}

    def prepare():
        for x in inputs:
            x.grad = None
        state["out"] = fwd(*inputs)

    def backward():
        state["out"].backward(grad)

    for fn in (forward, both):
        fn()
    t_fwd = run(forward, repeats)
    t_both = run(both, repeats)
    back = []
    for _ in range(repeats):  # backward alone: a fresh graph each time
        prepare()
        back.append(run(backward, 1))
    t_bwd = statistics.median(back)
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        both()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return {"impl": name, "fwd_s": t_fwd, "bwd_s": t_bwd, "fwd_bwd_s": t_both,
            "fwd_tflops": flops_fwd / t_fwd / 1e12, "fwd_bwd_tflops": (flops_fwd + flops_bwd) / t_both / 1e12,
            "peak_bytes_fwd_bwd": peak}


def bench_length(length: int, tokens: int, h: int, d: int, m: int, projection, device: str, dtype, repeats: int,
                 flash_attn_varlen_func) -> list[dict]:
    """Every implementation on sequences of ``length`` (about ``tokens`` per batch)."""
    import torch
    from performer_pytorch import FastAttention

    from kernels.favor import favor_attention
    from kernels.favor.naive import favor_attention as reference

    b = max(1, round(tokens / length))
    t = b * length
    cu = torch.arange(b + 1, device=device, dtype=torch.int32) * length

    def make(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    packed = [make(t, h, d) for _ in range(3)]
    padded = [make(b, h, length, d) for _ in range(3)]
    favor_f, favor_b = 8 * t * h * m * d, 16 * t * h * m * d
    soft_f, soft_b = 4 * b * h * length ** 2 * d, 10 * b * h * length ** 2 * d
    peer = FastAttention(dim_heads=d, nb_features=m, causal=False).to(device)
    peer.projection_matrix.copy_(projection)
    impls = [
        ("favor_triton", lambda q, k, v: favor_attention(q, k, v, projection, cu, length), packed, favor_f, favor_b),
        ("favor_reference", lambda q, k, v: reference(q, k, v, projection, cu, length), packed, favor_f, favor_b),
        ("performer_pytorch", lambda q, k, v: peer(q, k, v), padded, favor_f, favor_b),
        ("sdpa_softmax", lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v), padded,
         soft_f, soft_b),
    ]
    if flash_attn_varlen_func is not None and device == "cuda":
        impls.append(("flash_attn_varlen", lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, length, length),
                      packed, soft_f, soft_b))
    rows = []
    for name, fn, inputs, ff, fb in impls:
        try:
            r = measure(name, fn, inputs, device, repeats, ff, fb)
        except torch.cuda.OutOfMemoryError:
            r = {"impl": name, "error": "out of memory"}
            torch.cuda.empty_cache()
        r.update({"L": length, "batch": b, "tokens": t})
        print(json.dumps(r), file=sys.stderr)
        rows.append(r)
    return rows


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter), to check the script")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 16906])
    ap.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/favor_<device>.json; "
                    "with --smoke, in $TMPDIR)")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.lengths, args.tokens, args.repeats = [32, 64], 128, 2
    elif not torch.cuda.is_available():
        sys.exit("bench_favor.py measures GPU kernels: run it on a CUDA machine (or pass --smoke to check the script)")
    from kernels.favor import draw_projection

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h, d, m = (8, 64, 256) if not args.smoke else (2, 16, 32)
    projection = draw_projection(m, d, seed=0, device=device)
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    rows = []
    for length in args.lengths:
        rows += bench_length(length, args.tokens, h, d, m, projection, device, dtype, args.repeats, flash_attn_varlen_func)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter-smoke"
    result = result_record(
        "favor", device=name, machine=device_record(), dtype=str(dtype), heads=h, head_dim=d, features=m,
        matmul_tflops_bf16=matmul_rate(device, dtype, args.repeats), versions=versions("torch", "triton"),
        flop_counts="favor fwd 8*T*H*m*D, bwd 16*T*H*m*D; softmax fwd 4*B*H*L^2*D, bwd 10*B*H*L^2*D", rows=rows)
    out = args.out or RESULTS / f"favor_{device_slug()}.json"
    if args.smoke and not args.out:
        out = Path(os.environ.get("TMPDIR", "/tmp")) / out.name
    write_result(out, result)
    _plot(result, out.with_suffix(".png"))


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl in sorted({r["impl"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["impl"] == impl and "fwd_bwd_s" in r]
        axes[0].plot([r["L"] for r in rows], [r["fwd_bwd_s"] * 1e3 for r in rows], marker="o", label=impl)
        mem = [r for r in rows if r.get("peak_bytes_fwd_bwd")]
        axes[1].plot([r["L"] for r in mem], [r["peak_bytes_fwd_bwd"] / 2 ** 30 for r in mem], marker="o", label=impl)
    for ax, label in zip(axes, ("forward+backward ms per batch", "peak memory GiB (fwd+bwd)")):
        ax.set_xscale("log")
        ax.set_xlabel("sequence length L (about 65k tokens per batch)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"FAVOR+ on {result['device']} ({result['dtype']}, H={result['heads']}, D={result['head_dim']}, m={result['features']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

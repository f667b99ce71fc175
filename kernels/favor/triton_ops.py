"""The host side of the fused FAVOR+ kernels: `favor_forward` and `favor_backward` launch the
Triton kernels of `triton_forward` and `triton_backward` in order, with the configurations
`launch.launches` decides, and combine their per-piece partial sums in a fixed order (no
atomics). Shapes: q, k, v [T, H, D]; projection [m, D]; cu_seqlens [B+1].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .launch import CHUNK, launches


class Pieces(NamedTuple):
    """Row ranges of at most ``size`` rows, never across sequences, made on the device from
    ``cu_seqlens`` without reading it on the host (no synchronization per call): ``start``,
    ``length`` [N] int32, ``seq`` [N] int32 (clamped to a real sequence for the kernels), ``home``
    [N] int64 (the sequence, or B for an unused slot: a row the combine throws away), ``slot`` [N]
    int64 (the piece's number within its sequence), ``per_seq`` (most pieces of one sequence).
    N = T // size + B is an upper bound; unused pieces have length 0."""

    start: torch.Tensor
    length: torch.Tensor
    seq: torch.Tensor
    home: torch.Tensor
    slot: torch.Tensor
    per_seq: int


def pieces(cu_seqlens: torch.Tensor, total_rows: int, max_seqlen: int, size: int) -> Pieces:
    cu = cu_seqlens.to(torch.int64)
    n_seq = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    count = (lengths + size - 1) // size
    ends = torch.cumsum(count, 0)
    i = torch.arange(total_rows // size + n_seq, device=cu.device)
    home = torch.searchsorted(ends, i, right=True)  # B past the last real piece
    valid = home < n_seq
    seq = home.clamp(max=max(n_seq - 1, 0))
    slot = torch.where(valid, i - (ends - count)[seq], 0)
    start = cu[seq] + slot * size
    length = torch.where(valid, (cu[seq + 1] - start).clamp(0, size), 0)
    return Pieces(start.to(torch.int32), length.to(torch.int32), seq.to(torch.int32), home, slot,
                  max(1, -(-max_seqlen // size)))


def combine(pieces_: Pieces, n_seq: int, partial: torch.Tensor, fill: float) -> torch.Tensor:
    """Per-piece partial results [N, ...] laid out per sequence: [B, per_seq, ...] (unused slots
    ``fill``), for a reduction over dim 1 in a fixed order (no atomics)."""
    grid = partial.new_full((n_seq + 1, pieces_.per_seq, *partial.shape[1:]), fill)
    grid[pieces_.home, pieces_.slot] = partial
    return grid[:n_seq]


def favor_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                  cu_seqlens: torch.Tensor, max_seqlen: int, eps: float = 1e-4, block_rows: int | None = None,
                  chunk_rows: int = CHUNK, *, return_backward_extras: bool = False,
                  head_dim: int | None = None) -> tuple[torch.Tensor, ...]:
    """``(out [T, H, Dv], state S [B, H, m, Dv] fp32, normalizer z [B, H, m] fp32, den [T, H] fp32,
    key stabilizer M [B, H] fp32)`` of FAVOR+ over packed sequences; all but ``out`` are what the
    backward pass reuses. With ``return_backward_extras`` also ``query_max`` (each query row's
    stabilizer ``max_f (W q')_f`` [T, H] fp32) and ``out_lo`` (bf16/fp16 inputs: ``out``'s
    rounding error [T, H, Dv] bf16; fp32: None), `favor_backward`'s keyword arguments. ``block_rows``: rows per tile
    (a power of two >= 16; default: per head dim, `launch.py`); ``chunk_rows``: key rows per
    program. ``max_seqlen`` must be at least the longest sequence. ``head_dim``: the heads' true
    width, for the input scale ``head_dim^-1/4``, where q, k (and the projection) are zero-padded
    past it to a width the kernels take (default: q's width)."""
    t, h, d = q.shape
    dv = v.shape[-1]
    m = projection.shape[0]
    cfg = launches(d, dv, m, q.dtype, block_rows=block_rows)
    bm = cfg.key_state.constexprs["BM"]
    device = q.device
    n_seq = cu_seqlens.numel() - 1
    w, _ = cfg.projection_operands(projection, device)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    scale_in = (head_dim or d) ** -0.25

    chunks = pieces(cu_seqlens, t, max_seqlen, chunk_rows)
    n_chunks = len(chunks.start)
    n_fb = m // bm
    s_part = torch.empty(n_chunks, h, m, dv, device=device, dtype=torch.float32)
    z_part = torch.empty(n_chunks, h, m, device=device, dtype=torch.float32)
    mx = torch.empty(n_chunks, h, n_fb, device=device, dtype=torch.float32)
    vsum = torch.empty(n_chunks, h, dv, device=device, dtype=torch.float32)
    if n_chunks:
        cfg.key_state((n_chunks, h, n_fb), k, v, w, chunks.start, chunks.length, s_part, z_part, mx, vsum,
                      k.stride(0), k.stride(1), v.stride(0), v.stride(1), h, n_fb, scale_in)

    # combine the chunks of each sequence in a fixed order
    grid_mx = combine(chunks, n_seq, mx, -math.inf)  # [B, C, H, F]
    big = grid_mx.amax(dim=(1, 3), keepdim=True)  # the stabilizer M per sequence and head
    per_feature = torch.exp(grid_mx - big).repeat_interleave(bm, dim=3)  # [B, C, H, m]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float32)
    feat_scale = m ** -0.5
    state = feat_scale * ((combine(chunks, n_seq, s_part, 0.0) * per_feature[..., None]).sum(1)
                          + eps * combine(chunks, n_seq, vsum, 0.0).sum(1)[:, :, None, :])
    norm = feat_scale * ((combine(chunks, n_seq, z_part, 0.0) * per_feature).sum(1) + eps * lengths[:, None, None])

    out = torch.empty(t, h, dv, device=device, dtype=q.dtype)
    den = torch.empty(t, h, device=device, dtype=torch.float32)
    query_max = torch.empty(t, h, device=device, dtype=torch.float32)
    out_lo = torch.empty(t, h, dv, device=device, dtype=torch.bfloat16) if cfg.query_out.constexprs["O_LO"] else None
    tiles = pieces(cu_seqlens, t, max_seqlen, cfg.query_out.constexprs["BL"])
    if len(tiles.start):
        cfg.query_out((len(tiles.start), h), q, w, state.contiguous(), norm.contiguous(), tiles.start, tiles.length,
                      tiles.seq, out, out if out_lo is None else out_lo, den, query_max, q.stride(0), q.stride(1), out.stride(0), out.stride(1), h,
                      scale_in, eps, feat_scale)
    result = (out, state, norm, den, big.reshape(n_seq, h))
    return (*result, query_max, out_lo) if return_backward_extras else result


def query_max_reference(q: torch.Tensor, projection: torch.Tensor, head_dim: int | None = None) -> torch.Tensor:
    """Each query row's stabilizer ``max_f (W q')_f`` [T, H] fp32 in PyTorch, for callers of
    `favor_backward` that did not keep the forward's (it costs a [T, H, m] temporary)."""
    proj = torch.einsum("thd,md->thm", q.float() * (head_dim or q.shape[-1]) ** -0.25,
                        projection.to(q.device, torch.float32))
    return proj.amax(-1)


def favor_backward(grad_out, q, k, v, projection, cu_seqlens, max_seqlen: int, out, state, norm, den, key_max,
                   eps: float = 1e-4, block_rows: int | None = None, chunk_rows: int = CHUNK, *,
                   query_max: torch.Tensor | None = None, out_lo: torch.Tensor | None = None,
                   head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` [T, H, D] of FAVOR+ over packed sequences, from what `favor_forward` saved.
    ``query_max`` [T, H] and ``out_lo`` [T, H, Dv]: ``favor_forward(..., return_backward_extras=True)``'s
    last two results; without them the stabilizers are computed here in PyTorch and, for bf16/fp16,
    the rounded output is taken as exact (gradients then carry ~2^-9 relative errors of o).
    ``head_dim``: as for `favor_forward`."""
    t, h, d = q.shape
    dv_dim = v.shape[-1]
    m = projection.shape[0]
    cfg = launches(d, dv_dim, m, q.dtype, block_rows=block_rows)
    bm = cfg.query_grad_state.constexprs["BM"]
    device = q.device
    n_seq = cu_seqlens.numel() - 1
    w, wf = cfg.projection_operands(projection, device)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    grad_out = grad_out.contiguous()
    if query_max is None:
        query_max = query_max_reference(q, projection, head_dim)
    query_max = query_max.to(torch.float32).contiguous()
    den = den.contiguous()
    out = out.contiguous()
    if out_lo is None:
        out_lo = torch.zeros(out.shape, device=device, dtype=torch.bfloat16) if q.dtype != torch.float32 else out
    out_lo = out_lo.contiguous()
    scale_in = (head_dim or d) ** -0.25
    feat_scale = m ** -0.5

    chunks = pieces(cu_seqlens, t, max_seqlen, chunk_rows)
    n_chunks = len(chunks.start)
    ds_part = torch.empty(n_chunks, h, m, dv_dim, device=device, dtype=torch.float32)
    dz_part = torch.empty(n_chunks, h, m, device=device, dtype=torch.float32)
    if n_chunks:
        cfg.query_grad_state((n_chunks, h, m // bm), q, grad_out, out, out_lo, den, query_max, w, chunks.start, chunks.length,
                             ds_part, dz_part, q.stride(0), q.stride(1), grad_out.stride(0), grad_out.stride(1),
                             out.stride(0), out.stride(1), h, scale_in, eps, feat_scale)
    d_state = combine(chunks, n_seq, ds_part, 0.0).sum(1).contiguous()  # fixed-order sum over chunks
    d_norm = combine(chunks, n_seq, dz_part, 0.0).sum(1).contiguous()

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    tiles = pieces(cu_seqlens, t, max_seqlen, cfg.query_grad.constexprs["BL"])
    n_tiles = len(tiles.start)
    if n_tiles:
        cfg.query_grad((n_tiles, h), q, grad_out, out, out_lo, den, query_max, w, wf, state.contiguous(), norm.contiguous(),
                       tiles.start, tiles.length, tiles.seq, dq, q.stride(0), q.stride(1), grad_out.stride(0),
                       grad_out.stride(1), out.stride(0), out.stride(1), dq.stride(0), dq.stride(1), h, scale_in, eps,
                       feat_scale)
        if cfg.key_grad.constexprs["BL"] != cfg.query_grad.constexprs["BL"]:
            tiles = pieces(cu_seqlens, t, max_seqlen, cfg.key_grad.constexprs["BL"])
        cfg.key_grad((len(tiles.start), h), k, v, w, wf, d_state, d_norm, key_max.contiguous(), tiles.start,
                     tiles.length, tiles.seq, dk, dv, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                     dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), h, scale_in, eps, feat_scale)
    return dq, dk, dv

"""Fused FAVOR+ backward in Triton: features recomputed in registers, never stored.

Per sequence and head, with ``A = phi(q)`` [L, m], ``B = phi(k)``, state ``S = B^T V``,
normalizer ``z = B^T 1``, ``o = A S / (A z)`` and the output gradient ``G``:

    dnum = G / den            dden = -rowsum(G * o) / den
    dA = dnum S^T + dden z^T  dS = A^T dnum              dz = A^T dden
    dB = V dS^T + 1 dz^T      dV = B dS
    phi = c (exp(U) + eps), U = W x' - |x'|^2/2 - stab (stab detached, as in the definition):
    dU = c dA * exp(U)        dx' = dU W - rowsum(dU) x'   dx = d^(-1/4) dx'

Three kernels: ``_query_grad_state`` sums ``dS``, ``dz`` per (query chunk, head, feature block)
(a fixed-order sum over chunks follows, as in the forward; each program first finds the rows'
max over all features), ``_query_grad`` gives ``dq`` per query tile in one pass over the
feature blocks (running max, as the forward), ``_key_grad`` gives ``dk`` and ``dv`` per key tile. Saved from the forward: the output,
its denominators, ``S``, ``z`` and the key stabilizer per sequence and head, O(T D + B m D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_forward import CHUNK, _feature_block, _load_rows, _row_tile, _tile_rows, combine, pieces


@triton.jit
def _row_max(xt, w_ptr, D: tl.constexpr, BM: tl.constexpr, M_FEAT: tl.constexpr, BL: tl.constexpr,
             PRECISION: tl.constexpr):
    d = tl.arange(0, D)
    rmax = tl.full([BL], -float("inf"), tl.float32)
    for fb in tl.static_range(M_FEAT // BM):
        f = fb * BM + tl.arange(0, BM)
        w = tl.load(w_ptr + f[:, None] * D + d[None, :]).to(tl.float32)
        rmax = tl.maximum(rmax, tl.max(tl.dot(xt, tl.trans(w), input_precision=PRECISION), 1))
    return rmax


@triton.jit
def _query_grad_state(q_ptr, g_ptr, o_ptr, den_ptr, w_ptr, chunk_start_ptr, chunk_len_ptr, ds_ptr, dz_ptr,
                      stride_qt, stride_qh, stride_gt, stride_gh, stride_ot, stride_oh, n_heads, scale_in, eps,
                      feat_scale, D: tl.constexpr, DV: tl.constexpr, BL: tl.constexpr, BM: tl.constexpr,
                      M_FEAT: tl.constexpr, PRECISION: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    fb = tl.program_id(2)
    start = tl.load(chunk_start_ptr + c)
    n = tl.load(chunk_len_ptr + c)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    f = fb * BM + tl.arange(0, BM)
    w = tl.load(w_ptr + f[:, None] * D + d[None, :]).to(tl.float32)
    ds = tl.zeros([BM, DV], dtype=tl.float32)
    dz = tl.zeros([BM], dtype=tl.float32)
    for off in range(0, n, BL):
        rows, valid = _tile_rows(start, off, n, BL)
        qt = _load_rows(q_ptr, rows, valid, stride_qt, h * stride_qh, d) * scale_in
        half = tl.sum(qt * qt, 1) * 0.5
        rmax = _row_max(qt, w_ptr, D, BM, M_FEAT, BL, PRECISION)
        a = feat_scale * (tl.exp(tl.dot(qt, tl.trans(w), input_precision=PRECISION) - half[:, None] - rmax[:, None]) + eps)
        a = tl.where(valid[:, None], a, 0.0)
        g = _load_rows(g_ptr, rows, valid, stride_gt, h * stride_gh, dv)
        o = _load_rows(o_ptr, rows, valid, stride_ot, h * stride_oh, dv)
        den = tl.load(den_ptr + rows * n_heads + h, mask=valid, other=1.0)
        dnum = g / den[:, None]
        dden = -tl.sum(g * o, 1) / den
        ds += tl.dot(tl.trans(a), dnum, input_precision=PRECISION)
        dz += tl.sum(a * dden[:, None], 0)
    base = (c * n_heads + h).to(tl.int64)
    tl.store(ds_ptr + (base * M_FEAT + f)[:, None] * DV + dv[None, :], ds)
    tl.store(dz_ptr + base * M_FEAT + f, dz)


@triton.jit
def _query_grad(q_ptr, g_ptr, o_ptr, den_ptr, w_ptr, s_ptr, z_ptr, tile_start_ptr, tile_len_ptr, tile_seq_ptr,
                dq_ptr, stride_qt, stride_qh, stride_gt, stride_gh, stride_ot, stride_oh, stride_dt, stride_dh,
                n_heads, scale_in, eps, feat_scale, D: tl.constexpr, DV: tl.constexpr, BL: tl.constexpr,
                BM: tl.constexpr, M_FEAT: tl.constexpr, PRECISION: tl.constexpr):
    h, seq, rows, valid, qt, half = _row_tile(q_ptr, tile_start_ptr, tile_len_ptr, tile_seq_ptr, stride_qt,
                                                stride_qh, scale_in, D, BL)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    g = _load_rows(g_ptr, rows, valid, stride_gt, h * stride_gh, dv)
    o = _load_rows(o_ptr, rows, valid, stride_ot, h * stride_oh, dv)
    den = tl.load(den_ptr + rows * n_heads + h, mask=valid, other=1.0)
    dnum = g / den[:, None]
    dden = -tl.sum(g * o, 1) / den
    base = seq * n_heads + h
    # one pass over the feature blocks, relative to each row's running max (as in the forward)
    rmax = tl.full([BL], -float("inf"), tl.float32)
    dx = tl.zeros([BL, D], dtype=tl.float32)
    du_sum = tl.zeros([BL], dtype=tl.float32)
    for fb in tl.static_range(M_FEAT // BM):
        f = fb * BM + tl.arange(0, BM)
        w = tl.load(w_ptr + f[:, None] * D + d[None, :]).to(tl.float32)
        proj = tl.dot(qt, tl.trans(w), input_precision=PRECISION)
        r_new = tl.maximum(rmax, tl.max(proj, 1))
        alpha = tl.exp(rmax - r_new)
        e = tl.exp(proj - half[:, None] - r_new[:, None])
        s_blk = tl.load(s_ptr + (base * M_FEAT + f)[:, None] * DV + dv[None, :])
        z_blk = tl.load(z_ptr + base * M_FEAT + f)
        da = tl.dot(dnum, tl.trans(s_blk), input_precision=PRECISION) + dden[:, None] * z_blk[None, :]
        du = feat_scale * da * e
        dx = dx * alpha[:, None] + tl.dot(du, w, input_precision=PRECISION)
        du_sum = du_sum * alpha + tl.sum(du, 1)
        rmax = r_new
    dx = (dx - du_sum[:, None] * qt) * scale_in
    tl.store(dq_ptr + rows[:, None] * stride_dt + h * stride_dh + d[None, :], dx.to(dq_ptr.dtype.element_ty),
             mask=valid[:, None])


@triton.jit
def _key_grad(k_ptr, v_ptr, w_ptr, ds_ptr, dz_ptr, mx_ptr, tile_start_ptr, tile_len_ptr, tile_seq_ptr,
              dk_ptr, dv_ptr, stride_kt, stride_kh, stride_vt, stride_vh, stride_dkt, stride_dkh, stride_dvt,
              stride_dvh, n_heads, scale_in, eps, feat_scale, D: tl.constexpr, DV: tl.constexpr, BL: tl.constexpr,
              BM: tl.constexpr, M_FEAT: tl.constexpr, PRECISION: tl.constexpr):
    h, seq, rows, valid, kt, half = _row_tile(k_ptr, tile_start_ptr, tile_len_ptr, tile_seq_ptr, stride_kt,
                                                stride_kh, scale_in, D, BL)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    vt = _load_rows(v_ptr, rows, valid, stride_vt, h * stride_vh, dv)
    base = seq * n_heads + h
    big = tl.load(mx_ptr + base)
    dx = tl.zeros([BL, D], dtype=tl.float32)
    du_sum = tl.zeros([BL], dtype=tl.float32)
    dvv = tl.zeros([BL, DV], dtype=tl.float32)
    for fb in tl.static_range(M_FEAT // BM):
        f = fb * BM + tl.arange(0, BM)
        w = tl.load(w_ptr + f[:, None] * D + d[None, :]).to(tl.float32)
        e = tl.exp(tl.dot(kt, tl.trans(w), input_precision=PRECISION) - half[:, None] - big)
        b = feat_scale * (e + eps)
        ds_blk = tl.load(ds_ptr + (base * M_FEAT + f)[:, None] * DV + dv[None, :])
        dz_blk = tl.load(dz_ptr + base * M_FEAT + f)
        db = tl.dot(vt, tl.trans(ds_blk), input_precision=PRECISION) + dz_blk[None, :]
        dvv += tl.dot(b, ds_blk, input_precision=PRECISION)
        du = feat_scale * db * e
        dx += tl.dot(du, w, input_precision=PRECISION)
        du_sum += tl.sum(du, 1)
    dx = (dx - du_sum[:, None] * kt) * scale_in
    tl.store(dk_ptr + rows[:, None] * stride_dkt + h * stride_dkh + d[None, :], dx.to(dk_ptr.dtype.element_ty),
             mask=valid[:, None])
    tl.store(dv_ptr + rows[:, None] * stride_dvt + h * stride_dvh + dv[None, :], dvv.to(dv_ptr.dtype.element_ty),
             mask=valid[:, None])


def favor_backward(grad_out, q, k, v, projection, cu_seqlens, max_seqlen: int, out, state, norm, den, key_max,
                   eps: float = 1e-4, block_rows: int = 64, chunk_rows: int = CHUNK
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` [T, H, D] of FAVOR+ over packed sequences, from what `favor_forward` saved."""
    t, h, d = q.shape
    dv_dim = v.shape[-1]
    m = projection.shape[0]
    bm = _feature_block(m)
    device = q.device
    n_seq = cu_seqlens.numel() - 1
    w = projection.to(device=device, dtype=torch.float32).contiguous()
    grad_out = grad_out.contiguous()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    scale_in = d ** -0.25
    feat_scale = m ** -0.5
    consts = dict(D=d, DV=dv_dim, BL=block_rows, BM=bm, M_FEAT=m, PRECISION=precision)

    chunks = pieces(cu_seqlens, t, max_seqlen, chunk_rows)
    n_chunks = len(chunks.start)
    ds_part = torch.empty(n_chunks, h, m, dv_dim, device=device, dtype=torch.float32)
    dz_part = torch.empty(n_chunks, h, m, device=device, dtype=torch.float32)
    if n_chunks:
        _query_grad_state[(n_chunks, h, m // bm)](
            q, grad_out, out, den, w, chunks.start, chunks.length, ds_part, dz_part, q.stride(0), q.stride(1),
            grad_out.stride(0), grad_out.stride(1), out.stride(0), out.stride(1), h, scale_in, eps, feat_scale, **consts)
    d_state = combine(chunks, n_seq, ds_part, 0.0).sum(1).contiguous()  # fixed-order sum over chunks
    d_norm = combine(chunks, n_seq, dz_part, 0.0).sum(1).contiguous()

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    tiles = pieces(cu_seqlens, t, max_seqlen, block_rows)
    n_tiles = len(tiles.start)
    if n_tiles:
        _query_grad[(n_tiles, h)](
            q, grad_out, out, den, w, state, norm, tiles.start, tiles.length, tiles.seq, dq, q.stride(0), q.stride(1),
            grad_out.stride(0), grad_out.stride(1), out.stride(0), out.stride(1), dq.stride(0), dq.stride(1), h,
            scale_in, eps, feat_scale, **consts)
        _key_grad[(n_tiles, h)](
            k, v, w, d_state, d_norm, key_max.contiguous(), tiles.start, tiles.length, tiles.seq, dk, dv, k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), h,
            scale_in, eps, feat_scale, **consts)
    return dq, dk, dv

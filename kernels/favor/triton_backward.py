"""Fused FAVOR+ backward in Triton: features recomputed in registers, never stored.

Per sequence and head, with ``A = phi(q)`` [L, m], ``B = phi(k)``, state ``S = B^T V``,
normalizer ``z = B^T 1``, ``o = A S / (A z)`` and the output gradient ``G``:

    dnum = G / den            dden = -rowsum(G * o) / den
    dA = dnum S^T + dden z^T  dS = A^T dnum              dz = A^T dden
    dB = V dS^T + 1 dz^T      dV = B dS
    phi = c (exp(U) + eps), U = W x' - |x'|^2/2 - stab (stab detached, as in the definition):
    dU = c dA * exp(U)        dx' = dU W - rowsum(dU) x'   dx = d^(-1/4) dx'

Three kernels: ``_query_grad_state`` sums ``dS``, ``dz`` per (query chunk, head, feature block)
(a fixed-order sum over chunks follows, as in the forward), ``_query_grad`` gives ``dq`` per
query tile in one pass over the feature blocks, ``_key_grad`` gives ``dk`` and ``dv`` per key
tile. Both query kernels take each row's stabilizer (its max of ``W q'`` over all features) from
the forward, so a program reads only its own feature blocks and never rescales. Saved from the
forward: the output, its denominators and row stabilizers, ``S``, ``z`` and the key stabilizer
per sequence and head, O(T D + B m D). Launch configurations: `launch.py`; the host side:
`triton_ops.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_forward import _half_norm, _load_rows, _load_w, _mm, _project, _row_tile, _tile_rows


@triton.jit
def _output(o_ptr, olo_ptr, rows, valid, stride_t, head_offset, dv, O_LO: tl.constexpr):
    """The forward's output rows [BL, Dv] fp32, with the part rounding to bf16/fp16 cut off
    (``O_LO``): ``dden = -rowsum(G o) / den`` must use the o that S and z give, or dA's
    cancellation ``dnum S^T + dden z^T`` leaves the rounding behind (all of dq for one token)."""
    o = _load_rows(o_ptr, rows, valid, stride_t, head_offset, dv).to(tl.float32)
    if O_LO:
        o += _load_rows(olo_ptr, rows, valid, stride_t, head_offset, dv).to(tl.float32)
    return o


@triton.jit
def _query_grad_state(q_ptr, g_ptr, o_ptr, olo_ptr, den_ptr, qmax_ptr, w_ptr, chunk_start_ptr, chunk_len_ptr, ds_ptr,
                      dz_ptr, stride_qt, stride_qh, stride_gt, stride_gh, stride_ot, stride_oh, n_heads, scale_in,
                      eps, feat_scale, D: tl.constexpr, DV: tl.constexpr, BL: tl.constexpr, BM: tl.constexpr,
                      M_FEAT: tl.constexpr, X_OP: tl.constexpr, F_OP: tl.constexpr,
                      O_LO: tl.constexpr, EMULATE: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    fb = tl.program_id(2)
    start = tl.load(chunk_start_ptr + c)
    n = tl.load(chunk_len_ptr + c)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    f = fb * BM + tl.arange(0, BM)
    w_hi, w_lo = _load_w(w_ptr, f, D, M_FEAT, X_OP)
    ds = tl.zeros([BM, DV], dtype=tl.float32)
    dz = tl.zeros([BM], dtype=tl.float32)
    for off in range(0, n, BL):
        rows, valid = _tile_rows(start, off, n, BL)
        qt = _load_rows(q_ptr, rows, valid, stride_qt, h * stride_qh, d)
        # each row's stabilizer as the forward found it (max over all m features): reading it
        # keeps this program to its own feature block
        rmax = tl.load(qmax_ptr + rows * n_heads + h, mask=valid, other=0.0)
        proj = _project(qt, w_hi, w_lo, scale_in, BL, BM, X_OP, EMULATE)
        a = feat_scale * (tl.exp(proj - _half_norm(qt, scale_in)[:, None] - rmax[:, None]) + eps)
        a = tl.where(valid[:, None], a, 0.0)
        g = _load_rows(g_ptr, rows, valid, stride_gt, h * stride_gh, dv).to(tl.float32)
        o = _output(o_ptr, olo_ptr, rows, valid, stride_ot, h * stride_oh, dv, O_LO)
        den = tl.load(den_ptr + rows * n_heads + h, mask=valid, other=1.0)
        dnum = g / den[:, None]
        dden = -tl.sum(g * o, 1) / den
        ds = _mm(tl.trans(a), dnum, ds, F_OP, EMULATE)
        dz += tl.sum(a * dden[:, None], 0)
    base = (c * n_heads + h).to(tl.int64)
    tl.store(ds_ptr + (base * M_FEAT + f)[:, None] * DV + dv[None, :], ds)
    tl.store(dz_ptr + base * M_FEAT + f, dz)


@triton.jit
def _query_grad(q_ptr, g_ptr, o_ptr, olo_ptr, den_ptr, qmax_ptr, w_ptr, wf_ptr, s_ptr, z_ptr, tile_start_ptr, tile_len_ptr,
                tile_seq_ptr, dq_ptr, stride_qt, stride_qh, stride_gt, stride_gh, stride_ot, stride_oh, stride_dt,
                stride_dh, n_heads, scale_in, eps, feat_scale, D: tl.constexpr, DV: tl.constexpr, BL: tl.constexpr,
                BM: tl.constexpr, M_FEAT: tl.constexpr, X_OP: tl.constexpr, F_OP: tl.constexpr,
                O_LO: tl.constexpr, EMULATE: tl.constexpr):
    h, seq, rows, valid, qt = _row_tile(q_ptr, tile_start_ptr, tile_len_ptr, tile_seq_ptr, stride_qt, stride_qh,
                                        D, BL)
    half = _half_norm(qt, scale_in)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    g = _load_rows(g_ptr, rows, valid, stride_gt, h * stride_gh, dv).to(tl.float32)
    o = _output(o_ptr, olo_ptr, rows, valid, stride_ot, h * stride_oh, dv, O_LO)
    den = tl.load(den_ptr + rows * n_heads + h, mask=valid, other=1.0)
    dnum = g / den[:, None]
    dden = -tl.sum(g * o, 1) / den
    # the forward's per-row stabilizer: no running max, no rescaling of the [BL, D] accumulator
    rmax = tl.load(qmax_ptr + rows * n_heads + h, mask=valid, other=0.0)
    base = seq * n_heads + h
    dx = tl.zeros([BL, D], dtype=tl.float32)
    du_sum = tl.zeros([BL], dtype=tl.float32)
    for fb in range(0, M_FEAT // BM):
        f = fb * BM + tl.arange(0, BM)
        w_hi, w_lo = _load_w(w_ptr, f, D, M_FEAT, X_OP)
        e = tl.exp(_project(qt, w_hi, w_lo, scale_in, BL, BM, X_OP, EMULATE) - half[:, None] - rmax[:, None])
        s_blk = tl.load(s_ptr + (base * M_FEAT + f)[:, None] * DV + dv[None, :])
        z_blk = tl.load(z_ptr + base * M_FEAT + f)
        da = _mm(dnum, tl.trans(s_blk), dden[:, None] * z_blk[None, :], F_OP, EMULATE)
        du = feat_scale * da * e
        dx = _mm(du, tl.load(wf_ptr + f[:, None] * D + d[None, :]), dx, F_OP, EMULATE)
        du_sum += tl.sum(du, 1)
    dx = (dx - du_sum[:, None] * (qt.to(tl.float32) * scale_in)) * scale_in
    tl.store(dq_ptr + rows[:, None] * stride_dt + h * stride_dh + d[None, :], dx.to(dq_ptr.dtype.element_ty),
             mask=valid[:, None])


@triton.jit
def _key_grad(k_ptr, v_ptr, w_ptr, wf_ptr, ds_ptr, dz_ptr, mx_ptr, tile_start_ptr, tile_len_ptr, tile_seq_ptr,
              dk_ptr, dv_ptr, stride_kt, stride_kh, stride_vt, stride_vh, stride_dkt, stride_dkh, stride_dvt,
              stride_dvh, n_heads, scale_in, eps, feat_scale, D: tl.constexpr, DV: tl.constexpr, BL: tl.constexpr,
              BM: tl.constexpr, M_FEAT: tl.constexpr, X_OP: tl.constexpr, F_OP: tl.constexpr,
              EMULATE: tl.constexpr):
    h, seq, rows, valid, kt = _row_tile(k_ptr, tile_start_ptr, tile_len_ptr, tile_seq_ptr, stride_kt, stride_kh,
                                        D, BL)
    half = _half_norm(kt, scale_in)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    vt = _load_rows(v_ptr, rows, valid, stride_vt, h * stride_vh, dv)
    base = seq * n_heads + h
    big = tl.load(mx_ptr + base)
    dx = tl.zeros([BL, D], dtype=tl.float32)
    du_sum = tl.zeros([BL], dtype=tl.float32)
    dvv = tl.zeros([BL, DV], dtype=tl.float32)
    for fb in range(0, M_FEAT // BM):
        f = fb * BM + tl.arange(0, BM)
        w_hi, w_lo = _load_w(w_ptr, f, D, M_FEAT, X_OP)
        e = tl.exp(_project(kt, w_hi, w_lo, scale_in, BL, BM, X_OP, EMULATE) - half[:, None] - big)
        ds_blk = tl.load(ds_ptr + (base * M_FEAT + f)[:, None] * DV + dv[None, :])
        dz_blk = tl.load(dz_ptr + base * M_FEAT + f)
        db = _mm(vt, tl.trans(ds_blk), tl.zeros([BL, BM], dtype=tl.float32) + dz_blk[None, :], F_OP, EMULATE)
        dvv = _mm(feat_scale * (e + eps), ds_blk, dvv, F_OP, EMULATE)
        du = feat_scale * db * e
        dx = _mm(du, tl.load(wf_ptr + f[:, None] * D + d[None, :]), dx, F_OP, EMULATE)
        du_sum += tl.sum(du, 1)
    dx = (dx - du_sum[:, None] * (kt.to(tl.float32) * scale_in)) * scale_in
    tl.store(dk_ptr + rows[:, None] * stride_dkt + h * stride_dkh + d[None, :], dx.to(dk_ptr.dtype.element_ty),
             mask=valid[:, None])
    tl.store(dv_ptr + rows[:, None] * stride_dvt + h * stride_dvh + dv[None, :], dvv.to(dv_ptr.dtype.element_ty),
             mask=valid[:, None])

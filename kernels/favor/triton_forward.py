"""Fused FAVOR+ forward in Triton over packed sequences (the definition is `naive.py`).

Two kernels and a small deterministic combine in between:

1. ``_key_state``: one program per (key chunk, head, block of features). A chunk is up to
   ``CHUNK`` rows of one sequence (long sequences are split into several chunks, so their work
   spreads over programs). It computes the key features in registers and accumulates
   ``S_c = sum exp(Wk' - |k'|^2/2 - M_c) v`` and ``z_c = sum exp(...)`` in fp32, where ``M_c`` is
   the running max of ``Wk'`` (rescaling the sums when it grows), plus ``sum v``.
2. The combine (PyTorch, a fixed-order sum): the sequence's stabilizer is ``M = max_c M_c``; the
   state is ``S = m^-1/2 (sum_c exp(M_c - M) S_c + eps sum v)`` and likewise ``z``; the ``eps``
   term is added once, exactly as in the definition.
3. ``_query_out``: one program per (query tile, head): query features in registers, one pass
   over the feature blocks with each row's running max (sums rescaled when it grows),
   ``o = phi(q) S / (phi(q) z)``; each row's final max is saved for the backward.

No feature matrix is written to memory, and no atomics are used: results do not depend on
scheduling. Block sizes, warps, stages and the dtypes the dots take (bf16/fp16 projections,
TF32 feature-side products) come from `launch.py`, which says why; the host side (the
launches in order, the combine) is `triton_ops.py`. Shapes: q, k, v [T, H, D];
projection [m, D]; cu_seqlens [B+1].
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_rows(start, off, n, BL: tl.constexpr):
    """Rows ``start + off + [0, BL)`` of a piece of ``n`` rows: (rows [BL] int64, valid [BL])."""
    r = off + tl.arange(0, BL)
    return (start + r).to(tl.int64), r < n


@triton.jit
def _load_rows(ptr, rows, valid, stride_t, head_offset, cols):
    """Rows ``rows`` of a [T, H, W] tensor (``head_offset`` = h * its head stride), columns
    ``cols``, in the tensor's dtype (inputs stay narrow in registers); rows not ``valid`` read 0."""
    return tl.load(ptr + rows[:, None] * stride_t + head_offset + cols[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _mm(a, b, acc, OP: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + a @ b`` [M, N] fp32 with both operands rounded to ``OP`` (an operand dtype of the
    launch, `launch.py`); fp32 operands multiply in TF32 on GPU. ``EMULATE`` (Triton's interpreter
    only, whose own bf16/fp16 dot is wrong): 1 = the same rounding to bf16/fp16, then an fp32
    product, which is exact for such operands, so only the order of the fp32 sums differs from the
    tensor cores; 2 = also cut fp32 operands to TF32's 10 mantissa bits (truncating: the worst
    case), so that CPU tests of half-precision inputs see the GPU's error. fp32 inputs use 1:
    their CPU tests check the math to 1e-4, the GPU tests TF32's ~1e-3."""
    if EMULATE:
        a = a.to(OP).to(tl.float32)
        b = b.to(OP).to(tl.float32)
        if EMULATE == 2 and OP == tl.float32:
            a = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            b = (b.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a.to(OP), b.to(OP), acc, input_precision="tf32")


@triton.jit
def _load_w(w_ptr, f, D: tl.constexpr, M_FEAT: tl.constexpr, X_OP: tl.constexpr):
    """Projection rows ``f`` [BM] as (hi, lo) [BM, D] of a [2, m, D] (``X_OP`` half precision:
    ``W = hi + lo`` to ~2^-17) or [1, m, D] (fp32: lo is unused) projection."""
    offs = f[:, None] * D + tl.arange(0, D)[None, :]
    hi = tl.load(w_ptr + offs)
    if X_OP == tl.float32:
        lo = hi
    else:
        lo = tl.load(w_ptr + M_FEAT * D + offs)
    return hi, lo


@triton.jit
def _project(x, w_hi, w_lo, scale_in, BL: tl.constexpr, BM: tl.constexpr, X_OP: tl.constexpr,
             EMULATE: tl.constexpr):
    """``W x'`` [BL, BM] fp32 for raw rows x [BL, D] and a projection block (hi, lo) [BM, D]. x
    enters the dot unscaled (bf16/fp16 inputs are exact operands) and ``d^-1/4`` is applied to the
    fp32 result. Half-precision inputs take two dots, ``x hi^T + x lo^T``: W rounded once to bf16
    moves every exponent by ~2^-9 |Wx'| and was measured to double the error of dq; the split
    costs what one TF32 dot costs and keeps x narrow. fp32 inputs: one TF32 dot."""
    proj = _mm(x, tl.trans(w_hi), tl.zeros([BL, BM], dtype=tl.float32), X_OP, EMULATE)
    if X_OP != tl.float32:
        proj = _mm(x, tl.trans(w_lo), proj, X_OP, EMULATE)
    return proj * scale_in


@triton.jit
def _half_norm(x, scale_in):
    """``|x'|^2 / 2`` [BL] fp32 of raw rows x [BL, D], ``x' = d^-1/4 x``."""
    xf = x.to(tl.float32)
    return tl.sum(xf * xf, 1) * (0.5 * scale_in * scale_in)


@triton.jit
def _row_tile(x_ptr, tile_start_ptr, tile_len_ptr, tile_seq_ptr, stride_t, stride_h, D: tl.constexpr,
              BL: tl.constexpr):
    """The rows of this program's tile (program ids: tile, head) of a [T, H, D] tensor: (head,
    sequence, rows [BL], valid [BL], raw x [BL, D] in x's dtype)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(tile_start_ptr + t)
    n = tl.load(tile_len_ptr + t)
    seq = tl.load(tile_seq_ptr + t).to(tl.int64)
    rows, valid = _tile_rows(start, 0, n, BL)
    return h, seq, rows, valid, _load_rows(x_ptr, rows, valid, stride_t, h * stride_h, tl.arange(0, D))


@triton.jit
def _key_state(k_ptr, v_ptr, w_ptr, chunk_start_ptr, chunk_len_ptr, s_ptr, z_ptr, mx_ptr, vsum_ptr,
               stride_kt, stride_kh, stride_vt, stride_vh, n_heads, n_fblocks, scale_in,
               D: tl.constexpr, DV: tl.constexpr, BL: tl.constexpr, BM: tl.constexpr, M_FEAT: tl.constexpr,
               X_OP: tl.constexpr, F_OP: tl.constexpr,
               EMULATE: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    fb = tl.program_id(2)
    start = tl.load(chunk_start_ptr + c)
    n = tl.load(chunk_len_ptr + c)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    f = fb * BM + tl.arange(0, BM)
    w_hi, w_lo = _load_w(w_ptr, f, D, M_FEAT, X_OP)  # [BM, D] each
    acc = tl.zeros([BM, DV], dtype=tl.float32)
    zacc = tl.zeros([BM], dtype=tl.float32)
    vsum = tl.zeros([DV], dtype=tl.float32)
    m_run = -float("inf")
    for off in range(0, n, BL):
        rows, valid = _tile_rows(start, off, n, BL)
        kt = _load_rows(k_ptr, rows, valid, stride_kt, h * stride_kh, d)
        vt = _load_rows(v_ptr, rows, valid, stride_vt, h * stride_vh, dv)
        proj = _project(kt, w_hi, w_lo, scale_in, BL, BM, X_OP, EMULATE)
        proj = tl.where(valid[:, None], proj, -float("inf"))
        m_new = tl.maximum(m_run, tl.max(proj))
        alpha = tl.exp(m_run - m_new)
        e = tl.exp(proj - _half_norm(kt, scale_in)[:, None] - m_new)  # padded rows: exp(-inf) = 0
        acc = _mm(tl.trans(e), vt, acc * alpha, F_OP, EMULATE)
        zacc = zacc * alpha + tl.sum(e, 0)
        vsum += tl.sum(vt.to(tl.float32), 0)
        m_run = m_new
    base = (c * n_heads + h).to(tl.int64)
    tl.store(s_ptr + (base * M_FEAT + f)[:, None] * DV + dv[None, :], acc)
    tl.store(z_ptr + base * M_FEAT + f, zacc)
    tl.store(mx_ptr + base * n_fblocks + fb, m_run)
    if fb == 0:
        tl.store(vsum_ptr + base * DV + dv, vsum)


@triton.jit
def _query_out(q_ptr, w_ptr, s_ptr, z_ptr, tile_start_ptr, tile_len_ptr, tile_seq_ptr, o_ptr, olo_ptr, den_ptr, qmax_ptr,
               stride_qt, stride_qh, stride_ot, stride_oh, n_heads, scale_in, eps, feat_scale,
               D: tl.constexpr, DV: tl.constexpr, BL: tl.constexpr, BM: tl.constexpr, M_FEAT: tl.constexpr,
               X_OP: tl.constexpr, F_OP: tl.constexpr, O_LO: tl.constexpr,
               EMULATE: tl.constexpr):
    h, seq, rows, valid, qt = _row_tile(q_ptr, tile_start_ptr, tile_len_ptr, tile_seq_ptr, stride_qt, stride_qh,
                                        D, BL)
    half = _half_norm(qt, scale_in)
    dv = tl.arange(0, DV)
    # one pass over the feature blocks: the sums are kept relative to each row's running max of
    # Wq' and rescaled when it grows (the eps term does not depend on it: added at the end)
    rmax = tl.full([BL], -float("inf"), tl.float32)
    num = tl.zeros([BL, DV], dtype=tl.float32)
    den = tl.zeros([BL], dtype=tl.float32)
    s_sum = tl.zeros([DV], dtype=tl.float32)
    z_sum = tl.zeros([BM], dtype=tl.float32)
    base = seq * n_heads + h
    for fb in range(0, M_FEAT // BM):
        f = fb * BM + tl.arange(0, BM)
        w_hi, w_lo = _load_w(w_ptr, f, D, M_FEAT, X_OP)
        proj = _project(qt, w_hi, w_lo, scale_in, BL, BM, X_OP, EMULATE)
        r_new = tl.maximum(rmax, tl.max(proj, 1))
        alpha = tl.exp(rmax - r_new)
        e = tl.exp(proj - half[:, None] - r_new[:, None])
        s_blk = tl.load(s_ptr + (base * M_FEAT + f)[:, None] * DV + dv[None, :])
        z_blk = tl.load(z_ptr + base * M_FEAT + f)
        num = _mm(e, s_blk, num * alpha[:, None], F_OP, EMULATE)
        den = den * alpha + tl.sum(e * z_blk[None, :], 1)
        s_sum += tl.sum(s_blk, 0)
        z_sum += z_blk
        rmax = r_new
    num = feat_scale * (num + eps * s_sum[None, :])
    den = feat_scale * (den + eps * tl.sum(z_sum, 0))
    out = num / den[:, None]
    o_offs = rows[:, None] * stride_ot + h * stride_oh + dv[None, :]
    out_rounded = out.to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + o_offs, out_rounded, mask=valid[:, None])
    if O_LO:
        # what rounding the output to bf16/fp16 cut off: the backward's rowsum(G * o) must see
        # the o that S and z give (for a one-token sequence dq is exactly 0 only then)
        tl.store(olo_ptr + o_offs, (out - out_rounded.to(tl.float32)).to(olo_ptr.dtype.element_ty),
                 mask=valid[:, None])
    tl.store(den_ptr + rows * n_heads + h, den, mask=valid)
    # each row's stabilizer: the backward reuses it instead of recomputing every feature block
    tl.store(qmax_ptr + rows * n_heads + h, rmax, mask=valid)

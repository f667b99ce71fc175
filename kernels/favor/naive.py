"""FAVOR+ attention, the plain-PyTorch definition the fused kernel is tested against.

Non-causal FAVOR+ (Performer) with positive random features, per head and per sequence of a
packed batch. For ``x`` a query or key row of width ``d`` and ``W`` the ``[m, d]`` projection:

    x' = d^(-1/4) x
    phi(x) = m^(-1/2) * (exp(W x' - |x'|^2 / 2 - stab) + eps)

``stab`` is a detached maximum that keeps ``exp`` in range: for a query, the max of its own ``W x'``
over the m features; for the keys, the max over all keys of the sequence (and head) and all
features. Output: ``o = phi(q) (phi(k)^T v) / (phi(q) (phi(k)^T 1))``. Both stabilizers cancel in
the ratio except against ``eps``, which is how performer-pytorch 1.1.4 defines it too (the
reference is tested equal to its ``FastAttention`` given the same projection). Written for
clarity (a loop over sequences), in any float dtype including float64.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from ..packing import apply_packed


def draw_projection(m: int, d: int, generator: torch.Generator | None = None, seed: int | None = None,
                    dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A FAVOR+ projection ``[m, d]``: stacked blocks of ``d`` orthonormal rows (QR of a Gaussian
    ``d x d`` matrix, with the sign correction that makes them uniformly distributed, which
    performer-pytorch's default omits; the last block cut to the rows still needed), each row
    then scaled by the norm of an independent Gaussian ``d``-vector, so that rows have the length
    distribution of Gaussian rows while staying orthogonal within a block.

    ``generator`` or ``seed`` make the draw reproducible; drawn in float64 on the CPU, then cast.
    """
    if m < 1 or d < 1:
        raise ValueError(f"projection shape [{m}, {d}] must be positive")
    if generator is None:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    blocks = []
    for _ in range(math.ceil(m / d)):
        gaussian = torch.randn(d, d, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        # Householder QR fixes the signs of R's diagonal, which biases Q's columns; flipping them
        # to a positive diagonal makes Q Haar-distributed (rows then point anywhere evenly)
        q = q * torch.sign(torch.diagonal(r))
        blocks.append(q.T)  # rows orthonormal
    rows = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return (rows * norms[:, None]).to(dtype=dtype, device=device)


def _features(x: torch.Tensor, projection: torch.Tensor, is_query: bool, eps: float) -> torch.Tensor:
    """phi of one sequence's rows.  x [L, H, D], projection [m, D] -> [L, H, m]"""
    d = x.shape[-1]
    m = projection.shape[0]
    xs = x * d ** -0.25
    proj = torch.einsum("lhd,md->lhm", xs, projection.to(x.dtype))
    half_norm = (xs * xs).sum(-1, keepdim=True) / 2
    if is_query:  # per query row, over its features
        stab = proj.amax(dim=-1, keepdim=True).detach()
    else:  # per head, over all keys of the sequence and their features
        stab = proj.amax(dim=(0, 2), keepdim=True).detach()
    return m ** -0.5 * (torch.exp(proj - half_norm - stab) + eps)


def check_inputs(q, k, v, projection, cu_seqlens) -> list[int]:
    """Shapes and ``cu_seqlens`` checked; its values as a list."""
    if q.shape != k.shape or q.shape[:-1] != v.shape[:-1] or q.dim() != 3:
        raise ValueError(f"q, k, v must be [T, H, D] with equal T and H (got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)})")
    if projection.dim() != 2 or projection.shape[1] != q.shape[-1]:
        raise ValueError(f"projection must be [m, {q.shape[-1]}], got {tuple(projection.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={q.shape[0]}, got {bounds[:3]}...{bounds[-2:]}")
    return bounds


def favor_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                              cu_seqlens: torch.Tensor, max_seqlen: int, eps: float = 1e-4) -> torch.Tensor:
    """Non-causal FAVOR+ attention over packed sequences.

    q, k, v [T, H, D]; projection [m, D]; cu_seqlens [B+1] (int, from 0 to T); max_seqlen is
    accepted for the kernel's signature (unused here). Returns [T, H, D] in q's dtype. Attention
    never crosses a sequence boundary.
    """
    bounds = check_inputs(q, k, v, projection, cu_seqlens)
    out = torch.empty_like(v, dtype=q.dtype)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        phi_q = _features(q[a:b], projection, True, eps)
        phi_k = _features(k[a:b], projection, False, eps)
        state = torch.einsum("lhm,lhe->hme", phi_k, v[a:b].to(phi_k.dtype))  # [H, m, Dv]
        norm = phi_k.sum(0)  # [H, m]
        numerator = torch.einsum("lhm,hme->lhe", phi_q, state)
        denominator = torch.einsum("lhm,hm->lh", phi_q, norm)
        out[a:b] = (numerator / denominator[..., None]).to(q.dtype)
    return out


def favor_attention_reference_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                                     key_padding_mask: torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """`favor_attention_reference` on the padded layout: q, k, v [B, H, L, D], ``key_padding_mask``
    [B, L] bool (True on real tokens; None: all real). Sequences are the real tokens of each row (a
    prefix or not); padded positions of the output are zero.  -> [B, H, L, D]"""
    return apply_packed(partial(favor_attention_reference, projection=projection, eps=eps), q, k, v, key_padding_mask)

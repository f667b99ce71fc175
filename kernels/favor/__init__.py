"""FAVOR+ (Performer) linear attention over packed sequences.

`favor_attention` is what the model's attention layer calls: the fused Triton kernels
(`triton_forward`, `triton_backward`, launched by `triton_ops`) on CUDA tensors (or anywhere
under ``TRITON_INTERPRET=1``), the same definition in batched PyTorch ops (`batched`) otherwise
(a CPU run);
`favor_attention_padded` is it on the padded layout [B, H, L, D]. `favor_attention_reference`
(and `favor_attention_reference_padded`), in `naive.py`, is the plain definition both paths are
tested against: one name per function, so that an import says which one it gets.
`draw_projection` draws the projection; the caller decides when to redraw it.
"""

from __future__ import annotations

import os
from functools import partial

import torch

from ..packing import apply_packed
from .batched import favor_attention_batched
from .naive import draw_projection, favor_attention_reference, favor_attention_reference_padded
from .triton_ops import favor_backward, favor_forward

__all__ = ["draw_projection", "favor_attention", "favor_attention_batched", "favor_attention_padded",
           "favor_attention_reference", "favor_attention_reference_padded"]


class _FavorAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, cu_seqlens, max_seqlen, eps):
        out, state, norm, den, key_max, query_max, out_lo = favor_forward(q, k, v, projection, cu_seqlens, max_seqlen,
                                                                           eps, return_backward_extras=True)
        ctx.save_for_backward(q, k, v, projection, cu_seqlens, out, state, norm, den, key_max, query_max, out_lo)
        ctx.eps, ctx.max_seqlen = eps, max_seqlen
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, projection, cu_seqlens, out, state, norm, den, key_max, query_max, out_lo = ctx.saved_tensors
        dq, dk, dv = favor_backward(grad_out, q, k, v, projection, cu_seqlens, ctx.max_seqlen, out, state, norm, den,
                                    key_max, ctx.eps, query_max=query_max, out_lo=out_lo)
        return dq, dk, dv, None, None, None, None


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                    cu_seqlens: torch.Tensor, max_seqlen: int, eps: float = 1e-4) -> torch.Tensor:
    """Non-causal FAVOR+ attention over packed sequences: q, k, v [T, H, D] (fp32 / bf16 / fp16),
    projection [m, D] (m a multiple of 16), cu_seqlens [B+1], max_seqlen at least the longest
    sequence -> [T, H, D] in q's dtype. The projection gets no gradient. Definition:
    `favor_attention_reference`."""
    if q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return _FavorAttention.apply(q, k, v, projection, cu_seqlens, max_seqlen, eps)
    return favor_attention_batched(q, k, v, projection, cu_seqlens, max_seqlen, eps)


def favor_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                           key_padding_mask: torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """`favor_attention` for padded q, k, v [B, H, L, D] with ``key_padding_mask`` [B, L] (True on
    real tokens): the real tokens are packed, attended, and put back; padded outputs are zero."""
    return apply_packed(partial(favor_attention, projection=projection, eps=eps), q, k, v, key_padding_mask)


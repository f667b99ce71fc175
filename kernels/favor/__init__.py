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
           "favor_attention_reference", "favor_attention_reference_padded", "kernel_width"]


class _FavorAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, cu_seqlens, max_seqlen, eps, head_dim):
        out, state, norm, den, key_max, query_max, out_lo = favor_forward(
            q, k, v, projection, cu_seqlens, max_seqlen, eps, return_backward_extras=True, head_dim=head_dim)
        ctx.save_for_backward(q, k, v, projection, cu_seqlens, out, state, norm, den, key_max, query_max, out_lo)
        ctx.eps, ctx.max_seqlen, ctx.head_dim = eps, max_seqlen, head_dim
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, projection, cu_seqlens, out, state, norm, den, key_max, query_max, out_lo = ctx.saved_tensors
        dq, dk, dv = favor_backward(grad_out, q, k, v, projection, cu_seqlens, ctx.max_seqlen, out, state, norm, den,
                                    key_max, ctx.eps, query_max=query_max, out_lo=out_lo, head_dim=ctx.head_dim)
        return dq, dk, dv, None, None, None, None, None


def kernel_width(width: int) -> int:
    """The head width the kernels run a head of ``width`` at: a power of two >= 16 (zero-padded)."""
    return max(16, 1 << (width - 1).bit_length())


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                    cu_seqlens: torch.Tensor, max_seqlen: int, eps: float = 1e-4) -> torch.Tensor:
    """Non-causal FAVOR+ attention over packed sequences: q, k, v [T, H, D] (fp32 / bf16 / fp16),
    projection [m, D] (m a multiple of 16), cu_seqlens [B+1], max_seqlen at least the longest
    sequence -> [T, H, D] in q's dtype. Any head width: the kernels run it padded to `kernel_width`.
    The projection gets no gradient. Definition: `favor_attention_reference`."""
    if q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        # the kernels take power-of-two head widths >= 16: other widths (scBERT's 20) run zero-padded,
        # which changes no dot product or norm; the input scale stays the true width's
        d, dv = q.shape[-1], v.shape[-1]
        width, width_v = kernel_width(d), kernel_width(dv)
        # boundaries given on the host (a padding mask's, a caller's) go where the kernels read them
        cu_seqlens = cu_seqlens.to(q.device)
        out = _FavorAttention.apply(_pad(q, width), _pad(k, width), _pad(v, width_v), _pad(projection, width),
                                    cu_seqlens, max_seqlen, eps, d)
        return out if width_v == dv else out[..., :dv]
    return favor_attention_batched(q, k, v, projection, cu_seqlens, max_seqlen, eps)


def favor_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                           key_padding_mask: torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """`favor_attention` for padded q, k, v [B, H, L, D] with ``key_padding_mask`` [B, L] (True on
    real tokens): the real tokens are packed, attended, and put back; padded outputs are zero."""
    return apply_packed(partial(favor_attention, projection=projection, eps=eps), q, k, v, key_padding_mask)


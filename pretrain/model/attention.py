"""Attention over packed sequences, one interface for three backends.

Every backend takes q, k, v ``[T, H, D]`` of sequences concatenated without padding and
``cu_seqlens`` ``[B+1]`` (int32), and returns ``[T, H, D]``; attention never crosses a sequence.

- ``favor``: Performer FAVOR+ (`kernels.favor`): the fused Triton kernel on CUDA tensors, the
  same definition in batched PyTorch ops elsewhere. Linear in the sequence length; approximates softmax
  attention (error falls as the feature count m grows).
- ``flash``: ``flash_attn_varlen_func`` (exact softmax; needs CUDA and flash-attn, imported
  when first used).
- ``sdpa``: torch ``scaled_dot_product_attention`` on a padded view with a key mask (exact
  softmax, always available; the padding costs memory and time on mixed lengths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.favor import favor_attention, favor_attention_batched

from .packing import padding_index


def favor(q, k, v, cu_seqlens, max_seqlen, projection):
    """FAVOR+ with ``projection`` ``[m, D]``.  -> [T, H, D]"""
    fn = favor_attention if q.is_cuda else favor_attention_batched
    return fn(q, k, v, projection, cu_seqlens, max_seqlen)


_flash_varlen = None


def flash(q, k, v, cu_seqlens, max_seqlen, projection=None):
    """flash-attn's varlen kernel (fp16/bf16 CUDA tensors).  -> [T, H, D]"""
    global _flash_varlen
    if _flash_varlen is None:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as err:
            raise RuntimeError("attention backend 'flash' needs flash-attn (CUDA only: "
                               "`pip install flash-attn --no-build-isolation`); or set model.attention=sdpa") from err
        _flash_varlen = flash_attn_varlen_func
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"attention backend 'flash' runs on CUDA in fp16/bf16 (got {q.dtype} on {q.device}); "
                           "train with bf16 on a GPU, or set model.attention=sdpa")
    cu = cu_seqlens.to(torch.int32)
    return _flash_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, causal=False)


def sdpa(q, k, v, cu_seqlens, max_seqlen, projection=None):
    """Exact softmax attention on the padded layout ``[B, H, L, D]``.  -> [T, H, D]"""
    b = cu_seqlens.shape[0] - 1
    seq, pos = padding_index(cu_seqlens, q.shape[0])
    h = q.shape[1]

    def pad(x):
        out = x.new_zeros(b, max_seqlen, h, x.shape[-1])
        out[seq, pos] = x
        return out.transpose(1, 2)

    real = torch.zeros(b, max_seqlen, dtype=torch.bool, device=q.device)
    real[seq, pos] = True
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=real[:, None, None, :])
    return out.transpose(1, 2)[seq, pos]


BACKENDS = {"favor": favor, "flash": flash, "sdpa": sdpa}

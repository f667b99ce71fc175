"""Index arithmetic of packed sequences: the tokens of B sequences concatenated without padding,
``cu_seqlens`` [B+1] (int, rising from 0 to T) marking where each begins.

The one home of this arithmetic for every layer above (the FAVOR+ kernels' PyTorch paths, the
attention backends, the model), as flash-linear-attention keeps its ``fla.ops.utils.index``: a
helper written twice drifts. Token counts come from the caller's tensors, since reading
``cu_seqlens[-1]`` would wait for the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sequence_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The sequence of every packed token.  [T] int64"""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=n_tokens)


def padding_index(cu_seqlens: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq, pos)`` of every packed token: its sequence and its position in it, i.e. its place
    in the padded layout ``[B, max_seqlen]``.  [T], [T] int64"""
    seq = sequence_ids(cu_seqlens, n_tokens)
    pos = torch.arange(n_tokens, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]
    return seq, pos


def cu_seqlens_from_mask(real: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The packed layout of the True entries of ``real`` [B, L], row by row (a row's entries need
    not be a prefix): (cu_seqlens [B+1] int32, max_seqlen)."""
    lengths = real.sum(1)
    cu = torch.zeros(real.shape[0] + 1, dtype=torch.int32, device=real.device)
    cu[1:] = lengths.cumsum(0)
    return cu, int(lengths.max()) if real.shape[0] else 0


def apply_packed(packed_attention: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run a packed attention, ``packed_attention(q, k, v, cu_seqlens=, max_seqlen=)`` on [T, H, D],
    on padded q, k, v [B, H, L, D] with ``key_padding_mask`` [B, L] bool (True on real tokens;
    None: all real): the real tokens of each row are one sequence; padded outputs are zero.
    -> [B, H, L, Dv]"""
    b, h, length, _ = q.shape
    real = torch.ones(b, length, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    pick = lambda t: t.permute(0, 2, 1, 3)[real]  # noqa: E731 - [T, H, D]
    cu, longest = cu_seqlens_from_mask(real)
    out = q.new_zeros(b, length, h, v.shape[-1])
    out[real] = packed_attention(pick(q), pick(k), pick(v), cu_seqlens=cu, max_seqlen=longest)
    return out.permute(0, 2, 1, 3)


def with_prefix(x: torch.Tensor, prefix: torch.Tensor,
                cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prepend ``prefix[i]`` ([k, d]) to packed sequence i.  x [T, d], prefix [B, k, d] ->
    (x' [T+B*k, d], cu_seqlens' [B+1], token_rows [T]: where each input row went, prefix_rows [B, k])"""
    b, k = prefix.shape[0], prefix.shape[1]
    seq = sequence_ids(cu_seqlens, x.shape[0])
    token_rows = torch.arange(x.shape[0], device=x.device) + (seq + 1) * k
    new_cu = cu_seqlens + k * torch.arange(b + 1, device=x.device, dtype=cu_seqlens.dtype)
    prefix_rows = new_cu[:-1].long()[:, None] + torch.arange(k, device=x.device)
    out = x.new_empty(x.shape[0] + b * k, x.shape[1])
    out[token_rows] = x
    out[prefix_rows.flatten()] = prefix.reshape(b * k, -1).to(x.dtype)
    return out, new_cu, token_rows, prefix_rows


def with_cls(x: torch.Tensor, cls: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prepend ``cls`` [d] to every packed sequence.  x [T, d] ->
    (x' [T+B, d], cu_seqlens' [B+1], token_rows [T]: where each input row went)"""
    out, new_cu, token_rows, _ = with_prefix(x, cls.expand(cu_seqlens.shape[0] - 1, 1, -1), cu_seqlens)
    return out, new_cu, token_rows


def mean_per_sequence(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean of each packed sequence's rows, summed in at least fp32.  x [T, d] -> [B, d] in x's dtype
    (zero for empty sequences). CUDA's index_add of bf16 rounds every addition to bf16: a sum of
    thousands of rows would stop growing, and a length of 2001 is 2000 in bf16."""
    b = cu_seqlens.shape[0] - 1
    acc = torch.promote_types(x.dtype, torch.float32)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(acc)
    sums = torch.zeros(b, x.shape[1], dtype=acc, device=x.device).index_add(0, sequence_ids(cu_seqlens, x.shape[0]),
                                                                           x.to(acc))
    return (sums / lengths.clamp_min(1)[:, None]).to(x.dtype)


def max_per_sequence(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Elementwise max of each packed sequence's rows.  x [T, d] -> [B, d] (zero for empty sequences)"""
    seq = sequence_ids(cu_seqlens, x.shape[0])
    return x.new_zeros(cu_seqlens.shape[0] - 1, x.shape[1]).scatter_reduce(
        0, seq[:, None].expand_as(x), x, reduce="amax", include_self=False)


def compact(keep: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The packed layout of the rows where ``keep`` [T] is True: (cu_seqlens' [B+1], max_seqlen)."""
    b = cu_seqlens.shape[0] - 1
    seq = sequence_ids(cu_seqlens, keep.shape[0])
    kept = torch.zeros(b, dtype=torch.long, device=keep.device).index_add(0, seq, keep.long())
    new_cu = torch.zeros(b + 1, dtype=cu_seqlens.dtype, device=keep.device)
    new_cu[1:] = kept.cumsum(0)
    return new_cu, int(kept.max()) if b else 0

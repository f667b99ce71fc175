"""Index arithmetic of packed sequences (tokens of B sequences concatenated, ``cu_seqlens`` [B+1])."""

from __future__ import annotations

import torch


def sequence_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The sequence of every packed token.  [T] int64"""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=n_tokens)


def padding_index(cu_seqlens: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq, pos)`` of every packed token: its sequence and its position in it.  [T], [T]
    (``n_tokens`` = T, from the caller's tensors: reading ``cu_seqlens[-1]`` would wait for the device)"""
    seq = sequence_ids(cu_seqlens, n_tokens)
    pos = torch.arange(n_tokens, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]
    return seq, pos


def with_cls(x: torch.Tensor, cls: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prepend ``cls`` [d] to every packed sequence.  x [T, d] ->
    (x' [T+B, d], cu_seqlens' [B+1], token_rows [T]: where each input row went)"""
    b = cu_seqlens.shape[0] - 1
    seq = sequence_ids(cu_seqlens, x.shape[0])
    token_rows = torch.arange(x.shape[0], device=x.device) + seq + 1
    new_cu = cu_seqlens + torch.arange(b + 1, device=x.device, dtype=cu_seqlens.dtype)
    out = x.new_empty(x.shape[0] + b, x.shape[1])
    out[token_rows] = x
    out[new_cu[:-1].long()] = cls.to(x.dtype)
    return out, new_cu, token_rows


def mean_per_sequence(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean of each packed sequence's rows.  x [T, d] -> [B, d] (zero for empty sequences)"""
    b = cu_seqlens.shape[0] - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sums = x.new_zeros(b, x.shape[1]).index_add(0, sequence_ids(cu_seqlens, x.shape[0]), x)
    return sums / lengths.clamp_min(1).to(x.dtype)[:, None]


def compact(keep: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed layout of the rows where ``keep`` [T] is True: (cu_seqlens' [B+1], max_seqlen)."""
    b = cu_seqlens.shape[0] - 1
    seq = sequence_ids(cu_seqlens, keep.shape[0])
    kept = torch.zeros(b, dtype=torch.long, device=keep.device).index_add(0, seq, keep.long())
    new_cu = torch.zeros(b + 1, dtype=cu_seqlens.dtype, device=keep.device)
    new_cu[1:] = kept.cumsum(0)
    return new_cu, int(kept.max()) if b else 0

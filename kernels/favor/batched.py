"""FAVOR+ over packed sequences in batched PyTorch ops: the CPU fast path.

Same definition as `naive.py` (which loops over sequences for clarity). The feature maps are
computed for every token at once, head-major ``[H, T, m]``, so that each sequence's rows are one
contiguous run per head: `torch.split` hands out every sequence's block as a view, and its state and
output are two batched matrix products over the heads. Nothing is padded, so the cost follows the
tokens, not the batch size times the longest sequence: an earlier version padded the features to
``[B, max_seqlen, H, m]`` and spent most of its time filling and reading that padding
(`benchmarks/bench_favor_cpu.py` times both layouts and the reference). The normalizer
rides along as a column of ones beside ``v``: the state's last column is the sum of the key
features, the output's last column the denominator. Memory is that of the features (T x H x m);
on GPU the fused Triton kernel never stores the features at all.
"""

from __future__ import annotations

import torch

from ..packing import sequence_ids
from .naive import check_inputs


def favor_attention_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                            cu_seqlens: torch.Tensor, max_seqlen: int, eps: float = 1e-4) -> torch.Tensor:
    """q, k, v [T, H, D]; projection [m, D]; cu_seqlens [B+1]; max_seqlen is accepted for the
    kernel's signature (unused here).  -> [T, H, D] in q's dtype."""
    bounds = check_inputs(q, k, v, projection, cu_seqlens)
    t, h, d = q.shape
    b = len(bounds) - 1
    if t == 0:
        return torch.empty_like(q)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    w = projection.to(q.dtype)

    def project(x):  # [H, T, m] logits and [H, T, 1] half squared norms
        xs = x.transpose(0, 1) * d ** -0.25
        return torch.matmul(xs, w.T), (xs * xs).sum(-1, keepdim=True) / 2

    proj_q, half_q = project(q)
    proj_k, half_k = project(k)
    stab_q = proj_q.amax(-1, keepdim=True).detach()
    seq = sequence_ids(cu_seqlens, t)
    key_max = proj_k.detach().amax(-1)  # [H, T] -> per head and sequence
    seq_max = key_max.new_full((h, b), float("-inf")).scatter_reduce(1, seq.expand(h, -1), key_max, "amax")
    # the definition's factor m^-1/2 on every feature cancels between numerator and denominator
    phi_q = torch.exp(proj_q - (half_q + stab_q)) + eps
    phi_k = torch.exp(proj_k - (half_k + seq_max[:, seq, None])) + eps
    v_ones = torch.cat([v.transpose(0, 1).to(phi_k.dtype), phi_k.new_ones(h, t, 1)], -1)  # [H, T, Dv+1]
    parts = [fq @ (fk.transpose(1, 2) @ fv)  # [H, L, m] @ [H, m, Dv+1]
             for fq, fk, fv in zip(phi_q.split(lengths, 1), phi_k.split(lengths, 1), v_ones.split(lengths, 1))]
    out = torch.cat(parts, 1)  # [H, T, Dv+1]
    return (out[..., :-1] / out[..., -1:]).transpose(0, 1).to(q.dtype)

"""FAVOR+ over packed sequences in batched PyTorch ops: the CPU fast path.

Same definition as `naive.py` (which loops over sequences for clarity), computed for all
sequences at once on a padded ``[B, L, H, m]`` layout of the features, padded rows zeroed so that
they add nothing to a sequence's state. Memory is that of the features (B x L x H x m), so this
suits CPU runs and tests; on GPU the fused Triton kernel never stores the features at all.
"""

from __future__ import annotations

import torch

from ..packing import padding_index
from .naive import check_inputs


def favor_attention_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                            cu_seqlens: torch.Tensor, max_seqlen: int, eps: float = 1e-4) -> torch.Tensor:
    """q, k, v [T, H, D]; projection [m, D]; cu_seqlens [B+1]; max_seqlen >= the longest
    sequence.  -> [T, H, D] in q's dtype."""
    check_inputs(q, k, v, projection, cu_seqlens)
    t, h, d = q.shape
    b, m = cu_seqlens.shape[0] - 1, projection.shape[0]
    if t == 0:
        return torch.empty_like(q)
    seq, pos = padding_index(cu_seqlens, t)
    length = max(int(max_seqlen), 1)
    w = projection.to(q.dtype)

    def project(x):  # [T, H, m] logits and [T, H, 1] half squared norms
        xs = x * d ** -0.25
        return torch.einsum("thd,md->thm", xs, w), (xs * xs).sum(-1, keepdim=True) / 2

    proj_q, half_q = project(q)
    proj_k, half_k = project(k)
    stab_q = proj_q.amax(-1, keepdim=True).detach()
    key_max = proj_k.detach().amax(-1)  # [T, H] -> per sequence and head
    seq_max = key_max.new_full((b, h), float("-inf")).scatter_reduce(0, seq[:, None].expand(-1, h), key_max, "amax")
    stab_k = seq_max[seq][..., None]
    phi_q = m ** -0.5 * (torch.exp(proj_q - half_q - stab_q) + eps)
    phi_k = m ** -0.5 * (torch.exp(proj_k - half_k - stab_k) + eps)

    def pad(x):  # [T, H, c] -> [B, L, H, c], zero where there is no token
        out = x.new_zeros(b, length, h, x.shape[-1])
        return out.index_put((seq, pos), x)

    phi_k_padded, v_padded = pad(phi_k), pad(v.to(phi_k.dtype))
    state = torch.einsum("blhm,blhe->bhme", phi_k_padded, v_padded)  # [B, H, m, Dv]
    norm = phi_k_padded.sum(1)  # [B, H, m]
    phi_q_padded = pad(phi_q)
    numerator = torch.einsum("blhm,bhme->blhe", phi_q_padded, state)[seq, pos]  # [T, H, Dv]
    denominator = torch.einsum("blhm,bhm->blh", phi_q_padded, norm)[seq, pos]  # [T, H]
    return (numerator / denominator[..., None]).to(q.dtype)

"""FAVOR+ over packed sequences in batched PyTorch ops: the CPU fast path.

Same definition as `naive.py` (which loops over sequences for clarity). Sequences are taken in
groups of about ``group_tokens`` tokens (whole sequences, in order). In a group the feature maps of
every token are computed at once, head-major ``[H, n, m]``, so that each sequence's rows are one
contiguous run per head: `torch.split` hands out every sequence's block as a view, and its state and
output are two batched matrix products over the heads. The normalizer rides along as a column of
ones beside ``v``: the state's last column is the sum of the key features, the output's last column
the denominator.

Why this shape (`benchmarks/bench_favor_cpu.py` times it against the alternatives,
`benchmarks/results/favor_layouts_cpu.json`): nothing is padded, so the cost follows the tokens, not
the batch size times the longest sequence, as it did when the features were scattered into a zeroed
``[B, max_seqlen, H, m]`` batch; and a group's features stay in the CPU's cache between the
elementwise passes that make them, which the whole batch's (tens of MB) do not. One sequence at a
time, as the reference does, keeps that locality but pays Python and dispatch costs per sequence,
worst in the backward pass and with short cells.

With several torch threads the padded layout is used instead: every small product of the grouped
one is a parallel region that waits for all the threads, and where another process holds a core
(a busy machine, test workers side by side) a descheduled thread stalls each of them, so the
grouped layout fell far behind the padded one there, while the padded one runs few, large regions.
"""

from __future__ import annotations

import torch

from ..packing import padding_index, sequence_ids
from .naive import check_inputs

GROUP_TOKENS = 1024  # tokens per group: the features of one group of the report's model are 1 MB


def favor_attention_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                            cu_seqlens: torch.Tensor, max_seqlen: int, eps: float = 1e-4,
                            group_tokens: int | None = GROUP_TOKENS, layout: str | None = None) -> torch.Tensor:
    """q, k, v [T, H, D]; projection [m, D]; cu_seqlens [B+1]; max_seqlen >= the longest sequence;
    ``layout`` "grouped" or "padded" (None: grouped with one torch thread, padded with several);
    ``group_tokens`` None: the whole batch as one group.  -> [T, H, D] in q's dtype."""
    bounds = check_inputs(q, k, v, projection, cu_seqlens)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if layout is None:
        layout = "grouped" if torch.get_num_threads() == 1 else "padded"
    if layout == "padded":
        return _padded(q, k, v, projection, cu_seqlens, max_seqlen, eps)
    if layout != "grouped":
        raise ValueError(f"layout must be 'grouped', 'padded' or None, got {layout!r}")
    groups, current, tokens = [], [], 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        current.append(end - start)
        tokens += end - start
        if group_tokens is not None and tokens >= group_tokens:
            groups.append(current)
            current, tokens = [], 0
    groups += [current] if current else []
    sizes = [sum(g) for g in groups]
    w = projection.to(q.dtype)
    outs = [_group(*parts, w, lengths, eps) for *parts, lengths in zip(q.split(sizes), k.split(sizes), v.split(sizes),
                                                                         groups) if sum(lengths)]
    return (torch.cat(outs) if len(outs) > 1 else outs[0]).to(q.dtype)


def _group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, lengths: list[int],
           eps: float) -> torch.Tensor:
    """FAVOR+ of consecutive whole sequences of ``lengths``: q, k, v [n, H, D] -> [n, H, Dv]."""
    n, h, d = q.shape

    def project(x):  # [H, n, m] logits and [H, n, 1] half squared norms
        xs = x.transpose(0, 1) * d ** -0.25
        return torch.matmul(xs, w.T), (xs * xs).sum(-1, keepdim=True) / 2

    proj_q, half_q = project(q)
    proj_k, half_k = project(k)
    stab_q = proj_q.amax(-1, keepdim=True).detach()
    key_max = proj_k.detach().amax(-1)  # [H, n] -> per head and sequence
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=q.device)
    cu[1:] = torch.tensor(lengths, device=q.device).cumsum(0)
    seq = sequence_ids(cu, n)
    seq_max = key_max.new_full((h, len(lengths)), float("-inf")).scatter_reduce(1, seq.expand(h, -1), key_max, "amax")
    # the definition's factor m^-1/2 on every feature cancels between numerator and denominator
    phi_q = torch.exp(proj_q - (half_q + stab_q)) + eps
    phi_k = torch.exp(proj_k - (half_k + seq_max[:, seq, None])) + eps
    v_ones = torch.cat([v.transpose(0, 1).to(phi_k.dtype), phi_k.new_ones(h, n, 1)], -1)  # [H, n, Dv+1]
    parts = [fq @ (fk.transpose(1, 2) @ fv)  # [H, L, m] @ [H, m, Dv+1]
             for fq, fk, fv in zip(phi_q.split(lengths, 1), phi_k.split(lengths, 1), v_ones.split(lengths, 1))]
    out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # [H, n, Dv+1]
    return (out[..., :-1] / out[..., -1:]).transpose(0, 1)


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, cu_seqlens: torch.Tensor,
            max_seqlen: int, eps: float) -> torch.Tensor:
    """FAVOR+ of the whole batch on the features scattered into a zeroed ``[B, max_seqlen, H, m]``
    batch, contracted with einsum over it.  q, k, v [T, H, D] -> [T, H, Dv]"""
    t, h, d = q.shape
    b, length = cu_seqlens.shape[0] - 1, max(int(max_seqlen), 1)
    seq, pos = padding_index(cu_seqlens, t)
    w = projection.to(q.dtype)

    def project(x):  # [T, H, m] logits and [T, H, 1] half squared norms
        xs = x * d ** -0.25
        return torch.einsum("thd,md->thm", xs, w), (xs * xs).sum(-1, keepdim=True) / 2

    proj_q, half_q = project(q)
    proj_k, half_k = project(k)
    stab_q = proj_q.amax(-1, keepdim=True).detach()
    key_max = proj_k.detach().amax(-1)  # [T, H] -> per sequence and head
    seq_max = key_max.new_full((b, h), float("-inf")).scatter_reduce(0, seq[:, None].expand(-1, h), key_max, "amax")
    phi_q = torch.exp(proj_q - (half_q + stab_q)) + eps
    phi_k = torch.exp(proj_k - (half_k + seq_max[seq][..., None])) + eps

    def pad(x):  # [T, H, c] -> [B, L, H, c], zero where there is no token
        return x.new_zeros(b, length, h, x.shape[-1]).index_put((seq, pos), x)

    phi_k_padded, phi_q_padded = pad(phi_k), pad(phi_q)
    state = torch.einsum("blhm,blhe->bhme", phi_k_padded, pad(v.to(phi_k.dtype)))  # [B, H, m, Dv]
    norm = phi_k_padded.sum(1)  # [B, H, m]
    numerator = torch.einsum("blhm,bhme->blhe", phi_q_padded, state)[seq, pos]  # [T, H, Dv]
    denominator = torch.einsum("blhm,bhm->blh", phi_q_padded, norm)[seq, pos]  # [T, H]
    return (numerator / denominator[..., None]).to(q.dtype)

"""Pre-norm transformer blocks over packed sequences (x ``[T, d]`` + ``cu_seqlens`` ``[B+1]``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.favor import draw_projection, favor_attention_reference_padded

from .attention import BACKENDS


class Attention(nn.Module):
    """Multi-head self-attention over packed sequences. For ``favor`` it owns the projection
    ``[m, head_dim]`` as a buffer, redrawn by `redraw` (at optimizer steps only, so that a
    gradient-cache pass and its recompute use the same one)."""

    def __init__(self, d_model: int, n_heads: int, backend: str, favor_features: int):
        super().__init__()
        self.n_heads, self.head_dim, self.backend = n_heads, d_model // n_heads, backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        projection = draw_projection(favor_features, self.head_dim, seed=0) if backend == "favor" else torch.empty(0)
        self.register_buffer("projection", projection)

    def redraw(self, generator: torch.Generator) -> None:
        if self.backend == "favor":
            m, d = self.projection.shape
            self.projection.copy_(draw_projection(m, d, generator=generator).to(self.projection))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).view(t, 3, self.n_heads, self.head_dim).unbind(1)
        out = BACKENDS[self.backend](q, k, v, cu_seqlens, max_seqlen, self.projection)
        return self.out(out.reshape(t, self.n_heads * self.head_dim))  # t may be 0 (every gene masked)

    def forward_padded(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """The padded reference: x [B, L, d], key_padding_mask [B, L] (True on real tokens) ->
        [B, L, d] (padded rows are garbage). Exact softmax for sdpa, flash and varlen."""
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, L, Dh]
        if self.backend == "favor":
            out = favor_attention_reference_padded(q, k, v, self.projection, key_padding_mask)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :])
        return self.out(out.transpose(1, 2).reshape(b, length, -1))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_multiplier: float, dropout: float, norm_eps: float,
                 backend: str, favor_features: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads, backend, favor_features)
        self.norm2 = nn.LayerNorm(d_model, eps=norm_eps)
        hidden = int(round(d_model * ffn_multiplier))
        self.ffn = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cu_seqlens, max_seqlen))
        return x + self.drop(self.ffn(self.norm2(x)))

    def forward_padded(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn.forward_padded(self.norm1(x), key_padding_mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class Encoder(nn.Module):
    """``n_layers`` blocks and a final LayerNorm.  x [T, d] -> [T, d]"""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, ffn_multiplier: float, dropout: float,
                 norm_eps: float, backend: str, favor_features: int, activation_checkpointing: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, ffn_multiplier, dropout, norm_eps, backend, favor_features)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # non-reentrant checkpointing replays the RNG, so dropout matches in the recompute
                x = checkpoint(block, x, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = block(x, cu_seqlens, max_seqlen)
        return self.norm(x)

    def forward_padded(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """The padded reference of `forward`: x [B, L, d], key_padding_mask [B, L] -> [B, L, d]."""
        for block in self.blocks:
            x = block.forward_padded(x, key_padding_mask)
        return self.norm(x)

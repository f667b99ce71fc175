"""Transformer blocks over packed sequences (x ``[T, d]`` + ``cu_seqlens`` ``[B+1]``).

Pre-norm (the default: each branch sees ``LayerNorm(x)``, the residual stream is never normalized,
which trains stably at depth without warm-up tricks) or post-norm as in the original BERT
(``x = LayerNorm(x + branch(x))``: Geneformer's BertForMaskedLM). The encoder's own LayerNorm is
applied to the output in pre-norm and to the input in post-norm, where it plays BERT's embedding
LayerNorm (a post-norm block's output is normalized already).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.favor import draw_projection, favor_attention_reference_padded

from .attention import BACKENDS, MASKED_BACKENDS, KnownSplit


class Attention(nn.Module):
    """Multi-head self-attention over packed sequences: ``n_heads`` heads of ``head_dim`` (default
    d_model / n_heads; performer-pytorch's are 64 wide whatever d_model is). For ``favor`` it owns
    the projection ``[m, head_dim]`` as a buffer, redrawn by `redraw` (at optimizer steps only, so
    that a gradient-cache pass and its recompute use the same one)."""

    def __init__(self, d_model: int, n_heads: int, backend: str, favor_features: int, head_dim: int | None = None):
        super().__init__()
        self.n_heads, self.head_dim, self.backend = n_heads, head_dim or d_model // n_heads, backend
        inner = n_heads * self.head_dim
        self.qkv = nn.Linear(d_model, 3 * inner)
        self.out = nn.Linear(inner, d_model)
        projection = draw_projection(favor_features, self.head_dim, seed=0) if backend == "favor" else torch.empty(0)
        self.register_buffer("projection", projection)

    def redraw(self, generator: torch.Generator) -> None:
        if self.backend == "favor":
            m, d = self.projection.shape
            self.projection.copy_(draw_projection(m, d, generator=generator).to(self.projection))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                known: torch.Tensor | None = None) -> torch.Tensor:
        """``known`` [T] bool (or its `KnownSplit`): scGPT's generative mask (unknown tokens attend to
        known ones and themselves), on the backends that take it (`MASKED_BACKENDS`)."""
        t = x.shape[0]
        q, k, v = self.qkv(x).view(t, 3, self.n_heads, self.head_dim).unbind(1)
        if known is None:
            out = BACKENDS[self.backend](q, k, v, cu_seqlens, max_seqlen, self.projection)
        elif self.backend in MASKED_BACKENDS:
            out = BACKENDS[self.backend](q, k, v, cu_seqlens, max_seqlen, self.projection, known=known)
        else:
            raise ValueError(f"model.attention_mask=generative needs exact attention ({', '.join(MASKED_BACKENDS)}), "
                             f"not {self.backend}: set model.attention=sdpa, or flash/varlen on a GPU")
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


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_multiplier: float, dropout: float, norm_eps: float,
                 backend: str, favor_features: int, norm_position: str = "pre", activation: str = "gelu",
                 head_dim: int | None = None):
        super().__init__()
        self.post_norm = norm_position == "post"
        self.norm1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads, backend, favor_features, head_dim)
        self.norm2 = nn.LayerNorm(d_model, eps=norm_eps)
        hidden = int(round(d_model * ffn_multiplier))
        self.ffn = nn.Sequential(nn.Linear(d_model, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, d_model))
        self.drop = nn.Dropout(dropout)

    def _residuals(self, x: torch.Tensor, attend) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.drop(attend(x)))
            return self.norm2(x + self.drop(self.ffn(x)))
        x = x + self.drop(attend(self.norm1(x)))
        return x + self.drop(self.ffn(self.norm2(x)))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                known: torch.Tensor | None = None) -> torch.Tensor:
        return self._residuals(x, lambda h: self.attn(h, cu_seqlens, max_seqlen, known))

    def forward_padded(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self._residuals(x, lambda h: self.attn.forward_padded(h, key_padding_mask))


class Encoder(nn.Module):
    """``n_layers`` blocks and a LayerNorm (after them in pre-norm, before them in post-norm).
    x [T, d] -> [T, d]"""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, ffn_multiplier: float, dropout: float,
                 norm_eps: float, backend: str, favor_features: int, activation_checkpointing: bool = False,
                 norm_position: str = "pre", activation: str = "gelu", head_dim: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, ffn_multiplier, dropout, norm_eps, backend, favor_features,
                                          norm_position, activation, head_dim)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.post_norm = norm_position == "post"
        self.activation_checkpointing = activation_checkpointing

    def blocks_through(self, layer: int) -> int:
        """How many blocks run to give the output of block ``layer`` (-1: the last, -2: the one
        before it, ...: Python's negative indexing over the blocks)."""
        if layer != -1 and not -len(self.blocks) <= layer < -1:
            raise ValueError(f"encoder layer {layer}: give -1 (the last block, the default) down to "
                             f"-{len(self.blocks)} (the first); -2 is the second-to-last, Geneformer's embedding layer")
        return len(self.blocks) + 1 + layer

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                known: torch.Tensor | None = None, layer: int = -1) -> torch.Tensor:
        """``known`` [T] bool: scGPT's generative attention mask (None: full attention per sequence).
        ``layer``: the output of that block (`blocks_through`), the later blocks skipped; pre-norm
        applies the final LayerNorm to it as to the last block's (post-norm blocks end normalized)."""
        blocks = self.blocks if layer == -1 else self.blocks[:self.blocks_through(layer)]
        if known is not None and self.blocks and self.blocks[0].attn.backend != "sdpa":
            known = KnownSplit.of(known, cu_seqlens)  # the two-pass kernels' rows, found once for every layer
        if self.post_norm:
            x = self.norm(x)
        for block in blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # non-reentrant checkpointing replays the RNG, so dropout matches in the recompute
                x = checkpoint(block, x, cu_seqlens, max_seqlen, known, use_reentrant=False)
            else:
                x = block(x, cu_seqlens, max_seqlen, known)
        return x if self.post_norm else self.norm(x)

    def forward_padded(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """The padded reference of `forward`: x [B, L, d], key_padding_mask [B, L] -> [B, L, d]."""
        if self.post_norm:
            x = self.norm(x)
        for block in self.blocks:
            x = block.forward_padded(x, key_padding_mask)
        return x if self.post_norm else self.norm(x)

"""Parameters and training FLOPs of a model config, for MFU (no model is built).

FLOPs count matrix multiplies only (2 per multiply-add), forward, times 3 for training
(backward = 2 x forward), per cell of ``seq_len`` input (expressed) genes:

- a block on a sequence of n tokens: ``n * 2 * (4 d a + 2 d f)`` for the projections and the
  feed-forward (a = n_heads x head_dim, the heads' total width, d unless ``head_dim`` is set;
  f = hidden width), plus attention: exact softmax (``sdpa``, ``flash``) ``n * 4 * n * a``
  (scores and weighted sum), FAVOR+ ``n * 8 * m * a`` (query and key features, the key-value
  state and the query-state product, each ``m * head_dim`` per head);
- the masked-expression head on ``mask_ratio`` of the genes, the contrastive and label heads on
  the cell embedding;
- the value embedding only where it is auto-discretization (``2 (b + b^2 + b d)`` per embedded
  value: its b x b mix is large beside a narrow model's blocks; a table or the small MLP is not);
- sequence lengths as the model sees them: plus one for ``<cls>``, two for the T and S tokens; every vocabulary gene for
  ``gene_set=all``; for the encoder-decoder, the unmasked genes in the encoder and the full gene
  set in the decoder.

FAVOR+'s backward recomputes the features, so its true cost is a little above 3 x forward;
the convention (as for activation checkpointing) is not to count recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .shape import ModelConfig


@dataclass
class ModelCost:
    params: int
    flops_per_cell: float   # training (forward + backward)
    flops_per_token: float  # per input (expressed) gene token


def _linear(i: int, o: int) -> int:
    return i * o + o


def _stack_params(d: int, n_layers: int, ffn: int, inner: int | None = None) -> int:
    """``inner``: the heads' total width, n_heads x head_dim (default d)."""
    inner = inner or d
    block = 2 * d + _linear(d, 3 * inner) + _linear(inner, d) + 2 * d + _linear(d, ffn) + _linear(ffn, d)
    return n_layers * block + 2 * d


def _stack_flops(n: float, d: int, n_layers: int, ffn: int, attention: str, m: int, inner: int | None = None) -> float:
    inner = inner or d
    attn = 8 * m * inner if attention == "favor" else 4 * n * inner
    return n_layers * n * (2 * (4 * d * inner + 2 * d * ffn) + attn)


def _params(c: ModelConfig) -> int:
    d, ffn = c.d_model, int(round(c.d_model * c.ffn_multiplier))
    params = c.vocab_size * d
    if c.value_mode == "bins" and c.bin_embedding == "mlp":
        params += _linear(1, d) + _linear(d, d) + 2 * d
    elif c.value_mode == "bins":
        params += (c.n_bins + 1) * d
    elif c.value_mode == "rank":
        params += c.max_rank * d
    elif c.continuous_embedding == "autobin":
        b = c.autobin_bins
        params += _linear(1, b) + _linear(b, b) + b * d + d
    else:
        hidden = max(32, d // 4)
        params += _linear(1, hidden) + _linear(hidden, d) + d
    params += d if c.use_cls else 0
    params += 2 * d if c.depth_tokens else 0
    params += _stack_params(d, c.n_layers, ffn, c.n_heads * c.attention_head_dim)
    params += _linear(c.cell_dim, d) + _linear(d, c.contrastive_dim) + sum(_linear(c.cell_dim, n) for n in c.label_classes)
    if c.architecture == "encoder_decoder":
        dd, dffn = c.decoder.d_model, int(round(c.decoder.d_model * c.ffn_multiplier))
        params += _linear(d, dd) + c.vocab_size * dd + 2 * dd + _stack_params(dd, c.decoder.n_layers, dffn) + _linear(dd, 1)
    else:
        params += _linear(d, d) + 2 * d + _linear(d, c.mlm_outputs)
        params += _linear(d, d) + d * d if c.mvc_head else 0
    return params


def _training_flops(c: ModelConfig, seq_len, masked):
    """Training FLOPs of one sequence of ``seq_len`` input genes, ``masked`` of them masked. Only
    ``+ - *`` on the two, so that tensors of per-sequence values give per-sequence FLOPs."""
    d, ffn = c.d_model, int(round(c.d_model * c.ffn_multiplier))
    inner = c.n_heads * c.attention_head_dim  # the heads' total width
    n_genes, e, cls = c.n_genes, c.cell_dim, c.n_prefix
    depth = 2 * int(c.depth_tokens)
    autobin = 0.0  # per embedded value
    if c.value_mode == "continuous" and c.continuous_embedding == "autobin":
        autobin = 2.0 * (c.autobin_bins + c.autobin_bins ** 2 + c.autobin_bins * d)
    bin_mlp = 2.0 * (d + d * d) if c.value_mode == "bins" and c.bin_embedding == "mlp" else 0.0  # per value
    heads = 2 * (e * d + d * c.contrastive_dim + sum(e * n for n in c.label_classes))
    if c.architecture == "encoder_decoder":
        dd, dffn = c.decoder.d_model, int(round(c.decoder.d_model * c.ffn_multiplier))
        enc_len = seq_len - masked + cls
        # T and S: encoder outputs passed to the decoder too
        forward = (_stack_flops(enc_len, d, c.n_layers, ffn, c.attention, c.favor_features, inner)
                   + autobin * (seq_len - masked + depth)
                   + 2 * (seq_len - masked + depth) * d * dd
                   + _stack_flops(n_genes + depth, dd, c.decoder.n_layers, dffn, c.decoder.attention, c.favor_features)
                   + 2 * masked * dd + heads)
    else:
        mvc = 2 * masked * (2 * d * d + d) if c.mvc_head else 0.0  # MVC / GEPC: gene2query, W, the dot product
        enc_len = (n_genes + 0 * seq_len if c.gene_set == "all" else seq_len) + cls
        forward = (_stack_flops(enc_len, d, c.n_layers, ffn, c.attention, c.favor_features, inner)
                   + (autobin + bin_mlp) * (seq_len + depth) + 2 * masked * (d * d + d * c.mlm_outputs) + mvc + heads)
    return 3 * forward


def model_cost(config: ModelConfig, seq_len: float, mask_ratio: float = 0.15) -> ModelCost:
    """Parameters and training FLOPs per cell of ``seq_len`` input genes, ``mask_ratio`` of them masked."""
    per_cell = _training_flops(config, seq_len, mask_ratio * seq_len)
    return ModelCost(params=int(_params(config)), flops_per_cell=float(per_cell),
                     flops_per_token=float(per_cell / max(seq_len, 1)))


def sequences_flops(config: ModelConfig, lengths: torch.Tensor, masked: torch.Tensor) -> float:
    """Training FLOPs of a batch's sequences, each at its own length: ``lengths`` [B] input genes,
    ``masked`` [B] of them masked. Exact attention is quadratic in the length, so FLOPs at the
    batch's mean length undercount a ragged batch; this sums each sequence's own."""
    return float(_training_flops(config, lengths.double(), masked.double()).sum())

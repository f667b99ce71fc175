"""The cell model: embeddings, encoder (or xTrimoGene-style encoder-decoder) and the three heads.

``CellModel(config)(batch)`` takes a `PackedBatch` and returns a `ModelOutput` with everything
the objectives need, so that one forward call (what a DeepSpeed engine wraps) serves every loss:

- ``mlm``: predictions at the masked positions only (``batch.mlm_mask``), in token order:
  ``[n_masked, n_bins]`` logits (bins), ``[n_masked, vocab_size]`` logits (rank: the masked gene
  token is predicted) or ``[n_masked]`` values (continuous).
- ``cells``: the cell embedding ``[B, cell_dim]`` (from ``<cls>``, the mean over gene tokens, or
  scFoundation's ``[S | T | max | mean]``, 4 d wide, see `CellModel.encode`).
- ``contrastive``: its projection ``[B, contrastive_dim]`` (not normalized).
- ``labels``: one ``[B, n_classes]`` logit tensor per label column.
- ``tokens``: final hidden states of the input gene tokens ``[T, d]`` (None for the
  encoder-decoder, whose encoder sees only part of them).

The encoder-decoder (``architecture=encoder_decoder``, xTrimoGene/scFoundation): the encoder sees
only the expressed, unmasked genes of each cell; its outputs are scattered into the full gene
set of the vocabulary (every non-special token), where unexpressed genes get a learned zero
embedding and masked genes a learned mask embedding; a FAVOR+ decoder over that full set
regresses the masked values. Genes whose input value is 0 (a read-depth-downsampled cell's genes
that lost every read, still predicted from their original value) join the decoder as unexpressed.
Masked unexpressed genes (``data.mask_zero_prob``: tokens of input 0, target 0 that the loader adds)
get the mask embedding like every masked gene, so the decoder learns to predict zeros too.

T and S tokens (``depth_tokens``, scFoundation): two tokens per cell whose values are log10 of
its raw total count T and of its input's total S (``batch.read_depth``), embedded by the value
embedding plus a learned identity each (scFoundation gives them gene ids 19264 and 19265 of its
positional table: biomap-research/scFoundation model/get_embedding.py appends them after the
19,264 genes). Like ``<cls>`` they are added by the model, not the loader; they are never masked,
and the encoder-decoder passes their encoder outputs to the decoder as two more rows per cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_pipeline.conversion.vocab import gene_token_range
from data_pipeline.loading.batch import PackedBatch
from kernels.packing import compact, max_per_sequence, mean_per_sequence, sequence_ids, with_prefix

from .embeddings import (
    AutoDiscretization,
    BinValueMLP,
    GeneEmbeddingCoverage,
    ValueEmbedding,
    align_gene_embeddings,
    read_gene_embedding_file,
)
from .encoder import Encoder
from .shape import ModelConfig


@dataclass
class ModelOutput:
    mlm: torch.Tensor | None     # [n_masked, C] logits or [n_masked] values (None: contrastive_only)
    cells: torch.Tensor          # [B, cell_dim]
    contrastive: torch.Tensor    # [B, contrastive_dim]
    labels: list[torch.Tensor]   # per label column [B, n_classes]
    tokens: torch.Tensor | None  # [T, d]
    mvc: torch.Tensor | None = None  # [n_masked] MVC / GEPC values (model.mvc_head), else None


class CellModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab: tuple[list[str], list[str]] | None = None, seed: int = 0):
        """``vocab``: (Ensembl ids, symbols) per token, needed only to align a pretrained gene
        embedding file (``config.gene_embedding_file``)."""
        super().__init__()
        self.config = c = config.validate()
        self.gene_embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.gene_embedding_coverage: GeneEmbeddingCoverage | None = None
        if c.gene_embedding_file:
            self._load_gene_embedding(vocab)
        self.value_embedding = ValueEmbedding(c.value_mode, c.d_model, c.n_bins, c.max_rank, c.continuous_embedding,
                                              c.autobin_bins, c.autobin_alpha, c.bin_embedding)
        self.cls = nn.Parameter(torch.randn(c.d_model) * 0.02) if c.use_cls else None
        # identities of the T and S tokens (rows 0, 1), added to their values' embeddings
        self.depth = nn.Parameter(torch.randn(2, c.d_model) * 0.02) if c.depth_tokens else None
        self.drop = nn.Dropout(c.dropout)
        self.encoder = Encoder(c.d_model, c.n_layers, c.n_heads, c.ffn_multiplier, c.dropout, c.norm_eps, c.attention,
                               c.favor_features, c.activation_checkpointing, c.norm_position, c.activation, c.head_dim)
        mlm_out = c.mlm_outputs
        self.gene_range = gene_token_range((c.pad_token, c.cls_token, c.mask_token), c.vocab_size)  # [low, high)
        if c.architecture == "encoder_decoder":
            dec = c.decoder
            self.to_decoder = nn.Linear(c.d_model, dec.d_model)
            self.decoder_gene_embedding = nn.Embedding(c.vocab_size, dec.d_model)
            self.decoder_zero = nn.Parameter(torch.randn(dec.d_model) * 0.02)
            self.decoder_mask = nn.Parameter(torch.randn(dec.d_model) * 0.02)
            self.decoder = Encoder(dec.d_model, dec.n_layers, dec.n_heads, c.ffn_multiplier, c.dropout, c.norm_eps,
                                   dec.attention, c.favor_features, c.activation_checkpointing)
            self.mlm_head = nn.Linear(dec.d_model, 1)
        else:
            self.mlm_head = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.GELU(),
                                          nn.LayerNorm(c.d_model, eps=c.norm_eps), nn.Linear(c.d_model, mlm_out))
        self.contrastive_head = nn.Sequential(nn.Linear(c.cell_dim, c.d_model), nn.GELU(),
                                              nn.Linear(c.d_model, c.contrastive_dim))
        self.label_heads = nn.ModuleList(nn.Linear(c.cell_dim, n) for n in c.label_classes)
        if c.mvc_head:  # scGPT's MVCDecoder, "inner product" style: gene2query, sigmoid, then W (no bias)
            self.mvc_query = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.Sigmoid())
            self.mvc_weight = nn.Linear(c.d_model, c.d_model, bias=False)
        self.apply(self._init)
        for module in self.modules():
            # torch's default init, as scFoundation's: logits that vary with the value
            if isinstance(module, AutoDiscretization):
                module.to_logits.reset_parameters()
                module.mix.reset_parameters()
            # and as scGPT's: with zero biases relu(w v) is proportional to v, and the LayerNorm would give
            # every nonzero bin the same embedding
            if isinstance(module, BinValueMLP):
                module.linear1.reset_parameters()
                module.linear2.reset_parameters()
        self.redraw_projections(torch.Generator().manual_seed(seed))

    @classmethod
    def initial(cls, config: ModelConfig, seed: int, vocab: tuple[list[str], list[str]] | None = None) -> CellModel:
        """The model a training run starts from: torch's global RNG seeded with ``seed``, then the
        model built (so the same seed gives the same weights whatever ran before)."""
        torch.manual_seed(seed)
        return cls(config, vocab=vocab, seed=seed)

    @classmethod
    def from_pretrained(cls, bundle: str | Path, device: str | torch.device = "cpu") -> CellModel:
        """The model of an exported bundle (a folder written by `launch/export.py`), in eval mode,
        with ``.normalization`` and ``.vocab`` attached (`pretrain.load_pretrained` is this; the
        format is `pretrain.model.bundle`'s)."""
        from .bundle import read_bundle

        config, weights, normalization, vocab = read_bundle(bundle, device)
        model = cls(config)
        model.load_state_dict(weights)
        model.normalization, model.vocab = normalization, vocab
        return model.to(device).eval()

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and not getattr(module, "_pretrained", False):
            nn.init.normal_(module.weight, std=0.02)

    def _load_gene_embedding(self, vocab) -> None:
        c = self.config
        if vocab is None:
            raise ValueError("model.gene_embedding_file needs the vocabulary (Ensembl ids, symbols) to align genes: "
                             "pass vocab= (the trainer reads it from the corpus vocab.tsv)")
        if len(vocab[0]) != c.vocab_size:
            raise ValueError(f"the vocabulary passed has {len(vocab[0])} tokens but model.vocab_size={c.vocab_size}; "
                             "set model.vocab_size to the corpus vocabulary size (vocab.tsv)")
        ids, vectors = read_gene_embedding_file(c.gene_embedding_file)
        if vectors.shape[1] != c.d_model:
            raise ValueError(f"{c.gene_embedding_file}: embeddings are {vectors.shape[1]} wide but model.d_model="
                             f"{c.d_model}; set model.d_model={vectors.shape[1]} (scBERT: gene2vec 200 = width 200)")
        special = {c.pad_token, c.cls_token, c.mask_token}
        rows, found, self.gene_embedding_coverage = align_gene_embeddings(ids, vectors, *vocab, special)
        with torch.no_grad():
            weight = torch.randn(c.vocab_size, c.d_model) * 0.02
            # unknown genes get random rows at the pretrained rows' scale
            scale = float(np.std(rows[found])) if found.any() else 0.02
            weight *= scale / 0.02
            weight[torch.from_numpy(found)] = torch.from_numpy(rows[found])
            self.gene_embedding.weight.copy_(weight)
        self.gene_embedding._pretrained = True
        self.gene_embedding.weight.requires_grad_(not c.freeze_gene_embedding)

    @property
    def uses_favor(self) -> bool:
        """Whether any attention of the model is FAVOR+ (random projections to redraw)."""
        c = self.config
        return c.attention == "favor" or (c.architecture == "encoder_decoder" and c.decoder.attention == "favor")

    def redraws_after(self, step: int) -> bool:
        """Whether the FAVOR+ projections are redrawn after optimizer step ``step`` (0-based): every
        ``favor_redraw_interval`` steps, for a model with FAVOR+ attention."""
        interval = self.config.favor_redraw_interval
        return self.uses_favor and bool(interval) and (step + 1) % interval == 0

    @torch.no_grad()
    def redraw_projections(self, generator: torch.Generator) -> None:
        """Redraw every FAVOR+ projection (call at optimizer steps, with a generator seeded the
        same on every rank)."""
        for module in self.modules():
            if hasattr(module, "redraw"):
                module.redraw(generator)

    def to_gene_set(self, x: torch.Tensor, gene_ids: torch.Tensor, cu_seqlens: torch.Tensor, gene_table: nn.Embedding,
                    fill: torch.Tensor, n_extra: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Packed token rows ``x`` [T, d] scattered into every cell's full gene set (G = every
        non-special token, in token order), followed by ``n_extra`` zero rows per cell for the
        caller to fill; the other gene rows are ``gene_table(gene) + fill``.
        -> (rows [B * (G + n_extra), d], slot of each token [T], cu_seqlens [B+1], G + n_extra)"""
        b = cu_seqlens.shape[0] - 1
        low, high = self.gene_range
        n_genes = high - low
        per_cell = n_genes + n_extra
        slots = sequence_ids(cu_seqlens, gene_ids.shape[0]) * per_cell + (gene_ids - low)
        all_genes = torch.arange(low, high, device=x.device)
        dense = (gene_table(all_genes) + fill)[None].expand(b, n_genes, -1)
        if n_extra:
            dense = torch.cat([dense, dense.new_zeros(b, n_extra, dense.shape[-1])], dim=1)
        dense_cu = torch.arange(b + 1, device=x.device, dtype=torch.int32) * per_cell
        return dense.reshape(b * per_cell, -1).index_put((slots,), x), slots, dense_cu, per_cell

    def encode(self, gene_ids, values, cu_seqlens, max_seqlen, read_depth: torch.Tensor | None = None,
               known: torch.Tensor | None = None, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder over packed tokens: (gene-token states [T, d], cell embeddings [B, cell_dim]).
        ``read_depth`` [B, 2] (T, S total counts per sequence): needed with ``depth_tokens``.
        ``known`` [T] bool: scGPT's generative attention mask (``attention_mask=generative``: the
        tokens whose value is not known, the masked ones, attend to the known ones and themselves;
        the prefix tokens are known); None: full attention. ``layer``: the states (and the pooled
        cell embedding) of that encoder block (-1 the last; -2 the second-to-last, Geneformer's
        embedding layer; `Encoder.forward`)."""
        body, cells, _ = self._encode(gene_ids, values, cu_seqlens, max_seqlen, read_depth, known, layer)
        return body, cells

    def depth_embedding(self, read_depth: torch.Tensor | None, n_seqs: int) -> torch.Tensor:
        """Inputs of the T and S tokens: identity + value embedding of log10(total).  [B, 2, d]"""
        if read_depth is None or read_depth.shape != (n_seqs, 2):
            raise ValueError("model.depth_tokens needs batch.read_depth [n_seqs, 2] (raw and input total counts "
                             "per sequence; the CellLoader and pretrain.embed fill it in), got "
                             f"{None if read_depth is None else tuple(read_depth.shape)}")
        # at least float32: in bf16 the totals would keep 3 digits
        logs = torch.log10(read_depth.to(torch.promote_types(self.depth.dtype, torch.float32)).clamp_min(1))
        return self.depth + self.value_embedding(logs.flatten()).view(n_seqs, 2, -1)

    def _encode(self, gene_ids, values, cu_seqlens, max_seqlen, read_depth=None, known=None, layer: int = -1):
        """`encode`, plus the T and S tokens' states [B, 2, d] (None without ``depth_tokens``)."""
        c = self.config
        x = self.gene_embedding(gene_ids) + self.value_embedding(values)
        token_rows = None  # where each input token sits among the encoder's rows (None: in place)
        if c.gene_set == "all":  # scBERT: unexpressed genes too, with the zero-expression value
            zero = self.value_embedding(torch.zeros(1, dtype=values.dtype, device=x.device))
            x, token_rows, cu_seqlens, max_seqlen = self.to_gene_set(x, gene_ids, cu_seqlens, self.gene_embedding, zero)
        x = self.drop(x)
        b = cu_seqlens.shape[0] - 1
        prefix = []  # per sequence, before its genes: <cls>, then T and S
        if self.cls is not None:
            prefix.append(self.cls.expand(b, 1, -1))
        if self.depth is not None:
            prefix.append(self.depth_embedding(read_depth, b))
        cls_state = depth_states = None
        if not prefix:
            body = self.encoder(x, cu_seqlens, max_seqlen, known, layer)
        else:
            x, prefix_cu, rows, prefix_rows = with_prefix(x, torch.cat(prefix, dim=1), cu_seqlens)
            if known is not None:  # <cls> (and T, S) are known
                known = torch.ones(x.shape[0], dtype=torch.bool, device=x.device).index_put((rows,), known)
            h = self.encoder(x, prefix_cu, max_seqlen + c.n_prefix, known, layer)
            body = h[rows]
            if self.cls is not None:
                cls_state = h[prefix_rows[:, 0]]
            if self.depth is not None:
                depth_states = h[prefix_rows[:, -2:]]
        if c.pooling == "cls":
            cells = cls_state
        elif c.pooling == "mean":
            cells = mean_per_sequence(body, cu_seqlens)
        else:  # scFoundation's cell embedding (model/get_embedding.py, pool_type "all"): S, T, max and mean
            cells = torch.cat([depth_states[:, 1], depth_states[:, 0], max_per_sequence(body, cu_seqlens),
                               mean_per_sequence(body, cu_seqlens)], dim=-1)
        return (body if token_rows is None else body[token_rows]), cells, depth_states

    def encode_padded(self, gene_ids: torch.Tensor, values: torch.Tensor,
                      key_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded reference of `encode` (expressed-gene encoder): gene_ids, values,
        key_padding_mask [B, L] (True on real tokens) -> (token states [B, L, d], cells [B, d])."""
        if self.config.gene_set != "expressed" or self.config.architecture != "encoder" or self.depth is not None:
            raise ValueError("encode_padded is the reference of the expressed-gene encoder (gene_set=expressed, "
                             "architecture=encoder, no depth tokens)")
        x = self.drop(self.gene_embedding(gene_ids) + self.value_embedding(values.flatten()).view(*gene_ids.shape, -1))
        real = key_padding_mask
        if self.cls is not None:
            x = torch.cat([self.cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
            real = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)
        h = self.encoder.forward_padded(x, real)
        if self.cls is not None:
            cls_out, h = h[:, 0], h[:, 1:]
        if self.config.pooling == "cls":
            return h, cls_out
        weights = key_padding_mask.to(h.dtype)[..., None]
        return h, (h * weights).sum(1) / weights.sum(1).clamp_min(1)

    def forward(self, batch: PackedBatch, contrastive_only: bool = False) -> ModelOutput:
        """``contrastive_only``: the cell and contrastive embeddings alone (no masked-expression,
        MVC or label head, no decoder; the other fields None or empty): the gradient cache's first
        pass, which keeps only those. The encoder draws the same random numbers either way, and no
        head after it draws any, so the embeddings equal a full forward's under the same seed."""
        tokens, cells, depth, keep = self._encoder_pass(batch)
        if contrastive_only:
            return ModelOutput(mlm=None, cells=cells, contrastive=self.contrastive_head(cells), labels=[], tokens=None)
        if self.config.architecture == "encoder_decoder":
            return self._decode(batch, tokens, cells, depth, keep)
        mlm = self.mlm_head(tokens[batch.masked_index()])
        mvc = self.mvc(batch, cells) if self.config.mvc_head else None
        return self._outputs(mlm.squeeze(-1) if self.config.mlm_regresses else mlm, cells, tokens, mvc)

    def _encoder_pass(self, batch: PackedBatch):
        """(token states, cells [B, cell_dim], T and S states or None, the batch's rows the encoder saw
        (None: all)). The encoder-decoder's encoder sees the expressed (input > 0; masked inputs are
        -1), unmasked genes."""
        if self.config.architecture == "encoder_decoder":
            keep = ~batch.mlm_mask & (batch.values > 0)
            enc_cu, enc_max = compact(keep, batch.cu_seqlens)
            return *self._encode(batch.gene_ids[keep], batch.values[keep], enc_cu, enc_max, batch.read_depth), keep
        known = ~batch.mlm_mask if self.config.attention_mask == "generative" else None
        tokens, cells = self.encode(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen, batch.read_depth,
                                    known)
        return tokens, cells, None, None

    def mvc(self, batch: PackedBatch, cells: torch.Tensor) -> torch.Tensor:
        """scGPT's MVC / GEPC (bowang-lab/scGPT scgpt/model/model.py, MVCDecoder, "inner product"):
        each masked gene's value predicted from its cell's embedding alone, queried by the gene's
        identity embedding: ``(W sigmoid(Q e_gene + q)) . cell``. What trains the cell embedding
        (``<cls>``) to hold the cell's expression.  cells [B, d] -> [n_masked]"""
        where = batch.masked_index()
        seq = sequence_ids(batch.cu_seqlens, batch.gene_ids.shape[0])[where]
        query = self.mvc_weight(self.mvc_query(self.gene_embedding(batch.gene_ids[where])))
        return (query * cells[seq].to(query.dtype)).sum(-1)

    def _outputs(self, mlm, cells, tokens, mvc=None) -> ModelOutput:
        return ModelOutput(mlm=mlm, cells=cells, contrastive=self.contrastive_head(cells),
                           labels=[head(cells) for head in self.label_heads], tokens=tokens, mvc=mvc)

    def _decode(self, batch: PackedBatch, tokens, cells, depth, keep) -> ModelOutput:
        """The encoder-decoder's decoder over every gene of each cell, from `_encoder_pass`'s outputs."""
        # every cell x every gene: gene embedding + (encoder output | mask | zero expression)
        present = self.decoder_gene_embedding(batch.gene_ids)
        filled = present + torch.where(batch.mlm_mask[:, None], self.decoder_mask, self.decoder_zero)
        filled[keep] = present[keep] + self.to_decoder(tokens)
        n_extra = 0 if depth is None else 2
        dec, slot, dec_cu, per_cell = self.to_gene_set(filled, batch.gene_ids, batch.cu_seqlens,
                                                       self.decoder_gene_embedding, self.decoder_zero, n_extra)
        if depth is not None:  # T and S after each cell's genes
            b = batch.cu_seqlens.shape[0] - 1
            rows = (torch.arange(b, device=dec.device) * per_cell + per_cell - 2)[:, None] + torch.arange(2, device=dec.device)
            dec = dec.index_put((rows.flatten(),), self.to_decoder(depth).reshape(2 * b, -1).to(dec.dtype))
        out = self.decoder(self.drop(dec), dec_cu, per_cell)
        mlm = self.mlm_head(out[slot[batch.masked_index()]]).squeeze(-1)
        return self._outputs(mlm, cells, None)

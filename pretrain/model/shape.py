"""The shape of the cell model (`ModelConfig`, `DecoderConfig`) and its named choices.

The model owns its shape, so the model package needs nothing from the run configuration;
`pretrain.config` puts it under ``model:`` of a run and re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.conversion.vocab import gene_token_range
from data_pipeline.loading.batching import TokenCost

from ..knobs import FREE, knob

# favor: FAVOR+ (linear, approximate); flash: flash-attn, else varlen; sdpa: padded exact softmax (any device);
# varlen: torch's FlashAttention varlen kernel (exact, packed; CUDA bf16/fp16, torch >= 2.10)
ATTENTION_BACKENDS = ("favor", "flash", "sdpa", "varlen")
VALUE_MODES = ("bins", "continuous", "rank")
# depth_max_mean (scFoundation): [S | T | max | mean] of the encoder outputs, 4 x d_model wide
POOLINGS = ("cls", "mean", "depth_max_mean")
CONTINUOUS_EMBEDDINGS = ("mlp", "autobin")
# bins mode: table (one learned vector per bin) or mlp (scGPT: the bin index as a scalar through an MLP)
BIN_EMBEDDINGS = ("table", "mlp")
# bins mode: cross_entropy (logits over bins) or mse (scGPT: one value per position, squared error on the bin index)
BIN_LOSSES = ("cross_entropy", "mse")
ARCHITECTURES = ("encoder", "encoder_decoder")
GENE_SETS = ("expressed", "all")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "relu")
# full: every token attends to its whole sequence; generative: scGPT's, masked (unknown) genes attend to the known
# genes, <cls> and themselves only, known tokens to known tokens only (the exact backends: sdpa with the mask,
# flash and varlen in two kernel passes)
ATTENTION_MASKS = ("full", "generative")


@dataclass
class DecoderConfig:
    """The FAVOR+ decoder of the xTrimoGene/scFoundation-like encoder-decoder: it sees every gene
    of the vocabulary, the encoder's outputs scattered back among zero-gene and mask embeddings."""

    n_layers: int = knob("decoder blocks", 2)
    d_model: int = knob("decoder width", 256)
    n_heads: int = knob("decoder attention heads", 4)
    attention: str = knob("decoder attention backend (favor makes the full gene set affordable)", "favor")


@dataclass
class ModelConfig:
    """Shape of the cell encoder. ``vocab_size`` / ``n_bins`` / ``label_classes`` usually come from
    the corpus and the loader's normalization (the trainer fills them in)."""

    vocab_size: int = knob("token ids the gene embedding covers (corpus vocabulary, special tokens included)", 0)
    pad_token: int = knob("the <pad> token id", 0)
    cls_token: int = knob("the <cls> token id", 1)
    mask_token: int = knob("the <mask> token id", 2)
    d_model: int = knob("hidden width", 256)
    n_layers: int = knob("transformer blocks", 6)
    n_heads: int = knob("attention heads (d_model must be a multiple, unless head_dim is set)", 8)
    head_dim: int | None = knob("width of each attention head; q, k, v are n_heads x head_dim wide, projected back "
                                "to d_model (None: d_model / n_heads; performer-pytorch, which scBERT and CellLM "
                                "use, has 64)", None)
    ffn_multiplier: float = knob("feed-forward width as a multiple of d_model", 4.0)
    dropout: float = knob("dropout on the residual branches and embeddings", 0.1, resume=FREE)
    norm_eps: float = knob("LayerNorm epsilon", 1e-5)
    norm_position: str = knob("pre: LayerNorm inside each residual branch (default: stable at depth, no warm-up "
                              "dependence); post: after each residual sum, as the original BERT (Geneformer)", "pre")
    activation: str = knob(f"feed-forward activation: one of {', '.join(ACTIVATIONS)} (Geneformer: relu)", "gelu")
    attention: str = knob(f"attention backend: one of {', '.join(ATTENTION_BACKENDS)} (flash and varlen: CUDA + bf16; "
                           "sdpa: exact anywhere; favor: FAVOR+ approximation)", "favor")
    attention_mask: str = knob("full, or generative (scGPT's generative pretraining: masked genes attend to the known "
                               "genes, <cls> and themselves only; the exact backends: sdpa, flash, varlen; FAVOR+ "
                               "never forms the pairs)", "full")
    favor_features: int = knob("FAVOR+ random features m (multiple of 16)", 256)
    favor_redraw_interval: int = knob("redraw the FAVOR+ projections every N optimizer steps (0: never)", 1000)
    value_mode: str = knob("expression input: bins (bin table), continuous (MLP) or rank (position table)", "bins")
    continuous_embedding: str = knob("continuous values: mlp (a small MLP) or autobin (xTrimoGene's auto-discretization: "
                                     "softmax weights over autobin_bins learned embeddings)", "mlp")
    autobin_bins: int = knob("autobin: learned bin embeddings b (scFoundation bin_num: 100)", 100)
    autobin_alpha: float = knob("autobin: weight of the leaky-ReLU logits added to their b x b mix (scFoundation "
                                "bin_alpha: 1.0)", 1.0)
    bin_embedding: str = knob("bins: table (a learned vector per bin) or mlp (scGPT's value encoder: the bin index as a "
                              "scalar through Linear(1, d), ReLU, Linear(d, d), LayerNorm; the mask bin enters as -1)",
                              "table")
    bin_loss: str = knob("bins: cross_entropy (logits over the bins) or mse (scGPT: one value per masked position, "
                         "squared error against the bin index)", "cross_entropy")
    mvc_head: bool = knob("scGPT's MVC / GEPC head: each masked gene's value predicted from the cell embedding, "
                          "queried by its gene embedding (objectives.mvc_weight trains it)", False)
    depth_tokens: bool = knob("add two tokens per cell whose values are log10 of T (the cell's raw total count) and "
                              "S (its input's total, lower when the loader downsampled it): scFoundation's T and S",
                              False)
    n_bins: int = knob("expression bins of the loader's normalization (bin 0 = zero expression)", 51)
    max_rank: int = knob("rank mode: longest rank-ordered cell (positions embedded)", 2048)
    gene_set: str = knob("encoder input: the expressed genes of a cell, or all vocabulary genes (scBERT; "
                          "unexpressed ones get the zero-expression value)", "expressed")
    use_cls: bool = knob("prepend a <cls> token to every sequence", True)
    pooling: str = knob("cell embedding: the <cls> output (cls), the mean over gene tokens (mean), or "
                        "[S | T | max | mean] over gene tokens, 4 x d_model wide (depth_max_mean, scFoundation; "
                        "needs depth_tokens)", "cls")
    contrastive_dim: int = knob("width of the contrastive projection", 128)
    label_classes: list[int] = knob("classes per label column (one classification head each)", factory=list)
    gene_embedding_file: str | None = knob("pretrained gene embeddings (gene2vec text, .npz gene_ids+embeddings)",
                                            resume=FREE)  # initialization only: a resume loads the weights
    freeze_gene_embedding: bool = knob("keep pretrained gene embeddings fixed", False)
    activation_checkpointing: bool = knob("recompute each block in backward to save activation memory", False,
                                           resume=FREE)
    architecture: str = knob(f"one of {', '.join(ARCHITECTURES)}", "encoder")
    decoder: DecoderConfig = knob("encoder_decoder only: the full-gene-set decoder", factory=DecoderConfig)

    @property
    def cell_dim(self) -> int:
        """Width of the cell embedding (`ModelOutput.cells`)."""
        return 4 * self.d_model if self.pooling == "depth_max_mean" else self.d_model

    @property
    def mlm_regresses(self) -> bool:
        """Whether the masked-expression head predicts one value per position (squared error)
        rather than logits (cross-entropy)."""
        return self.value_mode == "continuous" or (self.value_mode == "bins" and self.bin_loss == "mse")

    @property
    def mlm_outputs(self) -> int:
        """Width of the masked-expression head's output."""
        if self.mlm_regresses:
            return 1
        return self.vocab_size if self.value_mode == "rank" else self.n_bins

    @property
    def attention_head_dim(self) -> int:
        """The width of each attention head: ``head_dim``, or d_model / n_heads."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def n_prefix(self) -> int:
        """Tokens the model adds to each cell before its genes: <cls>, then T and S."""
        return int(self.use_cls) + 2 * int(self.depth_tokens)

    @property
    def n_genes(self) -> int:
        """Gene tokens of the vocabulary, the full gene set: the run the model draws genes from, with
        special tokens before it or after it (a Geneformer dictionary's appended ``<cls>``)."""
        low, high = gene_token_range((self.pad_token, self.cls_token, self.mask_token), self.vocab_size)
        return high - low

    def token_cost(self, max_genes: int | None, views: int = 1) -> TokenCost:
        """What a cell costs against the token budget when this model runs it (the one place the
        trainer, the embedder and the benchmarks get it from): its expressed genes capped at
        ``max_genes``, + 1 for ``<cls>``; with ``gene_set=all`` the encoder runs every vocabulary gene
        (+ ``<cls>``, + T and S with ``depth_tokens``), and the encoder-decoder's decoder runs every vocabulary gene, so a cell costs
        at least the full gene set; x ``views``. Batches cost n_cells x their longest cell where an
        attention runs ``sdpa`` (it pads the packed batch to its longest sequence), else the sum."""
        cls = self.n_prefix
        full = None
        if self.gene_set == "all":
            full = self.n_genes + cls
        elif self.architecture == "encoder_decoder":
            full = self.n_genes + 2 * int(self.depth_tokens)  # the decoder runs T and S too
        backends = {self.attention, self.decoder.attention} if self.architecture == "encoder_decoder" else {self.attention}
        return TokenCost(cap=max_genes, extra_tokens=cls, views=views, full_length=full, padded="sdpa" in backends)

    def check_choices(self) -> None:
        """The named choices; what the corpus fills in (vocab_size, ...) is checked by `validate`."""
        choices = {"attention": ATTENTION_BACKENDS, "value_mode": VALUE_MODES, "pooling": POOLINGS,
                   "architecture": ARCHITECTURES, "gene_set": GENE_SETS, "norm_position": NORM_POSITIONS,
                   "activation": ACTIVATIONS, "continuous_embedding": CONTINUOUS_EMBEDDINGS,
                   "bin_embedding": BIN_EMBEDDINGS, "bin_loss": BIN_LOSSES, "attention_mask": ATTENTION_MASKS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.decoder.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model.decoder.attention={self.decoder.attention!r}: choose one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")

    def validate(self) -> ModelConfig:
        self.check_choices()
        if self.vocab_size <= max(self.pad_token, self.cls_token, self.mask_token):
            raise ValueError(f"model.vocab_size={self.vocab_size}: set it to the corpus vocabulary size "
                             "(the trainer does this from manifest.json)")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"model.head_dim={self.head_dim}: give a positive width, or null for d_model / n_heads")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not a multiple of model.n_heads={self.n_heads} "
                             "(or set model.head_dim)")
        if self.decoder.d_model % self.decoder.n_heads:
            raise ValueError(f"model.decoder.d_model={self.decoder.d_model} is not a multiple of "
                             f"model.decoder.n_heads={self.decoder.n_heads}")
        # the FAVOR+ kernels' tile sizes are set (and compile-checked for sm_90) up to head width 128
        for width, head, backend, where in (
                (self.d_model, self.attention_head_dim, self.attention, "model"),
                (self.decoder.d_model, self.decoder.d_model // self.decoder.n_heads, self.decoder.attention,
                 "model.decoder")):
            if backend == "favor" and head > 128:
                if where == "model" and self.head_dim:
                    raise ValueError(f"model: head width model.head_dim = {head} is over FAVOR+'s 128: lower it")
                raise ValueError(f"{where}: head width {where}.d_model / n_heads = {head} is over FAVOR+'s 128: raise "
                                 f"{where}.n_heads to at least {-(-width // 128)}")
        if self.favor_features % 16 or self.favor_features < 16:
            raise ValueError(f"model.favor_features={self.favor_features} must be a positive multiple of 16")
        if self.pooling == "cls" and not self.use_cls:
            raise ValueError("model.pooling=cls needs model.use_cls=true (or set model.pooling=mean)")
        if self.pooling == "depth_max_mean" and not self.depth_tokens:
            raise ValueError("model.pooling=depth_max_mean concatenates the T and S token outputs: set "
                             "model.depth_tokens=true (or choose model.pooling=mean)")
        if self.depth_tokens and self.value_mode != "continuous":
            raise ValueError("model.depth_tokens embeds log10 total counts as continuous values: set "
                             "model.value_mode=continuous (data.normalization=continuous)")
        if self.continuous_embedding == "autobin" and (self.autobin_bins < 2 or self.autobin_alpha < 0):
            raise ValueError(f"model.autobin_bins={self.autobin_bins} must be >= 2 and model.autobin_alpha="
                             f"{self.autobin_alpha} >= 0 (scFoundation: 100 and 1.0)")
        if self.value_mode == "bins" and self.n_bins < 3:
            raise ValueError(f"model.n_bins={self.n_bins}: bins need at least 3 (bin 0 is zero expression)")
        if self.architecture == "encoder_decoder" and self.value_mode != "continuous":
            raise ValueError("model.architecture=encoder_decoder regresses masked values: set model.value_mode=continuous")
        if self.gene_set == "all" and (self.value_mode == "rank" or self.architecture == "encoder_decoder"):
            raise ValueError("model.gene_set=all needs value_mode bins or continuous and architecture=encoder "
                             "(the encoder-decoder already gives its decoder the full gene set)")
        if self.mvc_head and (self.value_mode == "rank" or self.architecture != "encoder" or self.cell_dim != self.d_model):
            raise ValueError("model.mvc_head predicts values from a d_model-wide cell embedding and the gene embedding: it "
                             "needs value_mode bins or continuous, architecture=encoder and pooling cls or mean "
                             "(or set model.mvc_head=false)")
        if self.attention_mask == "generative" and (self.attention == "favor" or self.architecture != "encoder"
                                                    or self.gene_set != "expressed" or self.value_mode == "rank"):
            raise ValueError(f"model.attention_mask=generative needs exact attention, model.attention=sdpa, flash or "
                             f"varlen (not {self.attention}: FAVOR+ never forms the pairs), architecture=encoder, "
                             "gene_set=expressed and value_mode bins or continuous")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        return self

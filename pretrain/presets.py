"""Preset shapes of the anchor models (their sizes and input conventions, not their weights).

Each preset is a `ModelConfig` (vocab_size filled in from the corpus at training time) plus the
loader settings that go with it: normalization mode, bins and the cap on genes per cell, and
the other data / objective settings of the anchor's recipe (``data``, ``objectives``: config
values under the YAML and the command line). Where a number comes from is cited beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .model.shape import DecoderConfig, ModelConfig


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    normalization: str   # data_pipeline.loading.normalize mode
    max_genes: int | None
    about: str
    data: dict = field(default_factory=dict)        # further DataConfig values of the recipe
    objectives: dict = field(default_factory=dict)  # ObjectiveConfig values of the recipe


# scBERT's gene2vec: 200-d, frozen (TencentAILabHealthcare/scBERT performer_pytorch.py
# Gene2VecPositionalEmbedding: nn.Embedding.from_pretrained, which freezes). Not shipped: set
# model.gene_embedding_file=PATH (README: "scBERT's gene2vec"); the preset only freezes it.


PRESETS: dict[str, Preset] = {
    "scbert": Preset(
        # scBERT pretrain.py: dim 200, depth 6, heads 10, num_tokens CLASS = bin_num + 2 = 7 (bins 0..5 + the
        # mask/pad token 6): n_bins 6 here (mask bin 6); input every gene (SEQ_LEN = gene_num + 1). Its PerformerLM
        # leaves performer-pytorch's defaults: dim_head 64 (heads 10 x 64 wide, projected back to 200) and every
        # dropout (emb, ff, attn) 0
        ModelConfig(d_model=200, n_layers=6, n_heads=10, head_dim=64, dropout=0.0, attention="favor",
                    value_mode="bins", n_bins=6, gene_set="all", use_cls=False, pooling="mean",
                    freeze_gene_embedding=True),
        "log2_floor_bins", None,
        "scBERT: 6 Performer layers of width 200 over the full gene set, expression as floor(log2(1 + CP10k)) "
        "capped at 5, nonzero bins masked (90 % mask, 10 % kept), gene2vec frozen",
        # pretrain.py: mask_prob 0.15, replace_prob 0.9, RANDOM_TOKEN_PROB 0, MASK_IGNORE_TOKEN_IDS [0]
        data={"mask_ratio": 0.15, "mask_replace_prob": 0.9, "mask_random_prob": 0.0, "mask_nonzero_only": True}),
    "geneformer-10m": Preset(
        # ctheodoris/Geneformer examples/pretraining_new_model/pretrain_geneformer_w_deepspeed.py (BertConfig): hidden 256,
        # 6 layers, 4 heads, intermediate 512, hidden_act relu, layer_norm_eps 1e-12, dropouts 0.02, inputs of
        # 2,048; BERT is post-norm (transformers' BertLayer: LayerNorm after each residual sum)
        ModelConfig(d_model=256, n_layers=6, n_heads=4, ffn_multiplier=2.0, attention="sdpa", value_mode="rank",
                    max_rank=2048, use_cls=False, pooling="mean", norm_position="post", activation="relu",
                    norm_eps=1e-12, dropout=0.02),
        "rank", 2048,
        "Geneformer 10M: 6 post-norm ReLU BERT layers of width 256 over the top 2,048 genes in rank-value order, "
        "masked gene prediction"),
    "celllm": Preset(
        # PharMolix/OpenBioMed configs/ctc/cellLM.json: dim 512, depth 10, heads 16, max_seq_len 6000, num_tokens 8:
        # its CellLM wrapper caps values at 5, so six bins (0..5) and then <cls> and <pad>; n_bins 6 here (mask bin 6,
        # our <cls> is a gene-vocabulary token), binned as scBERT (floor(log2(1 + CP10k)), capped at 5: CellLM
        # builds on scBERT's code). Its performer-pytorch attention keeps dim_head 64 and dropout 0
        ModelConfig(d_model=512, n_layers=10, n_heads=16, head_dim=64, dropout=0.0, attention="favor",
                    value_mode="bins", n_bins=6),
        "log2_floor_bins", 6000,
        "CellLM: 10 Performer layers of width 512, 16 heads, over at most 6,000 expressed genes in 6 bins; "
        "contrastive + masked bins + the [cls] tumour/normal task (label column tumor_normal)",
        # the [cls] tumour / normal discrimination task reads the corpus label column "tumor_normal"; the contrastive
        # loss between two views of a cell and the label task are what train the pooled <cls>
        data={"views": True},
        objectives={"labels": {"tumor_normal": "tumor_normal"}, "contrastive_weight": 1.0, "label_weight": 0.1}),
    "scgpt": Preset(
        # bowang-lab/scGPT scgpt/model/model.py: ContinuousValueEncoder over the bin index (input_emb_style
        # "continuous" with binned input), ExprDecoder regressing one value, MVCDecoder ("inner product"), and
        # scgpt/loss.py masked_mse_loss for both; scgpt/data_collator.py: mlm_probability [0.25, 0.5, 0.75], masked
        # inputs all set to mask_value (no random or kept ones); blocks as FlashTransformerEncoderLayer builds them
        # for the whole-human model (norm_scheme "post", activation "relu", d_hid 512 = 1x, dropout 0.2)
        ModelConfig(d_model=512, n_layers=12, n_heads=8, ffn_multiplier=1.0, dropout=0.2, norm_position="post",
                    activation="relu", attention="flash", value_mode="bins", n_bins=51, bin_embedding="mlp",
                    bin_loss="mse", mvc_head=True),
        "quantile_bins", 1200,
        "scGPT: 12 post-norm ReLU flash-attention layers of width 512 over 1,200 expressed genes, per-cell quantile "
        "bins through a value MLP, squared error on masked bins (25/50/75 % masked) plus MVC/GEPC from the <cls> embedding",
        data={"mask_ratios": [0.25, 0.5, 0.75], "mask_replace_prob": 1.0, "mask_random_prob": 0.0},
        objectives={"mvc_weight": 1.0}),
    "scfoundation": Preset(
        # biomap-research/scFoundation model/training_hyperparameter.txt: encoder 768 x 12 layers x 12 heads,
        # decoder 512 x 6 x 8, bin_num 100, value_mask_prob 0.3; mae_autobin.py: auto-discretization (bin_alpha
        # 1.0, MaeAutobin's default, which GEARS/modules/encoders.py builds it with); get_embedding.py: T and S
        # tokens after the genes, cell embedding [S | T | max | mean]. Its hyperparameters beside value_mask_prob 0.3
        # also mask unexpressed genes: zero_mask_prob 0.03 (how they are drawn is not in the released code; here
        # each independently, data_pipeline/loading/zero_masking.py)
        ModelConfig(d_model=768, n_layers=12, n_heads=12, attention="flash", value_mode="continuous",
                    continuous_embedding="autobin", autobin_bins=100, autobin_alpha=1.0, depth_tokens=True,
                    use_cls=False, pooling="depth_max_mean", architecture="encoder_decoder",
                    decoder=DecoderConfig(n_layers=6, d_model=512, n_heads=8, attention="favor")),
        "continuous", None,
        "xTrimoGene/scFoundation: a flash encoder over expressed unmasked genes and the T/S depth tokens, a "
        "FAVOR+ decoder over every gene, auto-discretized values, 30 % of expressed and 3 % of unexpressed genes "
        "masked, read-depth-aware downsampling",
        # read-depth-aware pretraining (data_pipeline/loading/read_depth.py: the paper's Methods, no released code)
        data={"mask_ratio": 0.3, "mask_zero_prob": 0.03, "downsample_prob": 0.5, "downsample_beta": [2.0, 2.0],
              "downsample_min_total": 1000.0}),
}


def preset(name: str, **overrides) -> Preset:
    """A preset with model fields replaced by ``overrides`` (e.g. vocab_size)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    return replace(p, model=replace(p.model, **overrides))

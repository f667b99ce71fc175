"""Preset shapes of the anchor models (their sizes and input conventions, not their weights).

Each preset is a `ModelConfig` (vocab_size filled in from the corpus at training time) plus the
loader settings that go with it: normalization mode, bins and the cap on genes per cell.
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


PRESETS: dict[str, Preset] = {
    "scbert": Preset(
        ModelConfig(d_model=200, n_layers=6, n_heads=10, attention="favor", value_mode="bins", n_bins=7,
                    gene_set="all", use_cls=False, pooling="mean"),
        "log1p_bins", None,
        "scBERT: 6 Performer layers of width 200 over the full gene set, expression in 7 bins (0 = unexpressed)"),
    "geneformer-10m": Preset(
        ModelConfig(d_model=256, n_layers=6, n_heads=4, ffn_multiplier=2.0, attention="sdpa", value_mode="rank",
                    max_rank=2048, use_cls=False, pooling="mean"),
        "rank", 2048,
        "Geneformer 10M: 6 layers of width 256 over the top 2,048 genes in rank-value order, masked gene prediction"),
    "celllm": Preset(
        ModelConfig(d_model=512, n_layers=10, n_heads=8, attention="favor", value_mode="bins", n_bins=51),
        "log1p_bins", 6000,
        "CellLM: 10 Performer layers of width 512 over at most 6,000 expressed genes, contrastive + masked bins"),
    "scgpt": Preset(
        ModelConfig(d_model=512, n_layers=12, n_heads=8, attention="flash", value_mode="bins", n_bins=51),
        "quantile_bins", 1200,
        "scGPT: 12 flash-attention layers of width 512 over 1,200 expressed genes, per-cell quantile bins"),
    "scfoundation": Preset(
        # biomap-research/scFoundation model/training_hyperparameter.txt: encoder 768 x 12 layers x 12 heads,
        # decoder 512 x 6 x 8, bin_num 100, value_mask_prob 0.3; mae_autobin.py: auto-discretization (bin_alpha
        # 1.0, MaeAutobin's default, which GEARS/modules/encoders.py builds it with); get_embedding.py: T and S
        # tokens after the genes, cell embedding [S | T | max | mean]
        ModelConfig(d_model=768, n_layers=12, n_heads=12, attention="flash", value_mode="continuous",
                    continuous_embedding="autobin", autobin_bins=100, autobin_alpha=1.0, depth_tokens=True,
                    use_cls=False, pooling="depth_max_mean", architecture="encoder_decoder",
                    decoder=DecoderConfig(n_layers=6, d_model=512, n_heads=8, attention="favor")),
        "continuous", None,
        "xTrimoGene/scFoundation: a flash encoder over expressed unmasked genes and the T/S depth tokens, a "
        "FAVOR+ decoder over every gene, auto-discretized values, read-depth-aware downsampling",
        # read-depth-aware pretraining (data_pipeline/loading/read_depth.py: the paper's Methods, no released code)
        data={"mask_ratio": 0.3, "downsample_prob": 0.5, "downsample_beta": [2.0, 2.0],
              "downsample_min_total": 1000.0}),
}


def preset(name: str, **overrides) -> Preset:
    """A preset with model fields replaced by ``overrides`` (e.g. vocab_size)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    return replace(p, model=replace(p.model, **overrides))

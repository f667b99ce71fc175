"""The bundle format: the folder downstream teams load, without DeepSpeed or the training config.

A bundle is a folder:

- ``model.safetensors``: the cell model's weights (ZeRO shards consolidated to fp32), buffers
  (the FAVOR+ projections) included; its metadata names the bundle format and the model type;
- ``config.json``: the bundle format version, ``model_type`` (`model_type`), the architecture
  fields at top level (`ARCHITECTURE_FIELDS`, what other tools read without knowing this
  project), and the full `ModelConfig` under ``model`` (what `read_bundle_config` builds from);
- ``vocab.tsv``: the corpus vocabulary (token id, Ensembl id, symbol);
- ``normalization.json``: how counts become model input (mode, bins, target sum, gene cap, and
  in rank mode the per-token medians with their sha256);
- ``README.md``: a model card (what `pretrain.export` writes from a run);
- extra files a writer adds (a fine-tuned head and its labels).

This module writes (`write_bundle`) and reads (`read_bundle`) the format, of this version or of the
ones before it (`READABLE_FORMATS`). It sits in the model layer so that `CellModel.from_pretrained`
needs nothing above it; `pretrain.export` makes bundles of training runs, and its `load_pretrained`
is `CellModel.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

from data_pipeline.conversion.fsio import atomic_replace_dir, output_temp
from data_pipeline.conversion.vocab import Vocabulary, read_vocab
from data_pipeline.loading.normalize import FIXED_BIN_MODES, Normalization

from .attention import CUDA_ONLY_BACKENDS
from .shape import DecoderConfig, ModelConfig

logger = logging.getLogger(__name__)

# 1: config.json held the ModelConfig under "model" only; 2: model_type and the architecture fields at top
# level, the format in the safetensors metadata
BUNDLE_FORMAT = 2
READABLE_FORMATS = (1, 2)
# config.json's top-level copy of the architecture, beside "model" (and "embedding_dim": the cell embedding's width)
ARCHITECTURE_FIELDS = ("architecture", "vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "ffn_multiplier",
                       "attention", "attention_mask", "pooling", "value_mode", "n_bins", "gene_set", "use_cls",
                       "depth_tokens", "norm_position", "activation")


def model_type(config: ModelConfig) -> str:
    """``scfm-performer`` (FAVOR+ attention, scBERT / CellLM-like), ``scfm-transformer`` (exact softmax
    attention, Geneformer / scGPT-like), ``-encoder-decoder`` appended for the xTrimoGene / scFoundation
    layout: the family a reader of config.json needs to know which code runs the weights."""
    family = "scfm-performer" if config.attention == "favor" else "scfm-transformer"
    return family + ("-encoder-decoder" if config.architecture == "encoder_decoder" else "")


def bundle_config(config: ModelConfig, preset: str | None = None) -> dict:
    """What config.json holds (`BUNDLE_FORMAT`)."""
    full = asdict(config)
    return {"bundle_format": BUNDLE_FORMAT, "model_type": model_type(config), "preset": preset,
            **{k: full[k] for k in ARCHITECTURE_FIELDS}, "embedding_dim": config.cell_dim,
            "n_genes": config.n_genes, "model": full}


def normalization_record(norm: Normalization) -> dict:
    record = {"mode": norm.mode, "n_bins": norm.n_bins, "bin_edges": list(map(float, norm.edges))
              if norm.mode in FIXED_BIN_MODES else None, "target_sum": norm.target_sum, "max_genes": norm.max_genes,
              "medians": None, "medians_sha256": None,
              "quantile_ties": norm.quantile_ties}
    if norm.medians is not None:
        medians = np.asarray(norm.medians, np.float64)
        record["medians"] = [None if np.isnan(x) else float(x) for x in medians]
        record["medians_sha256"] = hashlib.sha256(medians.tobytes()).hexdigest()
    return record


def normalization_from_record(record: dict) -> Normalization:
    medians = None
    if record.get("medians") is not None:
        medians = np.array([np.nan if x is None else x for x in record["medians"]], np.float64)
        if hashlib.sha256(medians.tobytes()).hexdigest() != record["medians_sha256"]:
            raise ValueError("normalization.json: the medians do not match their sha256; the bundle is damaged")
    edges = record.get("bin_edges")
    return Normalization(mode=record["mode"], n_bins=record["n_bins"], target_sum=record["target_sum"],
                         max_genes=record["max_genes"], medians=medians,
                         quantile_ties=record.get("quantile_ties", "high"),  # bundles from before the key
                         bin_edges=tuple(edges) if edges is not None else None)


def write_bundle(out: str | Path, weights: dict[str, torch.Tensor], config: ModelConfig, vocab_tsv: bytes,
                 norm: Normalization, card: str, extra: dict[str, bytes] | None = None,
                 preset: str | None = None) -> Path:
    """Write bundle folder ``out``: the model's ``weights`` and ``config`` (``preset``: the anchor
    preset it was trained from, if any), the vocabulary (vocab.tsv bytes), the normalization, the
    model card (README.md) and ``extra`` files (name -> bytes, e.g. a fine-tuned head). Written and
    fsynced beside ``out``, then renamed: a killed writer leaves ``out`` as it was. An existing
    ``out`` is replaced only when it is a bundle or an empty folder (never, say, a run folder)."""
    from safetensors.torch import save_file

    out = Path(out)
    check_bundle_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_temp(out)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt", "bundle_format": str(BUNDLE_FORMAT), "model_type": model_type(config)})
    (tmp / "config.json").write_text(json.dumps(bundle_config(config, preset), indent=1))
    (tmp / "vocab.tsv").write_bytes(vocab_tsv)
    (tmp / "normalization.json").write_text(json.dumps(normalization_record(norm)))
    (tmp / "README.md").write_text(card)
    for name, data in (extra or {}).items():
        (tmp / name).write_bytes(data)
    atomic_replace_dir(tmp, out)
    return out


def check_bundle_out(out: str | Path) -> None:
    """Refuse (FileExistsError) a bundle destination ``out`` that exists and is neither an earlier
    bundle nor an empty folder: a run folder or a folder of bundles is not replaced."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        record = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        record = None
    # format 1 held the model's config under "model" only
    if isinstance(record, dict) and ("bundle_format" in record or "model" in record) \
            and (out / "model.safetensors").is_file():
        return
    raise FileExistsError(f"{out} exists and is neither a bundle nor an empty folder: it is not replaced; pass "
                          "--out a new folder (or an earlier bundle, to replace it)")


def exact_backends_to_sdpa(config: ModelConfig) -> ModelConfig:
    """``config`` with the CUDA-only exact backends (flash, varlen) replaced by sdpa: the same
    softmax attention and the same weights, so a bundle trained on GPUs embeds on a CPU."""
    decoder = config.decoder
    if decoder.attention in CUDA_ONLY_BACKENDS:
        decoder = replace(decoder, attention="sdpa")
    attention = "sdpa" if config.attention in CUDA_ONLY_BACKENDS else config.attention
    return replace(config, attention=attention, decoder=decoder)


def read_bundle_config(bundle: str | Path) -> ModelConfig:
    """The `ModelConfig` of ``bundle``'s config.json, of any format in `READABLE_FORMATS`; refuses a
    config.json whose top-level architecture fields were edited away from the model config."""
    bundle = Path(bundle)
    meta = json.loads((bundle / "config.json").read_text())
    version = meta.get("bundle_format")
    if version not in READABLE_FORMATS:
        fix = ("update this code to the version that exported it" if isinstance(version, int) and version > BUNDLE_FORMAT
               else "export the run again with `scfm export RUN --out BUNDLE`")
        raise ValueError(f"{bundle}: bundle format {version!r}; this code reads formats "
                         f"{', '.join(map(str, READABLE_FORMATS))}: {fix}")
    raw = dict(meta["model"])
    differ = [k for k in ARCHITECTURE_FIELDS if version >= 2 and k in meta and meta[k] != raw.get(k)]
    if differ:
        raise ValueError(f"{bundle}/config.json: top-level {', '.join(differ)} differ from the same fields under "
                         "'model' (what the weights were trained with); the file was edited: restore it, or export "
                         "the run again with `scfm export RUN --out BUNDLE`")
    raw["decoder"] = DecoderConfig(**raw["decoder"])
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:  # a newer exporter's keys: their defaults here may not be what the weights were trained with
        logger.warning(f"{bundle}/config.json: model keys this code does not know: {', '.join(unknown)}; the model "
                       "runs without them: update this code to the version that exported the bundle")
    return replace(ModelConfig(**{k: v for k, v in raw.items() if k in known}), gene_embedding_file=None)


def read_bundle(bundle: str | Path, device: str | torch.device = "cpu"
                ) -> tuple[ModelConfig, dict[str, torch.Tensor], Normalization, Vocabulary]:
    """What a bundle holds, checked: its `ModelConfig` (exact CUDA-only attention backends read as
    sdpa off CUDA and on GPUs before Ampere), the weights, the `Normalization` and the `Vocabulary`. `CellModel.from_pretrained`
    builds the model from them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    bundle = Path(bundle)
    for name in ("model.safetensors", "config.json", "vocab.tsv", "normalization.json"):
        if not (bundle / name).exists():
            raise FileNotFoundError(f"{bundle}: no {name}; pass a folder written by `scfm export`")
    config = read_bundle_config(bundle)
    with safe_open(str(bundle / "model.safetensors"), framework="pt") as f:
        stored = (f.metadata() or {}).get("bundle_format")  # absent before format 2
    if stored is not None and int(stored) not in READABLE_FORMATS:
        raise ValueError(f"{bundle}/model.safetensors: bundle format {stored}; this code reads formats "
                         f"{', '.join(map(str, READABLE_FORMATS))}: update this code to the version that exported it")
    device = torch.device(device)
    # FlashAttention kernels need a CUDA device of compute capability 8.0 (Ampere) or later
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        config = exact_backends_to_sdpa(config)
    weights = load_file(str(bundle / "model.safetensors"))
    norm = normalization_from_record(json.loads((bundle / "normalization.json").read_text()))
    vocab = read_vocab(bundle / "vocab.tsv")
    if len(vocab) != config.vocab_size:
        raise ValueError(f"{bundle}/vocab.tsv holds {len(vocab)} tokens, config.json's vocab_size is "
                         f"{config.vocab_size}: the files are not of one export; export the run again with "
                         "`scfm export RUN --out BUNDLE`")
    return config, weights, norm, vocab

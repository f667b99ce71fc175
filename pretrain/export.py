"""Export bundles: what downstream teams load, without DeepSpeed or the training config.

A bundle is a folder:

- ``model.safetensors``: the cell model's weights (ZeRO shards consolidated to fp32), buffers
  (the FAVOR+ projections) included; its metadata names the bundle format and the model type;
- ``config.json``: the bundle format version, ``model_type`` (`model_type`), the architecture
  fields at top level (`ARCHITECTURE_FIELDS`, what other tools read without knowing this
  project), and the full `ModelConfig` under ``model`` (what `load_pretrained` builds from);
- ``vocab.tsv``: the corpus vocabulary (token id, Ensembl id, symbol);
- ``normalization.json``: how counts become model input (mode, bins, target sum, gene cap, and
  in rank mode the per-token medians with their sha256);
- ``README.md``: a model card: what the model is, the corpus it was trained on (cells, tokens,
  genes, sources), steps and final losses, how to embed with one command and how to load it.

`export_bundle` reads a run directory or one of its checkpoints; `load_pretrained` (also
`CellModel.from_pretrained`) reads a bundle, of this format or of the ones before it
(`READABLE_FORMATS`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

from data_pipeline.conversion.vocab import read_vocab
from data_pipeline.corpus import Corpus
from data_pipeline.loading.normalize import FIXED_BIN_MODES, Normalization

from .config import DecoderConfig, ModelConfig
from .model import CellModel
from .model.attention import CUDA_ONLY_BACKENDS

logger = logging.getLogger(__name__)

# 1: config.json held the ModelConfig under "model" only; 2: model_type and the architecture fields at top
# level, the format in the safetensors metadata
BUNDLE_FORMAT = 2
READABLE_FORMATS = (1, 2)
# config.json's top-level copy of the architecture, beside "model" (and "embedding_dim": the cell embedding's width)
ARCHITECTURE_FIELDS = ("architecture", "vocab_size", "d_model", "n_layers", "n_heads", "ffn_multiplier", "attention",
                       "attention_mask", "pooling", "value_mode", "n_bins", "gene_set", "use_cls", "depth_tokens",
                       "norm_position", "activation")


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


def _find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint folder) from either: a run directory's newest intact checkpoint;
    a checkpoint folder only when intact (its files match its marker's checksums)."""
    from .checkpoint import MARKER, complete_checkpoints, problems

    if (path / "config.yaml").exists():
        found = complete_checkpoints(path)
        for ckpt in reversed(found):
            damaged = problems(ckpt)
            if not damaged:
                return path, ckpt
            logger.warning(f"skipping the damaged checkpoint {ckpt} ({'; '.join(damaged)})")
        what = "none is intact" if found else "the run saved none yet"
        raise ValueError(f"{path}: no complete checkpoint in {path / 'checkpoints'} ({what})")
    if (path / MARKER).exists() and (path.parent.parent / "config.yaml").exists():
        damaged = problems(path)
        if damaged:
            raise ValueError(f"{path}: the checkpoint is damaged: {'; '.join(damaged)}; export an earlier "
                             "checkpoint (or the run directory: its newest intact checkpoint)")
        return path.parent.parent, path
    raise ValueError(f"{path} is neither a run directory (with config.yaml) nor a complete checkpoint "
                     "(a checkpoints/step-N folder with a COMPLETE marker)")


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


def export_bundle(source: str | Path, out: str | Path) -> Path:
    """Consolidate the latest complete checkpoint of run directory ``source`` (or the checkpoint
    ``source``) into a bundle at ``out``."""
    import yaml
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .checkpoint import load_state_file, read_marker, weights_only_loads
    from .config import TrainConfig, from_dict

    run_dir, ckpt = _find_checkpoint(Path(source))
    # the config that trained this checkpoint (its marker's; config.yaml is the latest start's)
    saved = read_marker(ckpt).get("config") or yaml.safe_load((run_dir / "config.yaml").read_text())
    config = from_dict(TrainConfig, saved)
    # every file unpickled weights-only first, so that a refusal names the file; DeepSpeed's own
    # loads (which ask for full unpickling) are made weights-only too
    loaded = {p.name: load_state_file(p) for p in sorted(ckpt.glob("*.pt"))}
    with weights_only_loads():
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    weights = {k[len("model."):]: v.contiguous() for k, v in state.items() if k.startswith("model.")}
    model = CellModel(replace(config.model, gene_embedding_file=None))  # the weights come from the checkpoint
    missing = set(model.state_dict()) ^ set(weights)
    if missing:
        raise ValueError(f"{ckpt}: the checkpoint does not match the run's model config (differing keys: "
                         f"{sorted(missing)[:5]})")
    corpus = Corpus(config.data.corpus, config.data.cache_dir or None)
    norm = config.input_normalization()
    if norm.mode == "rank":
        norm = Normalization(**{**asdict(norm), "medians": corpus.medians()})
    # rank 0's model-states file holds the client state (ZeRO-3 names it per data-parallel rank)
    client = next(loaded[name] for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
                  if name in loaded)
    return write_bundle(out, weights, config.model, corpus.vocab_path.read_bytes(), norm,
                        _model_card(config, client, corpus, ckpt), preset=config.preset)


def write_bundle(out: str | Path, weights: dict[str, torch.Tensor], config: ModelConfig, vocab_tsv: bytes,
                 norm: Normalization, card: str, extra: dict[str, bytes] | None = None,
                 preset: str | None = None) -> Path:
    """Write bundle folder ``out`` (replaced if it exists; written beside it, then renamed):
    the model's ``weights`` and ``config`` (``preset``: the anchor preset it was trained from, if
    any), the vocabulary (vocab.tsv bytes), the normalization, the model card (README.md) and
    ``extra`` files (name -> bytes, e.g. a fine-tuned head)."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt", "bundle_format": str(BUNDLE_FORMAT), "model_type": model_type(config)})
    (tmp / "config.json").write_text(json.dumps(bundle_config(config, preset), indent=1))
    (tmp / "vocab.tsv").write_bytes(vocab_tsv)
    (tmp / "normalization.json").write_text(json.dumps(normalization_record(norm)))
    (tmp / "README.md").write_text(card)
    for name, data in (extra or {}).items():
        (tmp / name).write_bytes(data)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _model_card(config, client: dict, corpus: Corpus, ckpt: Path) -> str:
    """README.md of a bundle exported from a run: what the model is, what it was trained on (the
    corpus manifest's totals and sources), how to embed cells with one command and how to load it."""
    from .presets import PRESETS

    history = client.get("history") or []
    last = history[-1] if history else {}
    losses = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "mlm", "contrastive", "label") if last.get(k) is not None)
    m, d = config.model, config.data
    ties = f", {d.quantile_ties} ties" if d.normalization == "quantile_bins" else ""
    about = f"\n\nPreset `{config.preset}`: {PRESETS[config.preset].about}." if config.preset in PRESETS else ""
    decoder = (f"; decoder {m.decoder.n_layers} layers x {m.decoder.d_model}, {m.decoder.n_heads} heads, attention "
               f"{m.decoder.attention}" if m.architecture == "encoder_decoder" else "")
    sources = corpus.manifest.get("sources") or []
    shown = ", ".join(f"{s.get('name')} ({s.get('cells_written', 0):,} cells)" for s in sources[:10])
    more = f", ... ({len(sources)} files in all)" if len(sources) > 10 else ""
    labels = ", ".join(c.name for c in corpus.label_columns) or "none"
    return f"""# {model_type(m)}: a single-cell foundation model

A cell encoder pretrained on raw single-cell RNA counts: it reads a cell's expressed genes with
their expression and gives a cell embedding of width {m.cell_dim} (for clustering, integration,
label transfer, or fine-tuning).{about}

## Architecture

- model type `{model_type(m)}`: {m.architecture}, {m.n_layers} layers x {m.d_model}, {m.n_heads} heads, attention
  {m.attention}{decoder}; pooling {m.pooling}; embedding width {m.cell_dim}
- input: {d.normalization}{ties} ({m.value_mode} values), genes per cell capped at {d.max_genes}; vocabulary of
  {corpus.vocab.n_genes:,} genes (Ensembl ids, `vocab.tsv`)

## Training data

- corpus: {corpus.n_cells:,} cells, {corpus.n_tokens:,} nonzero gene tokens, from {len(sources)} source file(s):
  {shown or 'n/a'}{more}
- label columns: {labels}
- corpus plan hash {corpus.plan_hash}, vocabulary sha256 {corpus.vocab_sha256}

## Training

- trained for {client.get('step')} optimizer steps (checkpoint {ckpt.name}); last step's losses: {losses or 'n/a'}

## Embed cells with one command

```
python launch/embed.py THIS_FOLDER cells.h5ad --out cells_embedded.h5ad
```

`cells.h5ad` holds raw UMI counts in X (or `--layer NAME`), genes as Ensembl ids or symbols. The
output is the input plus `obsm["X_scfm"]` (`--out cells.zarr`: an AnnData zarr store of obs, var and
the embedding); then in scanpy: `sc.pp.neighbors(adata, use_rep="X_scfm")`.

## Load in Python (no DeepSpeed)

```python
from pretrain import load_pretrained        # or: pretrain.model.CellModel.from_pretrained("THIS_FOLDER")
model = load_pretrained("THIS_FOLDER")      # CellModel in eval mode; .normalization, .vocab
```

## Files

`model.safetensors` (weights), `config.json` (bundle format {BUNDLE_FORMAT}, model_type, architecture,
the full model config under `model`), `vocab.tsv`, `normalization.json`, this card.
"""


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
               else "export the run again with `python launch/export.py RUN --out BUNDLE`")
        raise ValueError(f"{bundle}: bundle format {version!r}; this code reads formats "
                         f"{', '.join(map(str, READABLE_FORMATS))}: {fix}")
    raw = dict(meta["model"])
    differ = [k for k in ARCHITECTURE_FIELDS if version >= 2 and k in meta and meta[k] != raw.get(k)]
    if differ:
        raise ValueError(f"{bundle}/config.json: top-level {', '.join(differ)} differ from the same fields under "
                         "'model' (what the weights were trained with); the file was edited: restore it, or export "
                         "the run again with `python launch/export.py RUN --out BUNDLE`")
    raw["decoder"] = DecoderConfig(**raw["decoder"])
    known = {f.name for f in fields(ModelConfig)}
    return replace(ModelConfig(**{k: v for k, v in raw.items() if k in known}), gene_embedding_file=None)


def load_pretrained(bundle: str | Path, device: str | torch.device = "cpu") -> CellModel:
    """The bundle's `CellModel` in eval mode, with ``.normalization`` (`Normalization`) and
    ``.vocab`` (`Vocabulary`) attached. Imports neither DeepSpeed nor the training config."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    bundle = Path(bundle)
    for name in ("model.safetensors", "config.json", "vocab.tsv", "normalization.json"):
        if not (bundle / name).exists():
            raise FileNotFoundError(f"{bundle}: no {name}; pass a folder written by `python launch/export.py`")
    config = read_bundle_config(bundle)
    with safe_open(str(bundle / "model.safetensors"), framework="pt") as f:
        stored = (f.metadata() or {}).get("bundle_format")  # absent before format 2
    if stored is not None and int(stored) not in READABLE_FORMATS:
        raise ValueError(f"{bundle}/model.safetensors: bundle format {stored}; this code reads formats "
                         f"{', '.join(map(str, READABLE_FORMATS))}: update this code to the version that exported it")
    if torch.device(device).type != "cuda":
        config = exact_backends_to_sdpa(config)
    model = CellModel(config)
    model.load_state_dict(load_file(str(bundle / "model.safetensors")))
    model.normalization = normalization_from_record(json.loads((bundle / "normalization.json").read_text()))
    model.vocab = read_vocab(bundle / "vocab.tsv")
    return model.to(device).eval()

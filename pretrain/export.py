"""Export bundles: what downstream teams load, without DeepSpeed or the training config.

A bundle is a folder:

- ``model.safetensors``: the cell model's weights (ZeRO shards consolidated to fp32), buffers
  (the FAVOR+ projections) included;
- ``config.json``: the `ModelConfig` fields and the bundle format version;
- ``vocab.tsv``: the corpus vocabulary (token id, Ensembl id, symbol);
- ``normalization.json``: how counts become model input (mode, bins, target sum, gene cap, and
  in rank mode the per-token medians with their sha256);
- ``README.md``: a model card (corpus manifest hash, steps, final losses, how to load).

`export_bundle` reads a run directory or one of its checkpoints; `load_pretrained` reads a bundle.
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

BUNDLE_FORMAT = 1


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
    corpus = Corpus(config.data.corpus)
    norm = config.input_normalization()
    if norm.mode == "rank":
        norm = Normalization(**{**asdict(norm), "medians": corpus.medians()})
    # rank 0's model-states file holds the client state (ZeRO-3 names it per data-parallel rank)
    client = next(loaded[name] for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
                  if name in loaded)
    return write_bundle(out, weights, config.model, corpus.vocab_path.read_bytes(), norm,
                        _model_card(config, client, corpus, ckpt))


def write_bundle(out: str | Path, weights: dict[str, torch.Tensor], config: ModelConfig, vocab_tsv: bytes,
                 norm: Normalization, card: str, extra: dict[str, bytes] | None = None) -> Path:
    """Write bundle folder ``out`` (replaced if it exists; written beside it, then renamed):
    the model's ``weights`` and ``config``, the vocabulary (vocab.tsv bytes), the normalization,
    the model card (README.md) and ``extra`` files (name -> bytes, e.g. a fine-tuned head)."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({"bundle_format": BUNDLE_FORMAT, "model": asdict(config)}, indent=1))
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
    history = client.get("history") or []
    last = history[-1] if history else {}
    losses = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "mlm", "contrastive", "label") if last.get(k) is not None)
    m, d = config.model, config.data
    ties = f", {d.quantile_ties} ties" if d.normalization == "quantile_bins" else ""
    return f"""# Cell model bundle

- architecture: {m.architecture}, {m.n_layers} layers x {m.d_model}, {m.n_heads} heads, attention {m.attention}
- input: {d.normalization}{ties} ({m.value_mode} values), genes per cell capped at {d.max_genes}
- trained for {client.get('step')} optimizer steps (checkpoint {ckpt.name}); last step's losses: {losses or 'n/a'}
- corpus: {corpus.n_cells} cells, plan hash {corpus.plan_hash},
  vocabulary sha256 {corpus.vocab_sha256}

Load without DeepSpeed:

```python
from pretrain import load_pretrained
model = load_pretrained("THIS_FOLDER")      # CellModel in eval mode; .normalization, .vocab
```

Embed an .h5ad of raw counts: `python launch/embed.py THIS_FOLDER cells.h5ad --out cells_embedded.h5ad`.
"""


def exact_backends_to_sdpa(config: ModelConfig) -> ModelConfig:
    """``config`` with the CUDA-only exact backends (flash, varlen) replaced by sdpa: the same
    softmax attention and the same weights, so a bundle trained on GPUs embeds on a CPU."""
    decoder = config.decoder
    if decoder.attention in CUDA_ONLY_BACKENDS:
        decoder = replace(decoder, attention="sdpa")
    attention = "sdpa" if config.attention in CUDA_ONLY_BACKENDS else config.attention
    return replace(config, attention=attention, decoder=decoder)


def load_pretrained(bundle: str | Path, device: str | torch.device = "cpu") -> CellModel:
    """The bundle's `CellModel` in eval mode, with ``.normalization`` (`Normalization`) and
    ``.vocab`` (`Vocabulary`) attached. Imports neither DeepSpeed nor the training config."""
    from safetensors.torch import load_file

    bundle = Path(bundle)
    for name in ("model.safetensors", "config.json", "vocab.tsv", "normalization.json"):
        if not (bundle / name).exists():
            raise FileNotFoundError(f"{bundle}: no {name}; pass a folder written by `python launch/export.py`")
    meta = json.loads((bundle / "config.json").read_text())
    if meta.get("bundle_format") != BUNDLE_FORMAT:
        raise ValueError(f"{bundle}: bundle format {meta.get('bundle_format')} is not {BUNDLE_FORMAT}")
    raw = dict(meta["model"])
    raw["decoder"] = DecoderConfig(**raw["decoder"])
    known = {f.name for f in fields(ModelConfig)}
    config = replace(ModelConfig(**{k: v for k, v in raw.items() if k in known}), gene_embedding_file=None)
    if torch.device(device).type != "cuda":
        config = exact_backends_to_sdpa(config)
    model = CellModel(config)
    model.load_state_dict(load_file(str(bundle / "model.safetensors")))
    model.normalization = normalization_from_record(json.loads((bundle / "normalization.json").read_text()))
    model.vocab = read_vocab(bundle / "vocab.tsv")
    return model.to(device).eval()

"""Export bundles of training runs: what downstream teams load, without DeepSpeed or the training
config. The folder's format is `pretrain.model.bundle`'s (its names are re-exported here);
`export_bundle` reads a run directory or one of its checkpoints and writes a bundle with a model
card; `load_pretrained` (the same as `CellModel.from_pretrained`) reads one.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch

from data_pipeline.corpus import Corpus, CorpusError
from data_pipeline.loading.normalize import Normalization
from data_pipeline.remote import is_url

from .model import CellModel
from .model.bundle import (  # noqa: F401 (re-exported: the format's names as before it moved down a layer)
    ARCHITECTURE_FIELDS,
    BUNDLE_FORMAT,
    READABLE_FORMATS,
    bundle_config,
    check_bundle_out,
    exact_backends_to_sdpa,
    model_type,
    normalization_from_record,
    normalization_record,
    read_bundle,
    read_bundle_config,
    write_bundle,
)

logger = logging.getLogger(__name__)


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


def export_bundle(source: str | Path, out: str | Path, corpus: str | None = None) -> Path:
    """Consolidate the latest complete checkpoint of run directory ``source`` (or the checkpoint
    ``source``) into a bundle at ``out``. The vocabulary (and rank mode's medians) come from the
    run's corpus: ``corpus`` (a folder or URL) when it has moved since, else the run's
    ``data.corpus``; either must be the corpus the checkpoint records."""
    import yaml
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .checkpoint import load_state_file, read_marker, weights_only_loads
    from .config import TrainConfig, from_dict

    check_bundle_out(out)  # before the consolidation: a refused --out costs nothing
    # resolved: a checkpoint named from inside its checkpoints/ folder still finds its run's config
    run_dir, ckpt = _find_checkpoint(Path(source).resolve())
    # the config that trained this checkpoint (its marker's; config.yaml is the latest start's)
    marker = read_marker(ckpt)
    saved = marker.get("config") or yaml.safe_load((run_dir / "config.yaml").read_text())
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
    corpus = _run_corpus(corpus or config.data.corpus, config, marker.get("corpus"), given=corpus is not None)
    norm = config.input_normalization()
    if norm.mode == "rank":
        norm = Normalization(**{**asdict(norm), "medians": corpus.medians()})
    # rank 0's model-states file holds the client state (ZeRO-3 names it per data-parallel rank)
    client = next(loaded[name] for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
                  if name in loaded)
    return write_bundle(out, weights, config.model, corpus.vocab_path.read_bytes(), norm,
                        _model_card(config, client, corpus, ckpt), preset=config.preset)


def _run_corpus(path: str, config, recorded: dict | None, given: bool) -> Corpus:
    """The corpus at ``path``, refused unless it has the vocabulary the checkpoint recorded."""
    try:
        corpus = Corpus(path, config.data.cache_dir or None, config.data.cache_limit_gb)
    except CorpusError as exc:
        where = "" if given or is_url(path) else (f" (the run's data.corpus, relative to the folder the run was "
                                                 f"started from; here {Path(path).resolve()})")
        raise ValueError(f"the corpus{where} cannot be read: {exc}. Pass --corpus PATH: the folder (or URL) "
                         "the run trained on, wherever it is now") from None
    if recorded and recorded.get("vocab_sha256") not in (None, corpus.vocab_sha256):
        raise ValueError(f"{path}: its vocabulary is not the one the checkpoint was trained with (vocab.tsv sha256 "
                         f"{corpus.vocab_sha256[:12]}..., the checkpoint's {recorded['vocab_sha256'][:12]}...): pass "
                         "--corpus with the corpus the run trained on")
    return corpus


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
    sources = corpus.sources
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
scfm embed THIS_FOLDER cells.h5ad --out cells_embedded.h5ad
```

`scfm` comes with the package (`pip install .` in the scfm-pretrain checkout); a checkout without
installing runs `python launch/embed.py` with the same arguments.
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


def load_pretrained(bundle: str | Path, device: str | torch.device = "cpu") -> CellModel:
    """The bundle's `CellModel` in eval mode, with ``.normalization`` (`Normalization`) and
    ``.vocab`` (`Vocabulary`) attached. Imports neither DeepSpeed nor the training config."""
    return CellModel.from_pretrained(bundle, device=device)

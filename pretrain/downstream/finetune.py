"""Fine-tuning a bundle for cell-type annotation, and predicting with the result (issue 23, point 1).

scBERT's recipe on this project's cell embedding: the encoder's cell embedding through a small MLP
(`ClassifierHead`: by default each feature scaled by the training cells' mean and sd, then
Linear -> ReLU -> Dropout per hidden layer, then the class logits), cross-entropy weighted by
inverse class frequency, AdamW, early stopping on the validation macro-F1 with the best epoch
kept. Two modes:

- ``head``: the encoder is frozen; every cell is embedded once (`pretrain.embed.embed_counts`)
  and only the head trains on those embeddings;
- ``full``: every weight the cell embedding depends on trains (the pretraining heads stay as
  exported), the encoder at ``lr x encoder_lr_scale``; cells enter the
  encoder exactly as `embed_counts` normalizes them (each cell's random draws seeded by its
  content), so training sees the input prediction will see. FAVOR+ projections stay as exported
  (no redraws: the fine-tuned encoder is evaluated with the projections it was tuned with).

A run writes into its output folder ``OUT``:

- a checkpoint after every epoch (head, encoder in full mode, best weights so far, optimizer,
  RNG states, epoch, best score): ``checkpoint.pt`` in one process, pretraining's
  ``checkpoints/step-NNNNNNNN`` under a launcher (`finetune_engine`); a rerun with the same
  ``OUT`` and settings resumes from it, and gives exactly what an uninterrupted run gives
  (``--epochs`` may grow; other settings that shape the training are refused);
- ``bundle/``: the fine-tuned bundle (`pretrain.export.write_bundle`'s format, loadable with
  `pretrain.load_pretrained`) plus ``head.safetensors`` and ``labels.json`` (label names, the
  head's shape, the confidence threshold); `load_finetuned` reads it;
- ``report.json``: on the validation cells, with the best epoch's weights: macro-F1, accuracy,
  per-class F1, the confusion matrix (rows: true label, columns: predicted, in ``classes``
  order), how many cells fall below the threshold (``unassigned``) and the per-epoch history;
  ``confusion.png`` beside it.

One process on the device given (plain torch), or data-parallel ranks under `deepspeed` /
`torchrun` in a DeepSpeed engine built from the config's ``deepspeed`` keys, as pretraining does
(`finetune_engine`: the same optimizer step on both paths). Rank 0 writes the outputs.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import xxhash
from torch import nn

from data_pipeline.conversion.fsio import STALE_TEMP_S, atomic_write_json, remove_stale_temps, source_checksum

from ..config import FinetuneConfig, resume_changes
from ..embed import embed_counts, model_input
from ..export import write_bundle
from ..model import CellModel
from ..model.bundle import read_bundle_config
from .finetune_engine import CHECKPOINT_FILE, Classifier, Trainer, make_trainer
from .token_cells import TokenCells, read_token_cells

logger = logging.getLogger(__name__)

FINETUNE_FORMAT = 1
HEAD_FILE = "head.safetensors"
LABELS_FILE = "labels.json"
UNASSIGNED = "unassigned"


class ClassifierHead(nn.Module):
    """Cell embeddings [B, in_dim] -> class logits [B, n_classes] (scBERT's fine-tuning head,
    fed the cell embedding instead of scBERT's convolution over every gene's output).

    ``standardize``: the embedding is first scaled per feature, ``(x - shift) / scale`` (buffers set
    by `standardize_by`, saved with the head). A pretrained embedding's features vary little around
    a large common offset, so the head's first layer otherwise learns slowly: in 10 epochs on the
    validation file's cells, macro-F1 0.418 unscaled and 0.533 scaled
    (`benchmarks/results/eval_validation_head_{unscaled,scaled}.json`)."""

    def __init__(self, in_dim: int, hidden: list[int], n_classes: int, dropout: float, standardize: bool = False):
        super().__init__()
        self.standardize = standardize
        if standardize:
            self.register_buffer("shift", torch.zeros(in_dim))
            self.register_buffer("scale", torch.ones(in_dim))
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            cells = (cells - self.shift) / self.scale
        return self.net(cells)

    @torch.no_grad()
    def standardize_by(self, embeddings: torch.Tensor) -> None:
        """Set the scaling from the training cells' embeddings [n, in_dim]: their mean and standard
        deviation per feature (a feature constant over them is only shifted)."""
        x = embeddings.detach().double()
        sd = x.std(dim=0, unbiased=False)
        self.shift.copy_(x.mean(dim=0))
        self.scale.copy_(torch.where(sd > 1e-6 * max(1.0, float(x.abs().max())), sd, 1.0))


# --- the labelled cells: reading, leaving out, splitting ------------------------------------------


@dataclass
class LabelledSplit:
    train: TokenCells
    val: TokenCells
    classes: list[str]
    y_train: np.ndarray  # [n_train] int64 class index
    y_val: np.ndarray  # [n_val]
    validation: str  # how the validation cells were chosen
    left_out: dict = field(default_factory=dict)  # reason -> number of cells


def _read(paths, model: CellModel, config: FinetuneConfig) -> TokenCells:
    return TokenCells.concat([read_token_cells(p, model, config.label_column, config.layer, config.gene_column,
                                               config.symbol_table, config.min_coverage) for p in paths])


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of ``labels`` [n], every label on both sides."""
    from sklearn.model_selection import train_test_split

    counts = Counter(labels.tolist())
    few = {k: v for k, v in sorted(counts.items()) if v < 2}
    if few:
        raise ValueError(f"a stratified split needs at least 2 cells of every label; these have fewer: {few}. Pass "
                         "--min-class-cells 2 to leave such labels out, or --validation FILE with cells of your own")
    n_val = math.ceil(fraction * len(labels))
    if n_val < len(counts) or len(labels) - n_val < len(counts):
        raise ValueError(f"--val-fraction {fraction} holds out {n_val} of {len(labels)} cells, but a stratified split "
                         f"needs at least one cell of each of the {len(counts)} labels on both sides; choose a fraction "
                         f"between {len(counts) / len(labels):.3f} and {1 - len(counts) / len(labels):.3f}, or pass "
                         "--validation FILE")
    train, val = train_test_split(np.arange(len(labels)), test_size=n_val, stratify=labels, random_state=seed)
    # sklearn rounds each label's share and can leave a small label on one side only: one of its cells
    # moves across, so that training, early stopping and the report see every label
    val, train = _every_label_on(val, train, labels, "validation")
    train, val = _every_label_on(train, val, labels, "training")
    return np.sort(train), np.sort(val)


def _every_label_on(side: np.ndarray, other: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(side, other) with one cell of each label ``side`` lacks moved there from ``other`` (which
    keeps at least one: a label on one side only has at least 2 cells there)."""
    moved = []
    for label in sorted(set(labels[other].tolist()) - set(labels[side].tolist())):
        cell = other[labels[other] == label][0]
        other, side = other[other != cell], np.append(side, cell)
        moved.append(label)
    if moved:
        logger.warning(f"the stratified split left {len(moved)} label(s) without {name} cells; one cell of each "
                       f"moved there: {', '.join(map(str, moved[:10]))}{', ...' if len(moved) > 10 else ''}")
    return side, other


def labelled_split(inputs, model: CellModel, config: FinetuneConfig, validation=None) -> LabelledSplit:
    """Read the labelled cells of ``inputs`` (and ``validation``), leave out unlabelled cells and
    rare labels (``min_class_cells``), split off validation cells when no file is given."""
    cells = _read(inputs, model, config)
    left_out: dict[str, int] = {}
    known = cells.labels != ""
    if not known.all():
        left_out["no label"] = int((~known).sum())
        logger.warning(f"{left_out['no label']} cells have no {config.label_column!r} label: left out")
    cells = cells.subset(np.flatnonzero(known))
    counts = Counter(cells.labels.tolist())
    rare = sorted(k for k, v in counts.items() if v < config.min_class_cells)
    if rare:
        keep = ~np.isin(cells.labels, rare)
        left_out["rare label"] = int((~keep).sum())
        logger.warning(f"labels with fewer than {config.min_class_cells} cells left out: {rare}")
        cells = cells.subset(np.flatnonzero(keep))
    if len(cells) == 0:
        raise ValueError(f"no labelled cells in {', '.join(map(str, inputs))} (column {config.label_column!r})")
    if validation is None:
        train_rows, val_rows = stratified_split(cells.labels, config.val_fraction, config.seed)
        train, val = cells.subset(train_rows), cells.subset(val_rows)
        how = f"stratified split of the inputs: {config.val_fraction} held out (seed {config.seed})"
    else:
        train, val = cells, _read([validation], model, config)
        how = f"file {validation}"
    return make_split(train, val, how, left_out)


def make_split(train: TokenCells, val: TokenCells, how: str, left_out: dict | None = None) -> LabelledSplit:
    """Training and validation cells (labels set; "" unknown) as a `LabelledSplit`: the classes
    are the training labels; validation cells of another label (or none) are left out. For callers
    that choose the cells themselves (cross-validation folds, label subsets); ``how`` says how."""
    left_out = dict(left_out or {})
    if (train.labels == "").any():
        left_out["no label"] = left_out.get("no label", 0) + int((train.labels == "").sum())
        train = train.subset(np.flatnonzero(train.labels != ""))
    classes = sorted(set(train.labels.tolist()))
    if UNASSIGNED in classes:
        raise ValueError(f"the label {UNASSIGNED!r} is what prediction gives low-confidence cells; rename it in "
                         "the label column (or leave those cells out) before fine-tuning")
    if len(classes) < 2:
        raise ValueError(f"the training cells have one label ({classes}); classification needs at least two: check "
                         "--label-column")
    usable = np.isin(val.labels, classes)
    if not usable.all():
        unseen = sorted(set(val.labels[~usable].tolist()) - {""})
        left_out["validation label not in training"] = int((~usable).sum())
        logger.warning(f"{int((~usable).sum())} validation cells have no label or one the training cells lack "
                       f"({unseen[:10]}): left out of the validation")
        val = val.subset(np.flatnonzero(usable))
    if len(val) == 0:
        raise ValueError(f"no validation cells with a training label ({how}); pass --validation FILE with cells of "
                         f"the labels {classes[:10]}")
    index = {c: i for i, c in enumerate(classes)}
    to_y = np.vectorize(index.__getitem__, otypes=[np.int64])
    return LabelledSplit(train, val, classes, to_y(train.labels), to_y(val.labels), how, left_out)


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced set weighs every class 1: n / (K n_c)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def _digest(*arrays) -> str:
    h = xxhash.xxh3_64()
    for a in map(np.asarray, arrays):
        h.update("\x1f".join(map(str, a.tolist())).encode() if a.dtype == object else a.tobytes())
        h.update(b"\x1e")  # where one array ends: no two splits of the same bytes hash alike
    return h.hexdigest()


# --- training ---------------------------------------------------------------------------------------


class _Cells:
    """Cell embeddings of a `TokenCells`, computed once (head mode) or by the trained encoder;
    ``trainer`` shares the embedding of every cell over the ranks (`Trainer.share_of`, `gather`)."""

    def __init__(self, model: CellModel, cells: TokenCells, config: FinetuneConfig, device,
                 trainer: Trainer | None = None, embeddings: np.ndarray | None = None):
        self.model, self.cells, self.config, self.device, self.trainer = model, cells, config, device, trainer
        self.fixed: torch.Tensor | None = None
        if config.mode == "head":
            self.fixed = torch.from_numpy(self.embed() if embeddings is None else embeddings).to(device)
        else:
            self.norm, self.depth = model_input(model, cells.indptr, cells.genes, cells.counts, cells.totals)

    @torch.no_grad()
    def embed(self) -> np.ndarray:
        """Embeddings of every cell, in order, as prediction computes them (each rank embeds its
        share).  [n, cell_dim]"""
        shared = self.trainer is not None and self.trainer.world > 1
        c = self.cells.subset(self.trainer.share_of(np.arange(len(self.cells)))) if shared else self.cells
        part = embed_counts(self.model, c.indptr, c.genes, c.counts, c.totals, self.config.token_budget,
                            device=self.device)
        return self.trainer.gather(part) if shared else part

    def batch(self, rows: np.ndarray):
        """`Classifier` inputs of cells ``rows``: their fixed embeddings [B, cell_dim] (head mode),
        or their packed encoder input (full mode)."""
        if self.fixed is not None:
            return self.fixed[torch.from_numpy(rows).to(self.device)]
        norm = self.norm
        lengths = np.diff(norm.indptr)[rows]
        index = np.concatenate([np.arange(norm.indptr[r], norm.indptr[r + 1]) for r in rows])
        cu = np.zeros(len(rows) + 1, np.int32)
        cu[1:] = np.cumsum(lengths)
        d = self.device
        return (torch.from_numpy(norm.genes[index]).to(d), torch.from_numpy(norm.values[index]).to(d),
                torch.from_numpy(cu).to(d), int(lengths.max(initial=0)), torch.from_numpy(self.depth[rows]).to(d))


def _encoder_parameters(model: CellModel, cells: _Cells) -> list[nn.Parameter]:
    """The parameters a cell embedding depends on (not the pretraining heads): the ones full mode
    trains. Found by a gradient through one cell in eval mode (no dropout draw)."""
    model.eval()
    _, embedding = model.encode(*cells.batch(np.arange(1)))
    embedding.float().sum().backward()
    used = [p for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return used


@torch.no_grad()
def class_probabilities(head: ClassifierHead, embeddings: torch.Tensor | np.ndarray, device="cpu",
                        chunk: int = 65536) -> np.ndarray:
    """Class probabilities [n, K] of cell embeddings [n, cell_dim], in chunks of cells (the
    hidden activations of a million cells at once would take gigabytes)."""
    head.eval()
    x = torch.as_tensor(embeddings)
    dtype = next(head.parameters()).dtype  # bf16 under a DeepSpeed engine in bf16
    parts = [torch.softmax(head(x[a : a + chunk].to(device, dtype)).float(), dim=-1).cpu()
             for a in range(0, len(x), chunk)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, head.net[-1].out_features), np.float32)


def _val_probabilities(model: CellModel, head: ClassifierHead, val: _Cells, device) -> np.ndarray:
    if val.fixed is not None:
        return class_probabilities(head, val.fixed, device)
    model.eval()
    return class_probabilities(head, val.embed(), device)


def scores(y: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float) -> dict:
    """Macro-F1, accuracy, per-class F1, confusion matrix [true][predicted] (argmax predictions)
    and the number of cells whose top probability is below ``threshold``; ``thresholded``: macro-F1
    and accuracy of the labels as predict writes them, a cell below the threshold `unassigned`
    (wrong whatever its label). Macro-F1 averages over the classes the cells hold or are predicted
    as (``scored``): a held-out file often holds a few of a model's classes, and a class it lacks
    and nothing predicts is no error of the model (per-class F1: None for those)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    labels = list(range(len(classes)))
    pred = probs.argmax(axis=1)
    per_class = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    scored = sorted(set(y.tolist()) | set(pred.tolist()))
    low = probs.max(axis=1, initial=0.0) < threshold
    written = np.where(low, -1, pred)  # -1: unassigned, no class's true positive
    scored_written = sorted(set(y.tolist()) | set(written[~low].tolist()))
    unassigned = int(low.sum())
    return {"macro_f1": float(f1_score(y, pred, labels=scored, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(y, pred)),
            "scored": [classes[i] for i in scored],
            "per_class_f1": {c: float(f) if i in scored else None for i, (c, f) in enumerate(zip(classes, per_class))},
            "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
            "threshold": threshold, "unassigned": unassigned, "unassigned_fraction": unassigned / max(1, len(y)),
            "thresholded": {
                "macro_f1": float(f1_score(y, written, labels=scored_written, average="macro", zero_division=0)),
                "accuracy": float(accuracy_score(y, written))}}


def _rng_state(device, shuffle: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _set_rng_state(state: dict, device, shuffle: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def finetune(bundle: str | Path, inputs: list[str | Path], out: str | Path, config: FinetuneConfig,
             validation: str | Path | None = None, device: str | torch.device = "cpu") -> dict:
    """Fine-tune ``bundle`` on the labelled cells of ``inputs`` (obs[config.label_column]); write
    ``out``/checkpoint.pt (each epoch), ``out``/bundle, ``out``/report.json (+ confusion.png).
    Resumes from ``out``/checkpoint.pt when present. Under a launcher (`deepspeed`, `torchrun`):
    data-parallel over the ranks on their devices (``device`` is not used), checkpoints in
    ``out``/checkpoints/ (`finetune_engine.DeepSpeedTrainer`), rank 0 writes the outputs. Returns
    the report."""
    from ..distributed import init_distributed, launched
    from ..export import load_pretrained

    config.validate()
    if launched():
        _, _, device = init_distributed()
    if (Path(bundle) / LABELS_FILE).exists():
        logger.info(f"{bundle} is a fine-tuned bundle: its encoder is fine-tuned again with a new head")
    model = load_pretrained(bundle, device=device)
    split = labelled_split(inputs, model, config, validation)
    return finetune_split(bundle, model, split, out, config, device, inputs=[str(p) for p in inputs])


def finetune_split(bundle: str | Path, model: CellModel, split: LabelledSplit, out: str | Path,
                   config: FinetuneConfig, device: str | torch.device = "cpu", inputs: list[str] = (),
                   embeddings: tuple[np.ndarray, np.ndarray] | None = None, plot: bool = True) -> dict:
    """`finetune` on cells already read and split (`labelled_split`, or `make_split` for folds the
    caller chose); ``model``: ``bundle`` loaded on ``device`` (`pretrain.load_pretrained`), trained
    in place in full mode. Head mode: ``embeddings`` (training, validation cells) [n, cell_dim] are
    the cells' `embed_counts` embeddings when the caller has them already (cross-validation embeds a
    file once, not once per fold). ``plot=False``: no confusion.png (report.json keeps the matrix; a
    caller running hundreds of folds saves the ~0.5 s each drawing costs)."""
    config.validate()
    bundle, out = Path(bundle), Path(out)
    classes, k = split.classes, len(split.classes)
    logger.info(f"{len(split.train)} training cells, {len(split.val)} validation cells ({split.validation}), "
                f"{k} labels")
    identity = {"data": _digest(split.train.indptr, split.train.genes, split.train.counts, split.train.labels,
                                split.val.indptr, split.val.genes, split.val.counts, split.val.labels),
                "bundle": source_checksum(bundle / "model.safetensors")}

    torch.manual_seed(config.seed)
    head = ClassifierHead(model.config.cell_dim, list(config.hidden), k, config.dropout, config.standardize).to(device)
    full = config.mode == "full"
    groups = [{"params": list(head.parameters()), "lr": config.lr}]
    given = embeddings if config.mode == "head" and embeddings is not None else (None, None)
    if full:
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        probe = _Cells(model, split.train.subset(np.arange(1)), config, device)
        encoder = [p for p in _encoder_parameters(model, probe) if id(p) in trainable]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in encoder:
            p.requires_grad_(True)
        groups.append({"params": encoder, "lr": config.lr * config.encoder_lr_scale})
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    trainer = make_trainer(Classifier(head, model if full else None), groups, config, device)
    if trainer.rank:  # dropout differs between ranks; the head's initialization (above) does not
        torch.manual_seed(config.seed + 7919 * trainer.rank)
    shuffle = torch.Generator().manual_seed(config.seed)
    weight = class_weights(split.y_train, k).to(device) if config.class_weights else None
    y_train = torch.from_numpy(split.y_train).to(device)

    run = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "since_best": 0, "stopped": False, "history": []}
    best = {"head": _copy(head.state_dict()), "model": _copy(model.state_dict()) if full else None}
    out.mkdir(parents=True, exist_ok=True)
    if trainer.rank == 0:  # what a killed save left half-written: this host's dead processes', an hour old
        remove_stale_temps(out, others_may_write=True, names={CHECKPOINT_FILE, "report.json"},
                           min_age_s=STALE_TEMP_S)
    saved = trainer.load(out, lambda saved: _check_resume(saved, config, identity, classes, out))
    if saved is not None:
        run = saved["run"]
        best = saved["best"]
        _set_rng_state(saved["rng"], device, shuffle)
        logger.info(f"resumed {out} after epoch {run['epoch']} (best macro-F1 {run['best_f1']:.4f} at epoch "
                    f"{run['best_epoch']})")

    train_cells = _Cells(model, split.train, config, device, trainer, given[0])
    val_cells = _Cells(model, split.val, config, device, trainer, given[1])
    if config.standardize and saved is None:  # a resumed run has its scaling in the checkpoint
        head.standardize_by(train_cells.fixed if train_cells.fixed is not None else
                            torch.from_numpy(train_cells.embed()))
        best["head"] = _copy(head.state_dict())
    n = len(split.train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    # a changed --patience decides from the resumed state, as an uninterrupted run with it would have
    patient = config.patience == 0 or run["since_best"] < config.patience
    if run["stopped"] and patient and run["epoch"] < config.epochs:
        run["stopped"] = False
        logger.info(f"the run had stopped early at epoch {run['epoch']}; with --patience {config.patience} it goes on")
    elif not run["stopped"] and not patient:
        run["stopped"] = True
    if run["stopped"]:
        logger.info(f"the run stopped early at epoch {run['epoch']} (no better validation macro-F1 for "
                    f"{run['since_best']} epochs): nothing left to train; writing its outputs again"
                    + (" (a larger --patience, or 0, trains on)" if run["epoch"] < config.epochs else ""))
    while run["epoch"] < config.epochs and not run["stopped"]:
        head.train()
        model.train(full)
        order = torch.randperm(n, generator=shuffle).numpy()
        total = sum(trainer.step(train_cells, order[start : start + config.batch_size], y_train, weight)
                    for start in range(0, n, config.batch_size))
        total = trainer.sum(total)
        probs = _val_probabilities(model, head, val_cells, device)
        s = scores(split.y_val, probs, classes, config.threshold)
        run["epoch"] += 1
        run["history"].append({"epoch": run["epoch"], "loss": total / max(1, steps_per_epoch),
                               "val_macro_f1": s["macro_f1"], "val_accuracy": s["accuracy"]})
        if s["macro_f1"] > run["best_f1"]:
            run.update(best_f1=s["macro_f1"], best_epoch=run["epoch"], since_best=0)
            best = {"head": _copy(head.state_dict()), "model": _copy(model.state_dict()) if full else None}
        else:
            run["since_best"] += 1
        if config.patience and run["since_best"] >= config.patience:
            run["stopped"] = True
        logger.info(f"epoch {run['epoch']}: loss {run['history'][-1]['loss']:.4f}, validation macro-F1 "
                    f"{s['macro_f1']:.4f}, accuracy {s['accuracy']:.4f}"
                    + (f"; no better for {run['since_best']} epochs: stopping" if run["stopped"] else ""))
        state = {"format": FINETUNE_FORMAT, "config": asdict(config), "identity": identity, "classes": classes,
                 "run": run, "best": best, "rng": _rng_state(device, shuffle)}
        trainer.save(out, state, run["epoch"] * steps_per_epoch)

    head.load_state_dict(best["head"])
    if full:
        model.load_state_dict(best["model"])
    model.eval()
    report = scores(split.y_val, _val_probabilities(model, head, val_cells, device), classes, config.threshold)
    report = {"label_column": config.label_column, "mode": config.mode, "classes": classes, **report,
              "n_train": len(split.train), "n_val": len(split.val), "validation": split.validation,
              "train_class_counts": {c: int(v) for c, v in zip(classes, np.bincount(split.y_train, minlength=k))},
              "left_out": split.left_out, "best_epoch": run["best_epoch"], "epochs_run": run["epoch"],
              "stopped_early": run["stopped"], "history": run["history"], "config": asdict(config),
              "bundle": str(bundle), "inputs": list(inputs)}
    if trainer.rank == 0:  # every rank holds the same weights and report
        _write_finetuned(out / "bundle", bundle, model, head, config, classes, report)
        atomic_write_json(out / "report.json", report, indent=1)
        if plot:
            _plot_confusion(report, out / "confusion.png")
    trainer.barrier()
    logger.info(f"best epoch {run['best_epoch']}: validation macro-F1 {report['macro_f1']:.4f}, accuracy "
                f"{report['accuracy']:.4f}, {report['unassigned']} of {len(split.val)} cells unassigned at threshold "
                f"{config.threshold}; bundle {out / 'bundle'}")
    return report


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _check_resume(saved: dict, config: FinetuneConfig, identity: dict, classes: list[str], out: Path) -> None:
    fix = f"rerun with the settings and inputs of the run in {out} to resume it, or pass another --out"
    if saved.get("format") != FINETUNE_FORMAT:
        raise ValueError(f"{out / CHECKPOINT_FILE}: fine-tuning checkpoint format {saved.get('format')}, not "
                         f"{FINETUNE_FORMAT}; pass another --out")
    refused, applied = resume_changes(saved["config"], config)
    if refused:
        raise ValueError(f"{out}: a fine-tuning run with other settings is there ({'; '.join(refused)}); {fix}")
    for line in applied:
        logger.info(f"resume: {line}")
    for key, what in (("bundle", "the bundle's weights"), ("data", "the labelled cells (inputs, validation)")):
        if saved["identity"][key] != identity[key]:
            raise ValueError(f"{out}: the run there was fine-tuned from other data: {what} differ; {fix}")
    if saved["classes"] != classes:
        raise ValueError(f"{out}: the run there has other labels ({saved['classes'][:10]}); {fix}")


# --- the fine-tuned bundle --------------------------------------------------------------------------


def _write_finetuned(folder: Path, source: Path, model: CellModel, head: ClassifierHead, config: FinetuneConfig,
                     classes: list[str], report: dict) -> None:
    from safetensors.torch import save

    labels = {"finetune_format": FINETUNE_FORMAT, "label_column": config.label_column, "classes": classes,
              "threshold": config.threshold, "mode": config.mode,
              "head": {"in_dim": model.config.cell_dim, "hidden": list(config.hidden), "dropout": config.dropout,
                       "standardize": config.standardize},
              "best_epoch": report["best_epoch"], "val_macro_f1": report["macro_f1"], "source_bundle": str(source)}
    card = f"""# Fine-tuned cell-type annotation bundle

- fine-tuned from {source} ({config.mode} mode: {'the encoder frozen, the head trained' if config.mode == 'head'
                                                else 'every weight trained'}) on obs[{config.label_column!r}]
- {len(classes)} labels: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}
- best epoch {report['best_epoch']}: validation macro-F1 {report['macro_f1']:.4f}, accuracy {report['accuracy']:.4f}
  ({report['validation']})

Predict: `scfm predict THIS_FOLDER cells.h5ad --out annotated.h5ad`; load in Python with
`pretrain.downstream.finetune.load_finetuned("THIS_FOLDER")`. Embedding (`scfm embed`) works as with any bundle.
"""
    # the source's attention backends (a GPU bundle's flash / varlen, read as sdpa on a CPU) and preset:
    # fine-tuning on a CPU does not downgrade what the bundle runs on a GPU
    stored = read_bundle_config(source)
    kept = replace(model.config, attention=stored.attention,
                   decoder=replace(model.config.decoder, attention=stored.decoder.attention))
    preset = json.loads((source / "config.json").read_text()).get("preset")
    write_bundle(folder, _full_precision(model.state_dict()), kept, (source / "vocab.tsv").read_bytes(),
                 model.normalization, card, extra={HEAD_FILE: save({k: v.detach().cpu().contiguous()
                                               for k, v in _full_precision(head.state_dict()).items()}),
                              LABELS_FILE: json.dumps(labels, indent=1).encode()}, preset=preset)


def _full_precision(state: dict) -> dict:
    """float32 for the half-precision tensors a bf16 DeepSpeed engine trains in place (ZeRO keeps
    its float32 master copy partitioned over the ranks); a bundle holds float32 weights."""
    return {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in state.items()}


def _plot_confusion(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(report["confusion"], np.float64)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    k = len(report["classes"])
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), report["classes"], rotation=90)
    ax.set_yticks(range(k), report["classes"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="share of the true label's cells")
    ax.set_title(f"{report['label_column']}: macro-F1 {report['macro_f1']:.3f}, accuracy {report['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_finetuned(bundle: str | Path, device: str | torch.device = "cpu") -> tuple[CellModel, ClassifierHead, dict]:
    """A fine-tuned bundle: (its `CellModel` in eval mode, the head in eval mode, labels.json)."""
    from safetensors.torch import load_file

    from ..export import load_pretrained

    bundle = Path(bundle)
    if not (bundle / LABELS_FILE).exists() or not (bundle / HEAD_FILE).exists():
        missing = [name for name in (LABELS_FILE, HEAD_FILE) if not (bundle / name).exists()]
        raise ValueError(f"{bundle} is not a fine-tuned bundle (no {' or '.join(missing)}): a pretrained bundle has no "
                         "classification head. Fine-tune it first: scfm finetune "
                         f"{bundle} LABELLED.h5ad --label-column COLUMN --out RUN, then predict with RUN/bundle")
    labels = json.loads((bundle / LABELS_FILE).read_text())
    if labels.get("finetune_format") != FINETUNE_FORMAT:
        raise ValueError(f"{bundle / LABELS_FILE}: fine-tuned bundle format {labels.get('finetune_format')} is not "
                         f"{FINETUNE_FORMAT}; fine-tune again with this version")
    model = load_pretrained(bundle, device=device)
    shape = labels["head"]
    head = ClassifierHead(shape["in_dim"], shape["hidden"], len(labels["classes"]), shape["dropout"],
                          shape.get("standardize", False))  # bundles written before the key: unscaled heads
    head.load_state_dict(load_file(str(bundle / HEAD_FILE)))
    return model, head.to(device).eval(), labels


# --- prediction -------------------------------------------------------------------------------------


def predict_cells(model: CellModel, head: ClassifierHead, cells: TokenCells, token_budget: int = 16384,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Class probabilities of ``cells`` in their order (a fine-tuned bundle's `load_finetuned`).
    -> [n, K] float32"""
    embeddings = embed_counts(model, cells.indptr, cells.genes, cells.counts, cells.totals, token_budget,
                              device=device)
    return class_probabilities(head, embeddings, device)


def predict_h5ad(bundle: str | Path, source: str | Path, out: str | Path, name: str | None = None,
                 threshold: float | None = None, layer: str | None = None, gene_column: str | None = None,
                 symbol_table: str | Path | None = None, min_coverage: float = 0.5, token_budget: int = 16384,
                 device: str | torch.device = "cpu", label_column: str | None = None) -> dict:
    """Annotate every cell of ``source`` with fine-tuned ``bundle``; write ``out`` (.h5ad): the
    input plus obs ``<name>_prediction`` (a label, or "unassigned" below ``threshold``; default
    labels.json's), obs ``<name>_confidence`` (the top probability), obsm
    ``<name>_probabilities`` [n, K] and uns ``<name>_classes`` (its column order), in the input's
    cell order. ``name`` defaults to the label column the bundle was fine-tuned on. Returns a
    summary; with ``label_column`` (the input's true labels) it holds `scores` of the cells whose
    label is one of the bundle's (``scores["not_scored"]``: the others)."""
    import pandas as pd

    from ..embed_output import annotated_copy, check_not_input

    source, out = Path(source), Path(out)
    if out.suffix != ".h5ad":
        raise ValueError(f"--out {out}: write an .h5ad (the input plus the prediction columns)")
    check_not_input(source, out)
    model, head, labels = load_finetuned(bundle, device)
    threshold = labels["threshold"] if threshold is None else threshold
    if not 0 <= threshold <= 1:
        raise ValueError(f"--threshold {threshold}: a probability in [0, 1] (0: never unassigned)")
    name = name or labels["label_column"]
    cells = read_token_cells(source, model, label_column=label_column, layer=layer, gene_column=gene_column,
                             symbol_table=symbol_table, min_coverage=min_coverage)
    probs = predict_cells(model, head, cells, token_budget, device)
    classes = labels["classes"]
    confidence = probs.max(axis=1, initial=0.0)
    predicted = np.asarray(classes, dtype=object)[probs.argmax(axis=1)] if len(probs) else np.zeros(0, object)
    low = confidence < threshold
    predicted[low] = UNASSIGNED
    # the input copied as a file with the columns added: its X and layers are never read into memory
    annotated_copy(source, out,
                   obs={f"{name}_prediction": pd.Categorical(predicted, categories=[*classes, UNASSIGNED]),
                        f"{name}_confidence": confidence.astype(np.float32)},
                   obsm={f"{name}_probabilities": probs.astype(np.float32)},
                   uns={f"{name}_classes": np.asarray(classes, dtype=object)})
    counts = Counter(predicted.tolist())
    summary = {"n_cells": len(cells), "unassigned": int(low.sum()), "threshold": threshold, "out": str(out),
               "columns": [f"{name}_prediction", f"{name}_confidence"], "obsm": f"{name}_probabilities",
               "predicted": {c: counts.get(c, 0) for c in [*classes, UNASSIGNED]}, "coverage": cells.coverage[0]}
    logger.info(f"{summary['unassigned']} of {len(cells)} cells unassigned (top probability below {threshold})")
    if label_column is not None and not np.isin(cells.labels, classes).any():
        summary["scores"] = None
        logger.warning(f"no cell's obs[{label_column!r}] is one of the bundle's labels ({', '.join(classes[:10])}"
                       f"{', ...' if len(classes) > 10 else ''}): nothing scored; check the column and how it names "
                       "the cell types")
    elif label_column is not None:
        known = np.isin(cells.labels, classes)
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[label] for label in cells.labels[known]], np.int64)
        summary["scores"] = {**scores(y, probs[known], classes, threshold), "not_scored": int((~known).sum())}
        got = summary["scores"]
        logger.info(f"against obs[{label_column!r}]: macro-F1 {got['macro_f1']:.4f}, accuracy {got['accuracy']:.4f} "
                    f"(the top label of every cell); as written, unassigned counted wrong: macro-F1 "
                    f"{got['thresholded']['macro_f1']:.4f}, accuracy {got['thresholded']['accuracy']:.4f} "
                    f"({int((~known).sum())} cells of other labels not scored)")
    return summary

"""Typed configuration: every knob of the model and the objectives, with its default and a
one-line help (``field(metadata={"help": ...})``). YAML files and ``key.sub=value`` overrides
set these fields; presets (`pretrain.presets`) are named instances; the model's shape
(`ModelConfig`) is the model's own (`pretrain.model.shape`), re-exported here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

from data_pipeline.loading.masking import Masking
from data_pipeline.loading.normalize import BINNED_MODES, MODES, QUANTILE_TIES, Normalization
from data_pipeline.loading.read_depth import Downsampling

from .knobs import FIXED, FREE, RESTORED
from .knobs import knob as _help
from .model.shape import ATTENTION_BACKENDS, DecoderConfig, ModelConfig  # noqa: F401 (re-exported: a run's parts)
from .presets import preset

MIN_TEMPERATURE = 0.01  # the learnable InfoNCE temperature's floor (its log-scale is clamped to [1, 100])


@dataclass
class ObjectiveConfig:
    """Which losses, their weights, and the contrastive gradient cache."""

    mlm_weight: float = _help("weight of masked expression modelling", 1.0)
    contrastive_weight: float = _help("weight of the InfoNCE loss between the two views of each cell (0: off)", 0.0)
    label_weight: float = _help("weight of the cell-label loss (0: off)", 0.0)
    labels: dict = _help("named label objectives, name: corpus label column (e.g. {tumor_normal: tumor_normal}, CellLM's "
                         "[cls] tumour/normal task); only those columns train, each its own head; empty: every label "
                         "column of the corpus", factory=dict)
    mvc_weight: float = _help("weight of scGPT's MVC / GEPC loss: masked genes' values predicted from the cell embedding "
                              "(needs model.mvc_head=true; 0: off)", 0.0)
    temperature: float = _help("InfoNCE temperature (initial value when learnable)", 0.07)
    learnable_temperature: bool = _help("learn the temperature (as a log-scale, clamped to [1/100, 1]; past a bound, "
                                        "only the gradient leading back is kept)", True)
    gradient_cache: bool = _help("divide-and-conquer contrastive: embed chunks without a graph, "
                                 "recompute each with its cached embedding gradient", True)

    @property
    def joins_chunks(self) -> bool:
        """Whether a step's chunks run as one graph: the contrastive loss without the gradient cache
        (its negatives must meet in one graph). Otherwise each chunk is a micro-step of its own, the
        gradient cache's or plain accumulation's (no contrastive loss: nothing joins the chunks)."""
        return not self.gradient_cache and self.contrastive_weight > 0


@dataclass
class DataConfig:
    """The corpus and how the loader turns it into batches."""

    # a resumed run may find its corpus elsewhere; the corpus itself (its plan hash) is checked by pretrain.train
    corpus: str = _help("corpus folder (`python -m data_pipeline convert ... --out CORPUS`), or its URL (https://, "
                        "s3://, gs://: anything fsspec opens)", "", resume=FREE)
    cache_dir: str = _help("local folder caching a corpus read from a URL (its small files and fetched blocks); "
                           "empty: $DATA_PIPELINE_CACHE, else ~/.cache/data_pipeline", "", resume=FREE)
    cache_limit_gb: float = _help("most GB of fetched blocks the cache keeps (the least recently used deleted first; "
                                  "it may pass the limit by 5 % per loader process between clean-ups); 0: no limit",
                                  0.0, resume=FREE)
    normalization: str = _help(" | ".join(MODES), "log1p_bins")
    quantile_ties: str = _help("quantile_bins: values tied over several edges get a random bin of the span (random, "
                               "scGPT's tie-breaking) or its top bin (high: np.digitize alone)", "random")
    max_genes: int | None = _help("cap on genes per cell (random subset; top ranks in rank mode)", None)
    token_budget: int = _help("most tokens per loader batch (one gradient-cache chunk), a cell counted as the model "
                              "runs it: capped genes + <cls>, x views, at least the full gene set for gene_set=all "
                              "and the encoder-decoder; under sdpa a batch counts cells x its longest", 16384)
    megabatch_cells: int = _help("cells shuffled and length-sorted together", 8192)
    max_batch_cells: int | None = _help("most cells in a batch, within the token budget (None: the budget alone)",
                                        None)
    mask_ratio: float = _help("fraction of each cell's genes masked for masked expression modelling", 0.15)
    mask_ratios: list[float] = _help("mask ratios of which one is drawn per cell (scGPT: [0.25, 0.5, 0.75]; scGPT draws "
                                     "one per batch); empty: data.mask_ratio", factory=list)
    mask_replace_prob: float = _help("masked inputs replaced by the mask token (BERT: 0.8; scBERT: 0.9)", 0.8)
    mask_random_prob: float = _help("masked inputs replaced by a random bin / gene (BERT: 0.1; scBERT: 0); the rest "
                                    "are kept", 0.1)
    mask_nonzero_only: bool = _help("mask only genes whose bin is not 0, ceil(mask_ratio x those) per cell (scBERT)",
                                    False)
    mask_zero_prob: float = _help("share of each cell's unexpressed vocabulary genes masked too, with target 0, so "
                                  "that the decoder learns zeros (scFoundation's zero_mask_prob 0.03); "
                                  "architecture=encoder_decoder with continuous normalization only (0: off)", 0.0)
    downsample_prob: float = _help("read-depth-aware pretraining (scFoundation): probability that a cell's input is "
                                   "downsampled (rate ~ Beta(downsample_beta), counts thinned binomially) while its "
                                   "targets stay the original cell's; continuous normalization only (0: off)", 0.0)
    downsample_beta: list[float] = _help("the downsampling rate's Beta(a, b)", factory=lambda: [2.0, 2.0])
    downsample_min_total: float = _help("cells with fewer total counts are never downsampled", 1000.0)
    views: bool = _help("two augmented views per cell (needed by the contrastive loss)", False)
    gene_dropout: float = _help("views: probability of dropping each gene", 0.1)
    min_depth: float = _help("views: lowest fraction of reads kept", 0.5)
    num_workers: int = _help("DataLoader worker processes per rank (0: in the training process)", 2, resume=FREE)
    seed: int = _help("shuffling and masking seed", 0)


@dataclass
class OptimizerConfig:
    lr: float = _help("peak learning rate", 1e-4, resume=RESTORED)
    weight_decay: float = _help("AdamW weight decay", 0.01, resume=RESTORED)
    betas: list[float] = _help("AdamW betas", factory=lambda: [0.9, 0.98], resume=RESTORED)
    eps: float = _help("AdamW epsilon", 1e-8, resume=RESTORED)


@dataclass
class ScheduleConfig:
    max_steps: int = _help("optimizer steps to train", 1000, resume=FREE)
    warmup_steps: int = _help("linear warm-up from 0 to the peak learning rate", 100)
    decay: str = _help("after warm-up: cosine | linear | constant", "cosine")
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak", 0.1)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _help("ZeRO stage 0-3", 2)
    bf16: bool | None = _help("bf16 mixed precision (None: on when a CUDA GPU supports it)", None)
    chunks_per_step: int = _help("loader batches per optimizer step per rank (gradient accumulation; with the "
                                 "contrastive gradient cache, the chunks of one contrastive batch)", 1)
    gradient_clipping: float = _help("clip the global gradient norm (0: off)", 1.0, resume=FREE)
    overrides: dict = _help("extra DeepSpeed config entries, merged last, nested keys one by one "
                            "(zero_optimization: {overlap_comm: true} keeps the stage)", factory=dict)


@dataclass
class RunConfig:
    """Where a run writes and how it logs, checkpoints and resumes."""

    out: str = _help("run directory: checkpoints, metrics JSON, loss plot, MLflow store, resolved config", "runs/run",
                     resume=FREE)
    experiment: str = _help("MLflow experiment name", "scfm-pretrain", resume=FREE)
    mlflow: bool = _help("log to MLflow (a SQLite store in the run directory unless MLFLOW_TRACKING_URI is set)", True,
                         resume=FREE)
    log_every: int = _help("steps between metric logs: the only steps that read values back from the device "
                           "(every step is still recorded in metrics.json)", 10, resume=FREE)
    checkpoint_every: int = _help("steps between checkpoints (0: only on signals and at the end)", 500, resume=FREE)
    keep_checkpoints: int = _help("checkpoints kept (oldest deleted)", 3, resume=FREE)
    max_nan_steps: int = _help("stop after this many non-finite losses in a row (each is skipped; a resume goes on "
                               "counting the ones its checkpoint ended with)", 5, resume=FREE)
    peak_tflops: float | None = _help("device peak TFLOP/s for MFU (None: known GPUs' dense bf16 peak, for bf16 runs)", None,
                                      resume=FREE)
    seed: int = _help("model initialization and dropout seed", 0)
    progress: bool = _help("show a progress bar on rank 0", True, resume=FREE)
    threads: int = _help("torch CPU threads per rank (0: automatic: usable cores (affinity, cgroup quota) / ranks "
                         "on the host, less up to a quarter for loader workers; OMP_NUM_THREADS, if set, is kept)", 0,
                         resume=FREE)
    inject_nan_steps: list[int] = _help("testing: steps (1-based) whose loss is made NaN, to exercise the skip",
                                        factory=list, resume=FREE)


@dataclass
class TrainConfig:
    """Everything `launch/pretrain.py` needs. ``preset`` fills the model shape, the loader's
    normalization and the preset's other ``data.*`` and ``objectives.*`` values from
    `pretrain.presets` before the YAML and command-line values."""

    preset: str | None = _help("anchor preset: scbert, geneformer-10m, celllm, scgpt, scfoundation", None, resume=FREE)
    data: DataConfig = _help("corpus and loader", factory=DataConfig)
    model: ModelConfig = _help("model shape", factory=ModelConfig)
    objectives: ObjectiveConfig = _help("losses", factory=ObjectiveConfig)
    optimizer: OptimizerConfig = _help("AdamW", factory=OptimizerConfig)
    schedule: ScheduleConfig = _help("learning-rate schedule and length", factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = _help("DeepSpeed engine", factory=DeepSpeedConfig)
    run: RunConfig = _help("run directory, logging, checkpoints", factory=RunConfig)

    def input_normalization(self) -> Normalization:
        """How counts become model input, for the loader and the exported bundle (rank mode's
        medians come from the corpus)."""
        return Normalization(mode=self.data.normalization, n_bins=self.model.n_bins, max_genes=self.data.max_genes,
                             quantile_ties=self.data.quantile_ties)

    def input_masking(self) -> Masking:
        """How the loader masks expression for the masked-expression loss."""
        d = self.data
        return Masking(d.mask_ratio, mask_prob=d.mask_replace_prob, random_prob=d.mask_random_prob,
                       nonzero_only=d.mask_nonzero_only, ratios=tuple(d.mask_ratios), zero_prob=d.mask_zero_prob)

    def label_column_indices(self, corpus_columns: list[str]) -> list[int]:
        """The corpus label columns the label loss trains on (`ObjectiveConfig.labels`), by position."""
        if not self.objectives.labels:
            return list(range(len(corpus_columns)))
        out = []
        for name, column in self.objectives.labels.items():
            if column not in corpus_columns:
                raise ValueError(f"objectives.labels.{name} reads label column {column!r}, which the corpus "
                                 f"{self.data.corpus} does not have (label columns: {corpus_columns or 'none'}): "
                                 f"convert with `python -m data_pipeline convert ... --label-columns {column}` or set "
                                 f"objectives.labels={{}}")
            out.append(corpus_columns.index(column))
        return out

    def input_downsampling(self) -> Downsampling | None:
        """Read-depth-aware downsampling of the loader's inputs (None: off)."""
        d = self.data
        if d.downsample_prob == 0:
            return None
        return Downsampling(d.downsample_prob, *d.downsample_beta, d.downsample_min_total)

    def validate(self) -> TrainConfig:
        """Values out of range refused up front (not hours into a run)."""
        checks = [
            (self.data.normalization in MODES,
             f"data.normalization={self.data.normalization!r}: choose one of {', '.join(MODES)}"),
            (self.data.quantile_ties in QUANTILE_TIES,
             f"data.quantile_ties={self.data.quantile_ties!r}: choose one of {', '.join(QUANTILE_TIES)}"),
            (self.data.token_budget >= 1 and self.data.megabatch_cells >= 1, "data.token_budget and "
             "data.megabatch_cells must be >= 1"),
            (0 <= self.data.mask_ratio <= 1, f"data.mask_ratio={self.data.mask_ratio} must be in [0, 1]"),
            (not self.data.mask_nonzero_only or self.data.normalization in BINNED_MODES,
             f"data.mask_nonzero_only=true skips bin 0, which data.normalization={self.data.normalization} does not "
             f"have: use a binned normalization ({', '.join(BINNED_MODES)}) or set data.mask_nonzero_only=false"),
            (self.data.num_workers >= 0, "data.num_workers must be >= 0"),
            (self.data.cache_limit_gb >= 0, "data.cache_limit_gb must be >= 0 (0: no limit)"),
            (self.run.threads >= 0, "run.threads must be >= 0 (0: automatic)"),
            (self.optimizer.lr > 0, f"optimizer.lr={self.optimizer.lr} must be > 0"),
            (len(self.optimizer.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1
                                                    for b in self.optimizer.betas),
             f"optimizer.betas={self.optimizer.betas}: two numbers in [0, 1), e.g. [0.9, 0.98]"),
            (self.optimizer.eps > 0, f"optimizer.eps={self.optimizer.eps} must be > 0, e.g. 1e-8"),
            (MIN_TEMPERATURE <= self.objectives.temperature <= 1,
             f"objectives.temperature={self.objectives.temperature} must be in [{MIN_TEMPERATURE}, 1] (the learnable "
             "temperature is clamped there, and out of it would neither apply nor learn), e.g. 0.07"),
            (self.run.peak_tflops is None or self.run.peak_tflops > 0,
             f"run.peak_tflops={self.run.peak_tflops} must be > 0 (or null: known GPUs' datasheet peak)"),
            (self.model.favor_redraw_interval >= 0,
             f"model.favor_redraw_interval={self.model.favor_redraw_interval} must be >= 0 (0: never redraw)"),
            (not self.data.views or (0 <= self.data.gene_dropout < 1 and 0 < self.data.min_depth <= 1),
             f"data.gene_dropout={self.data.gene_dropout} must be in [0, 1) and data.min_depth={self.data.min_depth} "
             "in (0, 1]"),
            (all(isinstance(s, int) and s >= 1 for s in self.run.inject_nan_steps),
             f"run.inject_nan_steps={self.run.inject_nan_steps}: steps are integers >= 1"),
            (self.schedule.max_steps >= 1 and self.schedule.warmup_steps >= 0,
             "schedule.max_steps must be >= 1 and schedule.warmup_steps >= 0"),
            (self.schedule.decay in ("cosine", "linear", "constant"),
             f"schedule.decay={self.schedule.decay!r}: choose cosine, linear or constant"),
            (0 <= self.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in [0, 1]"),
            (self.deepspeed.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={self.deepspeed.zero_stage}: 0-3"),
            (self.deepspeed.chunks_per_step >= 1, "deepspeed.chunks_per_step must be >= 1"),
            (self.deepspeed.gradient_clipping >= 0, "deepspeed.gradient_clipping must be >= 0 (0: off)"),
            (self.run.log_every >= 1, f"run.log_every={self.run.log_every} must be >= 1"),
            (self.run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0 (0: only on signals and at the end)"),
            (self.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1"),
            (self.run.max_nan_steps >= 1, f"run.max_nan_steps={self.run.max_nan_steps} must be >= 1"),
            (min(self.objectives.mlm_weight, self.objectives.contrastive_weight, self.objectives.label_weight,
                 self.objectives.mvc_weight) >= 0,
             "objectives.*_weight must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        try:
            self.input_masking()
        except ValueError as err:
            raise ValueError(f"data.mask_*: {err}") from None
        if not all(isinstance(c, str) for c in self.objectives.labels.values()):
            raise ValueError(f"objectives.labels={self.objectives.labels}: map each objective name to a label column "
                             "name, e.g. {tumor_normal: tumor_normal}")
        if len(self.data.downsample_beta) != 2:
            raise ValueError(f"data.downsample_beta={self.data.downsample_beta}: give the Beta's two shapes, e.g. [2, 2]")
        try:
            self.input_downsampling()
        except ValueError as err:
            raise ValueError(f"data.downsample_*: {err}") from None
        if self.data.downsample_prob > 0 and self.data.normalization != "continuous":
            raise ValueError(f"data.downsample_prob={self.data.downsample_prob} predicts original continuous values: "
                             "set data.normalization=continuous (or data.downsample_prob=0)")
        if self.data.mask_zero_prob > 0 and (self.model.architecture != "encoder_decoder"
                                             or self.data.normalization != "continuous"):
            raise ValueError(f"data.mask_zero_prob={self.data.mask_zero_prob} masks unexpressed genes as extra tokens "
                             "of target 0, which only the encoder-decoder predicts without reading their input (its "
                             "decoder runs every gene; an encoder would see them, and gene_set=all would read their "
                             "zero input): set model.architecture=encoder_decoder with data.normalization=continuous "
                             "(preset scfoundation), or data.mask_zero_prob=0")
        if self.objectives.mvc_weight > 0 and not self.model.mvc_head:
            raise ValueError(f"objectives.mvc_weight={self.objectives.mvc_weight} trains the MVC / GEPC head: set "
                             "model.mvc_head=true (or objectives.mvc_weight=0)")
        if self.model.pooling == "cls" and not self.cell_embedding_trained:
            logging.getLogger(__name__).warning(
                "model.pooling=cls: no loss reads the <cls> output (objectives.contrastive_weight, label_weight and "
                "mvc_weight are 0), so the cell embedding an export gives stays untrained; set model.pooling=mean (the "
                "gene tokens' mean, which masked modelling trains) or turn on a loss on the cell embedding")
        self.model.check_choices()  # the rest of the model waits for the corpus (vocabulary, label columns)
        return self

    @property
    def cell_embedding_trained(self) -> bool:
        """Whether a loss reads the pooled cell embedding (contrastive, labels, MVC / GEPC)."""
        o = self.objectives
        return o.contrastive_weight > 0 or o.label_weight > 0 or o.mvc_weight > 0


# --- resuming with a changed config --------------------------------------------------------------

_WHY = {FIXED: "the checkpoint was trained with it", RESTORED: "the checkpoint's optimizer state holds its own "
        "value, which DeepSpeed would restore in place of yours"}


def resume_changes(saved: dict, config: TrainConfig | FinetuneConfig) -> tuple[list[str], list[str]]:
    """The keys whose value in ``config`` (a `TrainConfig` or a `FinetuneConfig`) differs from
    ``saved`` (the resolved config a checkpoint was trained with, as JSON): (refused, applied), one
    line each, by each field's ``resume`` class. Keys ``saved`` lacks (checkpoints from before the
    key existed) are compared as the field's ``before`` value where it has one, else not at all."""
    import json

    refused, applied = [], []

    def walk(cls, old: dict, new: dict, where: str) -> None:
        for f in fields(cls):
            if f.name not in old and "before" not in f.metadata:
                continue
            value = old.get(f.name, f.metadata.get("before"))
            nested = _NESTED.get(f.type)
            if nested:
                walk(nested, value or {}, new[f.name], f"{where}{f.name}.")
                continue
            if value == new[f.name]:
                continue
            policy = f.metadata.get("resume", FIXED)
            line = f"{where}{f.name}: {value!r} in the checkpoint, {new[f.name]!r} now"
            if policy == FREE:
                applied.append(line)
            else:
                refused.append(f"{line} ({_WHY[policy]})")

    walk(type(config), saved, json.loads(json.dumps(asdict(config))), "")
    return refused, applied


# --- YAML files and key.sub=value overrides ------------------------------------------------------

def _coerce(value, annotation: str, where: str):
    """``value`` checked against a field's annotation (a string: this module uses postponed
    annotations), converting YAML's ints to floats where a float is asked for."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} cannot be null")
    base = annotation.replace(" | None", "").strip()
    if base == "float" and not isinstance(value, bool):
        try:  # YAML reads 1e-3 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r} should be a number") from None
    expected = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}.get(base)
    if base.startswith("list"):
        expected = list
    if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        raise ValueError(f"{where}={value!r} should be {base}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """A config dataclass from nested dicts; unknown keys are errors that list the known ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} should be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                         f"{where.rstrip('.') or 'the top level'} has: {', '.join(known)}")
    values = {}
    for name, value in data.items():
        f = known[name]
        nested = _NESTED.get(f.type)
        values[name] = (from_dict(nested, value, f"{where}{name}.") if nested else
                        _coerce(value, str(f.type), where + name))
    return cls(**values)


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ValueError(f"override {dotted}: {key} is not a section")
    tree[keys[-1]] = value


def merge_nested(base: dict, top: dict) -> dict:
    """``base`` with ``top`` merged in, nested dicts key by key (a YAML file's or an override's one
    key of a section keeps the section's others)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge_nested(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults < preset < YAML file < ``key.sub=value`` overrides (values parsed as YAML)."""
    import yaml

    raw: dict = {}
    if path:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config file is a YAML mapping of sections (data:, model:, ...)")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: write key.sub=value (e.g. schedule.max_steps=200)")
        _set(raw, key.strip(), yaml.safe_load(text) if text.strip() else None)
    base: dict = {}
    if raw.get("preset"):
        chosen = preset(raw["preset"])
        base = {"model": asdict(chosen.model),
                "data": {"normalization": chosen.normalization, "max_genes": chosen.max_genes, **chosen.data},
                "objectives": dict(chosen.objectives)}
    return from_dict(TrainConfig, merge_nested(base, raw)).validate()


_NESTED = {"DecoderConfig": DecoderConfig, "DataConfig": DataConfig, "ModelConfig": ModelConfig,
           "ObjectiveConfig": ObjectiveConfig, "OptimizerConfig": OptimizerConfig, "ScheduleConfig": ScheduleConfig,
           "DeepSpeedConfig": DeepSpeedConfig, "RunConfig": RunConfig}


FINETUNE_MODES = ("head", "full")


@dataclass
class FinetuneConfig:
    """Fine-tuning a bundle for cell-type annotation (`launch/finetune.py`): a classification head
    on the cell embedding. ``resume=`` says what a rerun into the same output folder may change."""

    label_column: str = _help("obs column holding the cell labels (cells with an empty or missing label are left out)",
                              "cell_type")
    mode: str = _help("head: the encoder frozen, only the head trains (embeddings computed once); full: every weight, "
                      "the encoder at lr x encoder_lr_scale", "head")
    epochs: int = _help("most epochs (a rerun with more continues the run)", 30, resume=FREE)
    patience: int = _help("stop after this many epochs without a better validation macro-F1 (0: never)", 5,
                          resume=FREE)
    batch_size: int = _help("cells per optimizer step", 32)
    lr: float = _help("AdamW learning rate of the head", 1e-3)
    encoder_lr_scale: float = _help("mode full: the encoder's learning rate as a fraction of lr", 0.1)
    weight_decay: float = _help("AdamW weight decay", 0.01)
    hidden: list[int] = _help("the head's hidden widths (scBERT's fine-tuning head: 512, 128), each Linear -> ReLU "
                              "-> Dropout", factory=lambda: [512, 128])
    dropout: float = _help("dropout after each hidden layer of the head", 0.1)
    class_weights: bool = _help("weight the cross-entropy by inverse class frequency (imbalanced cell types)", True)
    standardize: bool = _help("scale each feature of the cell embedding by the training cells' mean and sd before "
                              "the head (computed once at the start, with the encoder as loaded; kept in the head)",
                              True, before=False)  # heads fine-tuned before the key were unscaled
    val_fraction: float = _help("without a validation file: the share of labelled cells held out, stratified by label",
                                0.1)
    min_class_cells: int = _help("leave out labels with fewer labelled cells than this, counted before the "
                                 "validation split (0: keep all; a stratified split needs 2)", 0)
    threshold: float = _help("predictions with a lower top probability are 'unassigned' (scBERT's novel types); "
                             "written to labels.json as predict's default", 0.5, resume=FREE)
    seed: int = _help("head initialization, split, shuffling and dropout seed", 0)
    token_budget: int = _help("tokens per batch when embedding cells (counted as in training)", 16384)
    layer: str | None = _help("take the counts from this layer instead of X", None)
    gene_column: str | None = _help("var column holding the genes' Ensembl ids or symbols (detected if omitted)", None)
    symbol_table: str | None = _help("symbol -> Ensembl table (CSV/TSV[.gz] or pickled dict) for symbols the "
                                     "vocabulary lacks", None)
    min_coverage: float = _help("refuse inputs with a smaller share of their counts on vocabulary genes", 0.5)
    deepspeed: DeepSpeedConfig = _help("under a launcher (`deepspeed` / `torchrun`): the DeepSpeed engine, keys as in "
                                       "pretraining; gradient_clipping applies to single-process runs too",
                                       factory=lambda: DeepSpeedConfig(gradient_clipping=0.0))

    def validate(self) -> FinetuneConfig:
        if self.mode not in FINETUNE_MODES:
            raise ValueError(f"--mode {self.mode}: choose one of {', '.join(FINETUNE_MODES)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction {self.val_fraction}: a share strictly between 0 and 1 (e.g. 0.1)")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"--threshold {self.threshold}: a probability in [0, 1] (0: never unassigned)")
        if self.batch_size < 1 or self.epochs < 0 or self.patience < 0:
            raise ValueError("--batch-size must be >= 1, --epochs and --patience >= 0")
        ds = self.deepspeed
        if ds.zero_stage not in (0, 1, 2):
            # the best epoch's weights are kept as a copy of the module's parameters, which ZeRO-3 partitions
            raise ValueError(f"--deepspeed.zero_stage {ds.zero_stage}: fine-tuning runs ZeRO stages 0-2 (the head and "
                             "a cell encoder fit on one device); pass --deepspeed.zero_stage 2")
        if ds.chunks_per_step != 1:
            raise ValueError(f"--deepspeed.chunks_per_step {ds.chunks_per_step}: fine-tuning takes one batch per "
                             "optimizer step; set the global batch with --batch-size (it is split over the ranks)")
        if ds.gradient_clipping < 0:
            raise ValueError("--deepspeed.gradient_clipping must be >= 0 (0: off)")
        return self

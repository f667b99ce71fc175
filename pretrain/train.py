"""The training loop: `train(config)` is what `launch/pretrain.py` runs, on one process or many.

Read `train` and `_run` top to bottom: build the loader and the model from the config, wrap them in a
DeepSpeed engine, resume if asked, then per optimizer step take ``chunks_per_step`` loader
batches, agree on their counts (and a stop vote) over ranks, run `train_step` (masked expression +
labels + gradient-cached contrastive), log it (`pretrain.metrics.StepLog`: the device is read on
log steps only) and maybe checkpoint (`pretrain.checkpoint.Checkpointer`: every N steps, on
SIGTERM/SIGINT and at the end).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
from contextlib import ExitStack
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from data_pipeline.conversion.fsio import OutputLock
from data_pipeline.corpus import Corpus, CorpusError
from data_pipeline.loading.epoch_plan import Batching
from data_pipeline.loading.loader import CellLoader
from data_pipeline.loading.masking import Views
from data_pipeline.remote import is_url

from . import checkpoint
from .checkpoint import Checkpointer
from .config import TrainConfig
from .distributed import deepspeed_engine, init_distributed
from .metrics import RunLog, StepLog, device_peak_tflops, history_tail, skip_streak
from .model import CellModel, sequences_flops
from .model.attention import require_attention_device
from .objectives import PretrainModule, StepCounts, step_seed, train_step

logger = logging.getLogger(__name__)

VALUE_MODE_OF = {"log1p_bins": "bins", "log2_floor_bins": "bins", "quantile_bins": "bins", "rank": "rank", "continuous": "continuous",
                 "raw": "continuous"}


class SetupError(ValueError):
    """The config refused against the device and the corpus, before the run folder exists."""


def open_corpus(config: TrainConfig) -> Corpus:
    """The corpus ``data.corpus`` names; a path that is not a finished corpus fails here, before
    any run folder exists."""
    d = config.data
    if not d.corpus:
        raise ValueError("data.corpus is not set: pass data.corpus=PATH (a folder made by "
                         "`python -m data_pipeline convert`)")
    # a URL's own errors (nothing there, server down) are clearer: Corpus raises them
    if not is_url(d.corpus) and not Corpus.is_finished(d.corpus):
        raise ValueError(f"data.corpus={d.corpus}: no manifest.json there, so not a finished corpus: pass "
                         "data.corpus=PATH of a folder made by `python -m data_pipeline convert`")
    return Corpus(d.corpus, d.cache_dir or None, d.cache_limit_gb)


def build_loader(config: TrainConfig, device: torch.device, corpus: Corpus | None = None) -> CellLoader:
    """The training loader over ``corpus`` (default: `open_corpus`)."""
    d = config.data
    corpus = corpus or open_corpus(config)
    normalization = config.input_normalization()
    model = resolve_model_config(config, corpus).model  # what a cell costs depends on the vocabulary's size
    return CellLoader(corpus, normalization=normalization,
                      batching=Batching(d.token_budget, d.megabatch_cells, d.max_batch_cells),
                      masking=config.input_masking(), views=Views(d.gene_dropout, d.min_depth) if d.views else None,
                      label_columns=config.label_column_indices([c.name for c in corpus.label_columns]),
                      seed=d.seed, num_workers=d.num_workers, pin_memory=device.type == "cuda",
                      token_cost=model.token_cost(normalization.max_genes, views=2 if d.views else 1),
                      downsampling=config.input_downsampling())


def resolve_model_config(config: TrainConfig, corpus: Corpus) -> TrainConfig:
    """The model fields the corpus decides (vocabulary, label classes), checked against the data."""
    special = corpus.special_tokens
    model = replace(config.model, vocab_size=corpus.vocab_size, pad_token=special["<pad>"],
                    cls_token=special["<cls>"], mask_token=special["<mask>"])
    chosen = config.label_column_indices([c.name for c in corpus.label_columns])
    label_classes = [corpus.label_classes[i] for i in chosen]
    if not model.label_classes:
        model = replace(model, label_classes=label_classes)
    elif len(model.label_classes) != len(label_classes):
        raise ValueError(f"model.label_classes={model.label_classes} but the corpus has "
                         f"{len(label_classes)} label columns to train; leave it empty to take them from the corpus")
    wanted = VALUE_MODE_OF[config.data.normalization]
    if model.value_mode != wanted:
        raise ValueError(f"data.normalization={config.data.normalization} gives {wanted} values but "
                         f"model.value_mode={model.value_mode}; set model.value_mode={wanted}")
    if wanted == "rank" and (config.data.max_genes is None or config.data.max_genes > model.max_rank):
        raise ValueError(f"rank mode embeds positions up to model.max_rank={model.max_rank}: set "
                         f"data.max_genes (now {config.data.max_genes}) to at most that")
    if config.objectives.contrastive_weight > 0 and not config.data.views:
        raise ValueError("objectives.contrastive_weight > 0 needs two views per cell: set data.views=true")
    return replace(config, model=model.validate())


def warn_unused_objectives(config: TrainConfig, corpus: Corpus) -> None:
    """Said once, at start: an objective with a weight that the corpus gives nothing to train on."""
    weight = config.objectives.label_weight
    if weight > 0 and not corpus.label_columns:
        logger.warning(f"objectives.label_weight={weight} but the corpus {config.data.corpus} has no label "
                       "columns, so the label loss is 0 and trains nothing: set objectives.label_weight=0 (or "
                       "convert the corpus with --label-columns COLUMN)")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # an import hook refusing it; a module set to None
        return False


def lr_factor(schedule, step: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return 1.0
    span = max(1, schedule.max_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    floor = schedule.min_lr_ratio
    if schedule.decay == "linear":
        return floor + (1 - floor) * (1 - progress)
    if schedule.decay == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.decay={schedule.decay!r}: choose cosine, linear or constant")


def build_engine(config: TrainConfig, module: PretrainModule, device: torch.device):
    o, ds = config.optimizer, config.deepspeed
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config.schedule, s))
    micro_steps = 1 if config.objectives.joins_chunks else ds.chunks_per_step
    return deepspeed_engine(module, optimizer, ds, device, micro_steps, scheduler)


def _batches(loader: CellLoader):
    while True:
        yield from loader


def train(config: TrainConfig, resume: str | None = None, restart_epoch: bool = False) -> dict:
    """Train as ``config`` says; ``resume``: "auto" (the latest complete checkpoint of the run
    directory, if any), a checkpoint folder, or None; ``restart_epoch``: a resumed loader position
    of another layout (world size, workers, token cost), or saved before loader state version 2,
    starts its epoch over instead of being refused. Returns the run summary (rank 0).

    What the config and the corpus decide is checked before the run folder exists. A run that
    raises later ends its MLflow run FAILED, and a run folder this call made that holds nothing
    durable is cleared (`_clear_failed_start`). Rank 0 holds the run folder's lock (`OutputLock`)
    for the whole run: a second run on the same ``run.out`` (a job submitted twice, a restart
    while the first still runs) is refused with `FolderBusy` naming the holder, before it writes
    anything; two trainers in one folder overwrite each other's checkpoints and metrics."""
    rank, world, device = init_distributed()
    try:
        require_attention_device(config.model, device)  # before any run folder, engine or MLflow run exists
        if config.run.mlflow and not _importable("mlflow"):
            raise ValueError("run.mlflow=true but mlflow is not installed here: pip install mlflow, or set "
                             "run.mlflow=false (metrics.json and the loss plot are written either way)")
        corpus = open_corpus(config)  # a wrong data.corpus fails here, also before the run folder
        loader = build_loader(config, device, corpus)
        config = resolve_model_config(config, corpus)
    except CorpusError:  # the corpus's own error, as the loader and the corpus raise it
        raise
    except ValueError as err:  # the config against this device and corpus: nothing was written
        raise SetupError(str(err)) from None
    if rank == 0:
        warn_unused_objectives(config, corpus)
    run_dir = Path(config.run.out)
    made_here = not run_dir.exists()  # a folder that held anything before (a previous run's) is never removed
    log = None
    with ExitStack() as held:
        if rank == 0:
            held.enter_context(OutputLock(run_dir))  # makes the folder
            log = RunLog(run_dir, config.run.experiment, config.run.mlflow)
        try:
            return _run(config, resume, loader, log, run_dir, rank, world, device, restart_epoch)
        except BaseException:
            if log is not None:
                log.fail()
                if made_here:
                    held.close()  # the lock file goes with the rest
                    _clear_failed_start(run_dir, log)
            raise


def _run(config: TrainConfig, resume: str | None, loader: CellLoader, log: RunLog | None, run_dir: Path,
         rank: int, world: int, device: torch.device, restart_epoch: bool = False) -> dict:
    """`train` once the run folder exists: the engine, the resume, the steps, the summary."""
    record = checkpoint_record(config, loader.corpus)
    found = Checkpointer.resume_point(run_dir, resume, config, record, rank)
    vocab = loader.corpus.vocab
    model = CellModel.initial(config.model, config.run.seed, vocab=(vocab.ensembl_ids, vocab.symbols))
    engine, bf16 = build_engine(config, PretrainModule(model, config.objectives), device)
    checkpointer = Checkpointer(engine, loader, run_dir, config.run, record)
    step, history, skipped = checkpointer.load(found, restart_epoch)
    if rank == 0:  # after the resume point and the loader's position are accepted: a refused resume changes nothing
        (run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    if found is not None:
        # the restored optimizer holds the saved schedule's rate for this step; the schedule may have
        # changed since (schedule.max_steps may change on resume): this step trains at this run's rate.
        # The schedule counts applied updates (DeepSpeed does not step it on a skipped one): its own
        # restored position, not the step number
        sched = engine.lr_scheduler
        for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
            group["lr"] = base * lr_factor(config.schedule, sched.last_epoch)
    resumed_from_step = step
    if log is not None:
        log.start(asdict(config), history, resumed=found is not None)
    peak_tflops, peak_source = device_peak_tflops(device, config.run.peak_tflops, bf16)
    steps = StepLog(config, world, device, peak_tflops, log, step, skipped, skip_streak(history))
    batches, stop = _batches(loader), False
    flops = partial(sequences_flops, model.config)
    try:
        while step < config.schedule.max_steps and not stop:
            chunks = [next(batches) for _ in range(config.deepspeed.chunks_per_step)]
            counts, stop = checkpointer.agree(StepCounts.of(chunks, flops))  # host numbers of the CPU batches
            chunks = [c.to(device) for c in chunks]
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside the step)
            seed = step_seed(config.run.seed, step)
            result = train_step(engine, chunks, config.objectives, step_seed=seed, counts=counts,
                                redraw_seed=seed if model.redraws_after(step) else None,
                                poison=step + 1 in config.run.inject_nan_steps)
            step += 1
            steps.step(step, result, counts, lr, engine.get_global_grad_norm(), engine.was_step_applied())
            checkpointer.maybe_save(step, stop, steps)
        checkpointer.finish(step, steps)
    except BaseException:
        steps.read_what_is_left()  # the steps taken stay in metrics.json
        raise
    finally:
        steps.close()
        checkpointer.stop.restore()
    summary = {"steps": step, "resumed_from_step": resumed_from_step,
               "resumed_from": str(found) if found is not None else None, "stopped_by_signal": stop,
               "skipped_steps": steps.skipped,
               "final": history_tail(log.history) if log else {}, "bf16": bf16, "world_size": world,
               "device": str(device), "peak_tflops": peak_tflops, "peak_source": peak_source,
               "run_dir": str(run_dir), "mlflow_tracking_uri": getattr(log, "tracking_uri", None)}
    if log is not None:
        log.finish(summary)
    dist.barrier()
    return summary


def checkpoint_record(config: TrainConfig, corpus: Corpus) -> dict:
    """What a checkpoint's marker records for a resume to check: the resolved config (JSON) and the
    corpus's identity (its conversion plan and vocabulary; the folder may move)."""
    return {"config": json.loads(json.dumps(asdict(config))),
            "corpus": {"plan_hash": corpus.plan_hash, "vocab_sha256": corpus.vocab_sha256}}


def _clear_failed_start(run_dir: Path, log: RunLog) -> None:
    """A start that failed in a run folder this invocation made: unless it wrote something durable (a
    complete checkpoint, or steps in metrics.json), remove what it wrote, so that no half-made run is
    left for a later `--resume auto` or a reader of the folder. A local MLflow store stays: it holds
    the FAILED run, the record of what was tried (with its params)."""
    if log.took_steps or checkpoint.complete_checkpoints(run_dir):
        return
    keep = {"mlflow.db", "mlflow-artifacts"} if log.local_store else set()
    for path in run_dir.iterdir():
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()

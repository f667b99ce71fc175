"""The training loop: `train(config)` is what `launch/pretrain.py` runs, on one process or many.

Read `train` and `_run` top to bottom: build the loader and the model from the config, wrap them in a
DeepSpeed engine, resume if asked, then per optimizer step take ``chunks_per_step`` loader
batches, run `train_step` (masked expression + labels + gradient-cached contrastive), record
metrics, and checkpoint every N steps, on SIGTERM/SIGINT and at the end.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from data_pipeline.corpus import Corpus
from data_pipeline.loading.epoch_plan import Batching
from data_pipeline.loading.loader import CellLoader
from data_pipeline.loading.masking import Views

from . import checkpoint
from .config import TrainConfig, resume_changes
from .distributed import init_distributed
from .metrics import RunLog, device_peak_tflops
from .model import CellModel, model_cost
from .model.attention import require_attention_device
from .objectives import PretrainModule, train_step

logger = logging.getLogger(__name__)

VALUE_MODE_OF = {"log1p_bins": "bins", "log2_floor_bins": "bins", "quantile_bins": "bins", "rank": "rank", "continuous": "continuous"}


def open_corpus(config: TrainConfig) -> Corpus:
    """The corpus ``data.corpus`` names; a path that is not a finished corpus fails here, before
    any run folder exists."""
    d = config.data
    if not d.corpus:
        raise ValueError("data.corpus is not set: pass data.corpus=PATH (a folder made by "
                         "`python -m data_pipeline convert`)")
    if not Corpus.is_finished(d.corpus):
        raise ValueError(f"data.corpus={d.corpus}: no manifest.json there, so not a finished corpus: pass "
                         "data.corpus=PATH of a folder made by `python -m data_pipeline convert`")
    return Corpus(d.corpus)


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
    import deepspeed

    o, ds = config.optimizer, config.deepspeed
    bf16 = ds.bf16 if ds.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config.schedule, s))
    if ds.zero_stage == 0 and not bf16:
        raise ValueError("deepspeed.zero_stage=0 in fp32 applies updates whose gradients are NaN (DeepSpeed skips "
                         "them only with ZeRO 1-3 or bf16): use deepspeed.zero_stage=1 or more")
    micro_steps = ds.chunks_per_step if config.objectives.gradient_cache else 1
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": micro_steps,
                 "zero_optimization": {"stage": ds.zero_stage}, "bf16": {"enabled": bool(bf16)},
                 "gradient_clipping": ds.gradient_clipping, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**12, "wall_clock_breakdown": False, **ds.overrides}
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, bool(bf16)


class StopSignal:
    """SIGTERM / SIGINT (cluster preemption, Ctrl-C) ask for a checkpoint and a clean exit at the
    end of the current step, agreed by all ranks."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def _batches(loader: CellLoader):
    while True:
        yield from loader


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def train(config: TrainConfig, resume: str | None = None) -> dict:
    """Train as ``config`` says; ``resume``: "auto" (the latest complete checkpoint of the run
    directory, if any), a checkpoint folder, or None. Returns the run summary (rank 0).

    What the config and the corpus decide is checked before the run folder exists. A run that
    raises later ends its MLflow run FAILED, and a run folder this call made that holds nothing
    durable is cleared (`_clear_failed_start`)."""
    rank, world, device = init_distributed()
    require_attention_device(config.model, device)  # before any run folder, engine or MLflow run exists
    corpus = open_corpus(config)  # a wrong data.corpus fails here, also before the run folder
    loader = build_loader(config, device, corpus)
    config = resolve_model_config(config, corpus)
    if rank == 0:
        warn_unused_objectives(config, corpus)
    run_dir = Path(config.run.out)
    made_here = not run_dir.exists()  # a folder that held anything before (a previous run's) is never removed
    log = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = RunLog(run_dir, config.run.experiment, config.run.mlflow)
    try:
        return _run(config, resume, loader, log, run_dir, rank, world, device)
    except BaseException:
        if log is not None:
            log.fail()
            if made_here:
                _clear_failed_start(run_dir, log)
        raise


def _run(config: TrainConfig, resume: str | None, loader: CellLoader, log: RunLog | None, run_dir: Path,
         rank: int, world: int, device: torch.device) -> dict:
    """`train` once the run folder exists: the engine, the resume, the steps, the summary."""
    record = checkpoint_record(config, loader.corpus)
    found = _resume_point(run_dir, resume, config, record, rank)  # before config.yaml: a refused resume changes nothing
    if rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    vocab = loader.corpus.vocab
    model = CellModel.initial(config.model, config.run.seed, vocab=(vocab.ensembl_ids, vocab.symbols))
    module = PretrainModule(model, config.objectives)
    engine, bf16 = build_engine(config, module, device)

    step, history, skipped = 0, [], 0
    if found is not None:
        state = checkpoint.load(engine, found)
        step, history, skipped = state["step"], state["history"], state["skipped"]
        loader.load_state_dict(state["loader"])
        if rank == 0:
            print(f"resumed from {found} (step {step})", file=sys.stderr, flush=True)
    resumed_from_step = step
    if log is not None:
        log.start(asdict(config), history, resumed=found is not None)
    peak_tflops, peak_source = device_peak_tflops(device, config.run.peak_tflops)
    stop = StopSignal()
    progress = None
    if rank == 0 and config.run.progress:
        from tqdm import tqdm

        progress = tqdm(total=config.schedule.max_steps, initial=step, desc="pretrain", unit="step")

    def save() -> None:
        # "skipped_steps" is DeepSpeed's own key in a checkpoint's client state
        state = {"step": step, "loader": loader.state_dict(), "history": log.history if log else [],
                 "skipped": skipped}
        checkpoint.save(engine, run_dir, step, state, config.run.keep_checkpoints, record)

    batches = _batches(loader)
    nan_streak, interval, last_saved, stopped = 0, config.model.favor_redraw_interval, step, False
    redraw = config.model.attention == "favor" or (config.model.architecture == "encoder_decoder"
                                                   and config.model.decoder.attention == "favor")
    while step < config.schedule.max_steps:
        chunks = [next(batches).to(device) for _ in range(config.deepspeed.chunks_per_step)]
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside the step)
        started = time.perf_counter()
        redraw_seed = config.run.seed * 1_000_003 + step if redraw and interval and (step + 1) % interval == 0 else None
        result = train_step(engine, chunks, config.objectives, step_seed=config.run.seed * 1_000_003 + step,
                            redraw_seed=redraw_seed, poison=step + 1 in config.run.inject_nan_steps)
        applied = engine.was_step_applied()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        step += 1
        slots = sum(c.n_seqs * c.max_seqlen for c in chunks)
        totals = torch.tensor([result.n_cells, result.n_seqs, result.n_tokens, slots, float(stop.requested)],
                              dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        cells, seqs, tokens, slots, stop_votes = totals.tolist()
        good = applied and math.isfinite(result.loss)  # DeepSpeed skips an update whose gradients are not finite
        nan_streak = 0 if good else nan_streak + 1
        skipped += 0 if good else 1
        # the model runs sequences (a cell's two views are two): FLOPs per sequence of its mean length
        flops = model_cost(config.model, tokens / max(seqs, 1)).flops_per_cell * seqs
        metrics = {"step": step, "loss": result.loss, "mlm": result.mlm, "contrastive": result.contrastive,
                   "label": result.label, "temperature": result.temperature,
                   "lr": lr, "grad_norm": _float(engine.get_global_grad_norm()),
                   "cells_per_s": cells / seconds, "tokens_per_s": tokens / seconds,
                   "tflops_per_device": flops / seconds / world / 1e12,
                   "mfu": flops / seconds / world / 1e12 / peak_tflops if peak_tflops else None,
                   "padding_waste": 1 - tokens / max(slots, 1), "peak_memory_bytes": _peak_memory(device),
                   "skipped_steps": skipped}
        if config.data.views:  # two sequences per cell: cells_per_s above counts each cell once
            metrics["sequences_per_s"] = seqs / seconds
        if log is not None:
            log.record(metrics, log=step % config.run.log_every == 0 or step == config.schedule.max_steps)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{result.loss:.4f}", cells_s=f"{cells / seconds:.0f}")
        if nan_streak >= config.run.max_nan_steps:
            last = checkpoint.latest_complete(run_dir)
            raise RuntimeError(f"{nan_streak} non-finite losses in a row (step {step}): lower optimizer.lr, "
                               "raise deepspeed.gradient_clipping or check the corpus; "
                               + (f"the last complete checkpoint is {last}" if last else "no checkpoint was saved"))
        if stop_votes > 0 or (config.run.checkpoint_every and step % config.run.checkpoint_every == 0):
            save()
            last_saved = step
        if stop_votes > 0:
            stopped = True
            break
    if last_saved != step:
        save()
    if progress is not None:
        progress.close()
    summary = {"steps": step, "resumed_from_step": resumed_from_step,
               "resumed_from": str(found) if found is not None else None, "stopped_by_signal": stopped,
               "skipped_steps": skipped,
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


def _resume_point(run_dir: Path, resume: str | None, config: TrainConfig, record: dict, rank: int) -> Path | None:
    """The checkpoint to resume from, intact and trained with a config this run may change into
    (`pretrain.config.resume_changes`; the changes applied are said). Rank 0 reads the checkpoints;
    every rank gets its answer, or raises its error."""
    answer: list = [None]
    if rank == 0:
        try:
            found = checkpoint.resume_point(run_dir, resume)
            if found is not None:
                _check_resumed_config(found, config, record)
            answer = [("ok", None if found is None else str(found))]
        except ValueError as err:
            answer = [("error", str(err))]
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise checkpoint.ResumeError(value)
    return None if value is None else Path(value)


def _check_resumed_config(found: Path, config: TrainConfig, record: dict) -> None:
    marker = checkpoint.read_marker(found)
    if "config" not in marker:
        logger.warning(f"{found} records no config (saved before configs were recorded): a changed key is not "
                       "detected; resume with the config that trained it")
        return
    refused, applied = resume_changes(marker["config"], config)
    corpus = marker.get("corpus")
    if corpus is not None and corpus != record["corpus"]:
        refused.insert(0, f"data.corpus: trained on the corpus with plan hash {corpus['plan_hash']}, now "
                          f"{config.data.corpus} with plan hash {record['corpus']['plan_hash']} "
                          "(the loader's position and the vocabulary are that corpus's)")
    if refused:
        raise checkpoint.ResumeError(f"--resume {found}: the config changes keys a resumed run cannot change: "
                         + "; ".join(refused) + f". Resume with the checkpoint's values (its config is in "
                         f"{found / checkpoint.MARKER}), or train a new run (another run.out, no --resume)")
    if applied:
        logger.warning(f"resuming {found} with changed keys, applied from its step on: " + "; ".join(applied))


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


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def history_tail(history: list[dict], n: int = 20) -> dict:
    """Mean of the last ``n`` steps' losses and throughput (skipped steps left out)."""
    tail = history[-n:]
    keys = ("loss", "mlm", "contrastive", "label", "cells_per_s", "sequences_per_s", "tokens_per_s", "mfu")
    out = {}
    for key in keys:
        values = [h[key] for h in tail if h.get(key) is not None and math.isfinite(h[key])]
        if values:
            out[key] = sum(values) / len(values)
    return out

"""One optimizer step of pretraining: masked expression + cell labels + divide-and-conquer
contrastive, under a DeepSpeed engine (ZeRO 1/2/3, bf16, any number of ranks).

A step takes a rank's ``chunks`` (PackedBatches; each is one DeepSpeed micro-step, so the
engine's ``gradient_accumulation_steps`` must equal ``len(chunks)``) and minimizes

    L = w_mlm * (sum of masked-position losses / masked positions of all ranks)
      + w_mvc * (sum of MVC / GEPC squared errors / masked positions of all ranks)
      + w_label * (sum of label losses / known labels of all ranks)
      + w_contrastive * InfoNCE over the two views of every cell of every rank,

so that how the batch is cut into chunks and ranks does not change L. With the gradient cache
(GradCache's recipe, made to fit ZeRO-2/3, where a parameter's gradient may be reduced once
per micro-step and a second backward through the same graph is refused):

1. every chunk is embedded without an autograd graph, its dropout seeded by (step seed, rank,
   chunk), so that it can be replayed;
2. the contrastive embeddings of all ranks are gathered; each rank computes the global InfoNCE
   and its gradient with respect to its own embeddings and to the temperature;
3. every chunk is run again with the same seed, and the micro-step's backward is of
   ``world_size * (mlm + label + w_contrastive * sum(embedding * cached gradient))`` (+ the
   temperature term once per rank), with ``scale_wrt_gas=False``: DeepSpeed averages gradients
   over ranks and would divide by the number of micro-steps, while L is a sum over both.

Peak memory is that of one chunk's graph plus the embeddings, whatever the batch. Without the
cache the step is one micro-step over all the rank's cells (GAS must be 1), the embeddings
gathered with a gradient path to the local ones; a step of one chunk takes that path too (a
cache would only add a forward pass). `full_batch_loss` computes L in one graph
(single process), the reference the tests compare the step's update with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data_pipeline.loading.batch import PackedBatch

from ..config import ObjectiveConfig
from ..distributed import host_all_reduce
from .losses import info_nce, info_nce_blocked, label_loss_sum, mlm_loss_sum, view_pairs
from .pretrain_module import PretrainModule


@dataclass
class StepCounts:
    """What normalizes a step's losses and measures its throughput, summed over ranks: host facts of
    the CPU-built batches, so that reading them costs no device sync (`of` before ``.to(device)``)."""
    masked: float     # masked positions (the MLM denominator)
    labels: float     # known labels (the label-loss denominator)
    cells: float      # distinct cells (a cell's two views are one cell)
    seqs: float       # sequences (views count separately: what the model ran)
    tokens: float     # gene tokens of the input (masked unexpressed genes, decoder targets only, left out)
    slots: float      # token slots a padded [B, longest input] layout of the input would have had
    flops: float = 0.0  # model training FLOPs of the sequences, each at its own length (0: not counted)

    @classmethod
    def of(cls, chunks: list[PackedBatch], cost: Callable[[torch.Tensor, torch.Tensor], float] | None = None) -> StepCounts:
        """This rank's counts (reads the chunks' masks and labels: cheap on CPU tensors, a device
        sync on device ones). ``cost(lengths [B], masked [B])``: the training FLOPs of sequences
        of those input lengths and masked genes (`pretrain.model.flops.sequences_flops`)."""
        inputs = [_input_lengths(c) for c in chunks]
        return cls(masked=float(sum(int(c.mlm_mask.sum()) for c in chunks)),
                   labels=float(sum(int((c.labels >= 0).sum()) for c in chunks)),
                   cells=float(sum(c.n_cells for c in chunks)), seqs=float(sum(c.n_seqs for c in chunks)),
                   tokens=float(sum(int(lengths.sum()) for lengths, _ in inputs)),
                   slots=float(sum(len(lengths) * int(lengths.max()) for lengths, _ in inputs if len(lengths))),
                   flops=float(sum(cost(*x) for x in inputs)) if cost is not None else 0.0)

    def as_list(self) -> list[float]:
        return [self.masked, self.labels, self.cells, self.seqs, self.tokens, self.slots, self.flops]


def _input_lengths(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence [B]: its input genes and the masked ones among them; masked unexpressed genes
    (decoder targets, not input: `PackedBatch.n_masked_zeros`) count in neither."""
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(batch.n_seqs, device=lengths.device), lengths)
    zero = batch.mlm_mask & (batch.values == 0) if batch.values.is_floating_point() else torch.zeros_like(batch.mlm_mask)
    per_seq = lambda where: torch.bincount(seq[where], minlength=batch.n_seqs)  # noqa: E731
    return lengths - per_seq(zero), per_seq(batch.mlm_mask & ~zero)


@dataclass
class StepResult:
    """0-d float64 tensors on the step's device, left there: reading one is a device sync, so the
    trainer reads them only on log steps (`pretrain.metrics.StepLog`), all pending steps at once."""
    loss: torch.Tensor         # L, the same on every rank
    mlm: torch.Tensor          # mean masked-expression loss over all ranks' masked positions
    label: torch.Tensor        # mean label loss over all ranks' known labels
    contrastive: torch.Tensor  # InfoNCE over the global batch
    temperature: torch.Tensor
    mvc: torch.Tensor          # mean MVC / GEPC squared error over all ranks' masked positions (0: off)

    KEYS = ("loss", "mlm", "label", "contrastive", "temperature", "mvc")

    def stacked(self) -> torch.Tensor:
        """[6] in `KEYS` order."""
        return torch.stack([getattr(self, k).reshape(()).double() for k in self.KEYS])

    def to_host(self) -> dict[str, float]:
        return dict(zip(self.KEYS, self.stacked().tolist()))


def step_seed(run_seed: int, step: int) -> int:
    """The seed of optimizer step ``step`` (0-based): its chunks' dropout (`chunk_seed`) and a FAVOR+
    redraw after it. The same on every rank."""
    return run_seed * 1_000_003 + step


def chunk_seed(step_seed: int, rank: int, chunk: int) -> int:
    """The dropout seed of one chunk's forward (its first pass and its replay)."""
    return (step_seed * 1_000_003 + rank * 10_007 + chunk) % (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Torch's CPU (and current CUDA device's) RNG set to ``seed`` inside; restored after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: torch.Tensor, device) -> torch.Tensor:
    """Sums over ranks of a small vector, left on ``device`` (a collective, no host read)."""
    t = values.to(device=device, dtype=torch.float64)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` [n_r, p] stacked in rank order, without a graph: (all [sum n_r, p],
    offset of this rank's rows). Ranks may hold different numbers of rows."""
    rank, world = _world()
    if world == 1:
        return x.detach(), 0
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros(max(sizes), *x.shape[1:])
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def global_info_nce(first: torch.Tensor, second: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE over every rank's cells; the gradient reaches this rank's ``first``/``second``
    [n, p] (and ``logit_scale``). Equal on all ranks."""
    both, offset = gather_rows(torch.cat([first, second], dim=1))  # one collective for both views
    all_first, all_second = both.split(first.shape[1], dim=1)
    n = first.shape[0]
    all_first = torch.cat([all_first[:offset], first, all_first[offset + n:]])
    all_second = torch.cat([all_second[:offset], second, all_second[offset + n:]])
    return info_nce_blocked(all_first, all_second, logit_scale)


def _pair_rows(chunks: list[PackedBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [view_pairs(c.view_index) for c in chunks]


def train_step(engine, chunks: list[PackedBatch], objectives: ObjectiveConfig, step_seed: int,
               redraw_seed: int | None = None, poison: bool = False, counts: StepCounts | None = None) -> StepResult:
    """One optimizer step over this rank's ``chunks`` (already on the engine's device).
    ``counts``: the step's `StepCounts` summed over ranks, taken on the host before the chunks went
    to the device (the trainer's way: the step then reads nothing back from the device); without
    them they are counted here, an all-reduce and a device sync before the first forward.
    ``redraw_seed``: redraw the FAVOR+ projections after the step (the same seed on every rank),
    never inside it, where a chunk's replay must see the projection of its first pass.
    A non-finite loss gives non-finite gradients, and DeepSpeed (ZeRO 1-3, or bf16) then skips the
    update (``engine.was_step_applied()``). ``poison``: make this step's loss NaN (fault injection,
    to test that path)."""
    module: PretrainModule = engine.module
    rank, world = _world()
    regress = module.model.config.mlm_regresses
    contrastive = objectives.contrastive_weight > 0
    if objectives.joins_chunks and len(chunks) > 1:
        chunks = [PackedBatch.concat(chunks)]  # one graph over the whole rank batch
    if engine.gradient_accumulation_steps() != len(chunks):
        raise ValueError(f"{len(chunks)} chunks per step but DeepSpeed gradient_accumulation_steps="
                         f"{engine.gradient_accumulation_steps()}: set it to the chunks per step "
                         "(1 where the contrastive loss runs without the gradient cache)")
    device = chunks[0].gene_ids.device
    if counts is None:  # a caller other than the trainer: count here (a device sync on device chunks)
        counts = StepCounts(*host_all_reduce(StepCounts.of(chunks).as_list()))
    n_masked, n_labels = counts.masked, counts.labels
    # sums over this rank's positions, normalized by all ranks' count; times world_size because
    # DeepSpeed averages the ranks' gradients
    w_mlm = objectives.mlm_weight * world / n_masked if n_masked else 0.0
    w_label = objectives.label_weight * world / n_labels if n_labels else 0.0
    w_mvc = objectives.mvc_weight * world / n_masked if n_masked else 0.0

    grads, scale_grad = None, None
    contrastive_value = torch.zeros((), dtype=torch.float64, device=device)
    pairs = _pair_rows(chunks) if contrastive else None
    if contrastive and len(chunks) > 1:  # one chunk: its graph is the whole batch's, a cache only costs a pass
        with torch.no_grad():
            embeddings, scale = [], None
            for j, chunk in enumerate(chunks):
                with seeded(chunk_seed(step_seed, rank, j)):  # the replay below draws the same dropout
                    out, scale = engine(chunk, contrastive_only=True)  # the other heads' outputs would be dropped
                embeddings.append(out.contrastive.float())
        first = torch.cat([e[a] for e, (a, _) in zip(embeddings, pairs)]).requires_grad_()
        second = torch.cat([e[b] for e, (_, b) in zip(embeddings, pairs)]).requires_grad_()
        scale = scale.detach().float().requires_grad_()
        loss_c = global_info_nce(first, second, scale)
        loss_c.backward()
        contrastive_value = loss_c.detach().double()
        # cached gradient of each chunk's embeddings, in its own row order
        grads, start = [], 0
        for e, (a, b) in zip(embeddings, pairs):
            g = torch.zeros_like(e)
            g[a], g[b] = first.grad[start : start + len(a)], second.grad[start : start + len(a)]
            grads.append(g)
            start += len(a)
        scale_grad = scale.grad

    sums = torch.zeros(4, dtype=torch.float64, device=device)  # mlm, label, logit scale, mvc: read once at the end
    for j, chunk in enumerate(chunks):
        with seeded(chunk_seed(step_seed, rank, j)):
            out, scale = engine(chunk)
        mlm_sum, _ = mlm_loss_sum(out.mlm, chunk, regress)
        label_sum, _ = label_loss_sum(out.labels, chunk.labels)
        mvc_sum = _mvc_loss_sum(out, chunk, objectives)
        loss = w_mlm * mlm_sum + w_label * label_sum + w_mvc * mvc_sum
        sums += torch.stack([mlm_sum.detach(), label_sum.detach(), scale.detach().float().squeeze() / world,
                             mvc_sum.detach().reshape(()).to(mlm_sum.dtype)]).double()
        if contrastive and grads is not None:
            surrogate = (out.contrastive.float() * grads[j]).sum()
            if j == 0:
                surrogate = surrogate + scale.float() * scale_grad / world
            loss = loss + objectives.contrastive_weight * world * surrogate
        elif contrastive:  # no cache: the loss itself, through a gather that reaches the local rows
            a, b = pairs[0]
            # every rank's loss reaches the temperature: 1/world of the gradient each, so that
            # DeepSpeed's average over ranks of world * loss gives it once
            shared_scale = scale / world + (scale - scale / world).detach()
            loss_c = global_info_nce(out.contrastive[a], out.contrastive[b], shared_scale)
            contrastive_value = loss_c.detach().double()
            loss = loss + objectives.contrastive_weight * world * loss_c
        if poison:
            loss = loss * float("nan")
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
    if redraw_seed is not None:
        module.model.redraw_projections(torch.Generator().manual_seed(redraw_seed))
    mlm_total, label_total, scale_sum, mvc_total = _all_reduce_sum(sums, device)
    temperature = len(chunks) / scale_sum  # every chunk and rank saw the same scale
    mlm_mean = mlm_total / n_masked if n_masked else torch.zeros_like(mlm_total)
    label_mean = label_total / n_labels if n_labels else torch.zeros_like(label_total)
    mvc_mean = mvc_total / n_masked if n_masked else torch.zeros_like(mvc_total)
    total = (objectives.mlm_weight * mlm_mean + objectives.label_weight * label_mean + objectives.mvc_weight * mvc_mean
             + objectives.contrastive_weight * contrastive_value) * (float("nan") if poison else 1.0)
    return StepResult(loss=total, mlm=mlm_mean, label=label_mean, contrastive=contrastive_value,
                      temperature=temperature, mvc=mvc_mean)


def _mvc_loss_sum(out, chunk: PackedBatch, objectives: ObjectiveConfig) -> torch.Tensor:
    """Sum of the MVC / GEPC squared errors over the chunk's masked positions (0 when off)."""
    if objectives.mvc_weight == 0:
        return out.mlm.new_zeros((), dtype=torch.float32)
    if out.mvc is None:
        raise ValueError(f"objectives.mvc_weight={objectives.mvc_weight} trains the MVC / GEPC head, which this model "
                         "lacks: set model.mvc_head=true (or objectives.mvc_weight=0)")
    return mlm_loss_sum(out.mvc, chunk, regress=True)[0]


def full_batch_loss(module: PretrainModule, rank_chunks: list[list[PackedBatch]], objectives: ObjectiveConfig,
                    step_seed: int) -> torch.Tensor:
    """L of `train_step` in one graph, in one process: ``rank_chunks[r]`` are rank r's chunks,
    each run with the dropout seed `train_step` gives it. The reference for the step's update."""
    regress = module.model.config.mlm_regresses
    mlm_sum = label_sum = mvc_sum = 0.0
    n_masked = n_labels = 0
    firsts, seconds, scale = [], [], None
    for rank, chunks in enumerate(rank_chunks):
        for j, chunk in enumerate(chunks):
            with seeded(chunk_seed(step_seed, rank, j)):
                out, scale = module(chunk)
            s, n = mlm_loss_sum(out.mlm, chunk, regress)
            mlm_sum, n_masked = mlm_sum + s, n_masked + n
            mvc_sum = mvc_sum + _mvc_loss_sum(out, chunk, objectives)
            s, n = label_loss_sum(out.labels, chunk.labels)
            label_sum, n_labels = label_sum + s, n_labels + n
            if objectives.contrastive_weight > 0:
                a, b = view_pairs(chunk.view_index)
                firsts.append(out.contrastive[a])
                seconds.append(out.contrastive[b])
    loss = (objectives.mlm_weight * mlm_sum / max(n_masked, 1) + objectives.label_weight * label_sum / max(n_labels, 1)
            + objectives.mvc_weight * mvc_sum / max(n_masked, 1))
    if objectives.contrastive_weight > 0:
        loss = loss + objectives.contrastive_weight * info_nce(torch.cat(firsts), torch.cat(seconds), scale)
    return loss

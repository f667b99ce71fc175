"""Attention over packed sequences, one interface for four backends.

Every backend takes q, k, v ``[T, H, D]`` of sequences concatenated without padding and
``cu_seqlens`` ``[B+1]`` (int32), and returns ``[T, H, D]``; attention never crosses a sequence.
The exact backends all use the softmax scale ``1/sqrt(D)``.

- ``favor``: Performer FAVOR+ (`kernels.favor`): the fused Triton kernel on CUDA tensors, the
  same definition in batched PyTorch ops elsewhere. Linear in the sequence length; approximates softmax
  attention (error falls as the feature count m grows).
- ``varlen``: torch's ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10): exact softmax with
  the FlashAttention kernels that ship inside torch, forward and backward, on the packed layout (no
  padding). CUDA tensors in bf16/fp16 only: fp32 or CPU tensors are refused with the fix (train with
  ``deepspeed.bf16=true``, run under ``torch.autocast("cuda", dtype=torch.bfloat16)``, or set
  ``model.attention=sdpa``). Head widths that are not a multiple of 8 are zero-padded for the kernel.
- ``flash``: flash-attn's ``flash_attn_varlen_func`` when flash-attn is importable (imported when
  first used); otherwise ``varlen``, said once per process in the log. Same math either way.
- ``sdpa``: torch ``scaled_dot_product_attention`` on a padded view with a key mask (exact
  softmax, any device and dtype; the reference of the other exact backends; the padding costs memory
  and time on mixed lengths).

scGPT's generative attention (``model.attention_mask=generative``: bowang-lab/scGPT's pretraining,
"gen" tokens whose values are unknown attend to the known "pcpt" tokens, ``<cls>`` and themselves
only; known tokens attend to known tokens only) is a per-pair mask. ``sdpa`` takes it as a mask
(``known`` [T] bool, `generative_mask`). The FlashAttention varlen kernels take only causal or full
masks, so ``varlen`` and ``flash`` compute it in two kernel calls (`generative_two_pass`): every
query over its sequence's known keys (the kernel's output and log-sum-exp), then each unknown
query's own key merged in by its softmax weight; exact, and cheaper than full attention (a share r
of unknown tokens costs 1 - r^2 of it). FAVOR+ never forms the pairs (its state sums all keys of a
sequence): a known-keys state plus each unknown query's own term could express it, which is not
implemented, so ``favor`` refuses it.

`reference_attention` is the plain per-sequence definition (float64-capable) the tests compare them
with. `require_attention_device` refuses, before a training run builds anything, a backend that
cannot run on the run's device.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.favor import favor_attention, favor_attention_batched
from kernels.packing import padding_index, sequence_ids

log = logging.getLogger(__name__)

CUDA_ONLY_BACKENDS = ("flash", "varlen")  # FlashAttention kernels: CUDA, bf16/fp16
MASKED_BACKENDS = ("sdpa", "varlen", "flash")  # the backends that take the generative attention mask


def favor(q, k, v, cu_seqlens, max_seqlen, projection):
    """FAVOR+ with ``projection`` ``[m, D]``.  -> [T, H, D]"""
    fn = favor_attention if q.is_cuda else favor_attention_batched
    return fn(q, k, v, projection, cu_seqlens, max_seqlen)


def _kernel_dtype(backend: str, q: torch.Tensor) -> torch.dtype:
    """The dtype the FlashAttention kernels run ``q`` in: its own in half precision; bf16 for fp32
    on CUDA (a bundle loaded in fp32 to embed, fine-tune or predict: attention in bf16, its output
    back in fp32, the rest of the model in fp32). They do not run off CUDA."""
    if not q.is_cuda:
        raise RuntimeError(
            f"attention backend {backend!r} runs FlashAttention kernels on CUDA only (got {q.dtype} on "
            f"{q.device}): run on a GPU, or set model.attention=sdpa (exact attention on any device)")
    return q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


_torch_varlen = None


def _load_torch_varlen():
    """torch's ``varlen_attn`` (imported once)."""
    global _torch_varlen
    if _torch_varlen is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError as err:
            raise RuntimeError(f"attention backend 'varlen' needs torch >= 2.10 (torch.nn.attention.varlen); this is "
                               f"torch {torch.__version__}: upgrade torch, or set model.attention=sdpa") from err
        _torch_varlen = varlen_attn
    return _torch_varlen


def _varlen_kernel(q, k, v, cu_q, cu_k, max_q: int, max_k: int, with_lse: bool = False):
    """torch's varlen_attn at the softmax scale 1/sqrt(D) of the true head width.
    q [Tq, H, D], k, v [Tk, H, D], cu_q, cu_k [B+1] int32 -> out [Tq, H, D] (``with_lse``: and the
    log-sum-exp of each query's scaled scores [H, Tq] float32, which carries no gradient)

    Called with the arguments every torch since 2.10 takes (q, k, v, cu_seq_q, cu_seq_k, max_q,
    max_k; the default scale 1/sqrt(D); ``return_aux`` for the log-sum-exp). A head width D that is
    not a multiple of 8 (the kernel's granularity) is zero-padded to D'; q is multiplied by
    sqrt(D'/D) so that the kernel's 1/sqrt(D') scale is 1/sqrt(D) of the true width; the padding
    columns of the output are dropped."""
    fn = _load_torch_varlen()
    width = q.shape[-1]
    padded = -(-width // 8) * 8
    if padded != width:
        extra = (0, padded - width)
        q = F.pad(q * math.sqrt(padded / width), extra)
        k, v = F.pad(k, extra), F.pad(v, extra)
    lse = None
    if with_lse:
        from torch.nn.attention.varlen import AuxRequest

        out, lse = fn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), return_aux=AuxRequest(lse=True))
    else:
        out = fn(q, k, v, cu_q, cu_k, int(max_q), int(max_k))
    if padded != width:
        out = out[..., :width]
    return (out, lse) if with_lse else out


def varlen(q, k, v, cu_seqlens, max_seqlen, projection=None, known=None):
    """Exact softmax attention with torch's FlashAttention varlen kernel (bf16/fp16 CUDA tensors).
    q, k, v [T, H, D], cu_seqlens [B+1] -> [T, H, D]; ``known`` ([T] bool or a `KnownSplit`):
    scGPT's generative mask, in two kernel calls (`generative_two_pass`)."""
    return _packed_exact("varlen", _varlen_kernel, q, k, v, cu_seqlens, max_seqlen, known)


def _packed_exact(backend: str, kernel, q, k, v, cu_seqlens, max_seqlen, known):
    """The FlashAttention-kernel backends' one path: ``kernel`` (`_varlen_kernel`'s signature) over
    the packed sequences, or `generative_two_pass` with ``known``.  -> [T, H, D]"""
    low = _kernel_dtype(backend, q)
    if q.dtype != low:
        return _packed_exact(backend, kernel, q.to(low), k.to(low), v.to(low), cu_seqlens, max_seqlen,
                             known).to(q.dtype)
    if q.shape[0] == 0:  # every token masked away: nothing to attend, keep the graph for the gradients
        return q * 0
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if known is not None:
        return generative_two_pass(kernel, q, k, v, cu, max_seqlen, KnownSplit.of(known, cu))
    return kernel(q, k, v, cu, cu, max_seqlen, max_seqlen)


_UNSET = object()
_flash_varlen = _UNSET  # flash-attn's varlen function, None when flash-attn is not importable


def _load_flash_attn():
    """flash-attn's ``flash_attn_varlen_func``, or None (then one log line says `varlen` runs instead)."""
    global _flash_varlen
    if _flash_varlen is _UNSET:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
            log.warning("flash-attn is not installed: attention backend 'flash' runs torch's varlen_attn "
                        "(model.attention=varlen: the same exact attention, FlashAttention kernels shipped in torch)")
        _flash_varlen = flash_attn_varlen_func
    return _flash_varlen


def _flash_attn_kernel(q, k, v, cu_q, cu_k, max_q: int, max_k: int, with_lse: bool = False):
    """flash-attn's varlen kernel with `_varlen_kernel`'s signature (flash-attn pads the head width
    itself, at the true width's scale; its log-sum-exp is [H, Tq] float32 too)."""
    fn = _load_flash_attn()
    if with_lse:
        out, lse, _ = fn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), dropout_p=0.0, causal=False,
                         return_attn_probs=True)
        return out, lse
    return fn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), dropout_p=0.0, causal=False)


def flash(q, k, v, cu_seqlens, max_seqlen, projection=None, known=None):
    """flash-attn's varlen kernel (fp16/bf16 CUDA tensors), or `varlen` without flash-attn; ``known``
    as in `varlen`.  -> [T, H, D]"""
    if _load_flash_attn() is None:
        return varlen(q, k, v, cu_seqlens, max_seqlen, known=known)
    return _packed_exact("flash", _flash_attn_kernel, q, k, v, cu_seqlens, max_seqlen, known)


class KnownSplit(NamedTuple):
    """A batch's tokens under scGPT's generative mask, split for the two-pass kernels (built once
    per forward: finding the rows waits for the device). ``known`` [T] bool; ``known_rows`` [K] and
    ``unknown_rows`` [U] int64; ``cu_known`` and ``cu_unknown`` [B+1] int32, their packed layouts;
    ``unknown_has_keys`` [U] bool, False where an unknown token's sequence has no known token."""

    known: torch.Tensor
    known_rows: torch.Tensor
    unknown_rows: torch.Tensor
    cu_known: torch.Tensor
    cu_unknown: torch.Tensor
    unknown_has_keys: torch.Tensor

    @classmethod
    def of(cls, known: torch.Tensor | KnownSplit, cu_seqlens: torch.Tensor) -> KnownSplit:
        """``known`` [T] bool, ``cu_seqlens`` [B+1] (a `KnownSplit` is returned as it is)."""
        if isinstance(known, KnownSplit):
            return known
        seq = sequence_ids(cu_seqlens, known.shape[0])
        b = cu_seqlens.shape[0] - 1

        def layout(rows):
            counts = torch.zeros(b, dtype=torch.int32, device=known.device).index_add_(
                0, seq[rows], torch.ones_like(rows, dtype=torch.int32))
            return counts, F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))

        known_rows, unknown_rows = known.nonzero().flatten(), (~known).nonzero().flatten()
        n_known, cu_known = layout(known_rows)
        return cls(known, known_rows, unknown_rows, cu_known, layout(unknown_rows)[1], n_known[seq[unknown_rows]] > 0)


def generative_two_pass(kernel, q, k, v, cu_seqlens, max_seqlen: int, split: KnownSplit) -> torch.Tensor:
    """scGPT's generative attention with a kernel that takes no per-pair mask; ``kernel`` has
    `_varlen_kernel`'s signature.  q, k, v [T, H, D], cu_seqlens [B+1] int32 -> [T, H, D]

    Pass 1: every query over the known keys of its sequence: the answer of the known queries, and
    for an unknown query i the known part (output o, log-sum-exp L). Query i also attends itself,
    with score s = q_i . k_i / sqrt(D): its answer is w o + (1 - w) v_i, w = sigmoid(L - s).
    The kernels give L no gradient, yet w needs it: dL/dq_i = E_i / sqrt(D) and
    dL/dk_j = p_ij q_i / sqrt(D), with E_i = sum_j p_ij k_j the mean known key. Pass 2 computes E for
    the unknown queries (q and k held constant, the known keys as the values), and L is given the
    term (q_i . E_i) / sqrt(D) whose value is cancelled and whose gradient is those two: through
    q_i with E_i constant, and through E_i's values (the kernel's backward sums over the queries)."""
    if split.known_rows.shape[0] == 0:  # no known token in the batch: each sees only itself (and the
        return v                          # kernels may refuse keys of zero rows)
    kk, vk = k[split.known_rows], v[split.known_rows]
    out, lse = kernel(q, kk, vk, cu_seqlens, split.cu_known, max_seqlen, max_seqlen, with_lse=True)
    rows = split.unknown_rows
    if rows.shape[0] == 0:
        return out
    scale = 1 / math.sqrt(q.shape[-1])
    qu = q[rows]
    mean_key = kernel(qu.detach(), kk.detach(), kk, split.cu_unknown, split.cu_known, max_seqlen, max_seqlen)
    wide = torch.promote_types(q.dtype, torch.float32)  # the kernels' log-sum-exp is float32
    qu_w, mean_w = qu.to(wide), mean_key.to(wide)
    linear = ((qu_w - qu_w.detach()) * mean_w.detach() + qu_w.detach() * (mean_w - mean_w.detach())).sum(-1)
    known_part = lse.transpose(0, 1)[rows].to(wide) + scale * linear  # [U, H]
    # a sequence without known tokens: flash kernels give no keys an infinite log-sum-exp
    known_part = torch.where(split.unknown_has_keys[:, None], known_part, float("-inf"))
    own = scale * (qu_w * k[rows].to(wide)).sum(-1)  # [U, H]
    weight = torch.sigmoid(known_part - own)[..., None]
    merged = weight * out[rows].to(wide) + (1 - weight) * v[rows].to(wide)
    return out.index_put((rows,), merged.to(out.dtype))


def generative_mask(known: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """scGPT's generative attention on the padded layout: query i may attend key j when j is a real
    token and j is known or j is i. A padding query attends itself (its output is dropped): a row
    with no key at all gives NaN in some CUDA kernels, and a NaN there reaches the real rows'
    gradients.  known, real [B, L] bool -> [B, 1, L, L] bool"""
    length = known.shape[1]
    self_pair = torch.eye(length, dtype=torch.bool, device=known.device)
    return (real & known)[:, None, None, :] | self_pair[None, None]


def sdpa(q, k, v, cu_seqlens, max_seqlen, projection=None, known=None):
    """Exact softmax attention on the padded layout ``[B, H, L, D]``; ``known`` [T] bool (or a
    `KnownSplit`): scGPT's generative mask (`generative_mask`) in place of the key mask.  -> [T, H, D]"""
    b = cu_seqlens.shape[0] - 1
    seq, pos = padding_index(cu_seqlens, q.shape[0])
    h = q.shape[1]

    def pad(x):
        out = x.new_zeros(b, max_seqlen, h, x.shape[-1])
        out[seq, pos] = x
        return out.transpose(1, 2)

    real = torch.zeros(b, max_seqlen, dtype=torch.bool, device=q.device)
    real[seq, pos] = True
    if known is None:
        mask = real[:, None, None, :]
    else:
        padded_known = torch.zeros_like(real)
        padded_known[seq, pos] = known.known if isinstance(known, KnownSplit) else known
        mask = generative_mask(padded_known, real)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)
    return out.transpose(1, 2)[seq, pos]


def reference_attention(q, k, v, cu_seqlens):
    """The definition, one sequence at a time: softmax(q k^T / sqrt(D)) v within each sequence.
    q, k, v [T, H, D] (any dtype; float64 for exactness), cu_seqlens [B+1] -> [T, H, D]"""
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
            weights = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
            out[start:end] = (weights @ vs).transpose(0, 1)
    return out


BACKENDS = {"favor": favor, "flash": flash, "sdpa": sdpa, "varlen": varlen}


def require_attention_device(config, device: torch.device | str) -> None:
    """Refuse, before a training run builds its engine or opens its MLflow run, an attention backend
    that cannot run on ``device`` (``config``: a `ModelConfig`; the decoder's backend counts for the
    encoder-decoder). ``flash`` and ``varlen`` need CUDA; ``varlen`` (also ``flash`` without
    flash-attn) needs torch >= 2.10."""
    device = torch.device(device)
    used = [("model.attention", config.attention)]
    if config.architecture == "encoder_decoder":
        used.append(("model.decoder.attention", config.decoder.attention))
    for key, backend in used:
        if backend not in CUDA_ONLY_BACKENDS:
            continue
        if device.type != "cuda":
            raise ValueError(f"{key}={backend} runs FlashAttention kernels on CUDA GPUs only, and this run is on "
                             f"{device} (torch sees no CUDA device): set {key}=sdpa (exact softmax attention, "
                             f"any device) or {key}=favor (FAVOR+)")
        if backend == "varlen" or _load_flash_attn() is None:
            _load_torch_varlen()

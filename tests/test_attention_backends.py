"""The exact attention backends over packed sequences: ``varlen`` (torch's FlashAttention varlen
kernel), ``flash`` (flash-attn, else ``varlen`` with one log line) and ``sdpa`` (padded, the CPU
path), against the plain per-sequence definition (`reference_attention`).

On CPU torch's varlen kernel does not run (it has no CPU implementation), so the CPU tests install a
fake ``varlen_attn`` that records its arguments and computes the definition: they check the call
(int32 ``cu_seqlens``, max lengths, the 7 arguments every torch since 2.10 takes, the head-width
padding and its scale), the packing conventions against ``sdpa``, the flash -> varlen fallback and
the refusals. The ``gpu`` tests run the real kernels in bf16 against float64.
"""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch

from pretrain.config import ATTENTION_BACKENDS, DecoderConfig
from pretrain.model import CellModel, attention
from pretrain.model.attention import reference_attention, require_attention_device, sdpa, varlen
from tests.model_helpers import generative_reference, one_thread, random_batch, seeded, small_config  # noqa: F401

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed(lengths, heads: int, width: int, dtype=torch.float64, device="cpu", seed: int = 0):
    """Random q, k, v [T, H, D] of sequences of ``lengths`` and their cu_seqlens [B+1] int32."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, heads, width, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
               for _ in range(3))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return q, k, v, cu.to(device)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def kernel_definition(q, k, v, cu_q, cu_k):
    """What the FlashAttention varlen kernels compute, by definition (scale 1/sqrt(D) of the width
    given): query sequence b over key sequence b.  -> (out [Tq, H, D], log-sum-exp [H, Tq] float32
    without gradient; a query with no keys gets output 0 and an infinite log-sum-exp, as flash does)"""
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32)
    for qa, qb, ka, kb in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        if qb > qa and kb > ka:
            scores = torch.einsum("ihd,jhd->hij", q[qa:qb], k[ka:kb]) / math.sqrt(q.shape[-1])
            out[qa:qb] = torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v[ka:kb])
            lse[:, qa:qb] = torch.logsumexp(scores.detach(), dim=-1).float()
    return out, lse


class FakeVarlen:
    """Stands in for ``torch.nn.attention.varlen.varlen_attn`` on CPU: records each call and computes
    the definition (`kernel_definition`), returning the log-sum-exp when ``return_aux`` asks."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        q, k, v, cu_q, cu_k, max_q, max_k = args
        # the kernel's contract (CUDA's, checked here too): int32 offsets on q's device, python int
        # maxima, one dtype, a head width the FlashAttention kernels take
        for cu in (cu_q, cu_k):
            assert cu.dtype == torch.int32 and cu.device == q.device and cu.is_contiguous() and cu.dim() == 1
        assert isinstance(max_q, int) and isinstance(max_k, int)
        assert q.dtype == k.dtype == v.dtype and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
        assert max_q >= int((cu_q[1:] - cu_q[:-1]).max()) and max_k >= int((cu_k[1:] - cu_k[:-1]).max())
        out, lse = kernel_definition(q, k, v, cu_q, cu_k)
        aux = kwargs.pop("return_aux", None)
        assert not kwargs
        return (out, lse) if aux is not None and aux.lse else out


@pytest.fixture
def fake_varlen(monkeypatch):
    """The fake kernel installed, and the CUDA guard lifted (CPU float64 tensors run as they are)."""
    fake = FakeVarlen()
    monkeypatch.setattr(attention, "_torch_varlen", fake)
    monkeypatch.setattr(attention, "_kernel_dtype", lambda backend, q: q.dtype)
    return fake


@pytest.fixture
def no_flash_attn(monkeypatch):
    """flash-attn not importable (as on a stock torch install), and the backend not yet loaded."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    monkeypatch.setattr(attention, "_flash_varlen", attention._UNSET)


# --- config -----------------------------------------------------------------------------------

def test_config_accepts_varlen():
    assert "varlen" in ATTENTION_BACKENDS and set(ATTENTION_BACKENDS) == set(attention.BACKENDS)
    config = small_config(attention="varlen")
    assert config.validate() is config
    decoder = small_config(value_mode="continuous", architecture="encoder_decoder", attention="varlen",
                           decoder=DecoderConfig(d_model=16, n_heads=2, attention="varlen"))
    assert decoder.validate() is decoder
    with pytest.raises(ValueError, match=r"model\.attention='flash2': choose one of .*varlen"):
        small_config(attention="flash2").validate()


def test_scgpt_preset_needs_no_flash_attn(no_flash_attn):
    """The scGPT preset asks for ``flash``; on a stock torch install that is ``varlen``, and nothing
    in building the model imports flash-attn."""
    from pretrain.presets import preset

    model = preset("scgpt", vocab_size=40, n_layers=1).model
    assert model.attention == "flash"
    CellModel(model)
    require_attention_device(model, "cuda")  # flash without flash-attn -> varlen: torch has it
    assert attention._flash_varlen is None


# --- the definition and the padded reference ----------------------------------------------------

def test_sdpa_equals_the_per_sequence_definition_with_gradients():
    q, k, v, cu = packed([1, 5, 17, 2], heads=3, width=8, seed=1)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = sdpa(q, k, v, cu, 17)
    ref = reference_attention(q, k, v, cu)
    assert relative(out, ref) < 1e-12
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(grads, ref_grads):
        assert relative(a, b) < 1e-12
    # attention stays within its sequence: changing sequence 2 leaves the others alone
    k2 = k.detach().clone()
    k2[6:23] += torch.randn(17, 3, 8, dtype=k2.dtype)
    moved = sdpa(q.detach(), k2, v.detach(), cu, 17)
    assert relative(moved[:6], out[:6]) < 1e-12 and relative(moved[23:], out[23:]) < 1e-12
    assert (moved[6:23] - out.detach()[6:23]).abs().max() > 1e-3


# --- varlen: the call, with the kernel faked -------------------------------------------------------

@pytest.mark.parametrize("width", [8, 12])
def test_varlen_call_and_packing_equal_sdpa(fake_varlen, width):
    """cu_seqlens as int32 for q and k, the batch's max length twice, nothing else (the default
    scale): the output equals sdpa's. A width that is no multiple of 8 (12) reaches the kernel
    zero-padded to 16 with q scaled so that the kernel's 1/sqrt(16) is 1/sqrt(12)."""
    lengths = [1, 9, 4, 30, 2]
    q, k, v, cu = packed(lengths, heads=2, width=width, seed=width)
    out = varlen(q, k, v, cu.long(), max(lengths))
    assert out.shape == q.shape
    assert relative(out, sdpa(q, k, v, cu, max(lengths))) < 1e-12
    (args, kwargs), = fake_varlen.calls
    assert len(args) == 7 and kwargs == {}  # the arguments varlen_attn has taken since torch 2.10
    kq, kk, kv, cu_q, cu_k, max_q, max_k = args
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32 and torch.equal(cu_q, cu) and torch.equal(cu_k, cu)
    assert max_q == max_k == 30 and type(max_q) is int
    padded = -(-width // 8) * 8
    assert kq.shape == (sum(lengths), 2, padded) and kk.shape == kv.shape == kq.shape
    assert torch.equal(kk[..., :width], k) and not kk[..., width:].any() and not kv[..., width:].any()
    assert torch.allclose(kq[..., :width], q * math.sqrt(padded / width))


def test_varlen_gradients_flow_through_the_call(fake_varlen):
    q, k, v, cu = packed([3, 7, 1], heads=2, width=12, seed=3)
    for x in (q, k, v):
        x.requires_grad_(True)
    grad = torch.randn(q.shape, dtype=q.dtype)
    grads = torch.autograd.grad(varlen(q, k, v, cu, 7), (q, k, v), grad)
    ref_grads = torch.autograd.grad(reference_attention(q, k, v, cu), (q, k, v), grad)
    for a, b in zip(grads, ref_grads):
        assert relative(a, b) < 1e-12


def test_varlen_with_no_tokens_returns_empty_without_calling_the_kernel(fake_varlen):
    q, k, v, _ = packed([1], heads=2, width=8)
    empty = q[:0].requires_grad_(True)
    out = varlen(empty, k[:0], v[:0], torch.zeros(3, dtype=torch.int32), 0)
    assert out.shape == (0, 2, 8) and out.requires_grad and not fake_varlen.calls


def test_model_with_varlen_equals_model_with_sdpa(fake_varlen):
    """The encoder hands varlen the same packed q, k, v as sdpa: the whole model agrees."""
    batch = random_batch([5, 1, 12, 7], seed=4)
    model = CellModel(small_config(attention="sdpa")).double()
    fast = CellModel(small_config(attention="varlen")).double()
    fast.load_state_dict(model.state_dict())
    a, b = model(batch), fast(batch)
    assert relative(b.mlm, a.mlm) < 1e-12 and relative(b.cells, a.cells) < 1e-12
    assert len(fake_varlen.calls) == 2  # one per layer


# --- scGPT's generative mask in two kernel passes ------------------------------------------------------

GENERATIVE_LENGTHS = [1, 9, 4, 30, 2, 6]


def generative_inputs(lengths, width, seed, dtype=torch.float64, device="cpu"):
    """Random q, k, v, cu_seqlens and ``known`` (about half), with a sequence of only unknown tokens
    (the 3rd) and one of only known tokens (the 5th): the edge cases of the two passes."""
    q, k, v, cu = packed(lengths, heads=2 if device == "cpu" else 8, width=width, dtype=dtype, device=device,
                         seed=seed)
    known = torch.rand(q.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    bounds = cu.tolist()
    known[bounds[2]:bounds[3]] = False
    known[bounds[4]:bounds[5]] = True
    return q, k, v, cu, known.to(device)


@pytest.mark.parametrize("width", [8, 12])
def test_varlen_generative_two_pass_equals_the_explicit_mask_with_gradients(fake_varlen, width):
    """Output and dq, dk, dv of the two kernel passes (the kernel's log-sum-exp in float32 and without
    gradient, as the real kernels') equal the definition with an explicit mask matrix in float64, to
    float32's precision of that log-sum-exp."""
    q, k, v, cu, known = generative_inputs(GENERATIVE_LENGTHS, width, seed=20 + width)
    ins = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = varlen(*ins, cu, max(GENERATIVE_LENGTHS), known=known)
    ref = generative_reference(q, k, v, cu, known)
    assert relative(out, ref) < 1e-6
    grad = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(width))
    ref_ins = [x.detach().requires_grad_(True) for x in (q, k, v)]
    grads = torch.autograd.grad(out, ins, grad)
    ref_grads = torch.autograd.grad(generative_reference(*ref_ins, cu, known), ref_ins, grad)
    for a, b in zip(grads, ref_grads):
        assert relative(a, b) < 1e-6
    first, second = fake_varlen.calls  # all queries over the known keys; the unknown ones' mean key
    assert first[0][0].shape[0] == q.shape[0] and first[0][1].shape[0] == int(known.sum())
    assert second[0][0].shape[0] == int((~known).sum()) and "return_aux" not in second[1]


def test_generative_two_pass_with_every_token_known_or_unknown(fake_varlen):
    q, k, v, cu = packed([5, 3], heads=2, width=8, seed=30)
    for known in (torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool)):
        out = varlen(q, k, v, cu, 5, known=known)
        assert relative(out, generative_reference(q, k, v, cu, known)) < 1e-6
    assert torch.equal(varlen(q, k, v, cu, 5, known=torch.zeros(8, dtype=torch.bool)), v)  # only itself to see


def test_model_with_varlen_generative_equals_sdpa_generative(fake_varlen):
    """The whole model: the same outputs and gradients, and the known/unknown split found once per
    forward for every layer (two kernel calls a layer)."""
    batch = random_batch([5, 1, 12, 7], seed=4)
    model = CellModel(small_config(attention="sdpa", attention_mask="generative")).double()
    fast = CellModel(small_config(attention="varlen", attention_mask="generative")).double()
    fast.load_state_dict(model.state_dict())
    a, b = model(batch), fast(batch)
    assert relative(b.mlm, a.mlm) < 1e-6 and relative(b.cells, a.cells) < 1e-6
    assert len(fake_varlen.calls) == 2 * 2
    grads = torch.autograd.grad(b.mlm.square().sum() + b.cells.sum(), list(fast.parameters()), allow_unused=True)
    ref = torch.autograd.grad(a.mlm.square().sum() + a.cells.sum(), list(model.parameters()), allow_unused=True)
    for x, y in zip(grads, ref):
        assert (x is None) == (y is None) and (x is None or relative(x, y) < 1e-6 or y.norm() == 0)


def test_flash_attn_generative_two_pass(monkeypatch):
    """With flash-attn importable, the passes call its kernel, asking for the log-sum-exp once."""
    calls = []

    class FakeFlashAttn:
        @staticmethod
        def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, return_attn_probs=False):
            calls.append(return_attn_probs)
            out, lse = kernel_definition(q, k, v, cu_q, cu_k)
            return (out, lse, None) if return_attn_probs else out

    monkeypatch.setitem(sys.modules, "flash_attn", FakeFlashAttn)
    monkeypatch.setattr(attention, "_flash_varlen", attention._UNSET)
    monkeypatch.setattr(attention, "_kernel_dtype", lambda backend, q: q.dtype)
    monkeypatch.setattr(attention, "_torch_varlen", lambda *a, **kw: pytest.fail("varlen called"))
    q, k, v, cu, known = generative_inputs(GENERATIVE_LENGTHS, 8, seed=31)
    out = attention.flash(q, k, v, cu, max(GENERATIVE_LENGTHS), known=known)
    assert calls == [True, False] and relative(out, generative_reference(q, k, v, cu, known)) < 1e-6


# --- flash -> varlen ------------------------------------------------------------------------------

def test_flash_without_flash_attn_runs_varlen_and_says_so_once(no_flash_attn, fake_varlen, caplog):
    q, k, v, cu = packed([4, 6], heads=2, width=8, seed=5)
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        first = attention.flash(q, k, v, cu, 6)
        second = attention.flash(q, k, v, cu, 6)
    lines = [r for r in caplog.records if "flash-attn is not installed" in r.getMessage()]
    assert len(lines) == 1 and "varlen" in lines[0].getMessage()
    assert len(fake_varlen.calls) == 2
    assert torch.equal(first, second) and relative(first, sdpa(q, k, v, cu, 6)) < 1e-12


def test_flash_uses_flash_attn_when_importable(monkeypatch):
    calls = []

    class FakeFlashAttn:
        @staticmethod
        def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal):
            calls.append((cu_q.dtype, max_q, max_k, dropout_p, causal))
            return reference_attention(q, k, v, cu_q)

    monkeypatch.setitem(sys.modules, "flash_attn", FakeFlashAttn)
    monkeypatch.setattr(attention, "_flash_varlen", attention._UNSET)
    monkeypatch.setattr(attention, "_kernel_dtype", lambda backend, q: q.dtype)
    monkeypatch.setattr(attention, "_torch_varlen", lambda *a, **kw: pytest.fail("varlen called"))
    q, k, v, cu = packed([3, 5], heads=2, width=8, seed=6)
    out = attention.flash(q, k, v, cu.long(), 5)
    assert calls == [(torch.int32, 5, 5, 0.0, False)]
    assert relative(out, sdpa(q, k, v, cu, 5)) < 1e-12


# --- refusals name the fix ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_cpu_tensors_are_refused_naming_sdpa(backend, no_flash_attn):
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, cu = packed([2, 3], heads=2, width=8, dtype=dtype)
        with pytest.raises(RuntimeError, match=r"CUDA only.*model\.attention=sdpa"):
            attention.BACKENDS[backend](q, k, v, cu, 3)


@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_a_cpu_run_is_refused_before_it_builds_anything(backend, no_flash_attn):
    with pytest.raises(ValueError, match=rf"model\.attention={backend} runs FlashAttention kernels on CUDA GPUs "
                                         r"only.*set model\.attention=sdpa .* or model\.attention=favor"):
        require_attention_device(small_config(attention=backend), torch.device("cpu"))
    decoder = small_config(value_mode="continuous", architecture="encoder_decoder", attention="sdpa",
                           decoder=DecoderConfig(d_model=16, n_heads=2, attention=backend))
    with pytest.raises(ValueError, match=r"model\.decoder\.attention=.*set model\.decoder\.attention=sdpa"):
        require_attention_device(decoder, "cpu")
    for fine in ("sdpa", "favor"):
        require_attention_device(small_config(attention=fine), "cpu")
    require_attention_device(small_config(attention=backend), "cuda")


def test_model_forward_on_cpu_with_varlen_names_the_fix():
    model = CellModel(small_config(attention="varlen"))
    with pytest.raises(RuntimeError, match=r"model\.attention=sdpa"):
        model(random_batch([3, 4], seed=0))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU run is what is refused")
def test_the_trainer_refuses_varlen_on_cpu_before_engine_and_mlflow(tmp_path):
    from tests.train_helpers import TINY, make_corpus, run_pretrain

    corpus = make_corpus(tmp_path, n_cells=64, n_genes=200)
    run = tmp_path / "run"
    proc = run_pretrain([*TINY, f"data.corpus={corpus}", f"run.out={run}", "model.attention=varlen",
                         "run.mlflow=true", "schedule.max_steps=1"], check=False)
    assert proc.returncode != 0 and "model.attention=sdpa" in proc.stderr
    assert not run.exists()  # no run folder, hence no MLflow store or checkpoints


# --- GPU: the real kernels --------------------------------------------------------------------------

GPU_LENGTHS = [1, 17, 300, 2048]


def _bf16_against_float64(fn, lengths, heads, width, seed):
    """(output, dq, dk, dv) relative errors of ``fn`` in bf16 against the float64 definition."""
    q, k, v, cu = packed(lengths, heads, width, device="cuda", seed=seed)
    grad = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)).cuda()
    ins = [x.detach().requires_grad_(True) for x in (q, k, v)]
    ref = reference_attention(*ins, cu)
    ref_grads = torch.autograd.grad(ref, ins, grad)
    low = [x.detach().to(torch.bfloat16).requires_grad_(True) for x in (q, k, v)]
    out = fn(*low, cu, max(lengths))
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    grads = torch.autograd.grad(out, low, grad.to(torch.bfloat16))
    return [relative(out, ref)] + [relative(a, b) for a, b in zip(grads, ref_grads)], out, grads


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["varlen", "sdpa"])
def test_gpu_bf16_backend_equals_float64_definition(backend):
    errors, _, _ = _bf16_against_float64(attention.BACKENDS[backend], GPU_LENGTHS, heads=8, width=64, seed=10)
    assert max(errors) <= 1e-2, dict(zip(["out", "dq", "dk", "dv"], errors))


@pytest.mark.gpu
@gpu
def test_gpu_varlen_pads_a_head_width_that_is_no_multiple_of_8():
    errors, _, _ = _bf16_against_float64(varlen, [3, 50, 129], heads=4, width=20, seed=11)
    assert max(errors) <= 1e-2, errors


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_gpu_fp32_inputs_run_in_bf16(backend):
    """An fp32 model's attention (embedding a bundle loaded in fp32) on the real kernels."""
    q, k, v, cu = packed(GPU_LENGTHS, 8, 64, device="cuda", seed=13)
    out = attention.BACKENDS[backend](*(x.float() for x in (q, k, v)), cu, max(GPU_LENGTHS))
    assert out.dtype == torch.float32 and relative(out, reference_attention(q, k, v, cu)) <= 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_flash_equals_varlen():
    """flash is varlen without flash-attn (the same numbers); with flash-attn, the same attention."""
    _, out_v, grads_v = _bf16_against_float64(varlen, GPU_LENGTHS, heads=8, width=64, seed=12)
    errors, out_f, grads_f = _bf16_against_float64(attention.flash, GPU_LENGTHS, heads=8, width=64, seed=12)
    assert max(errors) <= 1e-2, errors
    if attention._load_flash_attn() is None:  # the same kernel (its backward accumulates dq atomically)
        assert torch.equal(out_f, out_v) and all(relative(a, b) < 1e-3 for a, b in zip(grads_f, grads_v))
    else:
        assert relative(out_f, out_v) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_gpu_generative_two_pass_in_bf16_equals_the_float64_definition(backend):
    """The real kernels' log-sum-exp (layout [H, Tq], natural log of the scaled scores; infinite for
    a query without keys) as the two passes read it: bf16 output and gradients against float64."""
    lengths = [1, 17, 300, 2048, 5, 64]
    q, k, v, cu, known = generative_inputs(lengths, 64, seed=40, device="cuda")
    grad = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(41)).cuda()
    ins = [x.detach().requires_grad_(True) for x in (q, k, v)]
    ref = generative_reference(*ins, cu, known)
    ref_grads = torch.autograd.grad(ref, ins, grad)
    low = [x.detach().to(torch.bfloat16).requires_grad_(True) for x in (q, k, v)]
    out = attention.BACKENDS[backend](*low, cu, max(lengths), known=known)
    grads = torch.autograd.grad(out, low, grad.to(torch.bfloat16))
    errors = [relative(out, ref)] + [relative(a, b) for a, b in zip(grads, ref_grads)]
    assert max(errors) <= 1e-2, dict(zip(["out", "dq", "dk", "dv"], errors))


def test_fp32_inputs_run_the_kernel_in_bf16_and_come_back_in_fp32(fake_varlen, monkeypatch):
    """An fp32 model on CUDA (a bundle loaded to embed or fine-tune) runs the FlashAttention kernel in
    bf16 and gets fp32 back, with gradients; it was refused ("train with deepspeed.bf16=true"), so
    `scfm embed` of a varlen/flash bundle failed on any GPU. Off CUDA the backends still refuse."""
    q, k, v, cu = packed([5, 1, 17], heads=2, width=16, seed=3, dtype=torch.float32)
    monkeypatch.setattr(attention, "_kernel_dtype", lambda backend, x: torch.bfloat16)  # as on CUDA
    ins = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = varlen(*ins, cu, 17)
    assert out.dtype == torch.float32 and all(a.dtype == torch.bfloat16 for a in fake_varlen.calls[-1][0][:3])
    ref = reference_attention(*(x.double() for x in (q, k, v)), cu)
    assert relative(out, ref) < 1e-2
    out.sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in ins)


def test_a_bundle_trained_with_exact_cuda_attention_embeds_on_cpu():
    """`load_pretrained` on a CPU swaps flash/varlen for sdpa: the same weights (strict load) and the
    same function as the CUDA backends' definition."""
    from pretrain.export import exact_backends_to_sdpa

    trained = small_config(attention="flash", architecture="encoder_decoder", value_mode="continuous",
                           decoder=DecoderConfig(n_layers=1, d_model=32, n_heads=2, attention="varlen"))
    swapped = exact_backends_to_sdpa(trained)
    assert (swapped.attention, swapped.decoder.attention) == ("sdpa", "sdpa")
    assert exact_backends_to_sdpa(small_config(attention="favor")).attention == "favor"
    on_cpu = CellModel(swapped)
    on_cpu.load_state_dict(CellModel(trained).state_dict(), strict=True)

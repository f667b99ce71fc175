"""The fused FAVOR+ Triton kernels equal the plain-PyTorch reference.

Every test runs on each device there is: "cpu" through Triton's interpreter (tests/conftest.py
turns it on when there is no CUDA; there bf16/fp16 dots are emulated by rounding their operands,
see kernels/favor/launch.py), and "cuda" with the compiled kernels (marked ``gpu``). On a CUDA
machine the interpreter is off, so the "cpu" variants skip: CPU tensors cannot reach compiled
kernels. The ``gpu``-only tests first check the compiled kernels at model size.
"""

from __future__ import annotations

import pytest
import torch

from kernels.favor.launch import interpreting
from kernels.favor.naive import draw_projection, favor_attention_reference
from kernels.favor.triton_ops import favor_backward, favor_forward

HAS_CUDA = torch.cuda.is_available()
_ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=_ON_CUDA)]
# fp32 inputs multiply in TF32 on GPU, whose tensor cores drop the 13 low mantissa bits. With that
# truncation emulated (interpreter, D=64, m=256): 7e-4 in the output, 2.6-2.7e-3 in dq and dk (the
# backward's cancellations, see launch.py), so 5e-3; the interpreter itself multiplies fp32 exactly.
TF32_BOUND = 5e-3

CASES = [  # (sequence lengths, heads, head dim, features, key rows per program)
    ([1, 17, 40, 5], 2, 16, 32, 1024),
    ([33, 1, 1, 64], 3, 32, 48, 16),     # long sequences split over several programs
    ([70], 1, 16, 64, 32),
    ([2, 3, 1, 50, 9, 16], 2, 16, 16, 24),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Where a test runs, on inputs of any dtype."""
    if request.param == "cpu" and not interpreting():
        pytest.skip("Triton's interpreter is off (CUDA is present): the cuda variant runs this")
    return request.param


def _inputs(lengths, h, d, seed, scale=1.0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lengths), h, d, generator=g) * scale for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return (*(x.to(device=device, dtype=dtype) for x in (q, k, v)), cu.to(device))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- compiled kernels at model size (GPU only: the interpreter would take hours); first in the file,
# so that the GPU suite's pytest part, which runs this file first, has them before its time runs out

RAGGED = [1, 17, 2048, 16906]  # a single token, a short tile, a few chunks, many chunks


def _model_size(dtype, seed=0):
    q, k, v, cu = _inputs(RAGGED, 8, 64, seed=seed, device="cuda", dtype=dtype)
    projection = draw_projection(256, 64, seed=seed + 1).to("cuda")
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 2)).to("cuda", dtype)
    return q, k, v, cu, projection, grad


def _fused_run(q, k, v, cu, projection, grad):
    from kernels.favor import favor_attention as fused

    inputs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fused(*inputs, projection, cu, max(RAGGED))
    out.backward(grad)
    return [out.detach()] + [x.grad for x in inputs]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype, bound", [(torch.float32, TF32_BOUND),
                                          (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_compiled_kernels_equal_float64_reference_at_model_size(dtype, bound):
    """H=8, D=64, m=256, ragged lengths 1, 17, 2048, 16906: output and dq, dk, dv of the compiled
    kernels against autograd through the float64 reference. fp32 multiplies in TF32 (TF32_BOUND)."""
    q, k, v, cu, projection, grad = _model_size(dtype)
    got = _fused_run(q, k, v, cu, projection, grad)
    ref_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = favor_attention_reference(*ref_in, projection.double(), cu, max(RAGGED))
    ref.backward(grad.double())
    want = [ref.detach()] + [x.grad for x in ref_in]
    errors = {name: _rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    assert all(a.dtype == dtype for a in got)
    assert max(errors.values()) < bound, errors
    # every sequence on its own too (the one-token sequence is not drowned by the long one)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert _rel(got[0][a:b], want[0][a:b]) < bound, (b - a, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_are_deterministic(dtype):
    """Two runs give bitwise equal outputs and gradients (no atomics, fixed-order sums)."""
    args = _model_size(dtype, seed=3)
    first, second = _fused_run(*args), _fused_run(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_boundaries_given_on_the_host_run_on_the_device():
    """cu_seqlens on the CPU (a padding mask's, a caller's) with CUDA q, k, v: moved, same output."""
    from kernels.favor import favor_attention as fused

    q, k, v, cu = _inputs([5, 40, 1], 2, 16, seed=4, device="cuda", dtype=torch.bfloat16)
    projection = draw_projection(32, 16, seed=2).to("cuda")
    assert torch.equal(fused(q, k, v, projection, cu.cpu(), 40), fused(q, k, v, projection, cu, 40))


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_equals_reference(case, seed, device):
    lengths, h, d, m, chunk = CASES[case]
    q, k, v, cu = _inputs(lengths, h, d, seed, scale=1.0 + 2 * seed, device=device)  # larger: stress the stabilizers
    projection = draw_projection(m, d, seed=seed).to(device)
    ref = favor_attention_reference(q.double(), k.double(), v.double(), projection.double(), cu, max(lengths))
    out, state, norm, den, _, qmax, _ = favor_forward(q, k, v, projection, cu, max(lengths), block_rows=16,
                                                   chunk_rows=chunk, return_backward_extras=True)
    assert out.dtype == q.dtype and out.shape == v.shape
    # TF32 products on GPU (launch.py): ~1e-3 there, fp32 exactly in the interpreter
    assert _rel(out, ref) < (1e-4 if device == "cpu" else TF32_BOUND)
    assert state.shape == (len(lengths), h, m, d) and norm.shape == (len(lengths), h, m)
    assert torch.isfinite(den).all() and (den > 0).all()
    # the saved per-row stabilizer is the max of W q' over all features
    want = torch.einsum("thd,md->thm", q.double() * d ** -0.25, projection.double()).amax(-1)
    torch.testing.assert_close(qmax.double(), want, rtol=0, atol=1e-5 if device == "cpu" else 2e-2)


def test_forward_never_mixes_sequences(device):
    q, k, v, cu = _inputs([5, 20, 3], 2, 16, seed=3, device=device)
    projection = draw_projection(32, 16, seed=4).to(device)
    base = favor_forward(q, k, v, projection, cu, 20, block_rows=16, chunk_rows=16)[0]
    k2, v2 = k.clone(), v.clone()
    k2[5:25] *= 3
    v2[5:25] += 1
    moved = favor_forward(q, k2, v2, projection, cu, 20, block_rows=16, chunk_rows=16)[0]
    torch.testing.assert_close(moved[:5], base[:5], rtol=0, atol=0)
    torch.testing.assert_close(moved[25:], base[25:], rtol=0, atol=0)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_gradients_equal_reference(case, device):
    """dq, dk, dv of the fused kernels (through the public autograd function, default tile sizes)
    against autograd through the float64 reference, on a random output gradient. Inputs of unit
    scale: at twice that, dq loses ~2e-4 to fp32 cancellation in the reference itself."""
    from kernels.favor import favor_attention as fused

    lengths, h, d, m, chunk = CASES[case]
    q, k, v, cu = _inputs(lengths, h, d, seed=10 + case, device=device)
    projection = draw_projection(m, d, seed=case).to(device)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(case)).to(device)
    ref_in = [x.double().requires_grad_(True) for x in (q, k, v)]
    favor_attention_reference(*ref_in, projection.double(), cu, max(lengths)).backward(grad.double())
    got_in = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = fused(*got_in, projection, cu, max(lengths))
    out.backward(grad)
    for name, a, b in zip("qkv", got_in, ref_in):
        assert _rel(a.grad, b.grad) < (1e-4 if device == "cpu" else TF32_BOUND), name


@pytest.mark.parametrize("d", [20, 8, 40])
def test_any_head_width_runs_zero_padded(d, device):
    """Head widths the kernels do not take (scBERT's 20; 8; 40) run padded to a power of two >= 16
    with the true width's input scale: forward and gradients equal the float64 reference."""
    from kernels.favor import favor_attention as fused
    from kernels.favor import kernel_width

    assert kernel_width(d) == {20: 32, 8: 16, 40: 64}[d]
    lengths = [1, 17, 40]
    q, k, v, cu = _inputs(lengths, 2, d, seed=d, device=device)
    projection = draw_projection(32, d, seed=d).to(device)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(d)).to(device)
    ref_in = [x.double().requires_grad_(True) for x in (q, k, v)]
    ref = favor_attention_reference(*ref_in, projection.double(), cu, max(lengths))
    ref.backward(grad.double())
    got_in = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = fused(*got_in, projection, cu, max(lengths))
    out.backward(grad)
    assert out.shape == v.shape and _rel(out, ref) < (1e-4 if device == "cpu" else TF32_BOUND)
    for name, a, b in zip("qkv", got_in, ref_in):
        assert a.grad.shape == b.grad.shape and _rel(a.grad, b.grad) < (1e-4 if device == "cpu" else TF32_BOUND), name


def test_backward_without_saved_query_max(device):
    """`favor_backward` called without the forward's row stabilizers computes them itself (in
    PyTorch: on GPU they differ from the kernels' TF32 ones by ~1e-3, which moves the weight of
    the eps term in the features a little, hence the looser bound there)."""
    q, k, v, cu = _inputs([9, 30], 2, 32, seed=14, device=device)
    projection = draw_projection(64, 32, seed=15).to(device)
    out, state, norm, den, key_max, qmax, _ = favor_forward(q, k, v, projection, cu, 30, return_backward_extras=True)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(16)).to(device)
    saved = favor_backward(grad, q, k, v, projection, cu, 30, out, state, norm, den, key_max, query_max=qmax)
    again = favor_backward(grad, q, k, v, projection, cu, 30, out, state, norm, den, key_max)
    for a, b in zip(saved, again):
        if device == "cpu":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert _rel(a, b) < TF32_BOUND


def test_padded_entry_and_determinism(device):
    from kernels.favor import favor_attention as fused
    from kernels.favor import favor_attention_padded

    q, k, v, cu = _inputs([9, 20], 2, 16, seed=5, device=device)
    projection = draw_projection(32, 16, seed=6).to(device)
    packed = fused(q, k, v, projection, cu, 20)
    torch.testing.assert_close(fused(q, k, v, projection, cu, 20), packed, rtol=0, atol=0)  # run to run
    pad = lambda t: torch.stack([torch.cat([t[:9], t.new_zeros(11, 2, 16)]), t[9:]]).permute(0, 2, 1, 3)  # noqa: E731
    mask = torch.tensor([[True] * 9 + [False] * 11, [True] * 20], device=device)
    out = favor_attention_padded(pad(q), pad(k), pad(v), projection, mask).permute(0, 2, 1, 3)
    torch.testing.assert_close(out[0, :9], packed[:9])
    torch.testing.assert_close(out[1], packed[9:])
    assert (out[0, 9:] == 0).all()


def _half_case(lengths, h, d, m, dtype, device, seed):
    from kernels.favor import favor_attention as fused

    q, k, v, cu = _inputs(lengths, h, d, seed=seed, device=device, dtype=dtype)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    projection = draw_projection(m, d, seed=seed + 1).to(device)
    out = fused(q, k, v, projection, cu, max(lengths))
    assert out.dtype == dtype
    ref_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = favor_attention_reference(*ref_in, projection.double(), cu, max(lengths))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 2)).to(device)
    out.backward(grad.to(dtype))
    ref.backward(grad.double())
    for a in (q, k, v):
        assert a.grad.dtype == dtype
    return [_rel(out, ref)] + [_rel(a.grad, b.grad) for a, b in zip((q, k, v), ref_in)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [([1, 30, 12], 2, 16, 32), ([70, 1, 33], 2, 64, 128)])
def test_half_precision_inputs(dtype, shape, device):
    """bf16 / fp16 in, the same dtype out; output and gradients within 1e-2 of the float64
    reference on the same (rounded) inputs. Under the interpreter the kernels round every dot
    operand as the GPU takes it: bf16/fp16 projections, TF32 feature-side operands (truncated,
    the worst case; launch.py). Measured there: bf16 ~4e-3 out, ~5e-3 gradients (~1.6e-3 of it
    the bf16 rounding of the results themselves; the same at L=4096), fp16 ~1e-3 / ~2.5e-3."""
    errors = _half_case(*shape, dtype, device, seed=7)
    assert max(errors) < 1e-2, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_token_sequence_has_no_query_gradient(dtype, device):
    """A one-token sequence's output is its v whatever q is: dq = 0, which the kernels only get
    (to TF32 rounding) when the backward uses the exact output, not the bf16/fp16 one it returned
    (``out_lo``; with the rounded one this dq was ~1% of the others' norm)."""
    from kernels.favor import favor_attention as fused

    device = device
    q, k, v, cu = _inputs([40, 1, 25], 2, 64, seed=21, device=device, dtype=dtype)
    q.requires_grad_(True)
    out = fused(q, k, v, draw_projection(128, 64, seed=22).to(device), cu, 40)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(23)).to(device, dtype))
    assert q.grad[40].float().norm() < 2e-3 * q.grad.float().norm()


def test_pieces_tile_every_sequence_on_the_device(device):
    from kernels.favor.triton_ops import pieces

    lengths = [3, 0, 70, 1, 16, 33]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    p = pieces(cu, int(cu[-1]), max(lengths), 16)
    used = p.length > 0
    got = sorted(zip(p.start[used].tolist(), p.length[used].tolist(), p.seq[used].tolist(), p.slot[used].tolist()))
    cu = cu.tolist()
    want = [(a + x, min(16, b - a - x), s, x // 16) for s, (a, b) in enumerate(zip(cu[:-1], cu[1:]))
            for x in range(0, b - a, 16)]
    assert got == sorted(want)
    assert (p.home[~used] == len(lengths)).all() and p.per_seq == 5


def test_empty_sequences_are_allowed(device):
    from kernels.favor import favor_attention as fused

    q, k, v, _ = _inputs([3, 0, 21], 2, 16, seed=12, device=device)
    cu = torch.tensor([0, 3, 3, 24], dtype=torch.int32, device=device)
    projection = draw_projection(32, 16, seed=13).to(device)
    ref = favor_attention_reference(q.double(), k.double(), v.double(), projection.double(), cu, 21)
    assert _rel(fused(q, k, v, projection, cu, 21), ref) < (1e-4 if device == "cpu" else TF32_BOUND)

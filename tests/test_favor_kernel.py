"""The fused FAVOR+ Triton kernels equal the plain-PyTorch reference (on CPU: Triton's interpreter,
fp32; on a GPU the same tests run compiled)."""

from __future__ import annotations

import pytest
import torch

from kernels.favor.naive import draw_projection, favor_attention
from kernels.favor.triton_forward import favor_forward

CASES = [  # (sequence lengths, heads, head dim, features, key rows per program)
    ([1, 17, 40, 5], 2, 16, 32, 1024),
    ([33, 1, 1, 64], 3, 32, 48, 16),     # long sequences split over several programs
    ([70], 1, 16, 64, 32),
    ([2, 3, 1, 50, 9, 16], 2, 16, 16, 24),
]


def _inputs(lengths, h, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lengths), h, d, generator=g) * scale for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_equals_reference(case, seed):
    lengths, h, d, m, chunk = CASES[case]
    q, k, v, cu = _inputs(lengths, h, d, seed, scale=1.0 + 2 * seed)  # larger inputs stress the stabilizers
    projection = draw_projection(m, d, seed=seed)
    ref = favor_attention(q.double(), k.double(), v.double(), projection.double(), cu, max(lengths))
    out, state, norm, den, _ = favor_forward(q, k, v, projection, cu, max(lengths), block_rows=16, chunk_rows=chunk)
    assert out.dtype == q.dtype and out.shape == v.shape
    assert _rel(out, ref) < 1e-4
    # the normalizer is what the reference's denominators come from
    assert state.shape == (len(lengths), h, m, d) and norm.shape == (len(lengths), h, m)
    assert torch.isfinite(den).all() and (den > 0).all()


def test_forward_never_mixes_sequences():
    q, k, v, cu = _inputs([5, 20, 3], 2, 16, seed=3)
    projection = draw_projection(32, 16, seed=4)
    base = favor_forward(q, k, v, projection, cu, 20, block_rows=16, chunk_rows=16)[0]
    k2, v2 = k.clone(), v.clone()
    k2[5:25] *= 3
    v2[5:25] += 1
    moved = favor_forward(q, k2, v2, projection, cu, 20, block_rows=16, chunk_rows=16)[0]
    torch.testing.assert_close(moved[:5], base[:5], rtol=0, atol=0)
    torch.testing.assert_close(moved[25:], base[25:], rtol=0, atol=0)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_gradients_equal_reference(case):
    """dq, dk, dv of the fused kernels (through the public autograd function, default tile sizes)
    against autograd through the float64 reference, on a random output gradient. Inputs of unit
    scale: at twice that, dq loses ~2e-4 to fp32 cancellation in the reference itself."""
    from kernels.favor import favor_attention as fused

    lengths, h, d, m, chunk = CASES[case]
    q, k, v, cu = _inputs(lengths, h, d, seed=10 + case)
    projection = draw_projection(m, d, seed=case)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(case))
    ref_in = [x.double().requires_grad_(True) for x in (q, k, v)]
    favor_attention(*ref_in, projection.double(), cu, max(lengths)).backward(grad.double())
    got_in = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = fused(*got_in, projection, cu, max(lengths))
    out.backward(grad)
    for name, a, b in zip("qkv", got_in, ref_in):
        assert _rel(a.grad, b.grad) < 1e-4, name


def test_padded_entry_and_determinism():
    from kernels.favor import favor_attention as fused
    from kernels.favor import favor_attention_padded

    q, k, v, cu = _inputs([9, 20], 2, 16, seed=5)
    projection = draw_projection(32, 16, seed=6)
    packed = fused(q, k, v, projection, cu, 20)
    torch.testing.assert_close(fused(q, k, v, projection, cu, 20), packed, rtol=0, atol=0)  # run to run
    pad = lambda t: torch.stack([torch.cat([t[:9], torch.zeros(11, 2, 16)]), t[9:]]).permute(0, 2, 1, 3)  # noqa: E731
    mask = torch.tensor([[True] * 9 + [False] * 11, [True] * 20])
    out = favor_attention_padded(pad(q), pad(k), pad(v), projection, mask).permute(0, 2, 1, 3)
    torch.testing.assert_close(out[0, :9], packed[:9])
    torch.testing.assert_close(out[1], packed[9:])
    assert (out[0, 9:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """bf16 / fp16 in, the same dtype out, within half-precision rounding of the reference on the
    same (rounded) inputs; gradients too."""
    from kernels.favor import favor_attention as fused

    q, k, v, cu = _inputs([1, 30, 12], 2, 16, seed=7)
    q, k, v = (x.to(dtype).requires_grad_(True) for x in (q, k, v))
    projection = draw_projection(32, 16, seed=8)
    out = fused(q, k, v, projection, cu, 30)
    assert out.dtype == dtype
    ref_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = favor_attention(*ref_in, projection.double(), cu, 30)
    assert _rel(out, ref) < 1e-2
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    out.backward(grad.to(dtype))
    ref.backward(grad.double())
    for a, b in zip((q, k, v), ref_in):
        assert a.grad.dtype == dtype and _rel(a.grad, b.grad) < 2e-2



def test_pieces_tile_every_sequence_on_the_device():
    from kernels.favor.triton_forward import pieces

    lengths = [3, 0, 70, 1, 16, 33]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    p = pieces(cu, int(cu[-1]), max(lengths), 16)
    used = p.length > 0
    got = sorted(zip(p.start[used].tolist(), p.length[used].tolist(), p.seq[used].tolist(), p.slot[used].tolist()))
    want = [(a + x, min(16, b - a - x), s, x // 16) for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist()))
            for x in range(0, b - a, 16)]
    assert got == sorted(want)
    assert (p.home[~used] == len(lengths)).all() and p.per_seq == 5


def test_empty_sequences_are_allowed():
    from kernels.favor import favor_attention as fused

    q, k, v, cu = _inputs([3, 0, 21], 2, 16, seed=12)
    cu = torch.tensor([0, 3, 3, 24], dtype=torch.int32)
    projection = draw_projection(32, 16, seed=13)
    ref = favor_attention(q.double(), k.double(), v.double(), projection.double(), cu, 21)
    assert _rel(fused(q, k, v, projection, cu, 21), ref) < 1e-4

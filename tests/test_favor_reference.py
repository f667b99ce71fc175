"""The FAVOR+ reference: equal to performer-pytorch's FastAttention, differentiable in float64,
packed = per sequence with no leakage across sequences, and projections drawn as Performer does."""

from __future__ import annotations

import math

import pytest
import torch
from performer_pytorch import FastAttention  # the numerical peer (a test-only requirement)

from kernels.favor.naive import draw_projection, favor_attention_reference, favor_attention_reference_padded


def _packed(lengths, h, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("seed", range(4))
def test_equals_performer_pytorch_fast_attention(seed):
    b, h, length, d, m = 3, 4, 37, 16, 48
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    projection = draw_projection(m, d, seed=seed, dtype=torch.float64)
    peer = FastAttention(dim_heads=d, nb_features=m, causal=False).double()
    peer.projection_matrix.copy_(projection)
    expected = peer(q, k, v)
    packed = lambda t: t.permute(0, 2, 1, 3).reshape(b * length, h, d)  # noqa: E731
    cu = torch.arange(b + 1, dtype=torch.int32) * length
    got = favor_attention_reference(packed(q), packed(k), packed(v), projection, cu, length)
    got = got.reshape(b, length, h, d).permute(0, 2, 1, 3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(favor_attention_reference_padded(q, k, v, projection), expected, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    """With eps = 0 the stabilizers cancel exactly, so the gradient through the detached maxima
    (what the reference and performer-pytorch compute, for any eps) is the true gradient."""
    q, k, v, cu = _packed([3, 1, 5], h=2, d=4)
    projection = draw_projection(8, 4, seed=1, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: favor_attention_reference(a, b, c, projection, cu, 5, eps=0.0), (q, k, v))


def test_packed_equals_each_sequence_alone_and_nothing_leaks():
    lengths = [1, 9, 4, 17, 2]
    q, k, v, cu = _packed(lengths, h=3, d=8, seed=2)
    projection = draw_projection(32, 8, seed=3, dtype=torch.float64)
    together = favor_attention_reference(q, k, v, projection, cu, max(lengths))
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = favor_attention_reference(q[a:b], k[a:b], v[a:b], projection, torch.tensor([0, b - a]), b - a)
        torch.testing.assert_close(together[a:b], alone, rtol=0, atol=0)
    # changing one sequence changes nothing outside it
    k2, v2 = k.clone(), v.clone()
    k2[cu[1]:cu[2]] += 5
    v2[cu[1]:cu[2]] *= -3
    changed = favor_attention_reference(q, k2, v2, projection, cu, max(lengths))
    outside = torch.ones(q.shape[0], dtype=torch.bool)
    outside[cu[1]:cu[2]] = False
    torch.testing.assert_close(changed[outside], together[outside], rtol=0, atol=0)
    assert not torch.allclose(changed[~outside], together[~outside])


def test_padded_entry_ignores_padding():
    q, k, v, cu = _packed([5, 3], h=2, d=8, seed=4)
    projection = draw_projection(16, 8, seed=5, dtype=torch.float64)
    ref = favor_attention_reference(q, k, v, projection, cu, 5)
    pad = lambda t: torch.stack([t[0:5], torch.cat([t[5:8], torch.randn(2, 2, 8, dtype=t.dtype) * 100])]).permute(0, 2, 1, 3)  # noqa: E731
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = favor_attention_reference_padded(pad(q), pad(k), pad(v), projection, mask).permute(0, 2, 1, 3)
    torch.testing.assert_close(out[0], ref[0:5])
    torch.testing.assert_close(out[1, :3], ref[5:8])
    assert (out[1, 3:] == 0).all()


def test_projection_draw():
    p = draw_projection(40, 16, seed=7, dtype=torch.float64)
    assert p.shape == (40, 16)
    torch.testing.assert_close(p, draw_projection(40, 16, seed=7, dtype=torch.float64))
    assert not torch.equal(p, draw_projection(40, 16, seed=8, dtype=torch.float64))
    unit = p / p.norm(dim=1, keepdim=True)
    for block in (unit[0:16], unit[16:32], unit[32:40]):  # orthonormal rows within each block
        torch.testing.assert_close(block @ block.T, torch.eye(len(block), dtype=torch.float64), atol=1e-12, rtol=0)
    norms = draw_projection(4096, 64, seed=9, dtype=torch.float64).norm(dim=1)
    assert abs(norms.mean().item() - math.sqrt(64)) < 0.1  # chi(64) rows: mean ~ sqrt(63.5)
    with pytest.raises(ValueError):
        draw_projection(0, 4)


def test_bad_shapes_name_the_problem():
    q, k, v, cu = _packed([3], h=1, d=4)
    with pytest.raises(ValueError, match="projection"):
        favor_attention_reference(q, k, v, torch.zeros(8, 5, dtype=q.dtype), cu, 3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        favor_attention_reference(q, k, v, torch.zeros(8, 4, dtype=q.dtype), torch.tensor([0, 2]), 3)

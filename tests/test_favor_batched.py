"""The batched-PyTorch FAVOR+ (the CPU path) equals the per-sequence definition in naive.py."""

from __future__ import annotations

import pytest
import torch

from kernels.favor import draw_projection, favor_attention_batched, favor_attention_reference


def _inputs(lengths, heads, dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    t = int(cu[-1])
    q, k, v = (torch.randn(t, heads, dim, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    return q, k, v, cu, max(lengths)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("layout", "group_tokens"),  # one sequence a group ... all in one group; padded
                         [("grouped", 1), ("grouped", 20), ("grouped", 64), ("grouped", None), ("padded", None)])
def test_batched_equals_reference_forward_and_gradients(seed, layout, group_tokens):
    g = torch.Generator().manual_seed(100 + seed)
    lengths = [0] + torch.randint(0, 30, (9,), generator=g).tolist() + [1, 0, 47, 0, 0]
    q, k, v, cu, longest = _inputs(lengths, heads=3, dim=16, seed=seed)
    projection = draw_projection(48, 16, seed=seed, dtype=torch.float64)
    ref = favor_attention_reference(q, k, v, projection, cu, longest)
    out = favor_attention_batched(q, k, v, projection, cu, longest, group_tokens=group_tokens, layout=layout)
    assert (out - ref).norm() / ref.norm() < 1e-12
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
        assert (a - b).norm() / a.norm() < 1e-12


def test_batched_gradcheck_and_empty_input():
    q, k, v, cu, longest = _inputs([3, 1, 5], heads=2, dim=4, seed=0)
    projection = draw_projection(16, 4, seed=0, dtype=torch.float64)
    # eps=0: the detached stabilizers then cancel exactly, as gradcheck's finite differences assume
    assert torch.autograd.gradcheck(lambda a, b, c: favor_attention_batched(a, b, c, projection, cu, longest, 0.0),
                                    (q, k, v))
    empty = torch.zeros(0, 2, 4)
    assert favor_attention_batched(empty, empty, empty, projection.float(), torch.zeros(1, dtype=torch.int32),
                                   0).shape == (0, 2, 4)


def test_batched_refuses_bad_cu_seqlens():
    q, k, v, cu, longest = _inputs([3, 2], heads=1, dim=4, seed=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        favor_attention_batched(q, k, v, draw_projection(16, 4, seed=0), cu[:-1], longest)


def test_the_layout_follows_the_thread_count(monkeypatch):
    """One torch thread: grouped; several: padded (its few large parallel regions); the same result.
    Both layouts agree to rounding, so which one ran is read from the calls, not from the output."""
    import kernels.favor.batched as batched

    q, k, v, cu, longest = _inputs([5, 9, 2], heads=2, dim=8, seed=3)
    projection = draw_projection(16, 8, seed=3, dtype=torch.float64)
    ran = []

    def recorded(name):
        original = getattr(batched, name)
        return lambda *args: ran.append(name) or original(*args)

    for name in ("_group", "_padded"):
        monkeypatch.setattr(batched, name, recorded(name))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            ran.clear()
            torch.set_num_threads(n)
            outs.append(favor_attention_batched(q, k, v, projection, cu, longest))
            assert set(ran) == ({"_group"} if n == 1 else {"_padded"})
    finally:
        torch.set_num_threads(threads)
    grouped = favor_attention_batched(q, k, v, projection, cu, longest, layout="grouped")
    padded = favor_attention_batched(q, k, v, projection, cu, longest, layout="padded")
    assert torch.allclose(outs[0], grouped, rtol=1e-12, atol=0) and torch.allclose(outs[1], padded, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="layout"):
        favor_attention_batched(q, k, v, projection, cu, longest, layout="dense")

"""`kernels.packing`, the one home of packed-sequence index arithmetic, and one name per function
in `kernels` (two different functions under one name made an import's meaning depend on its path)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import kernels
from kernels.packing import (
    compact,
    cu_seqlens_from_mask,
    mean_per_sequence,
    padding_index,
    sequence_ids,
    with_cls,
)

CU = torch.tensor([0, 2, 2, 5], dtype=torch.int32)  # lengths 2, 0, 3: an empty sequence in the middle


def test_each_public_function_in_kernels_has_its_own_name():
    owners: dict[str, set[str]] = {}
    for info in pkgutil.walk_packages(kernels.__path__, "kernels."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isfunction(obj) and not name.startswith("_") and obj.__module__.startswith("kernels"):
                owners.setdefault(name, set()).add(f"{obj.__module__}.{obj.__qualname__}")
    assert {name: where for name, where in owners.items() if len(where) > 1} == {}


def test_sequence_ids_and_padding_index():
    assert sequence_ids(CU, 5).tolist() == [0, 0, 2, 2, 2]
    seq, pos = padding_index(CU, 5)
    assert seq.tolist() == [0, 0, 2, 2, 2] and pos.tolist() == [0, 1, 0, 1, 2]
    seq, pos = padding_index(torch.zeros(1, dtype=torch.int32), 0)
    assert seq.numel() == 0 and pos.numel() == 0


def test_cu_seqlens_from_mask_packs_rows_in_order():
    real = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    cu, longest = cu_seqlens_from_mask(real)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 2, 5] and longest == 3
    assert cu_seqlens_from_mask(torch.zeros(0, 4, dtype=torch.bool))[0].tolist() == [0]


def test_with_cls_mean_and_compact():
    x = torch.arange(10, dtype=torch.float64).view(5, 2)
    out, new_cu, rows = with_cls(x, torch.tensor([-1.0, -1.0]), CU)
    assert new_cu.tolist() == [0, 3, 4, 8] and rows.tolist() == [1, 2, 5, 6, 7]
    assert out[:, 0].tolist() == [-1, 0, 2, -1, -1, 4, 6, 8]
    assert mean_per_sequence(x, CU).tolist() == [[1, 2], [0, 0], [6, 7]]
    kept_cu, longest = compact(torch.tensor([True, False, True, True, False]), CU)
    assert kept_cu.tolist() == [0, 1, 1, 3] and longest == 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_a_long_bf16_sequence_has_its_mean(device):
    """bf16 rows of long sequences (2,001 and 4,000 tokens): the mean is the float64 one up to
    bf16's rounding of the result (a bf16 running sum would stall near 1,024 x the row value)."""
    x = (3 + torch.rand(6001, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    cu = torch.tensor([0, 2001, 6001], dtype=torch.int32)
    got = mean_per_sequence(x.to(device, torch.bfloat16), cu.to(device))
    assert got.dtype == torch.bfloat16
    want = torch.stack([x.to(torch.bfloat16).double()[:2001].mean(0), x.to(torch.bfloat16).double()[2001:].mean(0)])
    torch.testing.assert_close(got.double().cpu(), want, rtol=2**-8, atol=0)

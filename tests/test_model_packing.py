"""`PackedBatch` cutting and joining (the gradient cache's chunks): split / concat round trips
with two views per cell kept together, select_cells errors, the padded layout, and the model
giving each sequence the same outputs in a chunk as in the whole batch."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from data_pipeline.loading.batch import PackedBatch
from pretrain.model import CellModel
from tests.model_helpers import cells_of, one_thread, pack, random_batch, seeded, small_config  # noqa: F401 (autouse fixtures)

LENGTHS = [1, 5, 3, 1, 12, 7, 2, 9, 4, 6]  # 10 sequences = 5 cells x 2 views




def assert_batches_equal(a: PackedBatch, b: PackedBatch):
    for f in fields(PackedBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


@pytest.mark.parametrize("cells_per_chunk", [1, 2, 3, 5, 8])
def test_split_then_concat_is_the_identity_and_keeps_views_together(cells_per_chunk):
    batch = random_batch(LENGTHS, seed=0, views_per_cell=2)
    assert batch.view_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    chunks = batch.split(cells_per_chunk)
    assert len(chunks) == -(-5 // cells_per_chunk)
    seen = 0
    for chunk in chunks:
        n_cells = int(chunk.view_index.max()) + 1
        assert chunk.view_index.tolist() == [i // 2 for i in range(2 * n_cells)]  # pairs, renumbered from 0
        assert chunk.cu_seqlens[0] == 0 and chunk.cu_seqlens.dtype == torch.int32
        lengths = (chunk.cu_seqlens[1:] - chunk.cu_seqlens[:-1]).tolist()
        assert lengths == LENGTHS[2 * seen: 2 * (seen + n_cells)]
        assert chunk.max_seqlen == max(lengths)
        assert chunk.labels.shape == (2 * n_cells, 2)
        assert chunk.cell_index.tolist() == batch.cell_index[2 * seen: 2 * (seen + n_cells)].tolist()
        seen += n_cells
    assert seen == 5
    assert_batches_equal(PackedBatch.concat(chunks), batch)


def test_select_cells_content_and_errors():
    batch = random_batch(LENGTHS, seed=1, views_per_cell=2)
    part = batch.select_cells(2, 4)  # sequences 4..7
    cu = batch.cu_seqlens.tolist()
    assert torch.equal(part.gene_ids, batch.gene_ids[cu[4]:cu[8]])
    assert torch.equal(part.values, batch.values[cu[4]:cu[8]])
    assert torch.equal(part.mlm_mask, batch.mlm_mask[cu[4]:cu[8]])
    assert torch.equal(part.mlm_targets, batch.mlm_targets[cu[4]:cu[8]])
    assert torch.equal(part.labels, batch.labels[4:8])
    assert part.view_index.tolist() == [0, 0, 1, 1]
    assert part.cu_seqlens.tolist() == [c - cu[4] for c in cu[4:9]]
    assert part.max_seqlen == 12
    with pytest.raises(ValueError, match=r"no sequences with view_index in \[3, 3\)"):
        batch.select_cells(3, 3)
    with pytest.raises(ValueError, match=r"no sequences with view_index in \[7, 9\)"):
        batch.select_cells(7, 9)
    interleaved = random_batch([2, 3, 4, 5], seed=2)
    interleaved.view_index = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="not contiguous"):
        interleaved.select_cells(0, 1)
    with pytest.raises(ValueError, match="cells_per_chunk=0 must be >= 1"):
        batch.split(0)


def test_to_padded_round_trip():
    batch = random_batch(LENGTHS, seed=3, value_mode="continuous")
    padded = batch.to_padded(pad_id=0)
    real = padded["key_padding_mask"]
    assert real.shape == (10, 12) and real.sum() == batch.n_tokens
    assert real.sum(1).tolist() == LENGTHS
    for name in ("gene_ids", "values", "mlm_mask", "mlm_targets"):
        assert torch.equal(padded[name][real], getattr(batch, name)), name
    assert (padded["gene_ids"][~real] == 0).all() and not padded["mlm_mask"][~real].any()
    assert padded["values"].dtype == batch.values.dtype


@pytest.mark.parametrize("overrides", [dict(attention="favor"), dict(attention="sdpa", use_cls=False, pooling="mean")],
                         ids=["favor", "sdpa"])
def test_model_outputs_per_chunk_equal_the_whole_batch(overrides):
    """What the gradient cache relies on: embedding chunk by chunk gives the whole batch's rows."""
    model = CellModel(small_config(**overrides), seed=0).double().eval()
    batch = random_batch(LENGTHS, seed=4, views_per_cell=2)
    with torch.no_grad():
        whole = model(batch)
        parts = [model(chunk) for chunk in batch.split(2)]
    torch.testing.assert_close(torch.cat([p.cells for p in parts]), whole.cells, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([p.tokens for p in parts]), whole.tokens, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([p.mlm for p in parts]), whole.mlm, rtol=0, atol=1e-12)
    # and concat of rebuilt cells is the same batch
    assert_batches_equal(pack(cells_of(batch), views_per_cell=2), batch)


def test_to_finds_the_masked_positions_on_the_host_and_concat_carries_them():
    """`to` lists the masked positions while the mask is on the host, so that the model and the loss
    gather them on the device with an index instead of a boolean mask (which waits for the device
    to count them); concat offsets them like the tokens. The model's outputs and the loss are the
    same either way."""
    from dataclasses import replace

    from pretrain.objectives.losses import mlm_loss_sum

    batch = random_batch(LENGTHS, seed=2, views_per_cell=2)
    assert batch.mlm_index is None and batch.mlm_mask.any()
    moved = batch.to("cpu")
    assert torch.equal(moved.mlm_index, torch.nonzero(batch.mlm_mask).flatten())
    assert torch.equal(batch.masked_index(), moved.mlm_index)  # the fallback finds the same positions
    chunks = [c.to("cpu") for c in batch.split(2)]
    joined = PackedBatch.concat(chunks)
    assert torch.equal(joined.mlm_index, moved.mlm_index)
    assert_batches_equal(replace(joined, mlm_index=None), batch)
    assert PackedBatch.concat([chunks[0], batch.split(2)[1]]).mlm_index is None  # one chunk without: found later
    model = CellModel(small_config(mvc_head=True)).eval()
    with torch.no_grad():
        a, b = model(batch), model(moved)
    for name in ("mlm", "cells", "mvc"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(mlm_loss_sum(a.mlm, batch, False)[0], mlm_loss_sum(b.mlm, moved, False)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["sdpa", "favor"])
def test_forward_and_masked_loss_do_not_wait_for_the_device(attention):
    """A training forward of a batch moved by `to` (the trainer's way), its masked-expression and MVC
    losses, launch without one device-to-host synchronization: a sync there stalls the launch queue
    every step. CUDA's sync debug mode raises at the first one, with its place in the traceback."""
    from pretrain.objectives.losses import mlm_loss_sum

    model = CellModel(small_config(attention=attention, mvc_head=True)).cuda().train()
    batch = random_batch(LENGTHS, seed=3, views_per_cell=2).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(batch)
        loss = mlm_loss_sum(out.mlm, batch, False)[0] + mlm_loss_sum(out.mvc, batch, True)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)

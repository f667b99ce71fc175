"""The cell model on CPU with fresh random inputs: the packed forward equals the padded
reference, a cell's outputs do not depend on the rest of its batch, activation checkpointing
changes nothing, and the rank / bf16 / flash paths behave (float64 where exactness matters)."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import DecoderConfig
from pretrain.model import CellModel
from tests.model_helpers import (  # noqa: F401 (autouse fixtures)
    cells_of,
    mlm_rows_per_cell,
    one_thread,
    pack,
    random_batch,
    random_cell,
    random_cells,
    seeded,
    small_config,
)

RAGGED = [1, 5, 1, 12, 3, 7, 2]  # includes length-1 cells




def exact(a, b, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def float64_model(**overrides) -> CellModel:
    return CellModel(small_config(**overrides), seed=3).double().eval()


# --- 1. packed forward = padded reference ------------------------------------------------------

@pytest.mark.parametrize("attention", ["favor", "sdpa"])
@pytest.mark.parametrize("use_cls,pooling,head_dim", [(True, "cls", None), (True, "mean", None), (False, "mean", None),
                                                      (True, "cls", 12)])
@pytest.mark.parametrize("value_mode", ["bins", "continuous", "rank"])
def test_packed_encode_equals_padded_reference(attention, use_cls, pooling, head_dim, value_mode):
    """head_dim 12: two heads of 12 (24 wide) in a 16-wide model, as performer-pytorch's 64-wide heads."""
    model = float64_model(attention=attention, use_cls=use_cls, pooling=pooling, value_mode=value_mode,
                          head_dim=head_dim)
    if head_dim:
        assert model.encoder.blocks[0].attn.qkv.weight.shape == (3 * 2 * head_dim, 16)
    batch = random_batch(RAGGED, seed=1, value_mode=value_mode)
    with torch.no_grad():
        tokens, cells = model.encode(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen)
        padded = batch.to_padded()
        real = padded["key_padding_mask"]
        h, cells_ref = model.encode_padded(padded["gene_ids"], padded["values"], real)
    assert tokens.shape == (batch.n_tokens, 16) and cells.shape == (len(RAGGED), 16)
    exact(tokens, h[real], atol=1e-10)
    exact(cells, cells_ref, atol=1e-10)
    # not vacuous: different cells get different embeddings
    assert (cells[1] - cells[3]).abs().max() > 1e-6


# --- 2. a cell's outputs do not depend on the other cells of its batch -------------------------

VARIANTS = {
    "favor": dict(attention="favor"),
    "sdpa": dict(attention="sdpa", use_cls=False, pooling="mean"),
    "all_genes_favor": dict(attention="favor", gene_set="all", use_cls=False, pooling="mean", vocab_size=40),
    "all_genes_sdpa": dict(attention="sdpa", gene_set="all", vocab_size=40),
    "rank_sdpa": dict(attention="sdpa", value_mode="rank"),
    "encoder_decoder": dict(attention="sdpa", value_mode="continuous", architecture="encoder_decoder", vocab_size=40,
                            decoder=dict(n_layers=1, d_model=8, n_heads=2, attention="favor")),
    "encoder_decoder_favor_mean": dict(attention="favor", value_mode="continuous", architecture="encoder_decoder",
                                       use_cls=False, pooling="mean", vocab_size=40,
                                       decoder=dict(n_layers=1, d_model=8, n_heads=2, attention="sdpa")),
    "encoder_decoder_sdpa_mean": dict(attention="sdpa", value_mode="continuous", architecture="encoder_decoder",
                                      use_cls=False, pooling="mean", vocab_size=40,
                                      decoder=dict(n_layers=1, d_model=8, n_heads=2, attention="favor")),
}


def variant_model(name: str) -> tuple[CellModel, dict]:
    overrides = dict(VARIANTS[name])
    if "decoder" in overrides:
        overrides["decoder"] = DecoderConfig(**overrides["decoder"])
    model = float64_model(**overrides)
    return model, dict(vocab_size=model.config.vocab_size, value_mode=model.config.value_mode)


def per_cell(model: CellModel, batch) -> list[dict[str, torch.Tensor]]:
    """Every output of ``model(batch)``, cut per sequence."""
    with torch.no_grad():
        out = model(batch)
    cu = batch.cu_seqlens.tolist()
    rows = mlm_rows_per_cell(batch)
    cut = []
    for i in range(batch.n_seqs):
        one = {"cells": out.cells[i], "contrastive": out.contrastive[i], "mlm": out.mlm[rows[i]]}
        one.update({f"label{j}": logits[i] for j, logits in enumerate(out.labels)})
        if out.tokens is not None:
            one["tokens"] = out.tokens[cu[i]:cu[i + 1]]
        cut.append(one)
    return cut


def assert_same(a: dict, b: dict, atol=1e-12):
    assert a.keys() == b.keys()
    for key in a:
        exact(a[key], b[key], atol=atol)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cell_outputs_do_not_depend_on_the_batch(name):
    model, kw = variant_model(name)
    cells = random_cells(RAGGED, seed=10, **kw)
    together = per_cell(model, pack(cells))
    for i, cell in enumerate(cells):
        if not model.config.use_cls and model.config.architecture == "encoder_decoder" and cell.mlm_mask.all():
            continue  # a batch of only fully masked cells: test_encoder_decoder_without_cls_fully_masked_cell_alone
        assert_same(per_cell(model, pack([cell]))[0], together[i])
    order = [3, 0, 6, 2, 5, 1, 4]
    permuted = per_cell(model, pack([cells[j] for j in order]))
    for position, j in enumerate(order):
        assert_same(permuted[position], together[j])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_changing_one_cell_changes_no_other_cell(name):
    model, kw = variant_model(name)
    batch = random_batch(RAGGED, seed=4, **kw)
    before = per_cell(model, batch)
    cells = cells_of(batch)
    victim = 3  # the longest cell: new genes, values and mask, same length
    cells[victim] = random_cell(len(cells[victim].gene_ids), torch.Generator().manual_seed(99), **kw)
    after = per_cell(model, pack(cells))
    for i in range(len(cells)):
        if i != victim:
            assert_same(after[i], before[i])
    assert (after[victim]["cells"] - before[victim]["cells"]).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["favor", "sdpa", "encoder_decoder", "generative"])
def test_contrastive_only_forward_equals_the_full_forwards_embeddings_with_dropout(name):
    """The gradient cache's first pass (`contrastive_only`: no decoder, no masked-expression, MVC or
    label head) gives the full forward's cell and contrastive embeddings under the same seed,
    dropout on: the heads it skips come after the encoder and draw no random numbers."""
    overrides = dict(VARIANTS.get(name, {}))
    if name == "encoder_decoder":
        overrides["decoder"] = DecoderConfig(**overrides["decoder"])
    if name == "generative":
        overrides = dict(attention="sdpa", attention_mask="generative", mvc_head=True)
    model = CellModel(small_config(dropout=0.2, **overrides), seed=2).double().train()
    batch = random_batch(RAGGED, seed=6, vocab_size=model.config.vocab_size, value_mode=model.config.value_mode)
    calls = []
    model.mlm_head.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(7)
    full = model(batch)
    torch.manual_seed(7)
    first = model(batch, contrastive_only=True)
    exact(first.cells, full.cells)
    exact(first.contrastive, full.contrastive)
    assert calls == [1] and first.mlm is None and first.labels == []  # the heads ran for the full forward only
    torch.manual_seed(8)
    assert (model(batch, contrastive_only=True).cells - full.cells).abs().max() > 1e-6  # dropout is on


def encoder_decoder_without_cls(attention: str) -> CellModel:
    return CellModel(small_config(attention=attention, vocab_size=40, value_mode="continuous",
                                  architecture="encoder_decoder",
                                  use_cls=False, pooling="mean",
                                  decoder=DecoderConfig(n_layers=1, d_model=8, n_heads=2, attention="favor")))


@pytest.mark.parametrize("attention", ["favor", "sdpa"])
def test_encoder_decoder_without_cls_fully_masked_cell_alone(attention):
    """The loader masks at least one gene per cell, so a 1-gene cell has no unmasked gene: its
    encoder input is empty and its mean embedding is zero (as within a larger batch)."""
    model = encoder_decoder_without_cls(attention)
    batch = random_batch([1], seed=0, vocab_size=40, value_mode="continuous")
    assert batch.mlm_mask.all()
    out = model(batch)
    assert out.mlm.shape == (1,) and torch.equal(out.cells, torch.zeros(1, 16))


# --- 7. activation checkpointing ---------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(attention="favor"), dict(attention="sdpa", use_cls=False, pooling="mean"),
                                       dict(attention="sdpa", value_mode="continuous", architecture="encoder_decoder",
                                            vocab_size=40)],
                         ids=["favor", "sdpa", "encoder_decoder"])
def test_activation_checkpointing_same_outputs_and_gradients_with_dropout(overrides):
    if overrides.get("architecture") == "encoder_decoder":
        overrides = dict(overrides, decoder=DecoderConfig(n_layers=1, d_model=8, n_heads=2, attention="favor"))
    plain = CellModel(small_config(dropout=0.2, **overrides), seed=1).double().train()
    ckpt = CellModel(small_config(dropout=0.2, activation_checkpointing=True, **overrides), seed=1).double().train()
    ckpt.load_state_dict(plain.state_dict())
    batch = random_batch(RAGGED, seed=5, vocab_size=plain.config.vocab_size, value_mode=plain.config.value_mode)

    def run(model, seed):
        model.zero_grad()
        torch.manual_seed(seed)
        out = model(batch)
        loss = out.mlm.pow(2).sum() + out.contrastive.pow(2).sum() + sum(x.pow(2).sum() for x in out.labels)
        loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_a, grads_a = run(plain, 123)
    out_b, grads_b = run(ckpt, 123)
    exact(out_b.mlm, out_a.mlm)
    exact(out_b.cells, out_a.cells)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        exact(grads_b[name], grads_a[name], atol=1e-10)
    # not vacuous: dropout is active, so another seed gives other outputs
    out_c, _ = run(plain, 124)
    assert (out_c.cells - out_a.cells).abs().max() > 1e-6


# --- 8. flash without flash-attn ---------------------------------------------------------------

def test_flash_backend_without_flash_attn_names_the_fix():
    """Without flash-attn the import fails with this advice; with it (GPU machines) the CPU
    float32 tensors are refused with the same advice."""
    model = CellModel(small_config(attention="flash"))
    batch = random_batch([3, 4], seed=0)
    with pytest.raises(RuntimeError, match="model.attention=sdpa"):
        model(batch)


# --- 10. rank mode -----------------------------------------------------------------------------

def test_rank_mode_predicts_the_masked_gene_token():
    model = CellModel(small_config(value_mode="rank", max_rank=16)).eval()
    batch = random_batch([4, 9, 16, 1], seed=2, value_mode="rank")
    out = model(batch)
    assert out.mlm.shape == (int(batch.mlm_mask.sum()), 64)
    assert out.tokens.shape == (batch.n_tokens, 16)
    # the rank (position) is embedded: the same genes in another order give other token states
    cell = cells_of(batch)[2]
    swapped = pack([cell.__class__(cell.gene_ids.flip(0), cell.values, cell.mlm_mask.flip(0), cell.mlm_targets.flip(0),
                                   cell.labels, 0)])
    with torch.no_grad():
        mean_a = model(pack([cell])).tokens.mean(0)
        mean_b = model(swapped).tokens.mean(0)
    assert (mean_a - mean_b).abs().max() > 1e-4


def test_rank_at_or_beyond_max_rank_names_the_knob():
    model = CellModel(small_config(value_mode="rank", max_rank=8))
    batch = random_batch([3, 10], seed=0, value_mode="rank")  # ranks 0..9
    with pytest.raises(ValueError, match=r"model\.max_rank=8"):
        model(batch)
    model(random_batch([3, 8], seed=0, value_mode="rank"))  # ranks 0..7 fit


# --- 11. bf16 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["favor", "sdpa"])
@pytest.mark.parametrize("value_mode", ["bins", "continuous"])
def test_bf16_forward_backward_finite_and_close_to_fp32(attention, value_mode):
    model32 = CellModel(small_config(attention=attention, value_mode=value_mode, d_model=32, n_heads=4), seed=2)
    model16 = CellModel(small_config(attention=attention, value_mode=value_mode, d_model=32, n_heads=4), seed=2)
    model16.load_state_dict(model32.state_dict())
    model16.to(torch.bfloat16)
    batch = random_batch(RAGGED, seed=6, value_mode=value_mode)
    outs = []
    for model in (model32, model16):
        out = model(batch)
        loss = out.mlm.float().pow(2).mean() + out.contrastive.float().pow(2).mean()
        loss = loss + sum(x.float().pow(2).mean() for x in out.labels)
        loss.backward()
        outs.append(out)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert out.tokens.dtype == model.gene_embedding.weight.dtype
    out32, out16 = outs
    assert out16.tokens.dtype == torch.bfloat16 and torch.isfinite(out16.tokens).all()
    assert torch.isfinite(out16.mlm).all() and torch.isfinite(out16.cells).all()
    # bf16 keeps ~3 significant digits: the outputs stay close to fp32's
    rel = (out16.tokens.float() - out32.tokens).norm() / out32.tokens.norm()
    assert rel < 0.05, rel
    g32 = model32.encoder.blocks[0].attn.qkv.weight.grad
    g16 = model16.encoder.blocks[0].attn.qkv.weight.grad.float()
    assert torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.9


# --- post-norm + ReLU (Geneformer's BERT) ------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_post_norm_relu_block_equals_torch_transformer_encoder_layer(seed):
    """A post-norm ReLU block (model.norm_position=post, model.activation=relu) computes what
    torch's own post-norm layer (TransformerEncoderLayer, norm_first=False, relu) computes with the
    same weights, on fresh random packed cells; the pre-norm default does not."""
    from pretrain.model.encoder import Block

    torch.manual_seed(100 + seed)
    d, heads, lengths = 16, 4, [3, 1, 9, 5]
    block = Block(d, heads, 2.0, 0.0, 1e-12, "sdpa", 16, norm_position="post", activation="relu").double().eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    ref = torch.nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, activation="relu",
                                           layer_norm_eps=1e-12, batch_first=True, norm_first=False).double().eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)  # rows: q, k, v (as Attention splits them)
        ref.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(block.attn.out.weight)
        ref.self_attn.out_proj.bias.copy_(block.attn.out.bias)
        for mine, theirs in ((block.ffn[0], ref.linear1), (block.ffn[2], ref.linear2), (block.norm1, ref.norm1),
                             (block.norm2, ref.norm2)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
    x = torch.randn(sum(lengths), d, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    padded = torch.zeros(len(lengths), max(lengths), d, dtype=torch.float64)
    pad = torch.ones(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        padded[i, :n], pad[i, :n] = x[cu[i]:cu[i + 1]], False
    with torch.no_grad():
        got = block(x, cu, max(lengths))
        want = ref(padded, src_key_padding_mask=pad)
        pre = Block(d, heads, 2.0, 0.0, 1e-12, "sdpa", 16, norm_position="pre", activation="relu").double().eval()
        pre.load_state_dict(block.state_dict())
        got_pre = pre(x, cu, max(lengths))
    want = torch.cat([want[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert not torch.allclose(got_pre, want, atol=1e-3)


def test_post_norm_model_packed_equals_padded_reference():
    """The whole post-norm model (encoder LayerNorm first, as BERT's embedding LayerNorm) packs exactly."""
    model = float64_model(norm_position="post", activation="relu", attention="sdpa")
    batch = random_batch(RAGGED, seed=2)
    with torch.no_grad():
        tokens, cells = model.encode(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen)
        padded = batch.to_padded()
        real = padded["key_padding_mask"]
        h, cells_ref = model.encode_padded(padded["gene_ids"], padded["values"], real)
    exact(tokens, h[real], atol=1e-10)
    exact(cells, cells_ref, atol=1e-10)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_an_earlier_encoder_layer_is_the_output_of_the_model_cut_there(norm_position):
    """``layer=-2`` (Geneformer's embedding layer) gives the states a model without the last block
    gives, with the same weights and the same final LayerNorm (pre-norm) or none (post-norm blocks
    end normalized); every other layer number is refused naming the range."""
    full = CellModel(small_config(n_layers=3, norm_position=norm_position)).eval()
    cut = CellModel(small_config(n_layers=2, norm_position=norm_position)).eval()
    cut.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("encoder.blocks.2.")})
    batch = random_batch([5, 9, 3, 7], seed=4)
    with torch.no_grad():
        body, cells = full.encode(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen, layer=-2)
        want_body, want_cells = cut.encode(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen)
        last_body, _ = full.encode(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen)
    torch.testing.assert_close(body, want_body, rtol=0, atol=0)
    torch.testing.assert_close(cells, want_cells, rtol=0, atol=0)
    assert (body - last_body).abs().max() > 1e-3
    for bad in (0, 1, -4):
        with pytest.raises(ValueError, match=r"encoder layer .*-1 .* down to -3"):
            full.encode(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen, layer=bad)

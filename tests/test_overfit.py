"""A small model memorizes one small batch of real cells: masked expression, cell-type label and
contrastive losses together fall by at least 90 % (a learning sanity check end to end: corpus,
loader, model, objectives)."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.plan import ConvertOptions
from data_pipeline.loading.epoch_plan import Batching
from data_pipeline.loading.loader import CellLoader
from data_pipeline.loading.masking import Views
from data_pipeline.loading.normalize import Normalization
from pretrain.config import ModelConfig, ObjectiveConfig
from pretrain.model import CellModel
from pretrain.objectives import PretrainModule, full_batch_loss

MAX_GENES, N_BINS = 48, 11


@pytest.mark.slow
def test_small_model_overfits_a_small_real_batch(shared_data, tmp_path):
    source = shared_data / "h5ad" / "mudan_zheng_sorted_ref.h5ad"
    corpus = tmp_path / "corpus"
    convert(corpus, ConvertOptions([str(source)], label_columns=["cell_type"]), progress=False)
    manifest = json.loads((corpus / "manifest.json").read_text())
    n_types = len(manifest["label_columns"][0]["categories"])
    loader = CellLoader(corpus, normalization=Normalization(n_bins=N_BINS, max_genes=MAX_GENES), views=Views(),
                        batching=Batching(token_budget=24 * 2 * MAX_GENES, megabatch_cells=512), seed=3)
    batch = next(iter(loader))
    assert batch.n_seqs >= 16 and (batch.labels >= 0).all()
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=manifest["vocab"]["size"], d_model=64, n_layers=2, n_heads=4, n_bins=N_BINS,
                         dropout=0.0, attention="sdpa", label_classes=[n_types])
    objectives = ObjectiveConfig(mlm_weight=1.0, contrastive_weight=0.5, label_weight=0.5)
    module = PretrainModule(CellModel(config), objectives)
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = full_batch_loss(module, [[batch]], objectives, step_seed=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])

"""What downstream teams do with a bundle beyond embedding: fine-tuning for cell-type annotation
(`finetune`), scHybridBERT clustering (`hybrid`: `vae`, `cell_graph`, `gat`; `clustering`: the
cluster baselines and scores), the shared reading of labelled .h5ad files into the model's tokens
(`token_cells`), and the classical representations every result is measured against (`expression`)."""

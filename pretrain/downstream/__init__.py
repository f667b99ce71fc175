"""What downstream teams do with a bundle beyond embedding: fine-tuning for cell-type annotation
(`finetune`), the shared reading of labelled .h5ad files into the model's tokens (`token_cells`),
and the classical baselines every result is measured against (`expression`)."""

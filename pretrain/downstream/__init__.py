"""What downstream teams do with a bundle beyond embedding: fine-tuning for cell-type annotation
(`finetune`), and the shared reading of labelled .h5ad files into the model's tokens (`token_cells`)."""

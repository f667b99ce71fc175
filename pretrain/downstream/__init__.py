"""What comes after pretraining: fine-tuning, clustering, and the classical baselines they are
measured against."""

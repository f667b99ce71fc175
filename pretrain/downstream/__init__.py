"""Downstream uses of an exported bundle (clustering, fine-tuning): each in a module of its own."""

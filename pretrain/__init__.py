"""Model, objectives and DeepSpeed training of single-cell foundation models.

`load_pretrained(bundle)` loads an exported model without DeepSpeed.
"""

from .export import load_pretrained

__all__ = ["load_pretrained"]

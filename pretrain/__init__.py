"""Model, objectives and DeepSpeed training of single-cell foundation models.

`load_pretrained(bundle)` (or `pretrain.model.CellModel.from_pretrained(bundle)`) loads an exported
bundle without DeepSpeed.
"""

from .export import load_pretrained

__all__ = ["load_pretrained"]

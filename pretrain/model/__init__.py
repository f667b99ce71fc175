"""The cell model (embeddings, packed encoder with favor / flash / varlen / sdpa attention, heads)."""

from .cell_model import CellModel, ModelOutput
from .flops import ModelCost, model_cost
from .presets import PRESETS, Preset, preset

__all__ = ["CellModel", "ModelCost", "ModelOutput", "PRESETS", "Preset", "model_cost", "preset"]

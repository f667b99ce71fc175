"""The cell model (embeddings, packed encoder with favor / flash / varlen / sdpa attention, heads)."""

from .cell_model import CellModel, ModelOutput
from .flops import ModelCost, model_cost, sequences_flops
from .shape import DecoderConfig, ModelConfig

__all__ = ["CellModel", "DecoderConfig", "ModelConfig", "ModelCost", "ModelOutput", "model_cost", "sequences_flops"]

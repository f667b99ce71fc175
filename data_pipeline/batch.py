"""`PackedBatch`: the loader's output and the model's input (DESIGN.md, "Batch format").

T tokens of B sequences concatenated without padding; ``cu_seqlens`` marks where each sequence
starts (flash-attention's convention). A sequence is a cell, or one view of a cell.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class PackedBatch:
    gene_ids: torch.Tensor     # [T] int64 token ids (rank mode: in rank order; else ascending)
    values: torch.Tensor       # [T] int64 bin / rank, or float32 continuous value
    cu_seqlens: torch.Tensor   # [B+1] int32
    max_seqlen: int
    mlm_mask: torch.Tensor     # [T] bool, positions whose input was masked
    mlm_targets: torch.Tensor  # [T] original value (or gene id in rank mode); meaningful where mlm_mask
    labels: torch.Tensor       # [B, n_label_columns] int64, -1 unknown
    view_index: torch.Tensor   # [B] int64, which cell of this batch a sequence shows (0..n_cells-1)
    cell_index: torch.Tensor   # [B] int64, the cell's global index in the corpus

    @property
    def n_tokens(self) -> int:
        return int(self.gene_ids.shape[0])

    @property
    def n_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def padded_tokens(self) -> int:
        """Token slots of the padded layout ``[B, max_seqlen]`` of this batch."""
        return self.n_seqs * self.max_seqlen

    def to_padded(self, pad_id: int = 0) -> dict[str, torch.Tensor]:
        """The ``[B, L]`` layout (L = max_seqlen) for code that needs it: ``gene_ids``, ``values``,
        ``mlm_mask``, ``mlm_targets`` padded (with ``pad_id`` / 0 / False / 0) and
        ``key_padding_mask`` [B, L] bool (True on real tokens)."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        b, length = self.n_seqs, self.max_seqlen
        real = torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]
        out = {"key_padding_mask": real}
        for name, fill in (("gene_ids", pad_id), ("values", 0), ("mlm_mask", False), ("mlm_targets", 0)):
            src = getattr(self, name)
            dense = torch.full((b, length), fill, dtype=src.dtype, device=src.device)
            dense[real] = src
            out[name] = dense
        return out

    def _map(self, fn) -> PackedBatch:
        return PackedBatch(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                              for f in fields(self)})

    def pin_memory(self) -> PackedBatch:  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = True) -> PackedBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

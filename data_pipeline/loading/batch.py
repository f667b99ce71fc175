"""`PackedBatch`: the loader's output and the model's input (DESIGN.md, "Batch format").

T tokens of B sequences concatenated without padding; ``cu_seqlens`` marks where each sequence
starts (flash-attention's convention). A sequence is a cell, or one view of a cell: its expressed
genes (capped at ``max_genes``), plus, with masked unexpressed genes (``data.mask_zero_prob``,
`zero_masking`), some genes it has no count for, masked, with input 0 and target 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

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
    # [B, 2] float32 total counts per sequence: T (the raw cell's, as the corpus stores it) and S (its
    # input's: lower than T when the loader downsampled the cell); scFoundation's T and S tokens read it
    read_depth: torch.Tensor | None = None
    # [M] int64, the positions where mlm_mask is True, ascending: found on the host by `to` (a boolean
    # index on the device waits for it to count the positions); None: found from the mask when asked
    mlm_index: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.gene_ids.shape[0])

    @property
    def n_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def n_cells(self) -> int:
        """Distinct cells: a cell shown in two views is one cell and two sequences. ``view_index``
        numbers the cells 0..n_cells-1 (the loader's, `select_cells`' and `concat`'s convention)."""
        return int(self.view_index.max()) + 1 if self.n_seqs else 0

    @property
    def n_masked_zeros(self) -> int:
        """Unexpressed genes added as masked targets (``data.mask_zero_prob``, scFoundation): masked
        with input 0, where a masked expressed gene's input is the mask value -1. They are decoder
        targets, not input: throughput counts leave them out."""
        if not self.values.is_floating_point():
            return 0
        return int((self.mlm_mask & (self.values == 0)).sum())

    def masked_index(self) -> torch.Tensor:
        """The masked positions [M] int64, ascending (``mlm_index``, else found from ``mlm_mask``:
        a device sync where the mask is on a device)."""
        return self.mlm_index if self.mlm_index is not None else torch.nonzero(self.mlm_mask).flatten()

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

    # --- cutting and joining (gradient-cache chunks) --------------------------------------------
    def select_cells(self, first: int, stop: int) -> PackedBatch:
        """The sequences whose ``view_index`` is in ``[first, stop)`` (both views of a cell stay
        together; sequences of a cell are contiguous, as the loader makes them), view_index
        renumbered from 0."""
        seqs = torch.nonzero((self.view_index >= first) & (self.view_index < stop)).flatten()
        if seqs.numel() == 0:
            raise ValueError(f"no sequences with view_index in [{first}, {stop})")
        s0, s1 = int(seqs[0]), int(seqs[-1]) + 1
        if s1 - s0 != seqs.numel():
            raise ValueError("a cell's sequences are not contiguous in this batch")
        t0, t1 = int(self.cu_seqlens[s0]), int(self.cu_seqlens[s1])
        cu = self.cu_seqlens[s0 : s1 + 1] - t0
        return PackedBatch(gene_ids=self.gene_ids[t0:t1], values=self.values[t0:t1], cu_seqlens=cu,
                           max_seqlen=int((cu[1:] - cu[:-1]).max()), mlm_mask=self.mlm_mask[t0:t1],
                           mlm_targets=self.mlm_targets[t0:t1], labels=self.labels[s0:s1],
                           view_index=self.view_index[s0:s1] - first, cell_index=self.cell_index[s0:s1],
                           read_depth=None if self.read_depth is None else self.read_depth[s0:s1])

    def split(self, cells_per_chunk: int) -> list[PackedBatch]:
        """Consecutive chunks of ``cells_per_chunk`` cells (the last may have fewer)."""
        if cells_per_chunk < 1:
            raise ValueError(f"cells_per_chunk={cells_per_chunk} must be >= 1")
        n_cells = self.n_cells
        return [self.select_cells(a, min(a + cells_per_chunk, n_cells)) for a in range(0, n_cells, cells_per_chunk)]

    @classmethod
    def concat(cls, batches: list[PackedBatch]) -> PackedBatch:
        """One batch of all sequences of ``batches``, in order (view_index kept distinct)."""
        cu, view, index, tokens = [batches[0].cu_seqlens[:1]], [], [], 0
        cells = torch.zeros((), dtype=batches[0].view_index.dtype, device=batches[0].view_index.device)
        for b in batches:
            cu.append(b.cu_seqlens[1:] + tokens)
            view.append(b.view_index + cells)
            if b.mlm_index is not None:
                index.append(b.mlm_index + tokens)
            tokens += b.n_tokens
            # the cells so far as a tensor: an int would wait for a device batch's view_index.max()
            cells = cells + (b.view_index.max() + 1 if b.n_seqs else 0)
        cat = lambda name: torch.cat([getattr(b, name) for b in batches])  # noqa: E731
        return cls(gene_ids=cat("gene_ids"), values=cat("values"), cu_seqlens=torch.cat(cu),
                   max_seqlen=max(b.max_seqlen for b in batches), mlm_mask=cat("mlm_mask"),
                   mlm_targets=cat("mlm_targets"), labels=cat("labels"), view_index=torch.cat(view),
                   cell_index=cat("cell_index"),
                   read_depth=None if any(b.read_depth is None for b in batches) else cat("read_depth"),
                   mlm_index=torch.cat(index) if len(index) == len(batches) else None)

    # --- one buffer per batch between processes --------------------------------------------------
    _TENSORS = ("gene_ids", "values", "cu_seqlens", "mlm_mask", "mlm_targets", "labels", "view_index", "cell_index",
                "read_depth")

    def _present(self) -> tuple[str, ...]:
        return tuple(n for n in self._TENSORS if getattr(self, n) is not None)

    def wire_bytes(self) -> int:
        """Bytes `to_wire` needs."""
        return sum(-(-getattr(self, n).numel() * getattr(self, n).element_size() // 8) * 8 for n in self._present())

    def to_wire(self, buf: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """``(buffer, header)``: every tensor copied into the front of ``buf`` (uint8, at least
        `wire_bytes`; shared memory in a DataLoader worker, reused batch after batch: fresh
        shared memory per batch costs page faults that dominate on some VMs), 8-byte aligned, so
        that a worker sends one shared segment per batch instead of one per tensor. `from_wire`
        rebuilds the batch as views."""
        names = self._present()
        parts = [getattr(self, n).contiguous() for n in names]
        sizes = [t.numel() * t.element_size() for t in parts]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // 8) * 8
        buf = buf[:total]
        for t, off, size in zip(parts, offsets, sizes):
            buf[off : off + size] = t.view(-1).view(torch.uint8)
        header = tuple((name, off, t.dtype, tuple(t.shape)) for name, t, off in zip(names, parts, offsets))
        return buf, (header, self.max_seqlen)

    @classmethod
    def from_wire(cls, buf: torch.Tensor, header: tuple) -> PackedBatch:
        layout, max_seqlen = header
        tensors = {}
        for name, off, dtype, shape in layout:
            n = 1
            for d in shape:
                n *= d
            size = n * torch.empty(0, dtype=dtype).element_size()
            tensors[name] = buf[off : off + size].view(dtype).view(shape)
        return cls(max_seqlen=max_seqlen, **tensors)

    def _map(self, fn) -> PackedBatch:
        return PackedBatch(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                              for f in fields(self)})

    def pin_memory(self) -> PackedBatch:  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = True) -> PackedBatch:
        """The batch on ``device``, with ``mlm_index`` found here first when the mask is on the host."""
        batch = self
        if self.mlm_index is None and self.mlm_mask.device.type == "cpu":
            batch = replace(self, mlm_index=torch.nonzero(self.mlm_mask).flatten())
        return batch._map(lambda t: t.to(device, non_blocking=non_blocking))

"""Token embeddings: gene identity plus expression value (DESIGN.md, "Model and kernels").

Gene identity: one row per vocabulary token, optionally initialized from a pretrained
gene-embedding file aligned to the vocabulary by Ensembl id (or symbol). Expression value, by
``value_mode``: ``bins`` (a table over bins 0 ... n_bins - 1 plus the loader's mask bin
``n_bins``), ``continuous`` (a small MLP of the value, or xTrimoGene's auto-discretization,
`AutoDiscretization`; the loader marks masked inputs with -1, which get a learned mask vector
instead) or ``rank`` (Geneformer: the value is the position in
the rank-ordered cell, embedded by a position table; masking acts on the gene token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_pipeline.conversion.vocab import strip_version


@dataclass
class GeneEmbeddingCoverage:
    n_vocab_genes: int
    n_found: int
    n_file_genes: int

    @property
    def fraction(self) -> float:
        return self.n_found / max(1, self.n_vocab_genes)


def read_gene_embedding_file(path: str | Path) -> tuple[list[str], np.ndarray]:
    """``(gene ids, vectors [n, d] float32)`` of a pretrained gene-embedding file: gene2vec /
    word2vec text (``GENE v1 ... vd`` per line, whitespace separated, an optional ``count dim``
    header: gene2vec's ``gene2vec_dim_200_iter_9_w2v.txt`` and the tab-separated
    ``gene2vec_dim_200_iter_9.txt``) or ``.npz`` with arrays ``gene_ids`` [n] and ``embeddings`` [n, d]."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"gene embedding file {path} does not exist; fix model.gene_embedding_file")
    if path.suffix == ".npy":  # scBERT's gene2vec_16906.npy: rows in its gene list's order, no names
        raise ValueError(f"{path}: a .npy holds vectors without gene names, so they cannot be aligned to the "
                         "vocabulary: save them as .npz with arrays gene_ids (the genes in row order; scBERT's "
                         "gene2vec_16906.npy follows the var_names of its panglao reference h5ad) and embeddings, "
                         "or use gene2vec's text file (gene2vec_dim_200_iter_9_w2v.txt)")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            missing = {"gene_ids", "embeddings"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: an .npz gene embedding file needs arrays gene_ids and embeddings "
                                 f"(missing {sorted(missing)}; has {z.files})")
            ids, vectors = [str(g) for g in z["gene_ids"]], np.asarray(z["embeddings"], np.float32)
    else:
        ids, rows = [], []
        with open(path) as fh:
            for line_no, line in enumerate(fh, 1):
                parts = line.split()
                if not parts or (line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts)):
                    continue
                try:
                    rows.append(np.array(parts[1:], np.float32))
                except ValueError as err:
                    raise ValueError(f"{path}:{line_no}: expected 'GENE v1 ... vd' with numbers ({err})") from None
                ids.append(parts[0])
        if not rows:
            raise ValueError(f"{path}: no embedding rows (expected 'GENE v1 ... vd' per line)")
        widths = {len(r) for r in rows}
        if len(widths) != 1:
            raise ValueError(f"{path}: rows have different widths {sorted(widths)}")
        vectors = np.stack(rows)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"{path}: {len(ids)} gene ids for embeddings of shape {vectors.shape}")
    return ids, vectors


def align_gene_embeddings(ids: list[str], vectors: np.ndarray, vocab_ensembl: list[str], vocab_symbols: list[str],
                          special: set[int]) -> tuple[np.ndarray, np.ndarray, GeneEmbeddingCoverage]:
    """Rows of ``vectors`` for each vocabulary token, matched by Ensembl id (version stripped,
    case-insensitive), else by symbol.  -> (rows [V, d], found [V] bool, coverage)"""
    if len(vocab_ensembl) != len(vocab_symbols):
        raise ValueError(f"vocabulary of {len(vocab_ensembl)} Ensembl ids but {len(vocab_symbols)} symbols")
    by_id = {}
    for i, g in enumerate(ids):  # versions are stripped from Ensembl ids only (symbols like AC000061.1 keep theirs)
        by_id.setdefault(strip_version(g).upper(), i)
    rows = np.zeros((len(vocab_ensembl), vectors.shape[1]), np.float32)
    found = np.zeros(len(vocab_ensembl), bool)
    for token, (ens, sym) in enumerate(zip(vocab_ensembl, vocab_symbols)):
        if token in special:
            continue
        i = by_id.get(strip_version(ens).upper()) if ens else None
        if i is None and sym:
            i = by_id.get(sym.upper())
        if i is not None:
            rows[token], found[token] = vectors[i], True
    coverage = GeneEmbeddingCoverage(len(vocab_ensembl) - len(special), int(found.sum()), len(ids))
    return rows, found, coverage


class ScalarLinear(nn.Linear):
    """``nn.Linear(1, n)`` of a continuous value, computed in at least fp32 and returned in the
    weights' dtype. Under bf16 training the value itself would otherwise be rounded to bf16's 8
    significant bits first: log10 total counts 4.28 and 4.31 (T and S of a cell downsampled by
    7 %) would be one input. The output is still rounded, but each of the n units rounds its own
    affine image, so together they keep the difference.  x [N, 1] -> [N, n]"""

    def __init__(self, out_features: int):
        super().__init__(1, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # bf16 autocast (embedding on a GPU) would narrow it
            out = nn.functional.linear(x.to(wide), self.weight.to(wide), self.bias.to(wide))
        return out.to(self.weight.dtype)


class AutoDiscretization(nn.Module):
    """xTrimoGene / scFoundation's value embedding (biomap-research/scFoundation,
    model/pretrainmodels/mae_autobin.py, AutoDiscretizationEmbedding2): a scalar value v becomes
    b logits ``h = LeakyReLU_0.1(w1 v + c1)``, mixed across bins ``z = alpha h + (W2 h + c2)``,
    and the embedding is the softmax-weighted sum of b learned bin vectors ``softmax(z) @ E``
    (E [b, d]): a soft, learned binning in place of fixed bin edges. values [N] float -> [N, d]."""

    def __init__(self, d_model: int, n_bins: int, alpha: float):
        super().__init__()
        self.to_logits = ScalarLinear(n_bins)
        self.mix = nn.Linear(n_bins, n_bins)
        self.bins = nn.Embedding(n_bins, d_model)
        self.alpha = alpha

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.leaky_relu(self.to_logits(values[:, None]), 0.1)
        weights = torch.softmax(self.alpha * h + self.mix(h), dim=-1)
        return weights @ self.bins.weight


class BinValueMLP(nn.Module):
    """scGPT's value encoder for binned input (bowang-lab/scGPT scgpt/model/model.py,
    ContinuousValueEncoder, which scGPT's pretraining uses with its binned values): the bin index
    is a scalar, not a category, so neighbouring bins get neighbouring embeddings:
    ``LayerNorm(W2 relu(w1 v + b1) + b2)``. The loader's mask bin (``mask_bin``) enters as -1,
    scGPT's ``mask_value``. (scGPT's dropout after the LayerNorm is the model's embedding dropout
    here.)  bins [N] int -> [N, d]"""

    MASK_VALUE = -1.0

    def __init__(self, d_model: int, mask_bin: int):
        super().__init__()
        self.mask_bin = mask_bin
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, bins: torch.Tensor) -> torch.Tensor:
        x = bins.to(self.linear1.weight.dtype)
        x = torch.where(bins == self.mask_bin, torch.full_like(x, self.MASK_VALUE), x)
        return self.norm(self.linear2(torch.relu(self.linear1(x[:, None]))))


class ValueEmbedding(nn.Module):
    """Expression input -> ``[T, d]``. values [T]: bins (int), continuous (float, -1 = masked)
    or rank (int position). Continuous values go through a small MLP (``continuous_embedding``
    mlp) or `AutoDiscretization` (autobin); bins through a table or `BinValueMLP` (``bin_embedding``)."""

    def __init__(self, mode: str, d_model: int, n_bins: int, max_rank: int, continuous_embedding: str = "mlp",
                 autobin_bins: int = 100, autobin_alpha: float = 1.0, bin_embedding: str = "table"):
        super().__init__()
        self.mode = mode
        if mode == "bins" and bin_embedding == "mlp":
            self.bin_mlp = BinValueMLP(d_model, mask_bin=n_bins)
        elif mode == "bins":
            self.table = nn.Embedding(n_bins + 1, d_model)  # + the loader's mask bin (= n_bins)
        elif mode == "rank":
            self.table = nn.Embedding(max_rank, d_model)
            self.max_rank = max_rank
        else:
            if continuous_embedding == "autobin":
                self.autobin = AutoDiscretization(d_model, autobin_bins, autobin_alpha)
            else:
                hidden = max(32, d_model // 4)
                self.mlp = nn.Sequential(ScalarLinear(hidden), nn.GELU(), nn.Linear(hidden, d_model))
            self.mask = nn.Parameter(torch.zeros(d_model))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self.mode == "continuous":
            x = values.to(torch.promote_types(self.mask.dtype, torch.float32))  # the first layer takes it wide
            masked = x < 0
            x = x.clamp_min(0)
            out = self.autobin(x) if hasattr(self, "autobin") else self.mlp(x[:, None])
            return torch.where(masked[:, None], self.mask.expand_as(out), out)
        if hasattr(self, "bin_mlp"):
            return self.bin_mlp(values)
        # checked where it costs no device sync; the trainer checks the loader's max_genes up front
        if self.mode == "rank" and not values.is_cuda and values.numel() and int(values.max()) >= self.max_rank:
            raise ValueError(f"rank {int(values.max())} >= model.max_rank={self.max_rank}: raise model.max_rank "
                             "or cap cells with the loader's max_genes")
        return self.table(values.long())

"""scHybridBERT's cell graph: K nearest neighbours of each cell under the Exp-Mah similarity

    sim(x, y) = Rcor(x, y) ** (alpha * dM(x, y))

(Pearson correlation raised to a power growing with the Manhattan distance), computed over the
VAE latent (`vae.fit_vae_latent`). Close, well-correlated cells score near 1.

This project's choices, where the paper's formula (as issue 23 gives it) leaves them open:

- ``dM`` is the Manhattan distance divided by the dimension (the mean absolute difference per
  latent coordinate), so the exponent does not grow with the latent width;
- a correlation <= ``eps`` (1e-6) counts as ``eps``: negatively correlated or uncorrelated
  cells get a similarity near 0, ranked below every positively correlated cell, and the ranking
  among positive correlations is the formula's own. ((1 + r) / 2 instead would rank a close but
  anti-correlated cell above a distant, well-correlated one.)
- ranking and pruning use ``log sim = alpha * dM * log r`` (the similarity itself underflows to 0
  for distant cells, which would make ties);
- pruning (after scGNN's adaptive kNN pruning, not from the scHybridBERT paper): of a cell's K
  neighbours, those whose log-similarity is below the mean minus one standard deviation of the
  K are dropped (the nearest is always kept); the graph is then made undirected by the union of
  the kept edges, each weighted by its similarity. No self-loops (the GAT adds its own).
- so alpha (> 0) scales every log-similarity alike and changes no edge, only the weights, which
  the GAT does not read: ``--sim-alpha`` does not change the clusters. Pruning on the similarity
  itself would let alpha act; it waits until the evaluation's clustering rows (3 seeds of
  benchmarks/results/eval_final*.json, computed with this graph) can be recomputed with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EPS = 1e-6


@dataclass(frozen=True)
class CellGraph:
    """An undirected graph as both directions of every edge: ``edge_index`` [2, E] (source,
    target) int64, sorted by target then source; ``weight`` [E] the Exp-Mah similarity."""

    edge_index: np.ndarray
    weight: np.ndarray
    n_nodes: int

    def degrees(self) -> np.ndarray:
        return np.bincount(self.edge_index[1], minlength=self.n_nodes)


def exp_mah_log_similarity(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, eps: float = EPS) -> torch.Tensor:
    """``log sim`` between rows of ``a`` [M, D] and ``b`` [N, D]: ``alpha * dM / D * log(max(r, eps))``. [M, N]"""
    ac, bc = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    an = ac / ac.norm(dim=1, keepdim=True).clamp_min(1e-30)  # a constant row: r = 0
    bn = bc / bc.norm(dim=1, keepdim=True).clamp_min(1e-30)
    r = (an @ bn.T).clamp(eps, 1.0)
    manhattan = torch.cdist(a, b, p=1) / a.shape[1]
    return alpha * manhattan * torch.log(r)


def exp_mah_knn_graph(z: np.ndarray, k: int = 15, alpha: float = 1.0, block: int = 1024) -> CellGraph:
    """The pruned, symmetric Exp-Mah kNN graph over the rows of ``z`` [N, D] (exact: O(N^2 D),
    computed in blocks of ``block`` rows)."""
    n = len(z)
    if n < 2:
        raise ValueError(f"a cell graph needs at least 2 cells, got {n}")
    if not alpha > 0:
        raise ValueError(f"alpha {alpha}: the Exp-Mah exponent alpha * dM needs alpha > 0 (0 makes every cell "
                         "equally similar, a negative one ranks the least similar first); the default is 1.0")
    k = min(k, n - 1)
    data = torch.from_numpy(np.asarray(z, np.float64))
    sources, targets, logs = [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = exp_mah_log_similarity(data[start:stop], data, alpha).numpy()
        s[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # not its own neighbour
        # stable sort: ties broken by cell index, so the graph does not depend on the block size
        nearest = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(s, nearest, axis=1)
        keep = best >= (best.mean(axis=1, keepdims=True) - best.std(axis=1, keepdims=True))
        keep[:, 0] = True
        rows = np.broadcast_to(np.arange(start, stop)[:, None], nearest.shape)
        sources.append(nearest[keep])
        targets.append(rows[keep])
        logs.append(best[keep])
    src, dst, log = np.concatenate(sources), np.concatenate(targets), np.concatenate(logs)
    # union of both directions; a pair kept from both ends has the same similarity twice
    both_src, both_dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    both_log = np.concatenate([log, log])
    key = both_dst.astype(np.int64) * n + both_src
    key, first = np.unique(key, return_index=True)
    return CellGraph(edge_index=np.stack([key % n, key // n]).astype(np.int64),
                     weight=np.exp(both_log[first]), n_nodes=n)

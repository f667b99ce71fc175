"""Graph attention (GAT, Velickovic et al. 2018) over an edge list, in plain torch, beside its
dense-adjacency reference (`dense_gat`); scHybridBERT runs it over the Exp-Mah cell graph.

Same definition as torch-geometric's ``GATConv(..., concat=False)`` (which imports without compiled
extensions but is not a dependency here): per head, ``h = W x``; for an edge j -> i,
``e_ij = LeakyReLU(a_src . h_j + a_dst . h_i)``; ``alpha_ij = softmax_j(e_ij)`` over i's incoming
edges; ``out_i = mean over heads of sum_j alpha_ij h_j``, plus a bias. With ``add_self_loops``
every node attends to itself once (existing self-loops are replaced), so a node without
neighbours keeps its own features; without it such a node's output is the bias alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Softmax of ``scores`` [E, H] within the groups of equal ``index`` [E] (values < n_segments)."""
    expanded = index.unsqueeze(1).expand_as(scores)
    top = torch.full((n_segments, scores.shape[1]), float("-inf"), dtype=scores.dtype, device=scores.device)
    # the shift only guards exp() against overflow: the softmax is the same for any constant per segment
    top = top.scatter_reduce(0, expanded, scores.detach(), reduce="amax", include_self=True)
    exp = torch.exp(scores - top.index_select(0, index))
    total = torch.zeros_like(top).index_add_(0, index, exp)
    return exp / total.index_select(0, index)


class GATLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, heads: int = 4, negative_slope: float = 0.2,
                 add_self_loops: bool = True):
        super().__init__()
        self.heads, self.out_dim = heads, out_dim
        self.negative_slope, self.add_self_loops = negative_slope, add_self_loops
        self.lin = nn.Linear(in_dim, heads * out_dim, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_dim))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        for p in (self.lin.weight, self.att_src, self.att_dst):
            nn.init.xavier_uniform_(p)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h [N, H, C], source score a_src . h [N, H], target score a_dst . h [N, H])."""
        h = self.lin(x).view(len(x), self.heads, self.out_dim)
        return h, (h * self.att_src).sum(-1), (h * self.att_dst).sum(-1)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """``x`` [N, F], ``edge_index`` [2, E] int64 (source, target) -> [N, out_dim]."""
        n = len(x)
        if self.add_self_loops:
            loop = torch.arange(n, device=x.device)
            edge_index = torch.cat([edge_index[:, edge_index[0] != edge_index[1]], torch.stack([loop, loop])], dim=1)
        src, dst = edge_index
        h, score_src, score_dst = self.project(x)
        # index_select, not h[src]: advanced indexing's backward accumulates in a thread-dependent order on
        # CPUs (two runs differed), index_select's does not
        scores = F.leaky_relu(score_src.index_select(0, src) + score_dst.index_select(0, dst), self.negative_slope)
        alpha = segment_softmax(scores, dst, n)
        out = torch.zeros_like(h).index_add_(0, dst, alpha.unsqueeze(-1) * h.index_select(0, src))
        return out.mean(dim=1) + self.bias


def dense_gat(layer: GATLayer, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """Reference for `GATLayer.forward` with a dense ``adjacency`` [N, N] bool (``[i, j]``: an edge
    j -> i; self-loops added as the layer adds them): a masked softmax over each row."""
    n = len(x)
    if layer.add_self_loops:
        adjacency = adjacency | torch.eye(n, dtype=torch.bool, device=x.device)
    h, score_src, score_dst = layer.project(x)
    e = F.leaky_relu(score_dst.T.unsqueeze(2) + score_src.T.unsqueeze(1), layer.negative_slope)  # [H, N_i, N_j]
    e = e.masked_fill(~adjacency, float("-inf"))
    alpha = torch.softmax(e, dim=2).nan_to_num(0.0)  # a row without edges: no attention, output = bias
    out = torch.einsum("hij,jhc->ihc", alpha, h)
    return out.mean(dim=1) + layer.bias


class GATEncoder(nn.Module):
    """Two GAT layers (ELU between), heads averaged in each: node features [N, F] -> [N, out_dim]."""

    def __init__(self, in_dim: int, hidden: int = 64, out_dim: int = 32, heads: int = 4):
        super().__init__()
        self.first = GATLayer(in_dim, hidden, heads)
        self.second = GATLayer(hidden, out_dim, heads)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.second(F.elu(self.first(x, edge_index)), edge_index)

"""scHybridBERT's parts against direct computations (issue 23, point 2): the edge-list GAT against its
dense-adjacency reference (forward and gradients, several heads, random graphs with isolated nodes
and self-loops), the Exp-Mah similarity against numpy, the pruned symmetric kNN graph against a
brute-force construction, the VAE loss against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.downstream.cell_graph import EPS, exp_mah_knn_graph, exp_mah_log_similarity
from pretrain.downstream.gat import GATLayer, dense_gat
from pretrain.downstream.vae import fit_vae_latent, vae_loss


def _random_graph(n: int, density: float, seed: int) -> torch.Tensor:
    """Dense adjacency [N, N] bool ([i, j]: edge j -> i) with self-loops on some nodes and the last
    two nodes isolated (no incoming or outgoing edges)."""
    g = torch.Generator().manual_seed(seed)
    adj = torch.rand(n, n, generator=g) < density
    adj[-2:, :] = False
    adj[:, -2:] = False
    assert adj.diagonal().any() and not adj.diagonal().all()
    return adj


def _edges(adj: torch.Tensor) -> torch.Tensor:
    dst, src = adj.nonzero(as_tuple=True)
    order = torch.randperm(len(src), generator=torch.Generator().manual_seed(1))  # any edge order
    return torch.stack([src, dst])[:, order]


@pytest.mark.parametrize("self_loops", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gat_edge_list_matches_dense_reference(self_loops, seed):
    torch.manual_seed(seed)
    n, heads = 17, 3
    adj = _random_graph(n, 0.3, seed)
    layer = GATLayer(6, 5, heads=heads, add_self_loops=self_loops).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    fast, ref = layer(x, _edges(adj)), dense_gat(layer, x, adj)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    if not self_loops:  # an isolated node attends to nothing: its output is the bias alone
        torch.testing.assert_close(fast[-1], layer.bias)
    else:  # with its own loop it is its projection, averaged over heads
        torch.testing.assert_close(fast[-1], layer.lin(x[-1:]).view(heads, 5).mean(0) + layer.bias)
    weights = torch.randn_like(fast)
    params = [x, layer.lin.weight, layer.att_src, layer.att_dst, layer.bias]
    grads_fast = torch.autograd.grad((fast * weights).sum(), params)
    grads_ref = torch.autograd.grad((dense_gat(layer, x, adj) * weights).sum(), params)
    for a, b in zip(grads_fast, grads_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gat_attention_depends_on_the_neighbours():
    """Not a mean over neighbours: changing the attention vectors changes the output (the test above
    would also pass for a layer that ignored attention in both paths)."""
    torch.manual_seed(0)
    adj = _random_graph(12, 0.4, 0)
    layer = GATLayer(4, 3, heads=2).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    before = layer(x, _edges(adj))
    with torch.no_grad():
        layer.att_src.mul_(5)
    assert (layer(x, _edges(adj)) - before).abs().max() > 1e-3


def test_gat_matches_torch_geometric_gatconv():
    """Where torch-geometric is installed (not a dependency), the layer equals its GATConv(concat=False)."""
    pyg = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    adj = _random_graph(15, 0.3, 3)
    layer = GATLayer(6, 4, heads=3).double()
    conv = pyg.GATConv(6, 4, heads=3, concat=False).double()
    with torch.no_grad():
        conv.lin.weight.copy_(layer.lin.weight)
        conv.att_src.copy_(layer.att_src)
        conv.att_dst.copy_(layer.att_dst)
        conv.bias.normal_()
        layer.bias.copy_(conv.bias)
    x = torch.randn(15, 6, dtype=torch.float64)
    edges = _edges(adj)
    torch.testing.assert_close(layer(x, edges), conv(x, edges), rtol=1e-10, atol=1e-12)


def _numpy_similarity(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    r = np.corrcoef(x, y)[0, 1]
    manhattan = np.abs(x - y).sum() / len(x)
    return max(r, EPS) ** (alpha * manhattan)


def test_exp_mah_similarity_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 9)), rng.normal(size=(11, 9))
    b[0] = -a[0] + 0.01 * rng.normal(size=9)  # strongly anti-correlated: clamped to eps
    b[1] = 2 * a[1] + 0.5                     # perfectly correlated, but distant
    for alpha in (0.5, 1.0, 3.0):
        got = np.exp(exp_mah_log_similarity(torch.from_numpy(a), torch.from_numpy(b), alpha).numpy())
        want = np.array([[_numpy_similarity(x, y, alpha) for y in b] for x in a])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)
    assert got[0, 0] < 1e-6 and got[1, 1] == pytest.approx(1.0)


def _brute_force_graph(z: np.ndarray, k: int, alpha: float) -> dict[tuple[int, int], float]:
    """{(source, target): similarity} for both directions of every kept edge."""
    n = len(z)
    logsim = np.array([[np.log(_numpy_similarity(z[i], z[j], alpha)) for j in range(n)] for i in range(n)])
    kept = {}
    for i in range(n):
        others = [j for j in range(n) if j != i]
        nearest = sorted(others, key=lambda j: (-logsim[i, j], j))[:k]
        values = np.array([logsim[i, j] for j in nearest])
        threshold = values.mean() - values.std()
        for rank, j in enumerate(nearest):
            if rank == 0 or logsim[i, j] >= threshold:
                kept[(j, i)] = kept[(i, j)] = float(np.exp(logsim[i, j]))
    return kept


@pytest.mark.parametrize("k, alpha", [(3, 1.0), (8, 1.0), (8, 0.2), (8, 5.0)])
def test_knn_graph_is_the_pruned_symmetric_exp_mah_graph(k, alpha):
    rng = np.random.default_rng(k)
    z = np.concatenate([rng.normal(size=(20, 5)), rng.normal(3, 1, size=(20, 5))])
    graph = exp_mah_knn_graph(z, k=k, alpha=alpha, block=7)
    src, dst = graph.edge_index
    got = {(int(s), int(d)): float(w) for s, d, w in zip(src, dst, graph.weight)}
    want = _brute_force_graph(z, k, alpha)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[e] for e in want], list(want.values()), rtol=1e-9)
    assert (src != dst).all()
    assert len(got) < 2 * k * len(z)  # something was pruned
    # the block size does not change the graph
    other = exp_mah_knn_graph(z, k=k, alpha=alpha, block=1024)
    np.testing.assert_array_equal(other.edge_index, graph.edge_index)


def test_alpha_must_be_positive_and_scales_only_the_weights():
    """alpha (the --sim-alpha of launch/cluster_cells.py): 0 or a negative one is refused, naming the
    fix; a positive one changes the edges' weights, not which edges there are (pruning on the
    log-similarity, as documented in cell_graph)."""
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(size=(30, 5)), rng.normal(3, 1, size=(30, 5))])
    low, high = (exp_mah_knn_graph(z, k=10, alpha=a) for a in (0.2, 5.0))
    assert np.array_equal(low.edge_index, high.edge_index) and not np.allclose(low.weight, high.weight)
    for alpha in (0.0, -1.0):
        with pytest.raises(ValueError, match="needs alpha > 0"):
            exp_mah_knn_graph(z, k=10, alpha=alpha)


def test_vae_loss_matches_its_formula():
    rng = np.random.default_rng(0)
    x, recon = rng.random((6, 10)), rng.random((6, 10))
    mu, logvar = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    alpha = 0.3
    mse = ((recon - x) ** 2).sum(axis=1).mean()
    kl = np.mean([0.5 * np.sum(np.exp(lv) + m**2 - 1 - lv) for m, lv in zip(mu, logvar)])
    got = vae_loss(*(torch.from_numpy(a) for a in (recon, x, mu, logvar)), recon_weight=alpha)
    assert float(got) == pytest.approx(alpha * mse + (1 - alpha) * kl, rel=1e-12)


def test_vae_refuses_inputs_outside_the_unit_interval():
    with pytest.raises(ValueError, match="unit_scale"):
        fit_vae_latent(np.full((4, 3), 2.0, np.float32))

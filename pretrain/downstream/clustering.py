"""What every clustering in the `cluster` command shares: cluster assignment (k-means with k given,
or graph communities on a kNN graph) and scores against known labels (ARI, NMI); the expression
preprocessing (log1p-CP10k, highly variable genes, PCA) is `expression`'s.

Graph communities are Leiden (leidenalg + igraph, as scanpy uses) when both are importable, else
networkx's Louvain (always installed; the same modularity objective with resolution, without
Leiden's guarantee of connected communities): the result records which ran.

The PCA-50 baseline follows scanpy's default pipeline (normalize_total 1e4, log1p, HVG with the
seurat flavour, PCA 50, neighbors 15, Leiden) with one difference, this project's: the neighbour
graph is the union of each cell's 15 exact Euclidean nearest neighbours, unweighted (not UMAP's
fuzzy connectivities, which need umap-learn).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def knn_adjacency(x: np.ndarray, k: int = 15) -> sp.csr_matrix:
    """Union of each row's ``k`` nearest (Euclidean, exact) rows, unweighted and symmetric, no self-loops."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    rows = np.repeat(np.arange(len(x)), k + 1)
    a = sp.csr_matrix((np.ones(idx.size), (rows, idx.ravel())), shape=(len(x), len(x)))
    a.setdiag(0)
    a.eliminate_zeros()
    a = ((a + a.T) > 0).astype(np.float64)
    return a.tocsr()


def community_method() -> str:
    try:
        import igraph  # noqa: F401
        import leidenalg  # noqa: F401
    except ImportError:
        return "louvain (networkx; install leidenalg and igraph for Leiden)"
    return "leiden (leidenalg)"


def graph_communities(adjacency: sp.csr_matrix, resolution: float = 1.0, seed: int = 0) -> tuple[np.ndarray, str]:
    """(community per node [N] int, numbered by decreasing size; the method that ran)."""
    method = community_method()
    upper = sp.triu(adjacency, k=1).tocoo()
    n = adjacency.shape[0]
    if method.startswith("leiden"):
        import igraph
        import leidenalg

        graph = igraph.Graph(n=n, edges=list(zip(upper.row.tolist(), upper.col.tolist())))
        part = leidenalg.find_partition(graph, leidenalg.RBConfigurationVertexPartition, weights=upper.data.tolist(),
                                        resolution_parameter=resolution, seed=seed)
        groups = [list(c) for c in part]
    else:
        import networkx as nx

        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        graph.add_weighted_edges_from(zip(upper.row.tolist(), upper.col.tolist(), upper.data.tolist()))
        groups = [sorted(c) for c in nx.community.louvain_communities(graph, resolution=resolution, seed=seed)]
    labels = np.empty(n, np.int64)
    for i, members in enumerate(sorted(groups, key=lambda c: (-len(c), min(c)))):
        labels[members] = i
    return labels, method


def kmeans(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans

    if not 1 <= k <= len(x):
        raise ValueError(f"--n-clusters {k}: needs 1 <= k <= the number of cells ({len(x)})")
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(np.asarray(x, np.float64)).astype(np.int64)


def assign_clusters(x: np.ndarray, n_clusters: int | None, resolution: float = 1.0, n_neighbors: int = 15,
                    seed: int = 0) -> tuple[np.ndarray, str]:
    """k-means with ``n_clusters`` when given, else communities of the kNN graph of ``x`` [N, D]."""
    if n_clusters:
        return kmeans(x, n_clusters, seed), f"k-means (k={n_clusters})"
    labels, method = graph_communities(knn_adjacency(x, n_neighbors), resolution, seed)
    return labels, f"{method}, resolution {resolution}, {n_neighbors} neighbours"


def scores(truth, predicted: np.ndarray) -> dict:
    """ARI and NMI of ``predicted`` against ``truth`` over the cells whose label is known."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from .token_cells import label_strings

    truth = label_strings(truth)
    known = truth != ""
    t, p = truth[known].astype(str), np.asarray(predicted)[known]
    return {"ari": float(adjusted_rand_score(t, p)), "nmi": float(normalized_mutual_info_score(t, p)),
            "n_labelled": int(known.sum()), "n_clusters": int(len(np.unique(predicted)))}

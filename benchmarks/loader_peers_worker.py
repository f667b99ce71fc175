"""The peer loaders of `bench_loader_peers.py`, run in their own interpreter (annbatch needs python
>= 3.12; the project runs on 3.10+): annbatch, scDataset and backed AnnData, each reading the same
cells as the project's loader, one measurement per command.

    python loader_peers_worker.py prepare --inputs A.h5ad B.h5ad ... --out DIR
    python loader_peers_worker.py serve --out DIR      # then JSON commands on stdin, one per line

``prepare`` writes what the peers read, once (kept under ``DIR``): ``union.h5ad``, the inputs
concatenated (outer join of their genes, plain CSR, the counts as stored), and ``annbatch.zarr``,
annbatch's preshuffled collection of it (`annbatch.DatasetCollection.add_adatas`, its recommended
layout). ``serve`` answers ``{"peer": P, "values": "raw" | "log1p_cp10k", "cells": N,
"batch_cells": B, "seed": S}`` with one JSON line: cells, nonzeros, batches and this process's CPU
and wall seconds for reading batches of B cells until N cells (N <= 0: one epoch). The peer
objects are built once and reused, so that each measurement times iteration only.

log1p_cp10k is computed on each yielded CSR batch as the project computes it
(``log1p(count / row total * 1e4)``, float64 then float32): annbatch and scDataset have no
normalization of their own. raw leaves the batch as the peer yields it (counts as stored).
Only numpy, scipy, anndata and the peers are imported here: nothing of the project.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def prepare(inputs: list[str], out: Path) -> dict:
    import anndata as ad

    out.mkdir(parents=True, exist_ok=True)
    union = out / "union.h5ad"
    if not union.exists():
        parts = []
        for f in inputs:
            a = ad.read_h5ad(f)
            a = ad.AnnData(X=sp.csr_matrix(a.X), obs=a.obs[[]], var=a.var[[]])
            a.var_names_make_unique()
            a.obs_names = [f"{Path(f).stem}:{n}" for n in a.obs_names]
            parts.append(a)
        joined = ad.concat(parts, join="outer")
        joined.X = sp.csr_matrix(joined.X)
        tmp = union.with_name(".union.tmp.h5ad")
        joined.write_h5ad(tmp)
        tmp.rename(union)
        del parts, joined
    collection = out / "annbatch.zarr"
    if not (collection / "zarr.json").exists() or not (out / "annbatch.done").exists():
        from annbatch import DatasetCollection

        DatasetCollection(collection).add_adatas([str(union)], shuffle=True, rng=np.random.default_rng(0))
        (out / "annbatch.done").write_text("ok\n")
    import h5py

    with h5py.File(union, "r") as h:
        shape = [int(x) for x in h["X"].attrs["shape"]]
        nnz = int(h["X/data"].shape[0])
    return {"union_h5ad": str(union), "annbatch_collection": str(collection), "cells": shape[0], "genes": shape[1],
            "nonzeros": nnz}


def log1p_cp10k(x: sp.csr_matrix) -> sp.csr_matrix:
    """log1p(count / row total * 1e4) of the stored entries, as float32 (the project's formula)."""
    indptr = np.asarray(x.indptr, np.int64)
    data = np.asarray(x.data, np.float64)
    totals = np.add.reduceat(data, indptr[:-1]) if len(data) else np.zeros(len(indptr) - 1)
    totals[np.diff(indptr) == 0] = 1.0  # reduceat's value for an empty row is a neighbour's: unused
    values = np.log1p(data / np.repeat(totals, np.diff(indptr)) * 1e4).astype(np.float32)
    return sp.csr_matrix((values, x.indices, x.indptr), shape=x.shape)


class Peers:
    """The peer loaders over the files `prepare` wrote, built on first use."""

    def __init__(self, out: Path):
        self.out = out
        self._built: dict = {}

    def _annbatch(self, batch_cells: int, seed: int, chunk_size: int, preload_nchunks: int):
        import anndata as ad
        from annbatch import DatasetCollection, Loader

        def x_only(group):  # annbatch's README: without it every obs column is read and yielded too
            return ad.AnnData(X=ad.io.sparse_dataset(group["X"]))

        loader = Loader(batch_size=batch_cells, chunk_size=chunk_size, preload_nchunks=preload_nchunks, shuffle=True,
                        preload_to_gpu=False, rng=np.random.default_rng(seed))
        return loader.use_collection(DatasetCollection(self.out / "annbatch.zarr", mode="r"), load_adata=x_only)

    def _backed(self):
        import anndata as ad

        return ad.read_h5ad(self.out / "union.h5ad", backed="r")

    def batches(self, peer: str, batch_cells: int, seed: int, chunk_size: int = 512, preload_nchunks: int = 32):
        """An iterator of CSR batches of one epoch of ``peer`` (annbatch: ``chunk_size`` consecutive
        rows per read, ``preload_nchunks`` chunks read and shuffled together)."""
        key = (peer, batch_cells, seed, chunk_size, preload_nchunks)
        if peer == "annbatch":
            if key not in self._built:
                self._built[key] = self._annbatch(batch_cells, seed, chunk_size, preload_nchunks)
            return (b["X"] for b in self._built[key])
        if peer == "scdataset":
            if key not in self._built:
                from scdataset import BlockShuffling, scDataset

                backed = self._backed()
                # scDataset's AnnData recipe: blocks of consecutive rows shuffled, fetch_factor batches
                # read together (sorted rows), materialized in memory, then cut into batches
                self._built[key] = scDataset(backed, BlockShuffling(block_size=8), batch_size=batch_cells,
                                             fetch_factor=16, fetch_transform=lambda view: view.to_memory().X,
                                             seed=seed)
            return iter(self._built[key])
        if peer == "anndata_backed":
            if key not in self._built:
                self._built[key] = self._backed()
            return _backed_batches(self._built[key], batch_cells, np.random.default_rng(seed))
        raise SystemExit(f"unknown peer {peer!r}: annbatch, scdataset or anndata_backed")


def _backed_batches(backed, batch_cells: int, rng: np.random.Generator):
    """Common practice on a backed AnnData: random minibatches of rows, ``X[sorted rows]``."""
    order = rng.permutation(backed.n_obs)
    for start in range(0, backed.n_obs, batch_cells):
        yield backed.X[np.sort(order[start:start + batch_cells])]


def measure(peers: Peers, peer: str, values: str, cells: int, batch_cells: int, seed: int, **options) -> dict:
    if values not in ("raw", "log1p_cp10k"):
        raise SystemExit(f"values {values!r}: raw or log1p_cp10k")
    got = nnz = batches = 0
    it = peers.batches(peer, batch_cells, seed, **options)
    cpu, wall = time.process_time(), time.perf_counter()
    for x in it:
        if values == "log1p_cp10k":
            x = log1p_cp10k(x)
        got += x.shape[0]
        nnz += x.nnz
        batches += 1
        if 0 < cells <= got:
            break
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cells": got, "nonzeros": nnz, "batches": batches, "cpu_s": cpu, "wall_s": wall}


def use_zarrs() -> str:
    """annbatch's own advice for local files: zarr's codec pipeline from zarrs (Rust), where installed
    (``pip install "annbatch[zarrs]"``). -> the pipeline in use"""
    import zarr

    try:
        import zarrs  # noqa: F401
    except ImportError:
        return str(zarr.config.get("codec_pipeline.path"))
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    return "zarrs.ZarrsCodecPipeline"


def versions() -> dict:
    import platform
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for name in ("annbatch", "scdataset", "anndata", "zarr", "zarrs", "numba", "numpy", "scipy", "h5py"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            out[name] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "serve"])
    ap.add_argument("--inputs", nargs="*", default=[])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.command == "prepare":
        print(json.dumps({**prepare(args.inputs, args.out), "versions": versions()}), flush=True)
        return
    zarr_pipeline = use_zarrs()
    peers = Peers(args.out)
    print(json.dumps({"ready": True, "versions": versions(), "zarr_codec_pipeline": zarr_pipeline}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        c = json.loads(line)
        options = {k: int(c[k]) for k in ("chunk_size", "preload_nchunks") if k in c}
        r = measure(peers, c["peer"], c["values"], int(c.get("cells", 0)), int(c["batch_cells"]), int(c.get("seed", 0)),
                    **options)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()

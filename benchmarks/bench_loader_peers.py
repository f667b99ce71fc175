"""The project's loader against its peers on the same real cells, one core, in cells per CPU-second
(issue 24 point 5). Writes ``benchmarks/results/loader_peers_cpu.json``.

    python benchmarks/bench_loader_peers.py --peer-python /path/to/python3.12   # ~1.5 min (2 cores)
    python benchmarks/bench_loader_peers.py --real-cells 20000 --rounds 1       # quick, ~40 s

The first run also converts the corpus and writes the peers' files under ``benchmarks/data/``
(a few minutes for 216,064 cells); later runs reuse them.

Cells: the shared real files (all but the one without gene ids), each repeated until together they
hold ``--real-cells`` (default 200,000: 8 copies of 27,008 cells = 216,064), as `bench_loader.py`
builds them. The project reads them as a corpus converted from those files; the peers read them as
one AnnData file, their outer join (`loader_peers_worker.prepare`), annbatch from its preshuffled
zarr collection of that file. Contenders:

- the project's `CellLoader`, 0 workers, batches of ``--batch-cells`` cells (token budget unbounded),
  megabatches of ``--megabatch-cells``: ``raw`` and ``continuous`` (= log1p-CP10k) without masking
  (like for like: each cell's expressed genes and values, packed), and ``log1p_bins`` + masking (15 %);
- annbatch (`Loader`, shuffled, its default chunk 512 x 32 chunks preloaded, batches of
  ``--batch-cells``; X only, zarr's codec pipeline from zarrs and numba where installed, as annbatch's
  README advises for local files): raw, and log1p-CP10k computed on each yielded batch;
- scDataset over backed AnnData (`BlockShuffling(8)`, fetch factor 16): raw;
- backed AnnData, ``X[sorted random rows]`` per batch: raw, ``--backed-cells`` cells per round
  (it is ~10x slower than the rest; its rate is per CPU-second like the others).

annbatch needs python >= 3.12: the peers run in their own interpreter (``--peer-python``; without it,
this one if it is >= 3.12 and has annbatch, else a venv built under ``benchmarks/data/peers-venv``
from ``--base-python`` with annbatch[zarrs,numba] 0.3.1, scdataset and anndata from PyPI), as a child process
that answers one measurement per request (`loader_peers_worker.py`). Everything is pinned to one
core (``sched_setaffinity``, inherited by the child) with every thread pool at 1 thread
(OMP/MKL/OpenBLAS/numba/torch). Per round every contender reads one epoch (the order rotated
round by round, so load from other processes hits all alike); the rate is cells / process CPU
seconds of the process that made the batches, the median of ``--rounds`` rounds. Each contender is
warmed up first (compilation, page cache) by ``--warmup-batches`` batches.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy, numba and torch start their pools

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import DATA, real_inputs, warm_page_cache  # noqa: E402
from bench_loader import corpus_of  # noqa: E402
from common import cpu_device, result_record, write_result  # noqa: E402

from data_pipeline.corpus import Corpus  # noqa: E402
from data_pipeline.loading.epoch_plan import Batching  # noqa: E402
from data_pipeline.loading.loader import CellLoader  # noqa: E402
from data_pipeline.loading.masking import Masking  # noqa: E402
from data_pipeline.loading.normalize import Normalization  # noqa: E402

WORKER = Path(__file__).resolve().parent / "loader_peers_worker.py"
PEER_PACKAGES = ("annbatch[zarrs,numba]==0.3.1", "scdataset", "anndata")
OURS = {
    "project raw": dict(normalization=Normalization("raw"), masking=None),
    "project log1p_cp10k": dict(normalization=Normalization("continuous"), masking=None),
    "project log1p_bins + masking": dict(normalization=Normalization("log1p_bins", n_bins=51), masking=Masking()),
}
PEERS = {
    "annbatch raw": ("annbatch", "raw"),
    "annbatch log1p_cp10k": ("annbatch", "log1p_cp10k"),
    "scDataset raw": ("scdataset", "raw"),
    "anndata backed raw": ("anndata_backed", "raw"),
}
GOALS = {"project raw": "annbatch raw", "project log1p_cp10k": "annbatch log1p_cp10k",
         "project log1p_bins + masking": "annbatch raw"}


def peer_python(args) -> tuple[str, str]:
    """The interpreter that runs the peers, and how it was chosen."""
    if args.peer_python:
        return args.peer_python, "given (--peer-python)"
    if sys.version_info >= (3, 12):
        try:
            import annbatch  # noqa: F401
            import scdataset  # noqa: F401

            return sys.executable, "this interpreter"
        except ImportError:
            pass
    venv = DATA / "peers-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        base = args.base_python
        if base is None:
            raise SystemExit("annbatch needs python >= 3.12: pass --peer-python (an interpreter with annbatch, scdataset "
                             "and anndata) or --base-python (a python >= 3.12 to build benchmarks/data/peers-venv from)")
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return str(python), f"venv built by this benchmark ({venv.relative_to(REPO)}: pip install {' '.join(PEER_PACKAGES)})"


class PeerProcess:
    """`loader_peers_worker.py serve` as a child: one JSON request and one JSON answer per measurement."""

    def __init__(self, python: str, folder: Path):
        self.proc = subprocess.Popen([python, str(WORKER), "serve", "--out", str(folder)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.hello = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the peer process ended (exit code {self.proc.wait()}): see its error above")
        return json.loads(line)

    def measure(self, peer: str, values: str, cells: int, batch_cells: int, seed: int = 0) -> dict:
        self.proc.stdin.write(json.dumps({"peer": peer, "values": values, "cells": cells, "batch_cells": batch_cells,
                                          "seed": seed}) + "\n")
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def ours_epoch(loader: CellLoader, max_batches: int | None = None) -> dict:
    """One epoch of the project's loader (or its first ``max_batches`` batches): cells, tokens, CPU and wall."""
    cells = tokens = batches = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for b in loader:
        cells += b.n_cells
        tokens += b.n_tokens
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    return {"cells": cells, "nonzeros": tokens, "batches": batches, "cpu_s": time.process_time() - cpu,
            "wall_s": time.perf_counter() - wall}


def pin_one_core(core: int | None) -> int:
    """Pin this process (and the children it starts) to one core; torch and numba to one thread."""
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[0] if core is None else core
    os.sched_setaffinity(0, {core})
    import numba
    import torch

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    return core


def summary(rows: list[dict]) -> dict:
    rates = [r["cells"] / r["cpu_s"] for r in rows]
    wall = [r["cells"] / r["wall_s"] for r in rows]
    return {"cells_per_cpu_s": round(float(np.median(rates))), "cells_per_cpu_s_rounds": [round(x) for x in rates],
            "cells_per_s_wall": round(float(np.median(wall))),
            "nonzeros_per_cpu_s": round(float(np.median([r["nonzeros"] / r["cpu_s"] for r in rows]))),
            "cells_per_round": rows[0]["cells"], "batches_per_round": rows[0]["batches"],
            "nonzeros_per_cell": round(rows[0]["nonzeros"] / max(1, rows[0]["cells"]), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real-cells", type=int, default=200_000, help="at least this many cells (whole copies of the files)")
    ap.add_argument("--batch-cells", type=int, default=1024)
    ap.add_argument("--megabatch-cells", type=int, default=8192, help="the project's loader")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backed-cells", type=int, default=32_768, help="cells per round of backed AnnData")
    ap.add_argument("--warmup-batches", type=int, default=16)
    ap.add_argument("--core", type=int, default=None, help="the core to pin to (default: the first allowed)")
    ap.add_argument("--peer-python", default=None, help="a python >= 3.12 with annbatch, scdataset and anndata")
    ap.add_argument("--base-python", default=None, help="a python >= 3.12 to build the peers' venv from")
    ap.add_argument("--result", type=Path, default=REPO / "benchmarks" / "results" / "loader_peers_cpu.json")
    args = ap.parse_args()

    files = real_inputs(args.real_cells, None)
    if not files:
        raise SystemExit("../shared/data is absent: this benchmark needs the shared real files")
    corpus = corpus_of(f"real-{args.real_cells}", files)
    python, python_how = peer_python(args)
    peers_folder = DATA / f"peers-real-{args.real_cells}"
    prep = subprocess.run([python, str(WORKER), "prepare", "--inputs", *map(str, files), "--out", str(peers_folder)],
                          check=True, capture_output=True, text=True)
    peer_data = json.loads(prep.stdout.strip().splitlines()[-1])
    warm_page_cache([*sorted(Path(corpus).rglob("*.tar")), Path(peer_data["union_h5ad"]),
                     *sorted(p for p in Path(peer_data["annbatch_collection"]).rglob("*") if p.is_file())])

    core = pin_one_core(args.core)
    load_before = os.getloadavg()
    batching = Batching(token_budget=1 << 40, megabatch_cells=args.megabatch_cells, max_batch_cells=args.batch_cells)
    loaders = {name: CellLoader(corpus, batching=batching, num_workers=0, seed=0, **mode) for name, mode in OURS.items()}
    for mode in OURS.values():  # compile, fault in; a separate loader so that the timed epochs stay whole
        ours_epoch(CellLoader(corpus, batching=batching, num_workers=0, seed=1, **mode), args.warmup_batches)
    child = PeerProcess(python, peers_folder)
    for peer, values in PEERS.values():  # the objects timed below (each iteration of them is a new epoch)
        child.measure(peer, values, args.warmup_batches * args.batch_cells, args.batch_cells)

    contenders = [*OURS, *PEERS]
    runs: dict[str, list] = {name: [] for name in contenders}
    for r in range(args.rounds):
        k = r % len(contenders)
        for name in contenders[k:] + contenders[:k]:
            if name in OURS:
                row = ours_epoch(loaders[name])
            else:
                peer, values = PEERS[name]
                cells = args.backed_cells if peer == "anndata_backed" else 0
                row = child.measure(peer, values, cells, args.batch_cells)
            runs[name].append(row)
            print(json.dumps({"round": r, "contender": name, **row}), file=sys.stderr)
    child.close()

    results = {name: summary(rows) for name, rows in runs.items()}
    rate = {name: s["cells_per_cpu_s"] for name, s in results.items()}
    ratios = {f"{ours} / {peer}": round(rate[ours] / rate[peer], 3) for ours, peer in GOALS.items()}
    import numba
    import torch

    c = Corpus(corpus)
    write_result(args.result, result_record(
        "loader_peers", device=cpu_device(),
        versions={"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                  "numba": numba.__version__},
        peer_versions=child.hello["versions"],
        peer_interpreter={"path": python, "chosen": python_how, "run_as": "a child process (loader_peers_worker.py)",
                          "annbatch_patched": False},
        cells={"files": [f.name for f in files], "copies_of_each": int(files[0].parent.name.split("-")[1][1:]),
               "corpus_cells": c.n_cells, "peer_cells": peer_data["cells"], "peer_genes": peer_data["genes"],
               "peer_nonzeros": peer_data["nonzeros"],
               "note": "the peers read every stored nonzero; the project's corpus keeps the genes of its vocabulary "
                       "(those with gene ids), hence fewer nonzeros per cell"},
        setup={"batch_cells": args.batch_cells, "workers": 0, "rounds": args.rounds,
               "one_core": f"sched_setaffinity to core {core} (children inherit it); OMP/MKL/OpenBLAS/numba/torch "
                          "threads 1",
               "rate": "cells / process CPU seconds of the process making the batches, median of the rounds",
               "interleaved": "each round runs every contender once, order rotated round by round",
               "project": {"megabatch_cells": args.megabatch_cells, "token_budget": "unbounded (batches cut at "
                           f"{args.batch_cells} cells)", "block_checks": True, "warmup_batches": args.warmup_batches},
               "annbatch": "Loader(batch_size, shuffle=True, preload_to_gpu=False), default chunk_size 512 x "
                           "preload_nchunks 32 (the fastest here of 512x32, 32x256 and 64x256), X only, over "
                           "DatasetCollection.add_adatas(shuffle=True) zarr; zarr codec pipeline "
                           f"{child.hello['zarr_codec_pipeline']}; batches as scipy CSR",
               "scdataset": "scDataset(backed AnnData, BlockShuffling(block_size=8), fetch_factor=16, "
                            "fetch_transform=view.to_memory().X)",
               "anndata_backed": f"X[sorted random rows], {args.backed_cells} cells per round"},
        load_average={"before": load_before, "after": os.getloadavg()},
        results=results, ratios=ratios,
        goal={"like_for_like": "project raw >= annbatch raw and project log1p_cp10k >= annbatch log1p_cp10k",
              "bins_masking": "project log1p_bins + masking >= 1.0x annbatch raw",
              "met": {k: v >= 1.0 for k, v in ratios.items()}},
        runs=runs,
    ))


if __name__ == "__main__":
    main()

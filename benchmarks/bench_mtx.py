"""Reading 10x ``matrix.mtx`` inputs: peak memory and time of the converter's indexed path
(`data_pipeline.conversion.mtx_index`) against parsing the file whole, on two 10x folders
(``matrix.mtx.gz``) of the same ``--cells`` synthetic cells: entries by cell (as Cell Ranger writes
them) and by gene (as ``scipy.io.mmwrite`` of a genes x cells CSR matrix does).

    python benchmarks/bench_mtx.py                   # 40,000 cells (56 M entries; ~6 min here)
    python benchmarks/bench_mtx.py --cells 5000      # a try-out

Rows, each in a fresh process:

- ``whole_parse_pandas``: the file parsed whole with pandas into CSR, as the mtx reader did before
  the index (once per converter worker reading the file);
- ``whole_parse_scipy``: ``scipy.io.mmread`` (the library reference the tests hold the index to);
- ``index_build``: `TenXMtxSource.build_index`, the converter's index stage for one file;
- ``convert_workers_2``: the whole conversion (plan, index, gene scan, units, merge) with 2 workers.

Peak memory is the resident set's high-water mark (``ru_maxrss``) of the process and, separately,
of the largest of its worker processes. The input is written once under ``benchmarks/data/``
(git-ignored). Writes ``benchmarks/results/mtx_cpu.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DATA = REPO / "benchmarks" / "data"
RESULT = REPO / "benchmarks" / "results" / "mtx_cpu.json"
MEASURES = ("whole_parse_pandas", "whole_parse_scipy", "index_build", "convert_workers_2")


ORDERS = ("cell", "gene")


def write_input(n_cells: int, n_genes: int, order: str) -> Path:
    """A 10x v3 folder of synthetic cells (`data_pipeline.synthetic`), entries ordered by cell as
    Cell Ranger (and R's ``writeMM`` of a genes x cells matrix) write them, or by gene (as
    ``scipy.io.mmwrite`` of a genes x cells CSR matrix does); written once, under a temp name until
    whole."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from data_pipeline.synthetic import iter_synthetic_chunks, synthetic_var

    folder = DATA / f"mtx_{n_cells}x{n_genes}_by_{order}"
    if (folder / "matrix.mtx.gz").exists():
        return folder
    tmp = DATA / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    var = synthetic_var(n_genes)
    with gzip.open(tmp / "features.tsv.gz", "wt") as fh:
        fh.writelines(f"{i}\t{s}\tGene Expression\n" for i, s in zip(var.index, var["gene_symbol"]))
    with gzip.open(tmp / "barcodes.tsv.gz", "wt") as fh:
        fh.writelines(f"cell{i:08d}-1\n" for i in range(n_cells))
    chunks = ((start, counts) for start, counts, _ in iter_synthetic_chunks(n_cells, n_genes, seed=0))
    if order == "gene":  # the whole matrix by gene: genes x cells CSR, a gene's cells at a time
        whole = sp.vstack([counts for _, counts in chunks], format="csr").T.tocsr()
        chunks = ((g, whole[g:g + 256]) for g in range(0, n_genes, 256))
    body = tmp / "entries.txt"
    nnz = 0
    with open(body, "w") as fh:
        for start, rows in chunks:
            coo = rows.tocoo()
            genes, cells = (coo.col, coo.row + start) if order == "cell" else (coo.row + start, coo.col)
            pd.DataFrame({"g": genes + 1, "c": cells + 1, "v": coo.data}).to_csv(fh, sep=" ", header=False,
                                                                                 index=False)
            nnz += coo.nnz
    with gzip.open(tmp / "matrix.mtx.gz", "wb", compresslevel=1) as out, open(body, "rb") as src:
        out.write(b"%%MatrixMarket matrix coordinate integer general\n%metadata_json: {}\n")
        out.write(f"{n_genes} {n_cells} {nnz}\n".encode())
        shutil.copyfileobj(src, out, 1 << 24)
    body.unlink()
    np.save(tmp / "nnz.npy", np.array([nnz]))
    tmp.rename(folder)
    return folder


def measure(name: str, folder: Path) -> dict:
    """One row, in this (fresh) process: seconds and peak memory, and the process's resident memory
    once the libraries the row uses are imported (``baseline_mib``: not the row's own)."""
    import numpy as np  # noqa: F401
    import pandas as pd  # noqa: F401
    import scipy.io  # noqa: F401
    import scipy.sparse  # noqa: F401

    from data_pipeline.conversion import convert, mtx_index, plan, readers  # noqa: F401

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=DATA) as scratch:
        if name == "whole_parse_pandas":
            import numpy as np
            import pandas as pd
            import scipy.sparse as sp

            from data_pipeline.conversion.mtx_index import read_header

            h = read_header(folder / "matrix.mtx.gz")
            e = pd.read_csv(h.path, sep=r"\s+", header=None, skiprows=h.lines, comment="%", engine="c",
                            dtype={0: np.int64, 1: np.int64, 2: np.int64})
            x = sp.csr_matrix((e[2].to_numpy(), (e[1].to_numpy() - 1, e[0].to_numpy() - 1)),
                              shape=(h.n_cells, h.n_features))
            entries = x.nnz
        elif name == "whole_parse_scipy":
            import scipy.io
            import scipy.sparse as sp

            x = sp.csr_matrix(scipy.io.mmread(str(folder / "matrix.mtx.gz")).T)
            entries = x.nnz
        elif name == "index_build":
            from data_pipeline.conversion.readers import open_source

            with open_source(folder) as src:
                entries = src.build_index(Path(scratch) / "index")
        elif name == "convert_workers_2":
            from data_pipeline.conversion.convert import convert
            from data_pipeline.conversion.plan import ConvertOptions
            from data_pipeline.corpus import Corpus

            timings: dict = {}
            convert(Path(scratch) / "corpus", ConvertOptions(inputs=[str(folder)]), workers=2, progress=False,
                    timings=timings)
            entries = Corpus(Path(scratch) / "corpus").n_tokens
        else:
            raise SystemExit(f"unknown measure {name}")
    seconds = time.perf_counter() - began
    row = {"measure": name, "seconds": round(seconds, 1), "entries": entries, "baseline_mib": round(baseline, 1),
           "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "peak_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1) or None}
    if name == "convert_workers_2":
        row["stage_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=40_000)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--measures", default=",".join(MEASURES))
    ap.add_argument("--orders", default=",".join(ORDERS), help="entry orders of the input file: by cell (Cell "
                    "Ranger), by gene (scipy.io.mmwrite of a genes x cells CSR matrix)")
    ap.add_argument("--result", type=Path, default=RESULT)
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # one row, in a fresh process
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--write-input", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.input)))
        return
    if args.write_input:
        print(write_input(args.cells, args.genes, args.orders))
        return
    from common import cpu_device, result_record, versions, write_result

    began = time.perf_counter()
    rows, inputs = [], {}
    for order in [o.strip() for o in args.orders.split(",") if o.strip()]:
        # in a process of its own: a child's peak memory (ru_maxrss) starts from its parent's at the fork
        made = subprocess.run([sys.executable, __file__, "--write-input", "--cells", str(args.cells), "--genes",
                               str(args.genes), "--orders", order], capture_output=True, text=True, cwd=REPO)
        if made.returncode:
            raise SystemExit(f"writing the input failed:\n{made.stderr[-3000:]}")
        folder = Path(made.stdout.strip().splitlines()[-1])
        import numpy as np

        nnz = int(np.load(folder / "nnz.npy")[0])
        inputs[order] = {"entries": nnz, "gzip_bytes": (folder / "matrix.mtx.gz").stat().st_size}
        print(f"{folder}: {args.cells:,} cells, {nnz:,} entries, {inputs[order]['gzip_bytes'] / 2**20:,.0f} MiB gzip",
              file=sys.stderr)
        for name in [m.strip() for m in args.measures.split(",") if m.strip()]:
            done = subprocess.run([sys.executable, __file__, "--measure", name, "--input", str(folder)],
                                  capture_output=True, text=True, cwd=REPO)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            rows.append({"order": order, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), file=sys.stderr)
    record = result_record("bench_mtx", device=cpu_device(), versions=versions("numpy", "pandas", "scipy"),
                           input={"cells": args.cells, "genes": args.genes, "orders": inputs},
                           rows=rows, seconds=round(time.perf_counter() - began, 1))
    write_result(args.result, record)


if __name__ == "__main__":
    main()

"""The cluster command (launch/cluster_cells.py, scHybridBERT) measured on a labelled .h5ad: ARI / NMI of
scHybridBERT, PCA-50 and k-means on the embedding alone, and the wall time, once with k-means at
``--n-clusters`` and once with graph communities at resolution 1.0.

    python launch/demo.py --out demo        # a bundle and labelled held-out synthetic cells
    python benchmarks/bench_cluster.py --bundle demo/bundle --input demo/held_out.h5ad \\
        --label-column cell_type --n-clusters 8 --out benchmarks/results/cluster_demo_cpu.json

The command runs as a subprocess (nothing imports launch/), with the threads it would pick itself;
options this script does not know (--vae-steps 300, --seed 1, ...) are passed on to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import device_record, result_record, versions, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--input", required=True, help="labelled .h5ad of raw counts")
    parser.add_argument("--label-column", required=True)
    parser.add_argument("--n-clusters", type=int, required=True)
    parser.add_argument("--out", required=True, help="results JSON")
    args, passed_on = parser.parse_known_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        for how in (["--n-clusters", str(args.n_clusters)], ["--leiden-resolution", "1.0"]):
            report = Path(tmp) / "report.json"
            cmd = [sys.executable, str(REPO / "launch" / "cluster_cells.py"), args.bundle, args.input, "--out",
                   str(Path(tmp) / "out.h5ad"), "--label-column", args.label_column, "--report", str(report), *how,
                   *passed_on]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            runs.append({"args": how, "wall_s": round(time.perf_counter() - start, 1),
                         "report": json.loads(report.read_text())})
    result = result_record("cluster", device=device_record(),
                           versions=versions("torch", "sklearn", "networkx", "leidenalg", "anndata"),
                           input=args.input, bundle=args.bundle, options=passed_on,
                           omp_num_threads=os.environ.get("OMP_NUM_THREADS"), runs=runs)
    write_result(Path(args.out), result)
    for run in runs:
        print(run["args"], run["wall_s"], {m: (round(v["ari"], 3), round(v["nmi"], 3))
                                           for m, v in run["report"]["methods"].items()})


if __name__ == "__main__":
    main()

"""How conversion, statistics and the loader grow with the number of cells (issue 25 points 2 and 4).

    python benchmarks/bench_scale.py                              # 0.25M and 1M cells: 9-15 min on 2 cores,
                                                                  # + ~8 min and 16 GB to generate the atlas once
    python benchmarks/bench_scale.py --sizes 0.25M,1M,4M,10M      # as far as the disk allows (4M: ~130 GB, 10M: ~324 GB)
    python benchmarks/bench_scale.py --trace-workers --sizes 0.25M,1M   # a conversion worker's memory by units done
    python benchmarks/bench_scale.py --project-only --node-cores 64 --nodes 8   # redo the projection only

For each size, the synthetic atlas (`python -m data_pipeline synthetic --preset atlas`, many h5ad
files) is generated once under ``benchmarks/data/scale/atlas-SIZE/`` and reused; a smaller atlas
takes the files of a larger one by hard link (the atlas's cells do not depend on how many are
asked for, only on their index). Then each step runs as its own process, as a user runs it:

- ``convert_built``: ``convert`` building the vocabulary (scan pass, units, merge);
- ``convert_supplied``: ``convert --vocab`` (the vocabulary of the first; no scan pass);
- ``convert_4_nodes`` (at ``--multinode-sizes``): the multi-node path on this machine: ``--num-nodes 4`` node ranks run
  concurrently on one filesystem (``--workers 1`` each, built vocabulary, so they wait for each
  other's gene scans as the ranks of a SLURM array do), then ``merge`` (timed as its own step).
  The merged corpus is compared byte for byte, every file (shards, manifest, vocabulary,
  ``cell_lengths.npy``, ``stats.zarr``), with the one-node corpus (``multinode_identity``);
- ``verify``, ``inspect``;
- ``loader_plan``: opening the corpus, ``CellLoader`` construction and the epoch plan (``len()``;
  then a second epoch's plan), in one process;
- ``loader_log1p_bins``, ``loader_rank``: one epoch (capped at ``--loader-max-batches`` batches
  where given: the JSON says so) with ``--loader-workers`` DataLoader workers.

Measured per step: wall time; CPU time (user + system of the step's process and every descendant,
from the ``RUSAGE_CHILDREN`` of a small wrapper process that runs only that step); peak RSS: the
largest of any one process (the same ``getrusage``, exact), and per process by sampling the
process tree with psutil every 50 ms (the main process, the largest worker, and the largest sum
over the tree at one sample: forked workers share pages with their parent, which the sum counts
twice), each also as its anonymous part (RssAnon: heap and private memory, without the file
pages a process maps); disk written (the output folder's size); the machine's load (1-minute load average, and
the cores busy with other processes' work: /proc/stat busy time minus the step's own CPU time, per
second of the step); bytes the step read from storage (``ru_inblock``) and its major page faults.
Every step starts with its inputs (the atlas, or the corpus it reads) dropped from the page cache,
as they would be at atlas scale: without that a small size read them from memory left by the step
before and a large one from disk. Bytes per nonzero: corpus bytes / tokens.

Fits (``fits``): per step and metric, the slope of log(metric) against log(cells) over the sizes
(1: linear; 0: flat), CPU microseconds per cell (one core's time per cell) at each size, and for
memory the bytes each additional cell adds. A time slope above 1.15, or memory that grows where it
should be flat (conversion workers, merge, loader workers, verify), is listed under ``defects``;
the merge's growth that the median sketch it holds explains is listed under ``bounded``, with the
peak it reaches when the sketch fills its capped window (the sketch grows with the values genes
take, not with cells).

The projection (``projection``) to 30M and 100M cells on one node of ``--node-cores`` cores and on
``--nodes`` nodes is computed from the per-core rates and fitted slopes, stated as a projection.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS, cpu_device, result_record, versions, write_result  # noqa: E402

from data_pipeline.corpus import Corpus  # noqa: E402

DATA = REPO / "benchmarks" / "data" / "scale"
RESULT = RESULTS / "scale_cpu.json"
PLOT = RESULTS / "scale_cpu.png"
PY = sys.executable
SAMPLE_S = 0.05
TOKEN_BUDGET, MEGABATCH = 65536, 8192
# steps whose memory should not grow with the corpus (issue 25): a worker holds a chunk, a merge streams
FLAT_MEMORY = {"convert_built": ("worker_peak_rss",), "convert_supplied": ("worker_peak_rss",),
               "merge": ("main_peak_rss",), "verify": ("main_peak_rss",),
               "loader_log1p_bins": ("worker_peak_rss",), "loader_rank": ("worker_peak_rss",)}


# --- sizes ----------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    t = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1], 1)
    return int(round(float(t.rstrip("km")) * mult))


def label(cells: int) -> str:
    if cells >= 1_000_000:
        return f"{cells / 1e6:g}M"
    return f"{cells / 1e3:g}k" if cells >= 1000 else str(cells)


# --- measuring one step ---------------------------------------------------------------------------

def _wrapper(out: str, cmd: list[str]) -> int:
    """Run ``cmd``, wait for it, write this wrapper's RUSAGE_CHILDREN (the step and every process it
    waited for) to ``out``: a fresh wrapper per step, so the peak RSS is this step's alone."""
    proc = subprocess.run(cmd)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(out).write_text(json.dumps({"returncode": proc.returncode, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
                                     "maxrss_bytes": ru.ru_maxrss * 1024, "storage_read_bytes": ru.ru_inblock * 512,
                                     "major_faults": ru.ru_majflt}))
    return proc.returncode


def _busy_jiffies() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle) / tick, sum(fields) / tick


class _Sampler(threading.Thread):
    """Peak RSS per process of the tree under ``root`` (the wrapper, left out), every SAMPLE_S."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.root = psutil, psutil.Process(root)
        self.peaks: dict[int, int] = {}
        self.anon: dict[int, int] = {}  # RssAnon: heap and other private memory, no file pages
        self.names: dict[int, str] = {}
        self.parents: dict[int, int] = {}
        self.tree_peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        ps = self.psutil
        while not self.stop.is_set():
            total = 0
            try:
                procs = self.root.children(recursive=True)
            except ps.Error:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if p.pid not in self.parents:
                        self.parents[p.pid] = p.ppid()
                        self.names[p.pid] = " ".join(p.cmdline()[:4])[:120]
                except ps.Error:
                    continue
                total += rss
                self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), rss)
                self.anon[p.pid] = max(self.anon.get(p.pid, 0), _rss_anon(p.pid))
            self.tree_peak = max(self.tree_peak, total)
            self.stop.wait(SAMPLE_S)


def _rss_anon(pid: int) -> int:
    """The process's anonymous resident memory (RssAnon of /proc/PID/status), bytes; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def drop_from_page_cache(paths: list[Path]) -> int:
    """Evict the files under ``paths`` from the page cache (POSIX_FADV_DONTNEED: no privilege
    needed; they were fsynced when written). Each step starts with its inputs on disk, as at
    atlas scale, where they are larger than memory: otherwise a small size reads them from memory
    left by the step before and a large one from disk, and the fit measures the cache (verify's
    system time grew 10x for 4x the cells). Returns the bytes dropped."""
    dropped = 0
    for root in paths:
        for f in ([root] if root.is_file() else sorted(q for q in root.rglob("*") if q.is_file())):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                dropped += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return dropped


def measure(name: str, cmds: list[list[str]], log_dir: Path, outputs: list[Path] | None = None,
            inputs: list[Path] | None = None) -> dict:
    """Run ``cmds`` concurrently (one for a plain step, several for node ranks), each under its own
    wrapper, with ``inputs`` dropped from the page cache first; wall time (the last to finish), CPU
    time (all), peak RSS (exact and sampled), bytes read from storage, the machine's load, disk
    written to ``outputs``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cold = drop_from_page_cache(inputs or [])
    load_before = os.getloadavg()
    busy0, _ = _busy_jiffies()
    t0 = time.perf_counter()
    runs = []
    for i, cmd in enumerate(cmds):
        ru_file = log_dir / f"{name}-{i}.rusage.json"
        ru_file.unlink(missing_ok=True)
        log = open(log_dir / f"{name}-{i}.log", "w")
        proc = subprocess.Popen([PY, str(Path(__file__).resolve()), "--_wrap", str(ru_file), "--", *cmd],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        sampler = _Sampler(proc.pid)
        sampler.start()
        runs.append((cmd, proc, sampler, ru_file, log))
    per = []
    for cmd, proc, sampler, ru_file, log in runs:
        proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        log.close()
        ru = json.loads(ru_file.read_text())
        text = Path(log.name).read_text()
        if ru["returncode"] != 0:
            raise SystemExit(f"{name}: `{' '.join(cmd)}` failed ({ru['returncode']}):\n{text[-3000:]}")
        main = next((pid for pid, parent in sampler.parents.items() if parent == proc.pid), None)
        workers = {pid: rss for pid, rss in sampler.peaks.items() if pid != main}
        per.append({"command": " ".join(Path(c).name if c == PY else c for c in cmd), "wall_s": wall,
                    "cpu_s": ru["user_s"] + ru["sys_s"], "user_s": ru["user_s"], "sys_s": ru["sys_s"],
                    "storage_read_bytes": ru["storage_read_bytes"], "major_faults": ru["major_faults"],
                    "max_rss_any_process": ru["maxrss_bytes"],
                    "main_peak_rss": sampler.peaks.get(main, 0),
                    "worker_peak_rss": max(workers.values(), default=0), "n_workers_seen": len(workers),
                    "main_peak_rss_anon": sampler.anon.get(main, 0),
                    "worker_peak_rss_anon": max((v for pid, v in sampler.anon.items() if pid != main), default=0),
                    "tree_peak_rss": sampler.tree_peak, "log": text[-4000:]})
    wall = time.perf_counter() - t0
    busy1, _ = _busy_jiffies()
    cpu = sum(p["cpu_s"] for p in per)
    row = {"wall_s": wall, "cpu_s": cpu, "user_s": sum(p["user_s"] for p in per),
           "sys_s": sum(p["sys_s"] for p in per),
           "storage_read_bytes": sum(p["storage_read_bytes"] for p in per),
           "major_faults": sum(p["major_faults"] for p in per), "inputs_dropped_from_page_cache_bytes": cold,
           "max_rss_any_process": max(p["max_rss_any_process"] for p in per),
           "main_peak_rss": max(p["main_peak_rss"] for p in per),
           "worker_peak_rss": max(p["worker_peak_rss"] for p in per),
           "main_peak_rss_anon": max(p["main_peak_rss_anon"] for p in per),
           "worker_peak_rss_anon": max(p["worker_peak_rss_anon"] for p in per),
           "tree_peak_rss": sum(p["tree_peak_rss"] for p in per),
           "load_avg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
           "other_cores_busy": round(max(0.0, (busy1 - busy0) - cpu) / wall, 2) if busy1 else None}
    if outputs:
        row["disk_bytes"] = sum(du(p) for p in outputs)
    if len(per) > 1:
        row["processes"] = [{k: v for k, v in p.items() if k != "log"} for p in per]
    else:
        row["command"] = per[0]["command"]
    row["_logs"] = [p["log"] for p in per]
    print(f"  {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {row['max_rss_any_process'] / 2**20:.0f} MiB "
          f"(main {row['main_peak_rss'] / 2**20:.0f}, worker {row['worker_peak_rss'] / 2**20:.0f}), load "
          f"{row['load_avg_1min']}, other cores busy {row['other_cores_busy']}", file=sys.stderr, flush=True)
    return row


def du(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (st_blocks, hard links counted once)."""
    if not path.exists():
        return 0
    seen, total = set(), 0
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        st = p.lstat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    return total


def stage_times(log: str) -> dict | None:
    """The convert command's own stage timings, from its last log line ("done in ... (plan x s, ...)")."""
    for line in reversed(log.splitlines()):
        if "done in" in line and "(" in line:
            inner = line.split("(", 1)[1].split(")", 1)[0]
            try:
                return {k: float(v.removesuffix(" s")) for k, v in (part.strip().split(" ", 1)
                                                                    for part in inner.split(","))}
            except ValueError:
                return None
    return None


# --- the atlas ------------------------------------------------------------------------------------

def ensure_atlas(cells: int, cells_per_file: int, log_dir: Path) -> tuple[Path, dict]:
    """The atlas of ``cells`` cells (generated once; files of a larger cached atlas hard-linked)."""
    folder = DATA / (f"atlas-{label(cells)}" + ("" if cells_per_file == 250_000 else f"-f{cells_per_file}"))
    manifest = folder / "synthetic_atlas.json"
    info = {"folder": str(folder.relative_to(REPO)), "cells_per_file": cells_per_file}
    done = manifest.exists() and len(json.loads(manifest.read_text()).get("files", [])) == \
        math.ceil(cells / cells_per_file)
    if not done:
        folder.mkdir(parents=True, exist_ok=True)
        linked = _link_from_larger(folder, cells, cells_per_file)
        info["files_hard_linked"] = linked
        row = measure(f"atlas-{label(cells)}", [[PY, "-m", "data_pipeline", "synthetic", "--preset", "atlas",
                                                  "--cells", str(cells), "--cells-per-file", str(cells_per_file),
                                                  "--out", str(folder), "--no-progress"]], log_dir)
        row.pop("_logs")
        info["generated"] = row
    else:
        info["generated"] = "cached (an earlier run)"
    files = sorted(folder.glob("part-*.h5ad"))
    info["files"] = len(files)
    info["bytes"] = du(folder)
    info["nonzeros"] = _nonzeros(files)
    return folder, info


def _link_from_larger(folder: Path, cells: int, cells_per_file: int) -> int:
    """Hard-link the files a larger cached atlas shares with this one: same file boundaries and the
    same cell-id width (the only thing the asked size changes in a file)."""
    width = len(str(cells - 1))
    linked = 0
    for other in sorted(DATA.glob("atlas-*")):
        m = other / "synthetic_atlas.json"
        if other == folder or not m.exists():
            continue
        meta = json.loads(m.read_text())
        if meta.get("cells_per_file") != cells_per_file or meta.get("n_cells", 0) < cells or \
                len(str(meta["n_cells"] - 1)) != width or meta.get("seed") != 0:
            continue
        for i in range(cells // cells_per_file):
            src, dst = other / f"part-{i:05d}.h5ad", folder / f"part-{i:05d}.h5ad"
            if src.exists() and not dst.exists():
                os.link(src, dst)
                linked += 1
    return linked


def _nonzeros(files: list[Path]) -> int:
    import h5py

    total = 0
    for f in files:
        with h5py.File(f, "r") as h:
            x = h["X"]
            total += int(x["indptr"][-1]) if isinstance(x, h5py.Group) else int((x[...] != 0).sum())
    return total


# --- corpus comparison ----------------------------------------------------------------------------

def file_hashes(corpus: Path) -> dict[str, str]:
    out = {}
    for p in sorted(corpus.rglob("*")):
        if p.is_file() and ".work" not in p.parts and not p.name.startswith(".lock"):
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    h.update(chunk)
            out[str(p.relative_to(corpus))] = h.hexdigest()
    return out


def compare_corpora(a: Path, b: Path) -> dict:
    ha, hb = file_hashes(a), file_hashes(b)
    differ = sorted(k for k in ha.keys() & hb.keys() if ha[k] != hb[k])
    only = sorted(ha.keys() ^ hb.keys())
    return {"files_compared": len(ha.keys() & hb.keys()), "bytes_compared": du(a),
            "differing_files": differ, "files_in_one_only": only,
            "identical": not differ and not only,
            "what": "sha256 of every file: shards, manifest.json, vocab.tsv, cell_lengths.npy, stats.zarr/*"}


def merge_window(corpus: Path) -> dict:
    """The statistics merge's dense window for this corpus (`stats.merge_partials`): per token, the
    sketch buckets from its lowest to its highest, 8 bytes each. It grows with the range of values a
    gene takes, not with cells, up to ``_DENSE_MERGE_MAX`` buckets (then the merge goes pairwise)."""
    import numpy as np
    import zarr

    from data_pipeline.conversion import stats

    z = zarr.open_group(str(corpus / "stats.zarr"), mode="r")
    keys = z["sketch_keys"][...].astype(np.int64)
    token, bucket = keys // stats._BUCKETS, keys % stats._BUCKETS
    starts = np.flatnonzero(np.r_[True, token[1:] != token[:-1]])  # keys sort by token, then bucket
    ends = np.r_[starts[1:], len(keys)] - 1
    width = bucket[ends] - bucket[starts] + 1
    return {"buckets": int(width.sum()), "bytes": int(width.sum()) * 8, "sketch_entries": len(keys),
            "tokens": len(starts), "widest_token_buckets": int(width.max(initial=0)),
            "cap_bytes": stats._DENSE_MERGE_MAX * 8}


# --- the loader steps (run as child processes) -----------------------------------------------------

def _loader_kwargs(mode: str):
    from data_pipeline.loading.epoch_plan import Batching
    from data_pipeline.loading.masking import Masking
    from data_pipeline.loading.normalize import Normalization

    norm = Normalization("rank", max_genes=2048) if mode == "rank" else Normalization("log1p_bins", n_bins=51)
    return dict(normalization=norm, batching=Batching(token_budget=TOKEN_BUDGET, megabatch_cells=MEGABATCH),
                masking=Masking())


def child_plan(corpus: str, report: str) -> None:
    import psutil

    from data_pipeline.corpus import Corpus
    from data_pipeline.loading.loader import CellLoader

    me = psutil.Process()
    out = {"rss_start": me.memory_info().rss}
    t = time.perf_counter()
    c = Corpus(corpus)
    out["open_corpus_s"] = time.perf_counter() - t
    t = time.perf_counter()
    loader = CellLoader(c, num_workers=0, **_loader_kwargs("log1p_bins"))
    out["construct_s"] = time.perf_counter() - t
    out["rss_after_construct"] = me.memory_info().rss
    t = time.perf_counter()
    out["batches_per_epoch"] = len(loader)
    out["epoch_plan_s"] = time.perf_counter() - t
    t = time.perf_counter()
    loader.spec.plan(1)
    out["second_epoch_plan_s"] = time.perf_counter() - t
    out["rss_after_plan"] = me.memory_info().rss
    Path(report).write_text(json.dumps(out))


def child_loader(corpus: str, mode: str, workers: int, max_batches: int, report: str) -> None:
    from data_pipeline.loading.loader import CellLoader

    t = time.perf_counter()
    loader = CellLoader(corpus, num_workers=workers, **_loader_kwargs(mode))
    construct = time.perf_counter() - t
    total = len(loader)
    cells = tokens = batches = 0
    t = time.perf_counter()
    first = None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t
        cells += len(batch.cell_index)
        tokens += int(batch.gene_ids.numel())
        batches += 1
        if max_batches and batches >= max_batches:
            break
    Path(report).write_text(json.dumps({
        "construct_s": construct, "epoch_s": time.perf_counter() - t, "first_batch_s": first, "cells": cells,
        "tokens": tokens, "batches": batches, "batches_per_epoch": total, "full_epoch": batches == total}))


# --- one size -------------------------------------------------------------------------------------

def run_size(cells: int, args, result: dict, save) -> dict:
    name = label(cells)
    logs = DATA / "logs" / name
    print(f"{name} cells", file=sys.stderr, flush=True)
    atlas, atlas_info = ensure_atlas(cells, args.cells_per_file, logs)
    inputs = [str(p) for p in sorted(atlas.glob("part-*.h5ad"))]
    entry = {"cells": cells, "label": name, "date": result_record("x")["date"], "atlas": atlas_info, "steps": {}}
    steps = entry["steps"]
    result["sizes"] = [s for s in result.get("sizes", []) if s["cells"] != cells] + [entry]
    result["sizes"].sort(key=lambda s: s["cells"])

    def step(key: str, row: dict) -> dict:
        row.pop("_logs", None)
        steps[key] = row
        save()
        return row

    def convert_cmd(out: Path, *extra: str) -> list[str]:
        return [PY, "-m", "data_pipeline", "convert", *inputs, "--out", str(out), "--no-progress", "--overwrite",
                *extra]

    one = DATA / f"corpus-{name}"
    atlas_files = [Path(p) for p in inputs]
    row = measure("convert_built", [convert_cmd(one, "--workers", str(args.workers))], logs, [one], atlas_files)
    row["stages_s"] = stage_times(row["_logs"][0])
    step("convert_built", row)
    corpus = Corpus(one)
    t = corpus.totals
    entry["corpus"] = {"bytes": t["bytes"], "disk_bytes": du(one), "n_tokens": t["n_tokens"],
                       "n_cells": t["n_cells"], "n_shards": t["n_shards"],
                       "bytes_per_nonzero": t["bytes"] / t["n_tokens"], "bytes_per_cell": t["bytes"] / t["n_cells"],
                       "nonzeros_per_cell": t["n_tokens"] / t["n_cells"],
                       "vocab_genes": corpus.vocab_size - len(corpus.special_tokens)}
    save()

    supplied = DATA / f"corpus-{name}-vocab"
    vocab = DATA / f"vocab-{name}.tsv"
    shutil.copyfile(one / "vocab.tsv", vocab)
    row = measure("convert_supplied", [convert_cmd(supplied, "--workers", str(args.workers), "--vocab", str(vocab))],
                  logs, [supplied], atlas_files)
    row["stages_s"] = stage_times(row["_logs"][0])
    step("convert_supplied", row)
    shutil.rmtree(supplied)

    if args.nodes > 1 and cells in args.multinode_sizes:
        nodes = DATA / f"corpus-{name}-{args.nodes}nodes"
        row = measure(f"convert_{args.nodes}_nodes",
                      [convert_cmd(nodes, "--workers", "1", "--num-nodes", str(args.nodes), "--node-rank", str(r))
                       for r in range(args.nodes)], logs, [nodes], atlas_files)
        row["note"] = (f"{args.nodes} node ranks at once on this {os.cpu_count()}-core machine, --workers 1 each, "
                       "built vocabulary (the ranks wait for each other's gene scans): its wall time is not a "
                       "cluster's")
        step(f"convert_{args.nodes}_nodes", row)
        step("merge", measure("merge", [[PY, "-m", "data_pipeline", "merge", str(nodes), "--workers",
                                         str(args.workers), "--no-progress"]], logs, inputs=[nodes]))
        ident = compare_corpora(one, nodes)
        ident.update(cells=cells, nodes=args.nodes, one_node=str(one.relative_to(REPO)),
                     multi_node=str(nodes.relative_to(REPO)))
        entry["multinode_identity"] = ident
        save()
        print(f"  {args.nodes}-node corpus identical to the one-node corpus: {ident['identical']} "
              f"({ident['files_compared']} files)", file=sys.stderr, flush=True)
        shutil.rmtree(nodes)

    step("verify", measure("verify", [[PY, "-m", "data_pipeline", "verify", str(one)]], logs, inputs=[one]))
    step("inspect", measure("inspect", [[PY, "-m", "data_pipeline", "inspect", str(one)]], logs, inputs=[one]))
    report = logs / "child.json"
    row = measure("loader_plan", [[PY, str(Path(__file__).resolve()), "--child", "plan", "--corpus", str(one),
                                   "--report", str(report)]], logs, inputs=[one])
    row.update(json.loads(report.read_text()))
    step("loader_plan", row)
    for mode in ("log1p_bins", "rank"):
        row = measure(f"loader_{mode}", [[PY, str(Path(__file__).resolve()), "--child", "loader", "--corpus",
                                          str(one), "--mode", mode, "--workers", str(args.loader_workers),
                                          "--max-batches", str(args.loader_max_batches), "--report", str(report)]],
                      logs, inputs=[one])
        row.update(json.loads(report.read_text()))
        row["cells_per_s"] = row["cells"] / row["epoch_s"]
        row["cells_per_cpu_s"] = row["cells"] / row["cpu_s"]
        step(f"loader_{mode}", row)
    entry["merge_window"] = merge_window(one)
    if not args.keep_corpora:
        shutil.rmtree(one)
    entry["disk_needed_bytes"] = {
        "atlas": atlas_info["bytes"], "corpus": entry["corpus"]["disk_bytes"],
        "peak_during_run": atlas_info["bytes"] + 2 * entry["corpus"]["disk_bytes"],
        "what": "the atlas, plus two corpora at once (the one-node corpus beside the supplied-vocabulary or the "
                "multi-node one); a conversion's .work needs no more than its corpus (units are renamed into "
                "shards)"}
    save()
    return entry


def trace_workers(cells: int, args, result: dict) -> dict:
    """A conversion worker's anonymous memory against the work units finished: convert (built
    vocabulary, ``--workers``) once more, sampling the workers every 0.1 s and counting the units'
    result files. A worker converts units of one size (``--shard-size``) whatever the corpus size,
    so its memory should stop growing after its first units: ``plateau`` says whether the peak at
    the end is within 3 % of the peak at half the units."""
    import psutil

    atlas = DATA / (f"atlas-{label(cells)}" + ("" if args.cells_per_file == 250_000 else f"-f{args.cells_per_file}"))
    inputs = [str(p) for p in sorted(atlas.glob("part-*.h5ad"))]
    if not inputs:
        sys.exit(f"{atlas}: no atlas to convert; run the benchmark for {label(cells)} cells first")
    out = DATA / f"trace-{label(cells)}"
    cmd = [PY, "-m", "data_pipeline", "convert", *inputs, "--out", str(out), "--no-progress", "--overwrite",
           "--workers", str(args.workers)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    root, peak, series, units, last_count = psutil.Process(proc.pid), 0, [], 0, 0.0
    while proc.poll() is None:
        try:
            peak = max([peak] + [_rss_anon(c.pid) for c in root.children()])
        except psutil.Error:
            pass
        if time.monotonic() - last_count > 1.0:
            last_count = time.monotonic()
            units = len(list((out / ".work" / "units").glob("*.json")))
            if not series or series[-1][0] != units or series[-1][1] != peak:
                series.append([units, peak])
        time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"trace: `{' '.join(cmd)}` failed ({proc.returncode})")
    total = Corpus(out).totals["n_shards"]
    shutil.rmtree(out)
    half = max((p for u, p in series if u <= total / 2), default=0)
    end = max((p for _, p in series), default=0)
    return {"date": result_record("x")["date"], "command": result_record("x")["command"], "units": total,
            "workers": args.workers, "worker_anon_peak_by_units_done": series, "peak_at_half_the_units": half,
            "peak_at_end": end, "plateau": bool(half) and end <= 1.03 * half}


# --- fits, defects, projection -------------------------------------------------------------------

METRICS = ("wall_s", "cpu_s", "max_rss_any_process", "main_peak_rss", "worker_peak_rss", "main_peak_rss_anon",
           "worker_peak_rss_anon")


def _slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


SKETCH_ENTRY_BYTES = 16  # the merged sketch: an int64 key and an int64 count per entry


def _sketch_explains(name: str, sizes: list[dict], growth: int) -> bool:
    """Whether the merge's memory grew by no more than 1.5x the growth of what it holds for the
    median sketch (the dense window, 8 bytes per bucket, and the merged entries) plus 32 MiB."""
    w = [s.get("merge_window") for s in sizes]
    if name != "merge" or len(w) < 2 or not all(w):
        return False
    held = [x["bytes"] + SKETCH_ENTRY_BYTES * x["sketch_entries"] for x in w]
    return growth <= 1.5 * (held[-1] - held[0]) + (32 << 20)


def _sketch_note(name: str, sizes: list[dict]) -> str:
    """For the steps that hold the median sketch (the merge; a one-node convert, which merges; rank
    mode's medians): how full its window was, which bounds what it can grow to."""
    w = [s.get("merge_window") for s in sizes]
    if name not in ("merge", "convert_built", "convert_supplied", "loader_rank") or not all(w):
        return ""
    return (f" (the median sketch it holds: {w[0]['sketch_entries'] / 1e6:.1f}M -> {w[-1]['sketch_entries'] / 1e6:.1f}M "
            f"entries, in a window of {w[-1]['buckets'] / 1e6:.1f}M buckets that bounds them; the window grows with "
            f"the range of each gene's values, not cells, capped at {w[-1]['cap_bytes'] // 8 / 1e6:.0f}M buckets)")


def fits(result: dict) -> tuple[dict, list[str], list[str]]:
    """(fits per step, defects, bounded): a step's memory that grows only as much as the median
    sketch it holds is bounded (the sketch cannot outgrow its capped window), not a defect."""
    sizes = result.get("sizes", [])
    names = sorted({k for s in sizes for k in s["steps"]}, key=lambda k: list(sizes[-1]["steps"]).index(k)
                   if k in sizes[-1]["steps"] else 99)
    out, defects, bounded = {}, [], []
    for name in names:
        have = [s for s in sizes if name in s["steps"]]
        cells = [s["cells"] for s in have]
        rows = [s["steps"][name] for s in have]
        f = {"cells": cells}
        for m in METRICS:
            f[f"{m}_slope"] = _slope(cells, [r.get(m) for r in rows])
        # work per cell: the loader's capped epochs did not read every cell
        done = [r.get("cells", c) if name.startswith("loader_") and name != "loader_plan" else c
                for r, c in zip(rows, cells)]
        f["cpu_us_per_cell"] = [r["cpu_s"] / d * 1e6 for r, d in zip(rows, done)]
        f["wall_us_per_cell"] = [r["wall_s"] / d * 1e6 for r, d in zip(rows, done)]
        if name.startswith("loader_") and name != "loader_plan":
            f["cpu_slope_per_cell_read"] = _slope(cells, f["cpu_us_per_cell"])
        if len(cells) >= 2:
            for m in ("main_peak_rss", "worker_peak_rss", "max_rss_any_process", "main_peak_rss_anon",
                      "worker_peak_rss_anon"):
                a, b = rows[0].get(m), rows[-1].get(m)
                if a and b:
                    f[f"{m}_bytes_per_added_cell"] = (b - a) / (cells[-1] - cells[0])
            slope = f.get("cpu_slope_per_cell_read") if "cpu_slope_per_cell_read" in f else f["cpu_s_slope"]
            if name.startswith("loader_") and name != "loader_plan":
                slope = None if slope is None else slope + 1  # per-cell slope 0 = linear
            if slope is not None and slope > 1.15 and name not in ("inspect",):
                defects.append(f"{name}: CPU time grows as cells^{slope:.2f} from {label(cells[0])} to "
                               f"{label(cells[-1])} ({f['cpu_us_per_cell'][0]:.1f} -> {f['cpu_us_per_cell'][-1]:.1f} "
                               f"CPU-us per cell; user {rows[0]['user_s']:.1f} -> {rows[-1]['user_s']:.1f} s, system "
                               f"{rows[0]['sys_s']:.1f} -> {rows[-1]['sys_s']:.1f} s; other processes kept "
                               f"{rows[0].get('other_cores_busy')} -> {rows[-1].get('other_cores_busy')} cores busy)")
            for m in FLAT_MEMORY.get(name, ()):
                # anonymous memory where sampled: a peak of RSS also catches transient file pages
                m = f"{m}_anon" if all(r.get(f"{m}_anon") for r in rows) else m
                a, b = rows[0].get(m), rows[-1].get(m)
                if a and b and b > 1.10 * a and b - a > 32 << 20:
                    per = (b - a) / (cells[-1] - cells[0])
                    grows = (f"{name}: {m.replace('_', ' ')} grows from {a / 2**20:,.0f} MiB to {b / 2**20:,.0f} MiB "
                             f"({label(cells[0])} -> {label(cells[-1])} cells)")
                    limit = sketch_bound(have, name) if _sketch_explains(name, have, b - a) else None
                    if limit is not None:
                        bounded.append(f"{grows}{_sketch_note(name, have)}: at most {limit / 2**30:.1f} GiB at any "
                                       "number of cells (its measured bytes per sketch entry, up to an entry in every "
                                       "bucket of the capped window)")
                    else:
                        defects.append(f"{grows}, {per:.1f} bytes per added cell: "
                                       f"{(a + per * (100e6 - cells[0])) / 2**30:.1f} GiB at 100M cells where it should "
                                       "be flat" + _sketch_note(name, have))
        out[name] = f
    return out, defects, bounded


def projection(result: dict, node_cores: int, nodes: int, efficiency: float, node_disk_gbs: float = 2.0,
               fs_gbs: float = 10.0, targets=(30e6, 100e6)) -> dict:
    """Time, disk and memory per node at ``targets`` cells, from the largest measured size's per-core
    rates grown by the fitted slopes. A projection: it assumes CPU-bound work spreading over cores at
    ``efficiency`` (measured 2-worker conversion scaling), local disks as fast as this VM's, and the
    growth fitted over the measured sizes continuing."""
    sizes = [s for s in result.get("sizes") or [] if s.get("corpus") and s.get("disk_needed_bytes")]
    if not sizes:
        return {}
    ref = sizes[-1]
    f = result.get("fits", {})
    n0 = ref["cells"]

    def grow(name: str, value: float, cells: float) -> float:
        """Time at ``cells``: the reference size's, grown as cells^slope, the slope at least 1 (the
        measured times include fixed start-up costs, so a slope under 1 at these sizes is not a
        promise of sublinear work)."""
        slope = (f.get(name) or {}).get("cpu_s_slope")
        return value * (cells / n0) ** max(1.0, slope or 1.0)

    plateau = (ref.get("convert_worker_trace") or {}).get("plateau")

    def mem(name: str, metric: str, cells: float) -> float | None:
        row = ref["steps"].get(name) or {}
        if plateau and name.startswith("convert_") and metric == "worker_peak_rss":
            return row.get(metric)  # the trace saw it stop growing: flat
        per = (f.get(name) or {}).get(f"{metric}_anon_bytes_per_added_cell",
                                      (f.get(name) or {}).get(f"{metric}_bytes_per_added_cell"))
        if not row.get(metric):
            return None
        same = f"{metric}_anon" if row.get(f"{metric}_anon") and \
            (sizes[0]["steps"].get(name) or {}).get(f"{metric}_anon") else metric  # what the flags compare
        first = (sizes[0]["steps"].get(name) or {}).get(same)
        if first and row[same] <= 1.10 * first:  # within the spread of a peak between runs: flat, as the flags
            return row[metric]
        return row[metric] + max(0.0, per or 0.0) * (cells - n0)  # linear growth in bytes per added cell

    out = {"basis": f"measured at {label(n0)} cells (largest size) on {result['device']['cpu']}, "
                    f"{result['device']['cores']} cores, with the fitted log-log slopes over "
                    f"{', '.join(s['label'] for s in sizes)}",
           "assumptions": {"node_cores": node_cores, "nodes": nodes, "core_efficiency": efficiency,
                           "node_disk_gbs": node_disk_gbs, "shared_fs_gbs": fs_gbs,
                           "conversion_workers_per_node": node_cores,
                           "text": "CPU time of the largest measured size, grown as cells^max(1, fitted CPU slope); "
                                   "spread over "
                                   "node_cores x nodes cores at core_efficiency, or bound by reading the input and "
                                   "writing the corpus at node_disk_gbs per node (shared_fs_gbs for all nodes "
                                   "together), whichever is slower; the merge runs once, on one node; "
                                   "memory: the measured peak RSS plus the bytes per added cell of anonymous memory "
                                   "(RSS where that was not sampled; flat where the peak grew by 10 % or less over "
                                   "the sizes, as the flags count it, or where the trace of a conversion worker's "
                                   "memory against units done saw it stop growing); disk: the "
                                   "measured bytes per cell. Not measured: shared-filesystem contention, stragglers."},
           "targets": []}
    corpus_per_cell = ref["corpus"]["disk_bytes"] / n0
    atlas_per_cell = ref["atlas"]["bytes"] / n0
    for cells in targets:
        row = {"cells": cells, "corpus_disk_bytes": corpus_per_cell * cells,
               "input_h5ad_bytes": atlas_per_cell * cells}
        for vocab, name in (("built", "convert_built"), ("supplied", "convert_supplied")):
            st = ref["steps"].get(name)
            if not st:
                continue
            cpu = grow(name, st["cpu_s"], cells)
            merge = ref["steps"].get("merge")
            merge_s = grow("merge", merge["cpu_s"], cells) if merge else None
            io = (row["input_h5ad_bytes"] + row["corpus_disk_bytes"]) / 1e9  # read once, written once
            io_one, io_many = io / node_disk_gbs, io / min(nodes * node_disk_gbs, fs_gbs)
            one = max(cpu / (node_cores * efficiency), io_one)
            many = max(cpu / (node_cores * nodes * efficiency), io_many) + (merge_s or 0.0)
            row[f"convert_{vocab}"] = {
                "cpu_hours": cpu / 3600, "one_node_hours": one / 3600, f"{nodes}_nodes_hours": many / 3600,
                "merge_hours": None if merge_s is None else merge_s / 3600,
                "cpu_bound_one_node_hours": cpu / (node_cores * efficiency) / 3600,
                "io_bound_one_node_hours": io_one / 3600, f"io_bound_{nodes}_nodes_hours": io_many / 3600,
                "worker_rss_bytes": mem(name, "worker_peak_rss", cells),
                # the main process merges: bounded as the merge is, by the median sketch's window
                "main_rss_bytes": min(x for x in (mem(name, "main_peak_rss", cells), sketch_bound(sizes, name))
                                      if x is not None) if mem(name, "main_peak_rss", cells) is not None else None,
            }
            row[f"convert_{vocab}"]["node_rss_bytes_upper_bound"] = \
                (mem(name, "worker_peak_rss", cells) or 0) * node_cores + (row[f"convert_{vocab}"]["main_rss_bytes"] or 0)
        if ref["steps"].get("merge"):
            row["merge_rss_bytes"] = mem("merge", "main_peak_rss", cells)
            bound = sketch_bound(sizes, "merge")
            if bound is not None and row["merge_rss_bytes"] is not None and bound < row["merge_rss_bytes"]:
                row["merge_rss_bytes"], row["merge_rss_bounded_by_sketch"] = bound, True
        for name in ("verify", "loader_plan"):
            st = ref["steps"].get(name)
            if st:
                row[name] = {"hours_one_core" if name == "verify" else "seconds":
                             grow(name, st["cpu_s"], cells) / (3600 if name == "verify" else 1),
                             "rss_bytes": mem(name, "main_peak_rss", cells)}
        if row.get("verify"):
            row["verify"]["one_process"] = True
        for mode in ("log1p_bins", "rank"):
            st = ref["steps"].get(f"loader_{mode}")
            if st:
                row[f"loader_{mode}"] = {"worker_rss_bytes": mem(f"loader_{mode}", "worker_peak_rss", cells),
                                         "main_rss_bytes": mem(f"loader_{mode}", "main_peak_rss", cells),
                                         "epoch_cpu_hours": st["cpu_s"] / st["cells"] * cells / 3600}
        out["targets"].append(row)
    peak = ref["disk_needed_bytes"]["peak_during_run"] / n0
    out["disk_needed_for_sizes"] = {label(int(c)): peak * c for c in (0.25e6, 1e6, 4e6, 10e6)}
    out["disk_needed_what"] = ("this benchmark's peak disk (the atlas's h5ad files + two corpora), at the measured bytes "
                               f"per cell of {label(n0)} cells")
    return out


def sketch_bound(sizes: list[dict], name: str) -> float | None:
    """Peak RSS of ``name`` once the median sketch fills its largest possible window: the measured
    peak at the largest size plus the anonymous bytes (RSS where not sampled) per added sketch
    entry, fitted between the sizes, times the entries still missing to ``_DENSE_MERGE_MAX``
    buckets."""
    have = [s for s in sizes if s.get("merge_window") and name in s["steps"]]
    if len(have) < 2:
        return None
    a, b = have[0], have[-1]
    m = "main_peak_rss_anon" if all(s["steps"][name].get("main_peak_rss_anon") for s in (a, b)) else "main_peak_rss"
    de = b["merge_window"]["sketch_entries"] - a["merge_window"]["sketch_entries"]
    dm = b["steps"][name][m] - a["steps"][name][m]
    if de <= 0 or dm <= 0:
        return None
    cap = b["merge_window"]["cap_bytes"] // 8
    return b["steps"][name]["main_peak_rss"] + dm / de * max(0, cap - b["merge_window"]["sketch_entries"])


# bytes per cell of the atlas (h5ad) + two corpora, measured at 1M cells (scale_cpu.json, 2026-12-05)
DISK_PER_CELL = 32_400


def disk_needed(cells: int, result: dict, cells_per_file: int) -> float:
    """Disk a size still needs: the atlas files not generated yet (none when a larger cached atlas
    lends them by hard link) and two corpora, at the measured bytes per cell (the largest size
    measured, else ``DISK_PER_CELL``)."""
    measured = [s for s in result.get("sizes", []) if s.get("disk_needed_bytes")]
    per_cell = measured[-1]["disk_needed_bytes"]["peak_during_run"] / measured[-1]["cells"] if measured \
        else DISK_PER_CELL
    atlas_share = measured[-1]["atlas"]["bytes"] / measured[-1]["disk_needed_bytes"]["peak_during_run"] if measured \
        else 0.5
    cached = any(len(json.loads((o / "synthetic_atlas.json").read_text()).get("files", [])) and
                 json.loads((o / "synthetic_atlas.json").read_text())["n_cells"] >= cells
                 for o in DATA.glob("atlas-*") if (o / "synthetic_atlas.json").exists())
    return per_cell * cells * ((1 - atlas_share) if cached else 1.0)


def core_efficiency() -> float:
    """The 2-worker conversion's scaling efficiency from `convert.json` (synthetic cells), else 0.8."""
    try:
        r = json.loads((RESULTS / "convert.json").read_text())
        return float(r["scaling_efficiency"]["synthetic/w2"])
    except (OSError, KeyError, ValueError, TypeError):
        return 0.8


# --- plot -----------------------------------------------------------------------------------------

def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    names = [k for k in sizes[-1]["steps"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for i, name in enumerate(names):
        have = [s for s in sizes if name in s["steps"]]
        xs = [s["cells"] for s in have]
        color = f"C{i % 10}"
        ax1.plot(xs, [s["steps"][name]["cpu_s"] for s in have], "o-", color=color, label=name)
        ax2.plot(xs, [s["steps"][name]["max_rss_any_process"] / 2**20 for s in have], "o-", color=color, label=name)
    for ax, what in ((ax1, "CPU time, all processes (s)"), (ax2, "peak RSS of any one process (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    xs = [s["cells"] for s in sizes]
    first = sizes[0]["steps"].get("convert_built", {}).get("cpu_s")
    if first:
        ax1.plot(xs, [first * x / xs[0] for x in xs], "k:", label="linear (from convert_built)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"bench_scale.py: {result['device']['cpu']}, {result['device']['cores']} cores "
                 f"({result['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --- main -----------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_wrap":
        sys.exit(_wrapper(sys.argv[2], sys.argv[4:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.25M,1M", help="cells per run, comma-separated (e.g. 0.25M,1M,4M,10M)")
    ap.add_argument("--cells-per-file", type=int, default=250_000, help="atlas cells per h5ad file")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="conversion workers / merge threads")
    ap.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers for the loader epochs")
    ap.add_argument("--loader-max-batches", type=int, default=0, help="cap each loader epoch (0: a full epoch)")
    ap.add_argument("--nodes", type=int, default=4, help="node ranks of the multi-node check (1: skip it)")
    ap.add_argument("--multinode-sizes", default="all", help="sizes at which to run the multi-node path (or 'all')")
    ap.add_argument("--keep-corpora", action="store_true", help="keep the one-node corpora (else deleted after)")
    ap.add_argument("--trace-workers", action="store_true",
                    help="only trace a conversion worker's memory against units done, for --sizes already measured")
    ap.add_argument("--ignore-disk", action="store_true", help="run a size even where the free disk looks too small")
    ap.add_argument("--fresh", action="store_true", help="start the JSON anew (default: keep its other sizes)")
    ap.add_argument("--result", type=Path, default=RESULT)
    ap.add_argument("--plot", type=Path, default=PLOT)
    ap.add_argument("--node-cores", type=int, default=64, help="projection: cores per node")
    ap.add_argument("--project-nodes", type=int, default=8, help="projection: nodes")
    ap.add_argument("--node-disk-gbs", type=float, default=2.0,
                    help="projection: GB/s a node reads its input and writes its corpus at (an assumption)")
    ap.add_argument("--fs-gbs", type=float, default=10.0,
                    help="projection: GB/s of the shared filesystem for all nodes together (an assumption)")
    ap.add_argument("--project-only", action="store_true", help="recompute fits, projection and plot from --result")
    ap.add_argument("--child", choices=("plan", "loader"), help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--max-batches", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "plan":
        return child_plan(args.corpus, args.report)
    if args.child == "loader":
        return child_loader(args.corpus, args.mode, args.workers, args.max_batches, args.report)

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.multinode_sizes = sizes if args.multinode_sizes == "all" else \
        [parse_size(s) for s in args.multinode_sizes.split(",") if s.strip()]
    old = json.loads(args.result.read_text()) if args.result.exists() and not args.fresh else {}
    result = result_record("bench_scale", device=cpu_device(),
                           versions=versions("numpy", "scipy", "h5py", "numba", "torch"),
                           settings={"workers": args.workers, "loader_workers": args.loader_workers,
                                     "loader_max_batches": args.loader_max_batches or None,
                                     "token_budget": TOKEN_BUDGET, "megabatch_cells": MEGABATCH,
                                     "cells_per_file": args.cells_per_file, "nodes": args.nodes,
                                     "rss_sampling_s": SAMPLE_S},
                           memory_total_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                           load_avg_at_start=[round(x, 2) for x in os.getloadavg()])
    if args.project_only or args.trace_workers:
        if not old:
            sys.exit(f"{args.result}: no result to project from; run the benchmark first")
        result = old
    else:
        result["sizes"] = old.get("sizes", [])
        result["runs"] = old.get("runs", []) + [{"date": result["date"], "command": result["command"],
                                                 "sizes": [label(c) for c in sizes],
                                                 "load_avg_at_start": result["load_avg_at_start"]}]

    def save() -> None:
        result["fits"], result["defects"], result["bounded"] = fits(result)
        result["projection"] = projection(result, args.node_cores, args.project_nodes, core_efficiency(),
                                          args.node_disk_gbs, args.fs_gbs)
        result["partial"] = any(s.get("disk_needed_bytes") is None for s in result.get("sizes", []))
        command = result.pop("command")
        result["command"] = command
        write_result(args.result, result, quiet=True)

    for entry in result.get("sizes", []):  # a size measured before this was recorded, its corpus kept
        corpus = DATA / f"corpus-{entry['label']}"
        if "merge_window" not in entry and (corpus / "stats.zarr").exists():
            entry["merge_window"] = merge_window(corpus)
    if args.trace_workers:
        for cells in sizes:
            entry = next((s for s in result.get("sizes", []) if s["cells"] == cells), None)
            if entry is None:
                sys.exit(f"{label(cells)} cells: not in {args.result}; run the benchmark for that size first")
            entry["convert_worker_trace"] = trace_workers(cells, args, result)
            t = entry["convert_worker_trace"]
            print(f"{label(cells)}: worker anonymous peak {t['peak_at_half_the_units'] / 2**20:.0f} MiB at half the "
                  f"{t['units']} units, {t['peak_at_end'] / 2**20:.0f} MiB at the end", file=sys.stderr)
    elif not args.project_only:
        for cells in sizes:
            free = shutil.disk_usage(REPO).free
            need = disk_needed(cells, result, args.cells_per_file)
            print(f"free disk {free / 1e9:.0f} GB; {label(cells)} cells need about {need / 1e9:.0f} GB", file=sys.stderr)
            if need > free and not args.ignore_disk:
                sys.exit(f"{label(cells)} cells need about {need / 1e9:.0f} GB of disk under {DATA} (the atlas's h5ad "
                         f"files and two corpora at once), {free / 1e9:.0f} GB are free: free some, or pass "
                         "--ignore-disk")
            run_size(cells, args, result, save)
    save()
    if result.get("sizes"):
        plot(result, args.plot)
    print(f"wrote {args.result} and {args.plot}", file=sys.stderr)
    for d in result["defects"]:
        print(f"DEFECT {d}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The GPU measurements in one command, most valuable first, for a lent GPU with 15 minutes of device
time: every part is its own process under its own time limit and writes its JSON under ``--out``
row by row, so that a timeout loses the least; a short table is printed last. With ``$OUT`` set
(the device tool's folder, which brings back at most 8 files) the files go to a local work folder,
packed after every part into ``$OUT/gpu_suite_results_<device>.tar.gz`` with ``gpu_suite_<device>.json``
beside it.

    python3 benchmarks/gpu_suite.py                  # on the GPU machine, from the repository root (~8 min)
    python3 benchmarks/gpu_suite.py --parts favor,train --out /tmp/r
    python benchmarks/gpu_suite.py --smoke           # on CPU: every part end to end at tiny sizes (~1 min)

Carry along ``.whl/`` and ``benchmarks/gpu_inputs/``, both made by ``bash benchmarks/gpu_prepare.sh``:
the wheels (DeepSpeed, performer-pytorch and what they need; the device has no package index), the
real files' genes per cell (``lengths.npy``, for the training part's length distribution; without it
lengths are synthetic and the JSON says so), the GPU training test's corpus and its fp32 CPU
reference.

The plan, part by part (budgets in seconds, 560 in all; a part that ends early passes its spare
time on to the next ones, so the last parts get what the first ones left; none runs past the
total):

1. ``wheels`` (30): ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` when
   ``.whl/`` exists; /tmp/site then goes on every later part's PYTHONPATH.
2. ``setup`` (40): versions (python, torch, triton, deepspeed, CUDA, cuDNN, driver), the device
   (name, multiprocessors, memory, L2, clocks from nvidia-smi) and the two ceilings, measured once:
   8192^3 matrix products on random data in bf16 and in fp32 with TF32 products, and a 2 GiB
   device-to-device copy (bytes read + written); do_bench medians, each twice. Writes
   ``ceilings_<device>.json`` at once; the later parts read it.
3. ``pytest_gpu`` (135): ``pytest -m gpu`` on the test files that carry GPU marks (found by grep at
   run time, so collection imports no test module whose packages the device lacks), the FAVOR+
   kernel file first (its model-size tests at its top: the never-compiled kernels are the first
   thing to prove), then the training test, every dtype (each kernel compiles in 1-1.5 s under
   Triton 3.6: benchmarks/results/compile_sm90_triton360.json), 90 s per test where pytest-timeout
   is installed; JUnit XML and the ``-rA`` log under ``--out``; ``gpu_tests_<device>.json`` with the
   pass / fail / skip counts (read from the log when a timeout kept the XML from being written).
4. ``favor`` (85): `bench_favor.py`, bf16: our Triton kernel, performer-pytorch (eager, same
   projection), varlen_attn (exact, packed) and SDPA (exact, padded) at L = 256 ... 16,906, about
   64K tokens per call, fwd and fwd+bwd, FLOP and byte counts, floors and gaps against the ceilings.
   ``favor_<device>.json``.
5. ``train`` (140): `bench_train.py`, geneformer-10m and scgpt at full size, bf16, ZeRO-2, one GPU,
   backends sdpa, varlen and favor (in that order: the two never run on a GPU last) on packed
   batches, and sdpa on length-grouped padded ones, on random padded ones and on every cell padded
   to the preset's cap (Geneformer's 29.4x baseline: 2,048 genes for geneformer-10m), the padded
   rows that the packed varlen and favor rows are compared with; 2 warm-up and 8 timed steps per
   row (the scgpt rows are the long ones, about 1-2 s each); a CUDA fault skips the rows after it;
   rows not started within the part's budget minus 25 s are skipped and recorded so (``--budget-s``);
   MFU against the datasheet peak and the measured GEMM rate. ``train_<device>.json``.
6. ``contrastive`` (55): `bench_contrastive.py`, the gradient-cached and the uncached step, 256 to
   65,536 cells (doubling) in ONE process (an out-of-memory is caught, the engine destroyed and the
   cache emptied before the next size; each size's peak from the allocator's counters, reset per
   size); a size whose predicted time would pass the budget is skipped; from the size whose step
   passes 1 s on, one timed step. ``contrastive_<device>.json``.
7. ``embed`` (35): `bench_embed.py`, cells embedded per second per device for each preset at full
   size, bf16 autocast, its own attention backend, 2 s per preset after a warm-up chunk (the scBERT
   explainer's 100k cells per hour on 8 A100). ``embed_<device>.json``.
8. ``train_loop`` (40): `bench_train_loop.py` on ``benchmarks/gpu_inputs/gpu_test_corpus`` (skipped without
   it: `gpu_prepare.sh` makes it), the real trainer (tiny model, sdpa, bf16) run twice,
   reading the device every step and every 10th step, 150 steps each, one process per run: what
   the per-step reads cost a GPU's launch queue (issue 21). ``train_loop_<device>.json``.
9. ``favor_fp32`` (what the others left, run only when that is at least 30 s; else skipped, which
   is no failure): our kernel on fp32 inputs (TF32 products) at the same sizes; the fp32 kernels'
   correctness is pytest_gpu's.

``gpu_suite_<device>.json`` (rewritten after every part) lists per part its command, exit code,
seconds, time limit, result files and, when it failed, the end of its output; each part's whole
output is in ``<part>.log`` beside it. Exit code 0 when every part succeeded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS, cpu_device, nvidia_smi, result_record, slug_of, write_result  # noqa: E402

# (part, budget in seconds, what it does): the order is the order of value
PLAN = (
    ("wheels", 30, "install the carried wheels (.whl/) into a --target folder for the parts' PYTHONPATH"),
    ("setup", 40, "versions, device, ceilings (bf16 and TF32 8192^3 GEMM, 2 GiB copy) -> ceilings_<device>.json"),
    ("pytest_gpu", 135, "pytest -m gpu on the test files with GPU marks, the FAVOR+ kernel's first, then training "
                        "-> gpu_tests_<device>.json, JUnit XML"),
    ("favor", 85, "FAVOR+ kernel vs performer-pytorch, varlen_attn, SDPA; bf16; fwd, fwd+bwd -> favor_<device>.json"),
    ("train", 140, "geneformer-10m, scgpt: favor / varlen / sdpa, packed vs padded (also to the cap); cells/s, MFU "
              "-> train_<device>.json"),
    ("contrastive", 55, "gradient-cached vs uncached step, 256 ... 65,536 cells -> contrastive_<device>.json"),
    ("embed", 35, "cells embedded per second per device, each preset, bf16 -> embed_<device>.json"),
    ("train_loop", 40, "the trainer's steps/s reading the device every step vs every 10th -> train_loop_<device>.json"),
    ("favor_fp32", 0, "our FAVOR+ kernel on fp32 inputs (TF32 products), in the time the others left "
                      "-> favor_fp32_<device>.json"),
)
# a part that cannot finish in less starts only with this much left (on a GPU; --smoke runs all)
MIN_START_S = {"favor_fp32": 30}
# pytest_gpu runs the files in this order (the rest after them, by name): the kernels that never ran
# on a GPU first, then what proves training
TEST_ORDER = ("tests/test_favor_kernel.py", "tests/test_gpu_training.py", "tests/test_attention_backends.py",
              "tests/test_kernels_packing.py")
PER_TEST_S = 90  # pytest-timeout's limit per test, where it is installed (the GPU image has it)
PARTS = tuple(name for name, _, _ in PLAN)
LENGTHS_FILE = REPO / "benchmarks" / "gpu_inputs" / "lengths.npy"
# the corpus of tests/test_gpu_training.py, made by gpu_prepare.sh (its writer needs anndata, which the image lacks)
PREPARED_CORPUS = REPO / "benchmarks" / "gpu_inputs" / "gpu_test_corpus"
GPU_MARK = re.compile(r"mark\.gpu\b")
TAIL = 3000


def device_slug_here(smoke: bool) -> str:
    """The device's file-name-safe name from nvidia-smi (this process never initializes CUDA: the
    parts get the whole GPU); ``cpu`` without one or in smoke."""
    if smoke:
        return "cpu"
    smi = nvidia_smi()
    name = (smi or {}).get("name")
    if not name:  # no nvidia-smi: ask torch, in a child process
        try:
            name = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0) "
                                   "if torch.cuda.is_available() else '')"], capture_output=True, text=True,
                                  timeout=120).stdout.strip().splitlines()[-1:]
            name = name[0] if name else ""
        except (OSError, subprocess.TimeoutExpired):
            name = ""
    return slug_of(name)


def gpu_test_files() -> list[str]:
    """Test files that carry a GPU mark (relative paths, in `TEST_ORDER`), found by text, so nothing
    is imported."""
    found = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if GPU_MARK.search(p.read_text(errors="replace")))
    rank = {name: i for i, name in enumerate(TEST_ORDER)}
    return sorted(found, key=lambda f: (rank.get(f, len(rank)), f))


# --- one part ------------------------------------------------------------------------------------------
def run_command(command: list[str], log: Path, timeout: float, env: dict, every=None,
                interval: float = 30.0) -> tuple[int | str, float]:
    """Run ``command`` from the repository root, its output into ``log``; on timeout kill its whole
    process group. ``every()`` is called each ``interval`` seconds while it runs (the suite packs
    its files then: a kill of the whole suite by the device tool keeps the rows a part has written).
    -> (exit code or "timeout", seconds)"""
    started = time.monotonic()
    deadline = started + max(1.0, timeout)
    with log.open("w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        code: int | str | None = None
        while code is None:
            left = deadline - time.monotonic()
            try:
                code = proc.wait(timeout=max(0.01, min(interval, left)) if every else max(0.01, left))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    code = "timeout"
                elif every:
                    every()
        if code == "timeout":
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            out.write(f"\n[gpu_suite: killed after {timeout:.0f} s]\n")
    return code, time.monotonic() - started


def tail(log: Path, chars: int = TAIL) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return text[-chars:]


def part_commands(part: str, out: Path, slug: str, smoke: bool, timeout: float) -> tuple[list[str], list[Path]]:
    """(command, result files) of one part."""
    py = sys.executable
    bench = Path("benchmarks")  # relative: the parts run from the repository root, and their JSONs record the command
    ceilings = out / f"ceilings_{slug}.json"
    smoke_flag = ["--smoke"] if smoke else []
    if part == "setup":
        return [py, str(bench / "gpu_suite.py"), "--setup-only", str(ceilings), *smoke_flag], [ceilings]
    if part == "pytest_gpu":
        files = gpu_test_files()
        xml = out / f"pytest_gpu_{slug}.xml"
        limit = [f"--timeout={PER_TEST_S}"] if importlib.util.find_spec("pytest_timeout") else []
        return [py, "-m", "pytest", "-m", "gpu", *limit, "-p", "no:cacheprovider", "-rA", "-v",
                f"--junitxml={xml}", *files], [xml]
    if part in ("favor", "favor_fp32"):
        result = out / f"{part}_{slug}.json"
        extra = ["--dtype", "fp32", "--impls", "favor_triton"] if part == "favor_fp32" else []
        if part == "favor_fp32" and smoke:
            extra += ["--lengths", "32"]
        return [py, str(bench / "bench_favor.py"), "--ceilings", str(ceilings), "--out", str(result), *extra,
                *smoke_flag], [result]
    if part == "train":
        result = out / f"train_{slug}.json"
        command = [py, str(bench / "bench_train.py"), "--ceilings", str(ceilings), "--result", str(result),
                   "--budget-s", f"{max(10.0, timeout - 25):.0f}"]
        if smoke:
            command += ["--smoke"]
        else:
            # sdpa first: the backends never run on a GPU (varlen, the FAVOR+ kernel) come after the rows
            # that a CUDA fault in them would otherwise take down with the process
            command += ["--device", "cuda", "--presets", "geneformer-10m", "scgpt", "--backends", "sdpa", "varlen",
                        "favor", "--modes", "packed", "grouped_padded", "padded_to_cap", "random_padded", "--warmup", "2",
                        "--timed", "8"]
        if LENGTHS_FILE.exists():
            command += ["--lengths-file", str(LENGTHS_FILE.relative_to(REPO))]
        return command, [result]
    if part == "embed":
        result = out / f"embed_{slug}.json"
        command = [py, str(bench / "bench_embed.py"), "--result", str(result)]
        command += ["--smoke"] if smoke else ["--device", "cuda", "--seconds", "2"]
        if LENGTHS_FILE.exists():
            command += ["--lengths-file", str(LENGTHS_FILE.relative_to(REPO))]
        return command, [result]
    if part == "train_loop":
        result = out / f"train_loop_{slug}.json"
        command = [py, str(bench / "bench_train_loop.py"), "--result", str(result),
                   "--corpus", str(PREPARED_CORPUS.relative_to(REPO))]
        # sdpa: no Triton compile in a 40 s part; one run per setting (each process starts DeepSpeed)
        command += ["--smoke"] if smoke else ["--repeats", "1", "--steps", "150", "model.attention=sdpa"]
        return command, [result]
    if part == "contrastive":
        result = out / f"contrastive_{slug}.json"
        command = [py, str(bench / "bench_contrastive.py"), "--out", str(result),
                   "--budget-s", f"{max(5.0, timeout - 10):.0f}"]
        command += ["--smoke"] if smoke else ["--device", "cuda"]
        return command, [result]
    raise ValueError(part)


def wheel_supported(wheel: Path) -> bool:
    """Whether this interpreter can install ``wheel`` (its tags against this interpreter's; True
    where packaging is not importable: pip then decides)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        try:
            from pip._vendor.packaging.tags import sys_tags
            from pip._vendor.packaging.utils import parse_wheel_filename
        except ImportError:
            return True
    try:
        return bool(set(parse_wheel_filename(wheel.name)[3]) & set(sys_tags()))
    except Exception:  # noqa: BLE001 - an odd file name: let pip say what is wrong
        return True


def install_wheels(wheels: Path | None, site: Path, env: dict, log: Path, timeout: float) -> dict:
    """The ``wheels`` part: pip-install every ``*.whl`` in ``wheels`` that this interpreter supports
    into ``site`` (no index, no dependencies) and put ``site`` on ``env``'s PYTHONPATH. A wheel
    built for another Python (a cp312 wheel in a CPU smoke run on 3.11) is left out and named: pip
    would refuse the whole set for it."""
    found = sorted(wheels.glob("*.whl")) if wheels and wheels.is_dir() else []
    if not found:
        log.write_text(f"no wheels in {wheels}: nothing to install\n")
        return {"command": None, "exit_code": 0, "seconds": 0.0, "note": f"no .whl files in {wheels}"}
    usable = [w for w in found if wheel_supported(w)]
    left_out = [w.name for w in found if w not in usable]
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--upgrade", "--target", str(site), *map(str, usable)]
    code, seconds = run_command(command, log, timeout, env) if usable else (0, 0.0)
    if code == 0:
        env["PYTHONPATH"] = os.pathsep.join([*_path_entries(env), str(site)])  # after any sitecustomize folder
    record = {"command": _show(command), "exit_code": code, "seconds": round(seconds, 1),
              "wheels": [p.name for p in usable], "site": str(site)}
    if left_out:
        record["not_installed"] = {name: "not supported by this interpreter" for name in left_out}
        print(f"wheels left out (not for this interpreter): {', '.join(left_out)}", flush=True)
    return record


def _path_entries(env: dict) -> list[str]:
    return [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def _show(command: list[str]) -> str:
    return " ".join(Path(c).name if i == 0 else (os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c)
                    for i, c in enumerate(command))


# --- what each part found, for the suite's JSON and the last table --------------------------------
def pytest_counts(xml: Path, log: Path) -> dict:
    """passed / failed / errors / skipped from the JUnit XML, else counted in the -v log."""
    if xml.exists():
        try:
            root = ElementTree.parse(xml).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            return {"source": xml.name, "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
                    "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}
        except (ElementTree.ParseError, ValueError):
            pass
    text = log.read_text(errors="replace") if log.exists() else ""
    words = re.findall(r"::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text)
    return {"source": f"{log.name} (no JUnit XML)", "passed": words.count("PASSED") + words.count("XPASS"),
            "failed": words.count("FAILED"), "errors": words.count("ERROR"),
            "skipped": words.count("SKIPPED") + words.count("XFAIL")}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(part: str, files: list[Path]) -> dict:
    """A part's key numbers (from its result JSON) for the suite JSON and the last table."""
    r = _load(files[0]) if files and files[0].suffix == ".json" else None
    if r is None:
        return {}
    if part == "setup":
        c = r.get("ceilings") or {}
        return {"gemm_bf16_tflops": c.get("gemm_bf16_tflops"), "gemm_tf32_tflops": c.get("gemm_tf32_tflops"),
                "copy_gbps": c.get("copy_gbps"), "gpu": (r.get("device") or {}).get("gpu"),
                "versions": r.get("versions")}
    out = {"partial": r.get("partial", False), "rows": len(r.get("rows") or [])}
    if part in ("favor", "favor_fp32"):
        out["lines"] = [{k: row.get(k) for k in ("impl", "L", "fwd_ms", "fwd_bwd_ms", "fwd_kernel_ms",
                                                  "fwd_bwd_kernel_ms", "fwd_gap", "fwd_bwd_gap",
                                                  "fwd_bwd_tflops", "error", "skipped")} for row in r["rows"]]
    elif part == "train":
        out["lengths"] = (r.get("settings") or {}).get("lengths")
        out["lines"] = [{k: row.get(k) for k in ("preset", "backend", "mode", "cells_per_s", "tokens_per_s", "mfu",
                                                  "mfu_measured_gemm", "oom", "error", "skipped")}
                        for row in r["rows"] if not row.get("skipped")
                        or any(why in str(row["skipped"]) for why in ("budget", "device faulted"))]
    elif part == "embed":
        out["lines"] = [{k: row.get(k) for k in ("preset", "backend", "cells_per_s", "error")} for row in r["rows"]]
    elif part == "train_loop":
        out["steps_per_s"] = {k: v for k, v in (r.get("summary") or {}).items() if k.startswith("steps_per_s")}
    elif part == "contrastive":
        out["largest_batch_fits"] = r.get("largest_batch_fits")
        out["lines"] = [{k: row.get(k) for k in ("mode", "batch_cells", "status", "ms_per_cell", "step_peak_bytes")}
                        for row in r["rows"]]
    return out


def _f(x, fmt: str) -> str:
    width = re.match(r"\d*", fmt).group()
    return "-".rjust(int(width)) if x is None and width else "-" if x is None else format(x, fmt)


def print_summary(report: dict) -> None:
    """The short table (the device tool returns only the end of the output)."""
    print("\n=== gpu_suite summary ===", flush=True)
    print(f"{'part':<13}{'status':<9}{'s':>6}{'limit':>7}  result", flush=True)
    for part, rec in report["parts"].items():
        print(f"{part:<13}{rec['status']:<9}{rec['seconds']:>6.0f}{rec.get('timeout_s') or 0:>7.0f}  "
              f"{', '.join(rec.get('results') or []) or rec.get('note', '')}", flush=True)
    for part, rec in report["parts"].items():
        s = rec.get("summary") or {}
        if part == "setup" and s:
            print(f"ceilings: bf16 GEMM {_f(s.get('gemm_bf16_tflops'), '.0f')} TFLOP/s, TF32 GEMM "
                  f"{_f(s.get('gemm_tf32_tflops'), '.0f')} TFLOP/s, copy {_f(s.get('copy_gbps'), '.0f')} GB/s "
                  f"({s.get('gpu')})", flush=True)
            print("versions: " + ", ".join(f"{k} {v}" for k, v in (s.get("versions") or {}).items()), flush=True)
        elif part == "pytest_gpu" and s:
            print(f"pytest -m gpu: {s.get('passed')} passed, {s.get('failed')} failed, {s.get('errors')} errors, "
                  f"{s.get('skipped')} skipped ({len(rec.get('test_files') or [])} files)", flush=True)
        elif part in ("favor", "favor_fp32") and s.get("lines"):
            print(f"{part}: impl / L: fwd ms, fwd+bwd ms (gap to floor), fwd+bwd TFLOP/s", flush=True)
            for x in s["lines"]:
                what = (f"skipped: {x['skipped'][:50]}" if x.get("skipped") else f"failed: {x['error'][:60]}"
                        if x.get("error") else f"{_f(x['fwd_ms'], '.3f')}, {_f(x['fwd_bwd_ms'], '.3f')} "
                        f"({_f(x.get('fwd_bwd_gap'), '.1f')}x), {_f(x.get('fwd_bwd_tflops'), '.0f')}")
                print(f"  {x['impl']:<18}{x['L']:>6}: {what}", flush=True)
        elif part == "train" and s.get("lines"):
            print(f"train ({s.get('lengths')} lengths): cells/s, tokens/s, MFU (datasheet), MFU (measured GEMM)",
                  flush=True)
            for x in s["lines"]:
                head = f"  {x['preset']:<15}{x['backend']:<7}{x['mode']:<15}"
                if x.get("skipped") or x.get("oom") or x.get("error"):
                    why = x.get("skipped") or ("out of memory" if x.get("oom") else x.get("error"))
                    print(f"{head}{why[:60]}", flush=True)
                else:
                    print(f"{head}{_f(x['cells_per_s'], '9.0f')}{_f(x['tokens_per_s'], '11.0f')}"
                          f"{_f(x['mfu'], '7.3f')}{_f(x['mfu_measured_gemm'], '7.3f')}", flush=True)
        elif part == "embed" and s.get("lines"):
            print("embed: cells/s per device", flush=True)
            for x in s["lines"]:
                what = _f(x.get("cells_per_s"), "9.1f") if x.get("cells_per_s") else f"failed: {str(x.get('error'))[:60]}"
                print(f"  {x['preset']:<15}{str(x.get('backend') or ''):<7}{what}", flush=True)
        elif part == "train_loop" and s.get("steps_per_s"):
            print("train_loop: " + ", ".join(f"{k.removeprefix('steps_per_s_')} {_f(v, '.1f')}"
                                             for k, v in s["steps_per_s"].items()) + " steps/s", flush=True)
        elif part == "contrastive" and s.get("lines"):
            print(f"contrastive: largest batch {s.get('largest_batch_fits')}; mode cells: ms/cell, step MiB",
                  flush=True)
            for x in s["lines"]:
                mib = None if x.get("step_peak_bytes") is None else x["step_peak_bytes"] / 2**20
                what = (f"{_f(x.get('ms_per_cell'), '.3f')} ms, {_f(mib, '.0f')} MiB" if x["status"] == "ok"
                        else x["status"])
                print(f"  {x['mode']:<9}{x['batch_cells']:>6}: {what}", flush=True)
    print(f"suite: {report['status']} in {report['seconds']:.0f} s; JSON: {report['file']}"
          + (f"; every file packed in {report['bundle']}" if report.get("bundle") else ""), flush=True)


def bundle(out: Path, dest: Path, slug: str, suite_file: Path) -> Path:
    """Every file under ``out`` (the installed wheels left out) in ``dest/gpu_suite_results_<slug>.tar.gz``,
    and the suite JSON beside it, each replaced atomically: the device tool brings back at most 8
    files, and the suite writes about 20. Called after every part, so a kill keeps the parts done."""
    dest.mkdir(parents=True, exist_ok=True)
    packed = dest / f"gpu_suite_results_{slug}.tar.gz"
    part = dest / f".{packed.name}.part"
    own = {packed.resolve(), part.resolve()}  # a --bundle inside --out: never pack the bundle itself
    with tarfile.open(part, "w:gz") as tar:
        for f in sorted(out.rglob("*")):
            rel = f.relative_to(out)
            if f.is_file() and rel.parts[0] != "site" and not f.name.endswith(".tmp") and f.resolve() not in own:
                tar.add(f, arcname=str(rel))
    part.replace(packed)
    if packed.stat().st_size > 15 * 2**20:  # the device tool brings back files of up to 16 MiB
        print(f"warning: {packed} is {packed.stat().st_size / 2**20:.1f} MiB, near the 16 MiB a returned file may "
              "have", flush=True)
    if suite_file.parent.resolve() != dest.resolve():
        copy = dest / f".{suite_file.name}.part"
        shutil.copyfile(suite_file, copy)
        copy.replace(dest / suite_file.name)
    return packed


# --- the setup part (its own process: the parent never touches CUDA) --------------------------------
def setup_only(path: Path, smoke: bool) -> None:
    from common import ResultFile, device_record, measure_ceilings, versions

    record = ResultFile(path, "ceilings", device=device_record(), smoke=smoke, nvidia_smi=nvidia_smi(),
                        versions=versions("torch", "triton", "deepspeed", "numpy", "performer_pytorch", "einops"),
                        ceilings=None)
    print(json.dumps({k: record.record[k] for k in ("device", "versions", "nvidia_smi")}, indent=1), flush=True)
    ceilings = measure_ceilings(smoke=smoke)
    record.finish(ceilings=ceilings)
    print(json.dumps(ceilings, indent=1), flush=True)


# --- the suite --------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--smoke", action="store_true", help="every part's CPU form at tiny sizes, to check the suite")
    ap.add_argument("--out", type=Path, help="folder for every JSON and log (default: with $OUT set, a local "
                    "work folder bundled into $OUT; else benchmarks/results; with --smoke, a temporary folder)")
    ap.add_argument("--bundle", type=Path, help="after every part, pack --out into DIR/gpu_suite_results_<device>"
                    ".tar.gz with the suite JSON beside it (default $OUT when --out is not given): the device "
                    "tool brings back at most 8 files")
    ap.add_argument("--total-s", type=float, default=sum(b for _, b, _ in PLAN),
                    help="seconds for all parts together (default: the sum of the plan's budgets)")
    ap.add_argument("--wheels", type=Path, help="folder of wheels to install first (default .whl/ when it exists; "
                    "with --smoke only when given)")
    ap.add_argument("--site", type=Path, help="pip --target folder for the wheels (default /tmp/site)")
    ap.add_argument("--setup-only", type=Path, metavar="JSON", help=argparse.SUPPRESS)  # the setup part's process
    args = ap.parse_args(argv)
    if args.setup_only:
        setup_only(args.setup_only, args.smoke)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        sys.exit(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    slug = device_slug_here(args.smoke)
    if slug == "cpu" and not args.smoke:
        sys.exit("no NVIDIA GPU here (nvidia-smi sees none): run the suite on a GPU machine, or check it here "
                 "with --smoke")
    bundle_to = args.bundle or (Path(os.environ["OUT"]) if os.environ.get("OUT") and not args.out else None)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_suite_")) if bundle_to or args.smoke else RESULTS)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    wheels = args.wheels or (None if args.smoke else REPO / ".whl")
    site = args.site or (out / "site" if args.smoke else Path("/tmp/site"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([*_path_entries(env), str(REPO)])
    env.pop("MLFLOW_TRACKING_URI", None)

    budgets = {name: budget for name, budget, _ in PLAN}
    planned = [p for p in PARTS if p in parts]
    print(f"gpu_suite on {slug}{' (smoke)' if args.smoke else ''}: results in {out}", flush=True)
    print(f"plan ({args.total_s:.0f} s in all; spare time passes on to later parts):", flush=True)
    for name, budget, what in PLAN:
        if name in planned:
            print(f"  {name:<12}{budget:>4} s  {what}", flush=True)
    suite_file = out / f"gpu_suite_{slug}.json"
    report = result_record("gpu_suite", device={**cpu_device(), "nvidia_smi": None if args.smoke else nvidia_smi()},
                           smoke=args.smoke, out=str(out), total_s=args.total_s,
                           plan=[{"part": n, "budget_s": b, "what": w} for n, b, w in PLAN if n in planned],
                           lengths_file=str(LENGTHS_FILE.relative_to(REPO)) if LENGTHS_FILE.exists() else None,
                           lengths=("real (benchmarks/gpu_inputs/lengths.npy)" if LENGTHS_FILE.exists() else
                                    "synthetic: benchmarks/gpu_inputs/lengths.npy was not carried"),
                           parts={}, status="running", seconds=0.0, file=str(suite_file),
                           bundle=str(bundle_to / f"gpu_suite_results_{slug}.tar.gz") if bundle_to else None)
    started = time.monotonic()
    allowed = 0.0  # budget of the parts so far: spare time rolls over
    for part in planned:
        allowed += budgets[part]
        elapsed = time.monotonic() - started
        # a part of budget 0 takes what the others left of the total (alone: all of it)
        timeout = args.total_s - elapsed if budgets[part] == 0 else min(allowed - elapsed, args.total_s - elapsed)
        log = out / f"{part}.log"
        print(f"[{elapsed:5.0f} s] {part}: up to {timeout:.0f} s ...", flush=True)
        if timeout < 5:
            rec = {"status": "skipped", "exit_code": None, "seconds": 0.0, "timeout_s": round(timeout, 1),
                   "note": "no time left in the suite's total"}
        elif not args.smoke and timeout < MIN_START_S.get(part, 0):
            rec = {"status": "skipped", "exit_code": None, "seconds": 0.0, "timeout_s": round(timeout, 1),
                   "excused": True,  # planned so: not a failure of the suite
                   "note": f"needs {MIN_START_S[part]} s, {timeout:.0f} s were left: run it alone with --parts {part}"}
        elif part == "wheels":
            rec = install_wheels(wheels, site, env, log, timeout)
            rec.update(status="ok" if rec["exit_code"] == 0 else "failed", timeout_s=round(timeout, 1),
                       log=log.name)
            if rec["exit_code"] != 0:
                rec["output_tail"] = tail(log)
        elif part == "train_loop" and not PREPARED_CORPUS.is_dir():
            # as pytest_gpu without GPU tests: nothing to run is no failure of the suite; the note says why
            rec = {"status": "ok", "exit_code": None, "seconds": 0.0, "timeout_s": round(timeout, 1),
                   "note": f"not run: no {PREPARED_CORPUS.relative_to(REPO)} (run benchmarks/gpu_prepare.sh first)"}
        elif part == "pytest_gpu" and not gpu_test_files():  # plain pytest would collect every test module
            rec = {"status": "ok", "exit_code": None, "seconds": 0.0, "timeout_s": round(timeout, 1), "test_files": [],
                   "note": "no test file carries a GPU mark: nothing to run"}
        else:
            command, files = part_commands(part, out, slug, args.smoke, timeout)
            for f in files:  # nothing stale from an earlier run counts as this run's result
                f.unlink(missing_ok=True)
            # said before it runs: a suite killed during this part says which part that was
            report["parts"][part] = {"status": "running", "timeout_s": round(timeout, 1), "log": log.name}
            write_result(suite_file, report, quiet=True)
            code, seconds = run_command(command, log, timeout, env,
                                        every=(lambda: bundle(out, bundle_to, slug, suite_file)) if bundle_to else None)
            if part == "pytest_gpu":
                code = 0 if code == 5 else code  # 5: nothing selected (no GPU test collected): not a failure
            rec = {"command": _show(command), "exit_code": code, "seconds": round(seconds, 1),
                   "timeout_s": round(timeout, 1), "log": log.name,
                   "results": [f.name for f in files if f.exists()],
                   "status": "ok" if code == 0 else ("timeout" if code == "timeout" else "failed")}
            if part == "pytest_gpu":
                rec["test_files"] = command[command.index(f"--junitxml={files[0]}") + 1:]
                counts = pytest_counts(files[0], log)
                rec["summary"] = counts
                write_result(out / f"gpu_tests_{slug}.json", result_record(
                    "gpu_tests", smoke=args.smoke, test_files=rec["test_files"], exit_code=code, **counts,
                    junit_xml=files[0].name if files[0].exists() else None, log=log.name), quiet=True)
                rec["results"].append(f"gpu_tests_{slug}.json")
            else:
                rec["summary"] = summary(part, files)
            if code != 0:
                rec["output_tail"] = tail(log)
        report["parts"][part] = rec
        report["seconds"] = round(time.monotonic() - started, 1)
        write_result(suite_file, report, quiet=True)
        if bundle_to:
            bundle(out, bundle_to, slug, suite_file)
        print(f"[{time.monotonic() - started:5.0f} s] {part}: {rec['status']} in {rec['seconds']:.0f} s", flush=True)
        if rec["status"] not in ("ok", "skipped"):
            print(f"--- end of {part}.log ---\n{tail(log, 1200)}\n---", flush=True)
    ok = all(r["status"] == "ok" or r.get("excused") for r in report["parts"].values())
    report.update(status="ok" if ok else "failed", seconds=round(time.monotonic() - started, 1))
    write_result(suite_file, report, quiet=True)
    if bundle_to:
        bundle(out, bundle_to, slug, suite_file)
    if args.smoke and site.exists() and site.is_relative_to(out):
        shutil.rmtree(site, ignore_errors=True)  # the installed test wheels: not a result
    print_summary(report)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

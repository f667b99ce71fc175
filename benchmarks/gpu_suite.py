"""The GPU benchmark suite in one command: FAVOR+ kernel, training throughput per preset, backend
and batching mode in bf16, gradient-cached contrastive memory; every result JSON named by device.

    python benchmarks/gpu_suite.py                         # all parts (each part well under 10 min on an H100)
    python benchmarks/gpu_suite.py --parts train --copy-to "$OUT"
    python benchmarks/gpu_suite.py --smoke                 # on CPU: each part's --smoke, to check the suite

On a machine without a package index, first carry the wheels `benchmarks/gpu_wheels.sh` builds.
Each part runs as its own process (a crash or an out-of-memory in one does not stop the others)
with a time limit; ``benchmarks/results/gpu_suite_<device>.json`` records per part its command,
exit code, seconds, result file and the end of its output when it failed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS, device_record, device_slug, result_record, versions, write_result  # noqa: E402

PARTS = ("favor", "train", "contrastive")


def part_command(part: str, result: Path, smoke: bool) -> list[str]:
    """The command line of one part, writing its JSON to ``result``."""
    script = REPO / "benchmarks" / f"bench_{part}.py"
    out_flag = {"favor": "--out", "train": "--result", "contrastive": "--out"}[part]
    command = [sys.executable, str(script), out_flag, str(result)]
    if smoke:
        command.append("--smoke")
    elif part in ("train", "contrastive"):
        command += ["--device", "cuda"]
    return command


def run_part(part: str, result: Path, smoke: bool, timeout: float) -> dict:
    command = part_command(part, result, smoke)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, output = "timeout", (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    record = {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)), "exit_code": code,
              "seconds": round(time.perf_counter() - started, 1),
              "result": str(result.relative_to(REPO)) if result.is_relative_to(REPO) and result.exists() else
              (str(result) if result.exists() else None)}
    if code != 0:
        record["output_tail"] = output[-3000:]
    print(f"{part}: exit {code} in {record['seconds']} s -> {record['result']}", file=sys.stderr)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--smoke", action="store_true", help="each part's --smoke (CPU), results in a temporary folder")
    ap.add_argument("--timeout", type=float, default=570, help="seconds per part (default 570)")
    ap.add_argument("--results", type=Path, help="folder for the JSONs (default benchmarks/results)")
    ap.add_argument("--copy-to", type=Path, help="also copy every JSON and PNG written into this folder")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        sys.exit(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    slug = device_slug()
    if slug == "cpu" and not args.smoke:
        sys.exit("no CUDA GPU here: run the suite on a GPU machine, or check it here with --smoke")
    folder = args.results or (Path("/tmp") / "gpu_suite_smoke" if args.smoke else RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    report = {part: run_part(part, folder / f"{part}_{slug}.json", args.smoke, args.timeout) for part in parts}
    suite = folder / f"gpu_suite_{slug}.json"
    write_result(suite, result_record("gpu_suite", device=device_record(), versions=versions("torch", "triton", "deepspeed"),
                                      smoke=args.smoke, parts=report))
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for path in [suite, *(folder / Path(r["result"]).name for r in report.values() if r["result"])]:
            for file in (path, path.with_suffix(".png")):
                if file.exists():
                    shutil.copy2(file, args.copy_to / file.name)
    sys.exit(0 if all(r["exit_code"] == 0 for r in report.values()) else 1)


if __name__ == "__main__":
    main()

"""What every benchmark's results JSON shares: the machine, the versions, the header, the write."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# the real count matrices beside the checkout (absent in a user's fresh clone) and the one file
# among them without gene identifiers, which every benchmark leaves out
SHARED_H5AD = Path(__file__).resolve().parents[2] / "shared" / "data" / "h5ad"
NO_GENE_IDS = "scdcc_10X_PBMC_top2000.h5ad"


def cpu_device() -> dict:
    """This machine, as results JSONs record it."""
    info = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if info.exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "platform": platform.platform()}


def device_record() -> dict:
    """The machine with its GPU (name, memory) when torch sees one."""
    import torch

    record = cpu_device()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                      gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return record


def device_slug() -> str:
    """A file-name-safe name of the accelerator, e.g. ``nvidia-h100-80gb-hbm3``; ``cpu`` without one."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").replace("--", "-")


def versions(*modules: str) -> dict:
    """Python and the named packages' versions (missing ones as None)."""
    import importlib

    out = {"python": platform.python_version()}
    for name in modules:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out


def result_record(benchmark: str, **fields) -> dict:
    """A results JSON's fields: the benchmark's name and date first, the command that made it last."""
    return {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)

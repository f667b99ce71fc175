"""The CPU cores this process may use: its affinity mask (SLURM's and taskset's cpusets), capped by
a cgroup CPU quota (docker --cpus, Kubernetes limits), not the machine's core count that
``os.cpu_count()`` gives. The converter sizes its worker pool by it and the trainer its threads
(`pretrain.threads`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """Cores allowed by a CFS quota (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``), or None when there is no quota or no cgroup file to read. Containers
    see their own cgroup at the root of the mount, which is the case this reads."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def usable_cores(affinity: set[int] | None = None, cgroup_root: Path = CGROUP) -> tuple[int, str]:
    """(cores this process may use, how that was found): the affinity mask, capped by a cgroup
    CPU quota (rounded up: a 1.5-core quota still runs 2 threads without stalls of note)."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except AttributeError:  # not on Linux
            affinity = set(range(os.cpu_count() or 1))
    cores, how = len(affinity), f"{len(affinity)} cores in the affinity mask"
    quota = cgroup_cpu_limit(cgroup_root)
    if quota is not None and math.ceil(quota) < cores:
        cores, how = max(1, math.ceil(quota)), f"cgroup CPU quota of {quota:g} cores ({how})"
    return max(1, cores), how

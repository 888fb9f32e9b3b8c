"""How many CPU threads a trainer process may use, and keeping torch and the OpenMP/BLAS pools
of numpy, scipy and scikit-learn to that number.

Inside a container these libraries size their pools by the node's cores, not by the pod's CPU
limit: on a 64-core node a pod limited to 4 CPUs runs 64-thread pools that the CFS quota then
throttles. OpenBLAS's threads spin while they wait, so oversubscription is worse than slow: on
this project's 2-core machine under load, the linear probe's logistic-regression fits took 28 s
with 2 BLAS threads per process and 0.6 s with one (docs/trainer.md, CPU threads).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path | None = None) -> float | None:
    """The container's CPU limit in CPUs (cgroup v2 `cpu.max`, else v1 CFS quota), or None."""
    root = root or CGROUP
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for directory in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def cpu_budget(*, processes: int = 1, root: Path | None = None,
               affinity: set[int] | None = None) -> int:
    """Threads per process: the CPUs this process may run on (affinity), capped by the
    container's CPU limit rounded up, shared by the `processes` of the pod, at least one."""
    cpus = len(affinity if affinity is not None else os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus // max(1, processes))


def limit_threads(*, processes: int = 1, log=print) -> int:
    """Size torch's intra-op pool and every OpenMP/BLAS pool to `cpu_budget`, unless the user set
    OMP_NUM_THREADS (torchrun sets it to 1 for several processes per pod). Returns the count."""
    import torch
    from threadpoolctl import threadpool_limits

    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(explicit) if explicit.isdigit() and int(explicit) > 0 else \
        cpu_budget(processes=processes)
    # Pools of libraries loaded later (scipy's OpenBLAS, scikit-learn's OpenMP) read these when
    # they load; threadpool_limits resizes the pools loaded already (torch's, numpy's).
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)  # applies now and stays (not used as a context manager)
    log(f"CPU threads per process: {threads}"
        + (" (OMP_NUM_THREADS)" if explicit else ""))
    return threads

"""How many CPU threads torch may use: the cores this process can really run on, split by the work.

`os.cpu_count()` counts the machine, not what the process is allowed: a `taskset` / cpuset affinity
mask or a container's CPU quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`) can leave far fewer,
and other processes may already keep some of those cores busy. A compute thread on a core it must
share waits at every OpenMP barrier for its descheduled peers while the others spin: decoding
measured 10-40x slower than with the shared cores left out (benchmarks/bench_threads.py).

    available_cores()                         # affinity mask, capped by the cgroup quota
    set_thread_budget()                       # the CLI, first thing: OMP_NUM_THREADS <= those cores
    choose_threads(None, processes=8)         # this process's share of the cores
    apply_threads(choose_threads(4))          # torch.set_num_threads

Imports nothing from llmctl, so every layer (model, train, evals, stages, cli) can use it.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Below about this many multiply-adds per step a thread costs more than it saves: the weights fit in
# cache and each op lasts microseconds, about what waking a thread does. An estimate (see the
# benchmark for a given machine); it only lowers the default, never an explicit --threads.
MIN_WORK_PER_THREAD = 2_000_000


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller (or "" for the v2 unified hierarchy) -> this process's cgroup path."""
    paths: dict[str, str] = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _ancestors(root: Path, rel: str) -> list[Path]:
    """The cgroup folder of `rel` under root and every folder above it up to root (each may limit)."""
    folder = root / rel.lstrip("/")
    if not folder.is_dir():  # inside a container the process's own cgroup is mounted at root
        return [root]
    out = [folder]
    while folder != root and root in folder.parents:
        folder = folder.parent
        out.append(folder)
    return out


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (e.g. 1.5), or None when unlimited or unknown."""
    paths = _cgroup_paths(proc_cgroup)
    limits: list[float] = []
    if "" in paths:  # cgroup v2: cpu.max is "QUOTA PERIOD" or "max PERIOD"
        base = root if (root / "cgroup.controllers").is_file() else root / "unified"
        for folder in _ancestors(base, paths[""]):
            fields = (_read(folder / "cpu.max") or "").split()
            if len(fields) == 2 and fields[0] != "max":
                limits.append(int(fields[0]) / int(fields[1]))
    if "cpu" in paths:  # cgroup v1: cfs quota and period in microseconds; quota -1 is unlimited
        mounts = [m for m in (root / "cpu", root / "cpu,cpuacct") if m.is_dir()]
        for folder in _ancestors(mounts[0], paths["cpu"]) if mounts else []:
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota and period and quota.isdigit() and int(quota) > 0 and int(period) > 0:
                limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def available_cores() -> int:
    """Cores this process may use: its affinity mask, capped by the cgroup CPU quota (rounded up)."""
    # macOS and Windows have no affinity API: every core counts there.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def busy_elsewhere(cores: int, stat: Path = Path("/proc/stat"), samples: int = 3) -> int:
    """How many of `cores` other processes keep busy right now: runnable threads machine-wide (the
    fewest of a few samples, so a passing blip does not count), minus this one, in proportion to
    the cores this process may use. 0 where the kernel does not say (not Linux)."""
    seen = []
    for i in range(samples):
        match = re.search(r"^procs_running (\d+)", _read(stat) or "", re.MULTILINE)
        if match is None:
            return 0
        seen.append(max(0, int(match.group(1)) - 1))
        if i + 1 < samples:
            time.sleep(0.002)
    return min(cores, min(seen) * cores // max(cores, os.cpu_count() or 1))


def choose_threads(requested: int | None = None, *, processes: int = 1, work: int | None = None) -> int:
    """Torch compute threads for one of `processes` processes sharing this process's cores.

    `requested` (a --threads option or config key) wins but is capped at the share: more threads
    than cores is never faster. Otherwise: the budget in OMP_NUM_THREADS when set (by the user, or
    by `set_thread_budget` in this process or its parent), else the cores no other process keeps
    busy right now; reduced for small `work` (multiply-adds per parallel op, e.g. a model's
    parameter count for a decode step), where threads cost more than they save.
    """
    cores = available_cores()
    share = max(1, cores // max(1, processes))
    if requested is not None and requested > 0:
        return min(requested, share)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        threads = min(share, int(env))
    else:
        # Threads on cores other processes occupy wait at every barrier for a descheduled peer:
        # measured 10-40x slower than leaving those cores out (benchmarks/bench_threads.py).
        threads = max(1, (cores - busy_elsewhere(cores)) // max(1, processes))
    if work is not None:
        threads = min(threads, max(1, work // MIN_WORK_PER_THREAD))
    return threads


def set_thread_budget(threads: int | None = None) -> int:
    """Cap this process and its children at `threads` (default and ceiling: the available cores).

    Kept in OMP_NUM_THREADS, which torch reads when it starts its thread pool and `choose_threads`
    reads later, so set it before torch does any work (the CLI does, first thing).
    """
    budget = choose_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(budget)
    return budget


def apply_threads(threads: int) -> int:
    """Make torch use `threads` compute threads; returns it."""
    import torch

    torch.set_num_threads(threads)
    return threads

"""How many CPUs this process may really use: what the default number of workers is made of.

os.cpu_count() is the machine's; a process pinned by `taskset` or a cpuset may run on fewer
(os.sched_getaffinity), and a container limited with `--cpus` gets a CFS quota (cgroup v2
`cpu.max`, v1 `cpu.cfs_quota_us`) that lets it use only so much of them, whatever it sees.
A worker per visible CPU in a container given one CPU's worth of quota would only be
throttled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
              Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def usable() -> int:
    """CPUs this process may run on, lowered to its cgroup's CPU quota when it has one."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = quota_cpus()
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def quota_cpus(v2: Path = _CGROUP_V2, v1: tuple[Path, Path] = _CGROUP_V1) -> int | None:
    """The cgroup's CPU quota in whole CPUs (rounded up), or None when there is none."""
    try:
        quota, _, period = v2.read_text().partition(" ")
        return _whole(quota, period)
    except OSError:
        pass
    try:
        return _whole(v1[0].read_text(), v1[1].read_text())
    except OSError:
        return None


def _whole(quota: str, period: str) -> int | None:
    quota, period = quota.strip(), period.strip()
    if quota in ("max", "-1") or not quota or not period:
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None

"""The kernel's jiffies clock, which conntrack entries use for last_seen (cheap in the datapath)."""

from __future__ import annotations

import gzip
import re
import time
from functools import lru_cache

_HZ_VALUES = (100, 250, 300, 1000)


def jiffies() -> int:
    """The current jiffies_64, as /proc/timer_list prints it."""
    with open("/proc/timer_list") as f:
        for line in f:
            if line.startswith("jiffies:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/timer_list has no jiffies line")


@lru_cache(maxsize=1)
def hz() -> int:
    """CONFIG_HZ from /proc/config.gz, else measured over 200 ms and rounded to a known value."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            m = re.search(r"^CONFIG_HZ=(\d+)$", f.read(), re.M)
            if m:
                return int(m.group(1))
    except OSError:
        pass
    j0, t0 = jiffies(), time.monotonic()
    time.sleep(0.2)
    rate = (jiffies() - j0) / (time.monotonic() - t0)
    return min(_HZ_VALUES, key=lambda v: abs(v - rate))


def seconds_since(jiffies_then: int, now: int | None = None) -> float:
    return max(0, (jiffies() if now is None else now) - jiffies_then) / hz()

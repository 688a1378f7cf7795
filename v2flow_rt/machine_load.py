"""How busy the machine was while something was timed: on a shared machine other work moves speed ratios
(0.34x to 2.6x between two runs here), so a benchmark records the load and says when it competed. Stdlib only.
"""

from __future__ import annotations

import os
import time
from typing import Any

# Other processes' share of the load average above which a timing is called contended, in cores.
COMPETING_CORES = 0.5


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):   # pragma: no cover - not on Windows
        return []


class LoadMeter:
    """``start()`` … ``stop()`` → the load average at both ends and this process's CPU time against wall time.

    The 1-minute load average counts this process too (about ``cpu_per_wall`` cores); what is left over is
    other work: ``competing`` when that exceeds ``COMPETING_CORES``, with a ``warning`` to print.
    """

    def start(self) -> LoadMeter:
        self.wall0, self.cpu0, self.load0 = time.perf_counter(), _cpu_seconds(), _loadavg()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        cpu = _cpu_seconds() - self.cpu0
        load1 = _loadavg()
        cpu_per_wall = cpu / wall if wall > 0 else 0.0
        peak = max(self.load0[0] if self.load0 else 0.0, load1[0] if load1 else 0.0)
        others = max(0.0, peak - cpu_per_wall)
        report: dict[str, Any] = {"loadavg_start": self.load0, "loadavg_end": load1, "wall_s": round(wall, 2),
                                  "process_cpu_s": round(cpu, 2), "cpu_per_wall": round(cpu_per_wall, 2),
                                  "other_load": round(others, 2), "competing": others > COMPETING_CORES,
                                  "warning": None}
        if report["competing"]:
            report["warning"] = (f"other work competed for the CPU (1-minute load up to {peak:.2f} on "
                                 f"{os.cpu_count()} cores, this process used {cpu_per_wall:.2f}): "
                                 f"the timings and ratios may not reproduce")
        return report


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

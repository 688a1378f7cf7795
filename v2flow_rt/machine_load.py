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
    """``start()`` … ``stop()`` → the load average at both ends, this process's CPU time against wall time,
    and the CPU time other processes used meanwhile.

    Where ``/proc`` can be read, other work is measured: every process that is not this one or one of its
    descendants (a benchmark's Ray workers or Triton server are its own), its CPU seconds over the interval
    (``other_cpu_s``; per wall second ``other_cores``). Elsewhere it is estimated: the 1-minute load average
    less this process's ``cpu_per_wall`` (``other_load``; children still running when ``stop`` is called
    are not counted as this process's there). ``competing`` when other work exceeds ``COMPETING_CORES``,
    with a ``warning`` to print.
    """

    def start(self) -> LoadMeter:
        self.table0 = _proc_table()
        self.wall0, self.cpu0, self.load0 = time.perf_counter(), _cpu_seconds(), _loadavg()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        cpu = _cpu_seconds() - self.cpu0
        load1 = _loadavg()
        table1 = _proc_table()
        cpu_per_wall = cpu / wall if wall > 0 else 0.0
        peak = max(self.load0[0] if self.load0 else 0.0, load1[0] if load1 else 0.0)
        others = max(0.0, peak - cpu_per_wall)
        report: dict[str, Any] = {"loadavg_start": self.load0, "loadavg_end": load1, "wall_s": round(wall, 2),
                                  "process_cpu_s": round(cpu, 2), "cpu_per_wall": round(cpu_per_wall, 2),
                                  "other_load": round(others, 2), "competing": others > COMPETING_CORES,
                                  "warning": None}
        if self.table0 is not None and table1 is not None:
            other_cpu = _other_cpu_seconds(self.table0, table1)
            cores = other_cpu / wall if wall > 0 else 0.0
            report.update(other_cpu_s=round(other_cpu, 2), other_cores=round(cores, 2),
                          competing=cores > COMPETING_CORES)
            if report["competing"]:
                report["warning"] = (f"other processes used {other_cpu:.1f} CPU seconds in {wall:.1f} s ({cores:.2f} "
                                     f"of {os.cpu_count()} cores): the timings and ratios may not reproduce")
        elif report["competing"]:
            report["warning"] = (f"other work competed for the CPU (1-minute load up to {peak:.2f} on "
                                 f"{os.cpu_count()} cores, this process used {cpu_per_wall:.2f}): "
                                 f"the timings and ratios may not reproduce")
        return report


ProcTable = dict[int, tuple[int, float]]    # pid → (parent pid, CPU seconds so far)


def _proc_table() -> ProcTable | None:
    """Every process's parent and CPU seconds from ``/proc/PID/stat``, or None where there is no /proc."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except (OSError, ValueError, AttributeError):
        return None
    table: ProcTable = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()   # the name may hold spaces and parentheses
        except (OSError, IndexError):
            continue                                             # it exited meanwhile
        table[pid] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)   # ppid, utime + stime
    return table


def _other_cpu_seconds(before: ProcTable, after: ProcTable) -> float:
    """CPU seconds used between the two tables by processes other than this one and its descendants."""
    ours = {os.getpid()}
    for table in (before, after):
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = [os.getpid()]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in ours:
                    ours.add(child)
                    todo.append(child)
    total = 0.0
    for pid, (_, cpu) in after.items():
        if pid not in ours:
            total += max(0.0, cpu - before[pid][1]) if pid in before else cpu
    return total


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

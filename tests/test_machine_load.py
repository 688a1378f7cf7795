"""LoadMeter: the process's CPU time against wall time, and a warning when other work held the CPU."""

from __future__ import annotations

import os
import time

import pytest

from v2flow_rt import machine_load
from v2flow_rt.machine_load import LoadMeter

BUSY = "import time\nend = time.perf_counter() + {s}\nwhile time.perf_counter() < end: pass\n"


def test_a_busy_loop_uses_about_one_core_and_sleeping_none() -> None:
    meter = LoadMeter().start()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass
    busy = meter.stop()
    meter = LoadMeter().start()
    time.sleep(0.3)
    idle = meter.stop()
    # CPU time is counted in clock ticks (10 ms); a busy loop on a shared machine still gets most of a core
    assert 0.5 < busy["cpu_per_wall"] <= 1.05, busy
    assert idle["cpu_per_wall"] < 0.2, idle
    assert busy["wall_s"] >= 0.3 and busy["process_cpu_s"] > 0.15


@pytest.mark.parametrize("load, competing", [((3.0, 3.0, 3.0), True), ((0.2, 0.2, 0.2), False)])
def test_other_load_is_called_competing(monkeypatch: pytest.MonkeyPatch, load: tuple[float, float, float],
                                        competing: bool) -> None:
    """Without /proc, other work is the load average less this process's share."""
    monkeypatch.setattr(os, "getloadavg", lambda: load)
    monkeypatch.setattr(machine_load, "_proc_table", lambda: None)
    report = LoadMeter().start().stop()          # this process did nothing in between: all of it is others'
    assert report["loadavg_start"] == list(load) and report["competing"] is competing
    assert (report["warning"] is not None) is competing
    if competing:
        assert "other work competed for the CPU (1-minute load up to 3.00" in report["warning"]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_other_processes_count_as_competing_and_our_children_do_not() -> None:
    """A busy process that is not ours (started detached: its parent exits, so it is re-parented) counts as
    other work; a busy child of ours that is still running when the meter stops does not."""
    import subprocess
    import sys

    meter = LoadMeter().start()
    subprocess.run(["sh", "-c", f"{sys.executable} -c '{BUSY.format(s=1.5)}' >/dev/null 2>&1 &"], check=True)
    time.sleep(0.9)
    detached = meter.stop()
    time.sleep(0.7)                                  # let it finish before the next measurement
    meter = LoadMeter().start()
    child = subprocess.Popen([sys.executable, "-c", BUSY.format(s=1.5)])
    time.sleep(0.9)
    ours = meter.stop()
    child.wait(timeout=30)
    assert detached["other_cpu_s"] >= 0.4 and detached["competing"], detached
    assert "other processes used" in detached["warning"]
    assert ours["other_cpu_s"] < detached["other_cpu_s"] - 0.3, (ours, detached)

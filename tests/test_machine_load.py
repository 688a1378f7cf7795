"""LoadMeter: the process's CPU time against wall time, and a warning when other work held the CPU."""

from __future__ import annotations

import os
import time

import pytest

from v2flow_rt.machine_load import LoadMeter


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
    monkeypatch.setattr(os, "getloadavg", lambda: load)
    report = LoadMeter().start().stop()          # this process did nothing in between: all of it is others'
    assert report["loadavg_start"] == list(load) and report["competing"] is competing
    assert (report["warning"] is not None) is competing
    if competing:
        assert "other work competed for the CPU (1-minute load up to 3.00" in report["warning"]

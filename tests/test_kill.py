"""An export killed with SIGKILL part way leaves the previous export intact and loadable; the next export into
the same place removes what the dead one left (and says so); a second export while one runs is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from v2flow_rt.export import export_model
from v2flow_rt.manifest import Manifest

STAGES = ["token_embed", "mar_step"]        # two small graphs: an export takes seconds, not minutes


def _export_cmd(out: Path, stages: list[str] = STAGES) -> list[str]:
    return [sys.executable, "-m", "v2flow_rt.cli", "export", "default", "--out", str(out), "--stages",
            ",".join(stages), "--quiet"]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _partial(out: Path) -> Path | None:
    return next((p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")), None)


def _kill_when(out: Path, ready: str, timeout: float = 240.0) -> int:
    """Start an export into ``out``, SIGKILL it once its partial folder holds ``ready`` ("" = exists); its pid."""
    proc = subprocess.Popen(_export_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            tmp = _partial(out)
            if tmp is not None and (not ready or (tmp / ready).exists()):
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"the export finished (rc {proc.returncode}) before it could be killed at {ready!r}")
            time.sleep(0.005)
        else:
            pytest.fail(f"no {ready!r} in a partial folder after {timeout} s")
    finally:
        proc.kill()
        proc.wait()
    return proc.pid


def _intact(out: Path, first: Manifest) -> None:
    import onnxruntime as ort

    m = Manifest.load(out, verify=True)       # every graph present and hashing to its recorded sha256
    assert m.sha256 == first.sha256 and m.created == first.created
    for stage in STAGES:
        ort.InferenceSession(str(m.path(stage)), providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_kill_9_leaves_the_previous_export_and_the_next_cleans_up(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export"
    first = export_model("default", out, stages=STAGES, progress=False, validate=False, quality=False)
    pid = 0
    for ready in ("", "token_embed.fp32.onnx", "mar_step.fp32.onnx"):   # early, after one graph, after both
        pid = _kill_when(out, ready)
        _intact(out, first)
        # only the last dead writer's partial folder (each new writer removed the one before it), and its
        # lock file, which no longer locks anything: the kernel dropped the flock with the process
        left = [name for name in _leftovers(out) if name != ".export.lock"]
        assert len(left) == 1 and left[0].startswith(f".export.partial-{pid}-"), left
    capfd.readouterr()
    export_model("default", out, stages=STAGES, progress=False, validate=False, quality=False)
    err = capfd.readouterr().err
    assert f"left by an interrupted writer (pid {pid})" in err, err
    assert _leftovers(out) == [], _leftovers(out)
    assert Manifest.load(out, verify=True).created >= first.created


@pytest.mark.slow
def test_a_second_export_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "export"
    # more graphs than the second export needs to start and be refused: the first still runs then
    first = _export_cmd(out, STAGES + ["velocity", "ode"])
    proc = subprocess.Popen(first, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while _partial(out) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the first export ended before the second started"
        second = subprocess.run(_export_cmd(out), capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines == [f"v2flow-rt export: error: {out} is being written by another process (pid {proc.pid}, "
                         f"lock {tmp_path / '.export.lock'}); wait for it to finish or choose another output"], lines
        assert proc.wait(timeout=240) == 0        # the first one is not disturbed
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    Manifest.load(out, verify=True)
    assert _leftovers(out) == []

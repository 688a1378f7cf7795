"""fileio: atomic files with shared modes, the folder swap, the writer lock, cleaning dead writers' leftovers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from v2flow_rt.errors import BusyError
from v2flow_rt.fileio import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale,
    current_umask,
    staged_folder,
    swap_folder,
    writer_lock,
)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_write_gives_the_mode_open_would_and_leaves_no_temp(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
        assert _mode(tmp_path / "a.json") == 0o644 == 0o666 & ~current_umask()
        assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
        atomic_write_text(tmp_path / "secret", "token", mode=0o600)
        assert _mode(tmp_path / "secret") == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "secret"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")

    def half(p: Path) -> None:
        p.write_text("ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_save_pretrained_files_are_not_owner_only(tmp_path: Path) -> None:
    from v2flow_rt.reference.checkpoint import from_pretrained, save_pretrained

    old = os.umask(0o022)
    try:
        save_pretrained(from_pretrained("default"), tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert _mode(tmp_path / "m" / name) == 0o644, name


def test_staged_folder_swaps_on_success_and_keeps_the_old_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with staged_folder(dest) as tmp:
        (tmp / "x").write_text("1")
        assert not dest.exists() and tmp.name.startswith(f".out.partial-{os.getpid()}-")
    assert (dest / "x").read_text() == "1"
    with pytest.raises(KeyError), staged_folder(dest) as tmp:
        (tmp / "x").write_text("2")
        raise KeyError("boom")
    assert (dest / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]      # no partial, no lock file left


def test_swap_folder_replaces_a_folder_whole(tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("new")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "b").write_text("old")
    swap_folder(tmp_path / "new", tmp_path / "dest")
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


_HOLDER = textwrap.dedent("""
    import sys, time
    from v2flow_rt.fileio import staged_folder
    with staged_folder(sys.argv[1]) as tmp:
        (tmp / "half").write_text("x")
        print("holding", flush=True)
        time.sleep(60)
""")


def _start_holder(dest: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(dest)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    proc = _start_holder(dest)
    try:
        with pytest.raises(BusyError, match=rf"{dest} is being written by another process \(pid {proc.pid}"):
            with writer_lock(dest):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_after_a_kill_the_lock_is_free_and_the_partial_folder_removed(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out"
    proc = _start_holder(dest)
    proc.kill()         # SIGKILL: no cleanup ran
    proc.wait()
    partials = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(partials) == 1 and f"-{proc.pid}-" in partials[0].name
    with staged_folder(dest) as tmp:
        (tmp / "ok").write_text("1")
    err = capsys.readouterr().err
    assert f"removed {partials[0]}" in err and f"pid {proc.pid}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_swap_killed_half_way_is_undone_by_the_next_writer(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # the previous version moved aside by a writer (a dead pid) that died before renaming its new folder in
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    old = tmp_path / f".out.old-{dead}-abcd1234"
    old.mkdir()
    (old / "v").write_text("previous")
    (tmp_path / f".out.partial-{dead}-zz").mkdir()
    with writer_lock(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "v").read_text() == "previous"
    assert "restored" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_live_writers_partials_are_kept(tmp_path: Path) -> None:
    mine = tmp_path / f".out.partial-{os.getpid()}-x"
    mine.mkdir()
    assert clean_stale(tmp_path / "out") == [] and mine.is_dir()


def test_a_parent_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception, match=r"file is a file, not a folder"), staged_folder(tmp_path / "file" / "sub"):
        pass

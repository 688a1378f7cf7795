"""The command line as the documentation shows it: every ``v2flow-rt`` command written in the project's
Markdown parses, and the engine verbs pick their backend from what ``--model`` is."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from v2flow_rt.cli import build_parser, main
from v2flow_rt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every ``v2flow-rt`` command in the tracked Markdown files, once each: lines of
    fenced or indented code blocks that start with ``v2flow-rt``, and inline code spans that do."""
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    found: dict[tuple[str, str], None] = {}
    for name in listed.stdout.split():
        text = (ROOT / name).read_text()
        lines = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
                 for line in block.replace("\\\n", " ").splitlines()]
        lines += [line for line in text.splitlines() if line.startswith("    ")]
        commands = [line.strip() for line in lines if line.strip().startswith("v2flow-rt ")]
        commands += [" ".join(span.split()) for span in re.findall(r"`(v2flow-rt\s[^`]+)`", text)]
        found.update(((name, c), None) for c in commands)
    return list(found)


def _argv(command: str) -> list[str] | None:
    """The arguments after ``v2flow-rt`` up to a comment or a redirection, optional parts (``[--seed N]``)
    kept, one-letter placeholders (``--threads T``) as 1; None for a line that lists verbs
    (``v2flow-rt init|export|...``)."""
    words = shlex.split(re.split(r"\s[#>]", command)[0])[1:]
    if not words or "|" in words[0]:
        return None
    words = [w.strip("[]") for w in words]
    return ["1" if re.fullmatch(r"[A-Z]", w) else w for w in words if w]


COMMANDS = documented_commands()


def test_the_documentation_shows_commands() -> None:
    assert len(COMMANDS) >= 20, COMMANDS                 # the extraction still finds README's commands
    assert {name for name, _ in COMMANDS} >= {"README.md", "v2flow_rt/assets/default/README.md"}


@pytest.mark.parametrize("where,command", COMMANDS, ids=[c[:60] for _, c in COMMANDS])
def test_every_documented_command_parses(where: str, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A command a reader copies from the docs must at least be one the parser takes (right verb, options,
    positionals, choices, value types)."""
    argv = _argv(command)
    if argv is None:
        pytest.skip("a list of verbs, not a command")
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{command}` does not parse: {capsys.readouterr().err.strip()}")


@pytest.fixture
def chosen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the backend of each pipeline the CLI opens, then stops the verb with a user error."""
    from v2flow_rt.pipeline import V2FlowPipeline

    calls: list[str] = []

    def record(path: Any, backend: str = "ort", **_: Any) -> None:
        calls.append(backend)
        raise ConfigError("recorded")

    monkeypatch.setattr(V2FlowPipeline, "from_pretrained", staticmethod(record))
    return calls


def test_engine_verbs_use_onnx_runtime_on_an_export_folder(default_export: Path, tmp_path: Path,
                                                           chosen: list[str]) -> None:
    """Without ``--backend``: an export folder runs on ONNX Runtime (its graphs, the one-call ones included),
    a model folder or ``default`` on PyTorch; a given ``--backend`` wins either way."""
    from PIL import Image

    ids = tmp_path / "ids.npy"
    np.save(ids, np.zeros((1, 64), np.int64))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(photo)
    export = str(default_export)
    runs = [(["tokenize", str(photo), "--out", str(tmp_path / "i.npy"), "--model", export], "ort"),
            (["detokenize", str(ids), "--out", str(tmp_path / "o.png"), "--model", export], "ort"),
            (["reconstruct", str(photo), "--out", str(tmp_path / "r.png"), "--model", export], "ort"),
            (["eval", "--model", export, "--images", str(photo)], "ort"),
            (["detokenize", str(ids), "--out", str(tmp_path / "o.png")], "torch"),
            (["detokenize", str(ids), "--out", str(tmp_path / "o.png"), "--model", export, "--backend", "torch"],
             "torch"),
            (["detokenize", str(ids), "--out", str(tmp_path / "o.png"), "--model", "default", "--backend", "ort"],
             "ort")]
    for argv, backend in runs:
        assert main(argv) == 2                      # the recorder's error, after the pipeline was asked for
        assert chosen[-1] == backend, argv
    assert len(chosen) == len(runs)


"""A catalogue of bad inputs to the command line: each is exit status 2, one line on stderr that names the
problem, and nothing written or changed. Run in-process (``cli.main``) on the bundled default model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from v2flow_rt import cli

DEFAULT = Path(cli.__file__).resolve().parent / "assets" / "default"


def _fixtures(d: Path) -> None:
    """Every bad file a case names, written once into ``d``."""
    import torch
    from PIL import Image

    np.save(d / "good.npy", np.zeros((1, 64), dtype=np.int64))
    np.save(d / "float.npy", np.full((1, 64), 1.9))
    np.save(d / "outofrange.npy", np.full((1, 64), 99999, dtype=np.int64))
    np.save(d / "short.npy", np.zeros((1, 10), dtype=np.int64))
    np.save(d / "bool.npy", np.ones((1, 64), dtype=bool))
    np.save(d / "empty.npy", np.zeros((0, 64), dtype=np.int64))
    np.save(d / "cube.npy", np.zeros((1, 2, 64), dtype=np.int64))
    np.save(d / "negative.npy", np.full((1, 64), -1, dtype=np.int64))
    np.save(d / "strings.npy", np.array(["a", "b"]))
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(d / "archive.npz", ids=np.zeros((1, 64), dtype=np.int64))
    (d / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    texts = {
        "invalid.json": '{"ids": [[1, 2,',
        "ragged.json": '{"ids": [[1, 2], [3]]}',
        "string.json": '{"ids": [["a", "b"]]}',
        "nan.json": '{"ids": [[1, NaN]]}',
        "inf.json": '{"ids": [[1, Infinity]]}',
        "float.json": '{"ids": [[1.9, 2]]}',
        "noids.json": '{"images": ["a.png"]}',
        "emptyids.json": '{"ids": []}',
        "emptyrow.json": '{"ids": [[]]}',
        "number.json": "42",
        "nested.json": '{"ids": [[[1]]]}',
        "mixed.json": '{"ids": [1, [2]]}',
        "negative.json": '{"ids": [[-3, 1]]}',
        "bools.json": '{"ids": [[true, false]]}',
        "huge.json": '{"ids": [[' + "9" * 30 + "]]}",
        "idsnull.json": '{"ids": null}',
        "notes.txt": "hello",
    }
    for name, text in texts.items():
        (d / name).write_text(text)
    (d / "latin1.json").write_bytes(b'{"ids": [[1]], "x": "\xff"}')
    (d / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    Image.new("RGB", (80, 80), (120, 40, 200)).save(d / "photo.png")
    (d / "afile").write_text("")
    (d / "folder").mkdir()
    # model folders with a bad config.json (the weights are a link to the bundled ones)
    for name, edit in {"badtype": {"temperature": "hot"}, "badint": {"img_size": 64.5},
                       "unknownkey": {"colour": "red"}, "nanfield": {"time_shift": float("nan")}}.items():
        m = d / name
        m.mkdir()
        cfg = json.loads((DEFAULT / "config.json").read_text())
        cfg.update(edit)
        (m / "config.json").write_text(json.dumps(cfg))
        (m / "model.safetensors").symlink_to(DEFAULT / "model.safetensors")
    (d / "notjson").mkdir()
    (d / "notjson" / "config.json").write_text("{oops")
    (d / "notjson" / "model.safetensors").symlink_to(DEFAULT / "model.safetensors")
    (d / "latin1cfg").mkdir()
    (d / "latin1cfg" / "config.json").write_bytes(b'{"name": "caf\xe9"}')
    (d / "latin1cfg" / "model.safetensors").symlink_to(DEFAULT / "model.safetensors")
    (d / "badweights").mkdir()
    shutil.copy(DEFAULT / "config.json", d / "badweights" / "config.json")
    (d / "badweights" / "model.safetensors").write_bytes(b"\x00" * 16)
    (d / "train_cfg.json").write_text(json.dumps({"name": "t", "temperature": "hot"}))
    # export folders with a bad manifest
    for name, text in {"exp_invalid": "{not json", "exp_version": json.dumps({"format_version": 99}),
                       "exp_fields": json.dumps({"format_version": 1}), "exp_list": "[1, 2]"}.items():
        (d / name).mkdir()
        (d / name / "manifest.json").write_text(text)
    (d / "exp_empty").mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'pwned'}",))

    torch.save({"model": {}, "args": Evil()}, d / "evil.pth")
    torch.save([1, 2, 3], d / "list.pth")
    (d / "junk.pth").write_bytes(b"not a checkpoint")
    (d / "resume").mkdir()
    torch.save([1, 2, 3], d / "resume" / "train_state.pt")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("catalogue")
    _fixtures(d)
    return d


D = "{d}"   # stands for the fixture folder in an argv

# (argv, a regex the one stderr line must match)
CASES: list[tuple[list[str], str]] = [
    # --- detokenize: ids files (JSON consistent with .npy) ---
    (["detokenize", f"{D}/invalid.json", "--out", "o.png"], r"invalid\.json: not valid JSON"),
    (["detokenize", f"{D}/ragged.json", "--out", "o.png"], r"ragged\.json: ragged ids"),
    (["detokenize", f"{D}/string.json", "--out", "o.png"], r"string\.json: token ids must be integers.*str"),
    (["detokenize", f"{D}/nan.json", "--out", "o.png"], r"nan\.json: not valid JSON.*NaN"),
    (["detokenize", f"{D}/inf.json", "--out", "o.png"], r"inf\.json: not valid JSON.*Infinity"),
    (["detokenize", f"{D}/float.json", "--out", "o.png"], r"float\.json: token ids must be integers.*float 1\.9"),
    (["detokenize", f"{D}/noids.json", "--out", "o.png"], r"noids\.json: a JSON object without an 'ids' key"),
    (["detokenize", f"{D}/emptyids.json", "--out", "o.png"], r"emptyids\.json: holds no token ids"),
    (["detokenize", f"{D}/emptyrow.json", "--out", "o.png"], r"emptyrow\.json: holds no token ids"),
    (["detokenize", f"{D}/number.json", "--out", "o.png"], r"number\.json: 'ids' must be a list"),
    (["detokenize", f"{D}/nested.json", "--out", "o.png"], r"nested\.json: token ids must be integers.*list"),
    (["detokenize", f"{D}/mixed.json", "--out", "o.png"], r"mixed\.json: 'ids' mixes lists and single values"),
    (["detokenize", f"{D}/negative.json", "--out", "o.png"], r"negative\.json: token ids must be non-negative"),
    (["detokenize", f"{D}/bools.json", "--out", "o.png"], r"bools\.json: token ids must be integers.*bool"),
    (["detokenize", f"{D}/huge.json", "--out", "o.png"], r"huge\.json: token ids must be non-negative integers below"),
    (["detokenize", f"{D}/idsnull.json", "--out", "o.png"], r"idsnull\.json: 'ids' must be a list.*NoneType"),
    (["detokenize", f"{D}/latin1.json", "--out", "o.png"], r"latin1\.json: not UTF-8 text"),
    (["detokenize", f"{D}/float.npy", "--out", "o.png"], r"float\.npy: token ids must be integers, got dtype float64"),
    (["detokenize", f"{D}/bool.npy", "--out", "o.png"], r"bool\.npy: token ids must be integers, got dtype bool"),
    (["detokenize", f"{D}/empty.npy", "--out", "o.png"], r"empty\.npy: holds no token ids"),
    (["detokenize", f"{D}/cube.npy", "--out", "o.png"], r"cube\.npy: ids must be one list per image \(2-D\), got 3-D"),
    (["detokenize", f"{D}/negative.npy", "--out", "o.png"], r"negative\.npy: token ids must be non-negative"),
    (["detokenize", f"{D}/strings.npy", "--out", "o.png"], r"strings\.npy: token ids must be integers"),
    (["detokenize", f"{D}/objects.npy", "--out", "o.png"], r"objects\.npy: not a \.npy or \.json file"),
    (["detokenize", f"{D}/archive.npz", "--out", "o.png"], r"archive\.npz: an \.npz archive"),
    (["detokenize", f"{D}/garbage.npy", "--out", "o.png"], r"garbage\.npy: not a \.npy or \.json file"),
    (["detokenize", f"{D}/notes.txt", "--out", "o.png"], r"notes\.txt: not a \.npy or \.json file"),
    (["detokenize", f"{D}/missing.npy", "--out", "o.png"], r"ids file .*missing\.npy does not exist"),
    (["detokenize", f"{D}/outofrange.npy", "--out", "o.png"], r"ids must be in \[0, 4096\), got range \[99999"),
    (["detokenize", f"{D}/short.npy", "--out", "o.png"], r"ids must be integers \[B, 64\], got int64 \(1, 10\)"),
    (["detokenize", f"{D}/folder", "--out", "o.png"], r"ids file .*folder is not a file"),
    # --- detokenize / reconstruct: options, checked before any work ---
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--seed", "-1"], r"--seed must be in \[0, "),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--steps", "1000000000"], r"--steps must be in \[1, 1000\]"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--steps", "0"], r"--steps must be in \[1, 1000\], got 0"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--temperature", "nan"], r"--temperature must be a finite"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--temperature", "inf"], r"--temperature must be a finite"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--temperature", "1e30"], r"--temperature must be .* \[0, 10\]"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--temperature", "-1"], r"--temperature must be"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--cfg", "nan"], r"--cfg must be a finite number"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--cfg", "1e30"], r"--cfg must be .* \[0, 100\]"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--threads", "-3"], r"--threads must be >= 1, got -3"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--threads", "0"], r"--threads must be >= 1, got 0"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--backend", "ort", "--threads", "-1"], r"--threads must be"),
    (["detokenize", f"{D}/good.npy", "--out", "o.xyz"], r"--out o\.xyz: unknown image file extension '\.xyz'"),
    (["detokenize", f"{D}/good.npy", "--out", "noext"], r"--out noext: no image file extension"),
    (["detokenize", f"{D}/good.npy", "--out", f"{D}/afile/o.png"], r"afile is a file, not a folder"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--model", f"{D}/nomodel"], r"model folder .*nomodel does not"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--model", f"{D}/badtype"],
     r"badtype/config\.json: config 'tiny': temperature must be a number, got 'hot' \(str\)"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--model", f"{D}/badint"], r"img_size must be an integer"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--model", f"{D}/unknownkey"], r"unknown config field.*colour"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--model", f"{D}/nanfield"], r"time_shift must be finite"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--model", f"{D}/notjson"], r"config is not valid JSON"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--model", f"{D}/latin1cfg"],
     r"latin1cfg/config\.json: not UTF-8 text"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--model", f"{D}/badweights"],
     r"model\.safetensors is not a readable safetensors file"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--backend", "ort", "--precision", "fp64"],
     r"unknown precision 'fp64'; choose one of fp32, fp16, int8, int8-qdq"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--backend", "ort", "--model", f"{D}/exp_invalid"],
     r"manifest\.json is not valid JSON"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--backend", "ort", "--model", f"{D}/exp_version"],
     r"manifest format version 99"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--backend", "ort", "--model", f"{D}/exp_fields"],
     r"missing field\(s\)"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--backend", "ort", "--model", f"{D}/exp_list"],
     r"expected a JSON object, got list"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--backend", "ort", "--model", f"{D}/exp_empty"],
     r"exp_empty is not an export folder \(no manifest\.json\)"),
    (["detokenize", f"{D}/good.npy", "--out", "o.png", "--backend", "ort", "--model", f"{D}/afile"],
     r"afile is not an export folder"),
    (["reconstruct", f"{D}/missing.png", "--out", "o.png"], r"missing\.png"),
    (["reconstruct", f"{D}/notes.txt", "--out", "o.png"], r"notes\.txt: not an image file"),
    (["reconstruct", f"{D}/truncated.png", "--out", "o.png"], r"truncated\.png"),
    (["reconstruct", f"{D}/photo.png", "--out", "o.bmpx"], r"unknown image file extension '\.bmpx'"),
    (["reconstruct", f"{D}/photo.png", "--out", "o.png", "--solver", "euler", "--steps", "5000"], r"--steps must be"),
    # --- tokenize ---
    (["tokenize", f"{D}/photo.png", "--out", "missing_dir/ids.json"], r"--out missing_dir/ids\.json: the folder "
                                                                      r"missing_dir does not exist"),
    (["tokenize", f"{D}/photo.png", "--out", f"{D}/afile/ids.json"], r"afile is a file, not a folder"),
    (["tokenize", f"{D}/photo.png", "--out", f"{D}/folder"], r"folder is a folder; give a file name"),
    (["tokenize", f"{D}/notes.txt", "--out", "ids.npy"], r"notes\.txt: not an image file"),
    (["tokenize", f"{D}/missing.png", "--out", "ids.npy"], r"missing\.png"),
    (["tokenize", f"{D}/photo.png", "--out", "ids.npy", "--threads", "-3"], r"--threads must be >= 1, got -3"),
    # --- export ---
    (["export", "default", "--out", f"{D}/afile/sub"], r"cannot write .*afile/sub: .*afile is a file, not a folder"),
    (["export", "default", "--out", "e", "--precision", ","], r"--precision ',' names no precision"),
    (["export", "default", "--out", "e", "--precision", ""], r"--precision '' names no precision"),
    (["export", "default", "--out", "e", "--precision", "fp32,fp64"], r"unknown precision\(s\) \['fp64'\]"),
    (["export", "default", "--out", "e", "--num-iter", "0"], r"--num-iter must be in \[1, "),
    (["export", "default", "--out", "e", "--steps", "100000"], r"--steps must be in \[1, 1000\]"),
    (["export", "default", "--out", "e", "--temperature", "nan"], r"--temperature must be a finite number"),
    (["export", "default", "--out", "e", "--cfg", "-5"], r"--cfg must be"),
    (["export", "default", "--out", "e", "--max-batch", "0"], r"--max-batch must be >= 1"),
    (["export", "default", "--out", "e", "--opset", "17"], r"opset 17 is not supported"),
    (["export", f"{D}/nomodel", "--out", "e"], r"nomodel"),
    (["export", "default", "--out", f"{D}/folder_with_file"], r"refusing to replace .*folder_with_file"),
    # --- validate, build, bench, demo ---
    (["validate", f"{D}/afile"], r"afile is a file, not an export folder"),
    (["validate", f"{D}/nothere"], r"export folder .*nothere does not exist"),
    (["validate", f"{D}/exp_invalid"], r"manifest\.json is not valid JSON"),
    (["bench", "--repeat", "0"], r"--repeat must be >= 1"),
    (["bench", "--batch", "0"], r"--batch must be >= 1"),
    (["bench", "--precisions", "fp32,xx"], r"--precisions: unknown precision\(s\) \['xx'\]"),
    (["demo", "--precisions", ","], r"--precisions ',' names no precision"),
    (["demo", "--steps", "-2"], r"--steps must be in \[1, 1000\]"),
    # --- init, import-official, train ---
    (["init", "--preset", "nope", "--out", "m"], r"unknown preset 'nope'"),
    (["init", "--preset", "tiny", "--out", "m", "--copy-codec"], r"--copy-codec needs --codec"),
    (["init", "--preset", "tiny", "--out", "m", "--seed", "-1"], r"--seed must be in \[0, "),
    (["import-official", f"{D}/evil.pth", "--out", "m"],
     r"evil\.pth: not loaded: it is a pickle that would run code when loaded \(it names posix\.system\)"),
    (["import-official", f"{D}/list.pth", "--out", "m"], r"list\.pth: expected a dict with 'model'"),
    (["import-official", f"{D}/junk.pth", "--out", "m"], r"junk\.pth is not a readable torch file"),
    (["import-official", f"{D}/missing.pth", "--out", "m"], r"checkpoint .*missing\.pth does not exist"),
    (["train", "--preset", "nope", "--out", "t"], r"unknown preset 'nope'"),
    (["train", "--config", f"{D}/train_cfg.json", "--out", "t"], r"train_cfg\.json: .*temperature must be a number"),
    (["train", "--config", f"{D}/nothere.json", "--out", "t"], r"config file .*nothere\.json does not exist"),
    (["train", "--out", "t", "--steps", "0"], r"--steps must be >= 1, got 0"),
    (["train", "--out", f"{D}/resume", "--steps", "1", "--threads", "1"],
     r"cannot resume from .*resume/train_state\.pt: not a training state written by this package"),
    (["train", "--out", "t", "--lr", "nan"], r"--lr must be a finite number"),
    (["train", "--out", "t", "--batch-size", "0"], r"--batch-size must be >= 1"),
    (["train", "--out", "t", "--threads", "-1"], r"--threads must be >= 0, got -1"),
    (["train", "--out", "t", "--ema-decay", "2"], r"--ema-decay must be"),
    # --- text to image ---
    (["generate", "a red ball", "--out", "g.png", "--num", "0"], r"--num must be >= 1, got 0"),
    (["generate", "a red ball", "--out", "g.png", "--decoder-temperature", "nan"],
     r"--decoder-temperature must be a finite number"),
    (["generate", "a red ball", "--out", "g.png", "--cfg", "1e30"], r"--cfg must be"),
    (["generate", "a red ball", "--out", "g.png", "--top-p", "0"], r"--top-p must be"),
    (["generate", "a red ball", "--out", "g.png", "--seed", "-1"], r"--seed must be in \[0, "),
    (["generate", "caf\udcff", "--out", "g.png"], r"the prompt is not valid UTF-8 text"),
    (["generate", "a red ball", "--out", "g.txt2"], r"unknown image file extension"),
    (["train-llm", "--out", "t", "--steps", "0"], r"--steps must be >= 1"),
    (["export-llm", "--out", "t", "--threads", "0"], r"--threads must be >= 1, got 0"),
    # --- datasets and serving ---
    (["triton-repo", f"{D}/exp_invalid", "--out", "r"], r"manifest\.json is not valid JSON"),
    (["triton-repo", f"{D}/nothere", "--out", "r"], r"export folder .*nothere does not exist"),
]


def _snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else (0, 0)
            for f in folders for p in sorted(f.rglob("*")) if not p.is_symlink()}


def _run(argv: list[str], cwd: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    old = Path.cwd()
    os.chdir(cwd)
    try:
        rc = cli.main(argv)
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    seen = [ln.rsplit("\r", 1)[-1] for ln in err.split("\n")]   # what a terminal shows: a progress bar is redrawn
    return rc, [ln for ln in seen if ln.strip()], out


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a)[:80] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv: list[str], expected: str, files: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace(D, str(files)) for a in argv]
    if "folder_with_file" in " ".join(argv):
        (files / "folder_with_file").mkdir(exist_ok=True)
        (files / "folder_with_file" / "precious.txt").write_text("keep me")
    before = _snapshot(files, tmp_path)
    rc, err, out = _run(argv, tmp_path, capsys)
    assert rc == 2, (rc, err)
    assert len(err) == 1, err
    assert err[0].startswith(f"v2flow-rt {argv[0]}: error: "), err[0]
    import re
    assert re.search(expected, err[0]), err[0]
    assert "Traceback" not in err[0]
    assert _snapshot(files, tmp_path) == before, "something was written or changed"
    assert not (files / "pwned").exists()


def test_the_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 60


def test_debug_shows_the_traceback(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from v2flow_rt.errors import ShapeError

    with pytest.raises(ShapeError, match="float 1.9"):
        cli.main(["--debug", "detokenize", str(files / "float.json"), "--out", "o.png"])
    with pytest.raises(ShapeError, match="ragged"):
        cli.main(["detokenize", str(files / "ragged.json"), "--out", "o.png", "--debug"])


def test_a_permission_error_on_an_output_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # root ignores file modes, so the refusal is simulated where the output folder is made
    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(kwargs.get("dir", "?")))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    rc, err, _ = _run(["init", "--preset", "tiny", "--out", "m"], tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and re_search(r"init: error: .*: Permission denied", err[0]), err
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_tokenize_folder_is_refused_before_the_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    rc, err, _ = _run(["tokenize", "x.png", "--out", "ids.npy"], tmp_path, capsys)
    assert rc == 2 and err == ["v2flow-rt tokenize: error: --out ids.npy: the folder . is not writable"], err


def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from v2flow_rt.reference import checkpoint

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_pretrained", interrupted)
    rc, err, _ = _run(["init", "--preset", "tiny", "--out", "m"], tmp_path, capsys)
    assert rc == 130 and len(err) == 1 and "init: interrupted" in err[0], err
    assert list(tmp_path.iterdir()) == []          # the partial folder and the lock are gone


def test_tokenize_prints_the_path_it_wrote(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err, out = _run(["tokenize", str(files / "photo.png"), "--out", "myids"], tmp_path, capsys)
    assert rc == 0, err
    assert (tmp_path / "myids.npy").is_file() and not (tmp_path / "myids").exists()
    assert out.startswith("wrote myids.npy: 1 image(s) x 64 tokens"), out
    ids = np.load(tmp_path / "myids.npy")
    rc, err, out = _run(["tokenize", str(files / "photo.png"), "--out", "ids.json"], tmp_path, capsys)
    assert rc == 0 and json.loads((tmp_path / "ids.json").read_text())["ids"] == ids.tolist()


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


@pytest.fixture(scope="module")
def pipe():
    from v2flow_rt.pipeline import V2FlowPipeline

    return V2FlowPipeline.from_pretrained("default", backend="torch")


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": -1}, r"seed must be in \[0, "), ({"steps": 2.5}, r"steps must be an integer, got 2\.5"),
    ({"steps": 10 ** 9}, r"steps must be in \[1, 1000\]"), ({"temperature": float("nan")}, r"temperature must be"),
    ({"cfg": 1e30}, r"cfg_scale must be a finite number in \[0, 100\]"), ({"seed": 1.5}, r"seed must be an integer"),
])
def test_the_api_refuses_what_the_cli_refuses(pipe, kwargs: dict[str, object], message: str) -> None:
    from v2flow_rt.errors import ConfigError

    ids = np.zeros((1, pipe.config.num_tokens), dtype=np.int64)
    with pytest.raises(ConfigError, match=message):
        pipe.detokenize(ids, **kwargs)


@pytest.mark.parametrize("threads", [-3, -1, 2.5, "4"])
def test_engines_refuse_bad_thread_counts(threads: object) -> None:
    from v2flow_rt.errors import ConfigError
    from v2flow_rt.pipeline import V2FlowPipeline

    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        V2FlowPipeline.from_pretrained("default", backend="torch", threads=threads)  # type: ignore[arg-type]

"""Manifest: round trip, the runtime's API, and the errors a broken export folder must give (no torch needed)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from v2flow_rt.config import get_preset
from v2flow_rt.errors import ArtifactError
from v2flow_rt.manifest import MANIFEST_NAME, Manifest, checkpoint_sha256, file_sha256, record_stage
from v2flow_rt.stages import stage_specs


def _folder(tmp_path: Path) -> tuple[Path, Manifest]:
    """A fake export folder: two stages × two precisions of random bytes, and its manifest."""
    cfg = get_preset("tiny")
    specs = stage_specs(cfg, max_batch=4)
    folder = tmp_path / "export"
    folder.mkdir()
    rng = np.random.default_rng(0)
    files: dict[str, dict[str, str]] = {}
    sha: dict[str, str] = {}
    for precision in ("fp32", "int8"):
        files[precision] = {}
        for stage in ("tokenizer", "ode"):
            rel = f"{stage}.{precision}.onnx"
            (folder / rel).write_bytes(rng.bytes(2048))
            files[precision][stage] = rel
            sha[rel] = file_sha256(folder / rel)
    m = Manifest(config=cfg, stages={s: record_stage(specs[s]) for s in ("tokenizer", "ode")}, files=files,
                 sha256=sha, opset=18, source_checkpoint_sha256="ab" * 32,
                 stage_options={"max_batch": 4, "steps": cfg.ode_steps, "solver": cfg.solver,
                                "shift": cfg.time_shift},
                 constants={"fake_latent": rng.standard_normal(cfg.encoder_dim).astype(np.float32).tolist()})
    m.write(folder)
    return folder, m


def test_round_trip_and_api(tmp_path: Path) -> None:
    folder, written = _folder(tmp_path)
    m = Manifest.load(folder)
    assert m == written
    assert m.precisions == ["fp32", "int8"]
    assert m.path("ode", "int8") == folder / "ode.int8.onnx"
    assert m.spec("ode") == stage_specs(m.config, max_batch=4)["ode"]
    # float32 values survive JSON exactly (float32 → float64 → repr → float64 → float32)
    assert m.fake_latent.dtype == np.float32
    np.testing.assert_array_equal(m.fake_latent, np.asarray(written.constants["fake_latent"], np.float32))
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")], "atomic write left a temp file"
    assert stat.S_IMODE((folder / MANIFEST_NAME).stat().st_mode) & 0o044, "manifest must be readable by others"


def test_missing_folder_or_manifest(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        Manifest.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Manifest.load(tmp_path / "empty")


def test_corrupt_json(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path)
    text = (folder / MANIFEST_NAME).read_text()
    (folder / MANIFEST_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Manifest.load(folder)


def test_missing_graph_names_the_file(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path)
    (folder / "ode.int8.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"ode\.int8\.onnx is missing"):
        Manifest.load(folder, verify=False)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_corrupted_graph(tmp_path: Path, damage: str) -> None:
    folder, _ = _folder(tmp_path)
    path = folder / "tokenizer.fp32.onnx"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[:1000]))
    else:  # same size, one byte changed: only the hash can tell
        data[500] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"tokenizer\.fp32\.onnx is corrupted or truncated"):
        Manifest.load(folder)
    Manifest.load(folder, verify=False)  # existence-only check still passes


def test_wrong_precision_or_stage_lists_what_exists(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path)
    m = Manifest.load(folder)
    with pytest.raises(ArtifactError, match=r"precision 'fp8' was not exported.*fp32, int8"):
        m.path("ode", "fp8")
    with pytest.raises(ArtifactError, match=r"stage 'velocity' was not exported at fp32.*tokenizer, ode"):
        m.path("velocity", "fp32")
    with pytest.raises(ArtifactError, match="not in this export"):
        m.spec("velocity")


def test_check_source(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path)
    m = Manifest.load(folder)
    m.check_source("ab" * 32)
    with pytest.raises(ArtifactError, match="manifest is from another checkpoint"):
        m.check_source("cd" * 32)


def test_stage_contract_drift_is_reported(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["stages"]["ode"]["inputs"][0][0] = "x_noise"        # the graph on disk has another input name
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="re-export"):
        Manifest.load(folder).spec("ode")


def test_file_outside_folder_is_refused(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path)
    (tmp_path / "outside.onnx").write_bytes(b"x")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["files"]["fp32"]["ode"] = "../outside.onnx"
    data["sha256"]["../outside.onnx"] = file_sha256(tmp_path / "outside.onnx")
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="outside the export folder"):
        Manifest.load(folder)


def test_bad_config_or_version(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version"):
        Manifest.load(folder)
    data["config"]["img_size"] = 63
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="bad config"):
        Manifest.load(folder)


def test_checkpoint_sha256(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert checkpoint_sha256(tmp_path) == checkpoint_sha256(tmp_path / "model.safetensors")
    assert checkpoint_sha256(tmp_path) == file_sha256(tmp_path / "model.safetensors")
    with pytest.raises(ArtifactError, match="does not exist"):
        checkpoint_sha256(tmp_path / "missing")


def test_manifest_imports_neither_torch_nor_onnx() -> None:
    code = ("import sys, v2flow_rt.manifest; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "[]"

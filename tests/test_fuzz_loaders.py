"""Property-based fuzzing of the loaders that take a user's files: ids (.npy, .json), config.json, manifest.json
and images. Every input either loads into what the caller expects or raises the package's error class for it;
no other exception (TypeError, KeyError, OverflowError, ...) may escape. Sized to run in well under a minute."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from v2flow_rt.config import V2FlowConfig, get_preset  # noqa: E402
from v2flow_rt.data import decode_image  # noqa: E402
from v2flow_rt.errors import ArtifactError, ConfigError, ImageError, ShapeError  # noqa: E402
from v2flow_rt.ids import load_ids  # noqa: E402
from v2flow_rt.manifest import MANIFEST_NAME, Manifest, record_stage  # noqa: E402
from v2flow_rt.stages import stage_specs  # noqa: E402

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                                 st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4)), max_leaves=20)


_SCRATCH = tempfile.TemporaryDirectory(prefix="v2flow-fuzz-")   # one folder, each example overwrites its file


def _write(data: bytes, suffix: str) -> Path:
    path = Path(_SCRATCH.name) / f"input{suffix}"
    path.write_bytes(data)
    return path


def _folder() -> Path:
    folder = Path(_SCRATCH.name) / "export"
    folder.mkdir(exist_ok=True)
    for f in folder.iterdir():
        f.unlink()
    return folder


def _check_ids(path: Path) -> None:
    try:
        ids = load_ids(path)
    except ShapeError:
        return
    assert ids.dtype == np.int64 and ids.ndim == 2 and ids.size > 0 and (ids >= 0).all()


# ----------------------------------------------------------------------------- ids

@FAST
@given(value=json_values)
def test_ids_json_of_any_value(value: Any) -> None:
    _check_ids(_write(json.dumps({"ids": value}, allow_nan=True).encode(), ".json"))


@FAST
@given(rows=st.lists(st.lists(st.one_of(st.integers(-5, 2 ** 40), st.floats(), st.booleans()), max_size=4),
                     max_size=4))
def test_ids_json_rows(rows: list[list[Any]]) -> None:
    path = _write(json.dumps({"images": [], "ids": rows}).encode(), ".json")
    try:
        ids = load_ids(path)
    except ShapeError:
        return
    # what loads is exactly what was written: integers, a rectangle, nothing truncated
    assert ids.tolist() == rows


@FAST
@given(data=st.binary(max_size=64))
def test_ids_json_of_any_bytes(data: bytes) -> None:
    _check_ids(_write(data, ".json"))


_dtypes = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                    hnp.boolean_dtypes(), hnp.complex_number_dtypes(), hnp.unicode_string_dtypes(max_len=3))


@FAST
@given(arr=hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
def test_ids_npy_of_any_array(arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    _check_ids(_write(buf.getvalue(), ".npy"))


@FAST
@given(cut=st.integers(0, 200), flips=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), max_size=4))
def test_ids_npy_truncated_or_flipped(cut: int, flips: list[tuple[int, int]]) -> None:
    buf = io.BytesIO()
    np.save(buf, np.arange(64, dtype=np.int64).reshape(1, 64))
    data = bytearray(buf.getvalue()[:cut] if cut < 200 else buf.getvalue())
    for at, byte in flips:
        if at < len(data):
            data[at] = byte
    _check_ids(_write(bytes(data), ".npy"))


# ----------------------------------------------------------------------------- config.json

_TINY = get_preset("tiny").to_dict()


@FAST
@given(key=st.sampled_from(sorted(_TINY)), value=json_values)
def test_config_with_any_value_in_any_field(key: str, value: Any) -> None:
    data = dict(_TINY, **{key: value})
    text = json.dumps(data, allow_nan=True)
    try:
        cfg = V2FlowConfig.from_json(text)
    except ConfigError:
        return
    assert getattr(cfg, key) == value


@FAST
@given(value=json_values)
def test_config_of_any_json(value: Any) -> None:
    try:
        V2FlowConfig.from_json(json.dumps(value, allow_nan=True))
    except ConfigError:
        pass


@FAST
@given(data=st.binary(max_size=64))
def test_config_file_of_any_bytes(data: bytes) -> None:
    path = _write(data, ".json")
    try:
        V2FlowConfig.from_file(path)
    except ConfigError:
        pass


# ----------------------------------------------------------------------------- manifest.json

def _manifest_dict() -> dict[str, Any]:
    cfg = get_preset("tiny")
    specs = stage_specs(cfg, max_batch=2)
    m = Manifest(config=cfg, stages={"mar_step": record_stage(specs["mar_step"])},
                 files={"fp32": {"mar_step": "mar_step.fp32.onnx"}}, sha256={"mar_step.fp32.onnx": "0" * 64},
                 opset=18, source_checkpoint_sha256="x" * 64)
    return json.loads(m.to_json())


_MANIFEST = _manifest_dict()


@FAST
@given(key=st.sampled_from(sorted(_MANIFEST)), value=json_values, drop=st.booleans())
def test_manifest_with_any_value_in_any_field(key: str, value: Any, drop: bool) -> None:
    data = dict(_MANIFEST)
    if drop:
        del data[key]
    else:
        data[key] = value
    try:
        m = Manifest.from_dict(data)
        m.precisions      # noqa: B018  (what a reader asks first)
        for stage in m.stages:
            m.spec(stage)
    except ArtifactError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(_MANIFEST)), value=json_values)
def test_manifest_load_of_a_folder(key: str, value: Any) -> None:
    folder = _folder()
    (folder / "mar_step.fp32.onnx").write_bytes(b"")
    (folder / MANIFEST_NAME).write_text(json.dumps(dict(_MANIFEST, **{key: value}), allow_nan=True))
    try:
        Manifest.load(folder, verify=True)
    except ArtifactError:
        pass


@FAST
@given(data=st.binary(max_size=64))
def test_manifest_file_of_any_bytes(data: bytes) -> None:
    folder = _folder()
    (folder / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(ArtifactError):
        Manifest.load(folder)


# ----------------------------------------------------------------------------- images

def _encoded(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)).save(buf, format=fmt)
    return buf.getvalue()


_IMAGES = {fmt: _encoded(fmt) for fmt in ("PNG", "BMP", "GIF", "JPEG")}
_HEADER = {"PNG": 33, "BMP": 54, "GIF": 13, "JPEG": 200}    # past the sizes: no mutation claims a giant image


@FAST
@given(fmt=st.sampled_from(sorted(_IMAGES)), cut=st.integers(0, 2000),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6))
def test_images_truncated_or_flipped(fmt: str, cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(_IMAGES[fmt][:cut] if cut < 2000 else _IMAGES[fmt])
    for at, byte in flips:
        at += _HEADER[fmt]
        if at < len(data):
            data[at] = byte
    try:
        img = decode_image(bytes(data), "fuzzed")
    except ImageError:
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


@FAST
@given(data=st.binary(max_size=128))
def test_images_of_any_bytes(data: bytes) -> None:
    try:
        decode_image(data, "fuzzed")
    except ImageError:
        pass

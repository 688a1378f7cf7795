"""V2FlowPipeline over the torch engine: the three verbs, image handling, bad input, seeded decoding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from v2flow_rt.errors import ArtifactError, BackendUnavailable, ImageError, ShapeError
from v2flow_rt.pipeline import V2FlowPipeline
from v2flow_rt.reference.checkpoint import save_pretrained


@pytest.fixture(scope="module")
def pipe(tiny_model, tmp_path_factory) -> V2FlowPipeline:
    folder = save_pretrained(tiny_model, tmp_path_factory.mktemp("tiny"))
    return V2FlowPipeline.from_pretrained(folder, backend="torch")


def test_tokenize_matches_the_reference_model(pipe, tiny_model) -> None:
    import torch

    from v2flow_rt.reference.codecs import build_codec

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    ids = pipe.tokenize(images)
    x = torch.from_numpy(pipe.prepare(images))
    ref = tiny_model.tokenize(build_codec(tiny_model.config).encode(x)).numpy()
    assert ids.shape == (3, 64) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref)


def test_detokenize_is_seeded_and_reconstruct_shapes(pipe) -> None:
    ids = np.random.default_rng(1).integers(0, 4096, (2, 64))
    a = pipe.detokenize(ids, seed=3, steps=2)
    b = pipe.detokenize(ids, seed=3, steps=2)
    c = pipe.detokenize(ids, seed=4, steps=2)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0
    out = pipe.reconstruct(np.zeros((1, 64, 64, 3), np.uint8), steps=1)
    assert out.shape == (1, 64, 64, 3)


def test_images_of_any_size_and_mode(pipe, tmp_path) -> None:
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (50, 90), dtype=np.uint8)
    rgba = rng.integers(0, 256, (120, 80, 4), dtype=np.uint8)
    wide16 = rng.integers(0, 65536, (64, 200), dtype=np.uint16)
    path = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(path)
    ids = pipe.tokenize([gray, rgba, wide16, str(path)])
    assert ids.shape == (4, 64)
    # A grayscale image equals its RGB replication.
    np.testing.assert_array_equal(pipe.tokenize(gray), pipe.tokenize(np.repeat(gray[..., None], 3, 2)))


@pytest.mark.parametrize("bad,needle", [
    (np.zeros((10, 10, 2), np.uint8), "shape"),
    (np.zeros((10, 10, 3), np.float64), "uint8"),
    (np.zeros((1, 3, 32, 32), np.float32), "float images must be"),
    (np.full((1, 3, 64, 64), 3.0, np.float32), "within"),
    ([], "no images"),
    ("/no/such/file.png", "no such file"),
])
def test_bad_images_are_refused_clearly(pipe, bad, needle) -> None:
    with pytest.raises(ImageError, match=needle):
        pipe.tokenize(bad)


def test_bad_ids_and_backends(pipe, tmp_path) -> None:
    with pytest.raises(ShapeError, match=r"\[B, 64\]"):
        pipe.detokenize(np.zeros((1, 63), np.int64))
    with pytest.raises(ShapeError, match="must be in"):
        pipe.detokenize(np.full((1, 64), 4096))
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        V2FlowPipeline.from_pretrained(tmp_path, backend="tpu")
    with pytest.raises(ArtifactError, match="not an export folder"):
        V2FlowPipeline.from_pretrained(tmp_path, backend="ort")

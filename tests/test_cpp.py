"""The C++ clients in cpp/ built with cmake + g++ against the pip torch's LibTorch and run on AOTInductor
packages of the bundled default model's one-call graphs; their outputs are compared with Python's: ids
exactly, images to 1e-4 of their largest value (the ORT stage loop, fed the same ids, orders and noise)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from v2flow_rt.data import HELDOUT_PHOTOS, eval_crops, from_model_range
from v2flow_rt.export.folder import export_model
from v2flow_rt.pipeline import V2FlowPipeline
from v2flow_rt.sampling import seeded_randomness

CPP = Path(__file__).resolve().parent.parent / "cpp"
STEPS = 4

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None,
                                reason="cmake and g++ are needed to build the C++ clients")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default model's one-call graphs (ONNX and AOTInductor, temperature 1 so the noise matters) and the
    two executables."""
    import torch

    root = tmp_path_factory.mktemp("cpp")
    m = export_model("default", root / "export", steps=STEPS, aoti=True, quality=False, progress=False,
                     sampler={"temperature": 1.0}, calib_images=8)
    build = root / "build"
    subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return {"root": root, "manifest": m, "tok": build / "v2flow-tokenize", "detok": build / "v2flow-detokenize"}


def _run(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)


def test_tokenize_executable_gives_pythons_ids(built: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    crops = eval_crops(HELDOUT_PHOTOS, 64, per_image=3)                              # [6, 3, 64, 64]
    ref = V2FlowPipeline.from_pretrained(built["root"] / "export", backend="ort").tokenize(crops, one_call=False)
    np.save(tmp_path / "images.npy", crops)
    r = _run(built["tok"], built["manifest"].package_path("tokenize"), "--out", tmp_path / "ids.npy",
             "--images", tmp_path / "images.npy")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), ref)
    # PPM images in, the same ids out (uint8 pixels → [-1, 1] in C++)
    ppms = []
    for i, img in enumerate(from_model_range(crops)):
        Image.fromarray(img).save(tmp_path / f"{i}.ppm")
        ppms.append(tmp_path / f"{i}.ppm")
    r = _run(built["tok"], built["manifest"].package_path("tokenize"), "--out", tmp_path / "ids2.npy", *ppms)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "ids2.npy"), ref)


def test_detokenize_executable_matches_the_python_loop(built: dict[str, Any], tmp_path: Path) -> None:
    ids = np.random.default_rng(4).integers(0, 4096, (3, 64)).astype(np.int64)
    pipe = V2FlowPipeline.from_pretrained(built["root"] / "export", backend="ort")
    orders, noise = seeded_randomness(7, 3, 64, 192, 4)
    ref = pipe.detokenize(ids, steps=STEPS, temperature=1.0, seed=7, output="float", one_call=False)
    for name, a in (("ids", ids), ("orders", orders), ("noise", noise)):
        np.save(tmp_path / f"{name}.npy", a)
    pkg = built["manifest"].package_path("detokenize")
    r = _run(built["detok"], pkg, "--ids", tmp_path / "ids.npy", "--orders", tmp_path / "orders.npy",
             "--noise", tmp_path / "noise.npy", "--out", tmp_path / "out.npy", "--ppm", tmp_path / "img")
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "out.npy")
    assert got.shape == (3, 3, 64, 64) and np.abs(ref).max() > 0.1
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "img_001.ppm")), from_model_range(got)[1])
    # another seed's noise gives another image: the noise input is used
    r = _run(built["detok"], pkg, "--ids", tmp_path / "ids.npy", "--seed", "3", "--out", tmp_path / "seeded.npy")
    assert r.returncode == 0, r.stderr
    seeded = np.load(tmp_path / "seeded.npy")
    assert np.isfinite(seeded).all() and np.abs(seeded - got).max() > 1e-2


def test_bad_inputs_are_one_line_errors(built: dict[str, Any], tmp_path: Path) -> None:
    np.save(tmp_path / "ids.npy", np.zeros((2, 63), np.int64))
    r = _run(built["detok"], built["manifest"].package_path("detokenize"), "--ids", tmp_path / "ids.npy",
             "--seed", "1", "--out", tmp_path / "o.npy")
    assert r.returncode == 2 and "axis 1 must be 64, got 63" in r.stderr and not (tmp_path / "o.npy").exists()
    r = _run(built["tok"], built["manifest"].package_path("detokenize"), "--out", tmp_path / "x.npy", "a.ppm")
    assert r.returncode == 2 and "is the 'detokenize' package" in r.stderr



def test_command_line_mistakes_are_one_line_errors(built: dict[str, Any], tmp_path: Path) -> None:
    """A wrong command line names what is wrong (before: "stoull", "map::at", a seed of -1 taken as 2^64 - 1, a
    mistyped option or a --cfg-scale for an unguided package ignored), exits 2 and writes nothing."""
    orders, noise = seeded_randomness(5, 1, 64, 192, 4)
    for name, a in (("ids", np.zeros((1, 64), np.int64)), ("orders", orders), ("noise", noise),
                    ("ids64", np.zeros((1, 64), np.float64))):
        np.save(tmp_path / f"{name}.npy", a)
    ids, out = ["--ids", tmp_path / "ids.npy"], ["--out", tmp_path / "o.npy"]
    cases = [([*ids, "--seed", "abc", *out], "--seed must be a non-negative integer, got 'abc'"),
             ([*ids, "--seed", "-1", *out], "--seed must be a non-negative integer, got '-1'"),
             ([*ids, "--seed", "1" + "0" * 20, *out], "--seed must fit 64 bits"),
             ([*ids, "--orders", tmp_path / "orders.npy", *out], "--orders and --noise go together"),
             ([*ids, "--seed", "1", "--orders", tmp_path / "orders.npy", "--noise", tmp_path / "noise.npy", *out],
              "give either --seed S or --orders O.npy with --noise N.npy"),
             ([*ids, "--seed", "1", "--nosie", tmp_path / "noise.npy", *out], "unknown option '--nosie' (the options"),
             ([*ids, "--seed", "1", "--out"], "--out needs a value"),
             ([*ids, "--seed", "1", *out, "extra"], "unexpected argument 'extra'"),
             ([*ids, "--seed", "1", "--cfg-scale", "3", *out], "is an unguided package (exported with cfg 1)"),
             (["--ids", tmp_path / "ids64.npy", "--seed", "1", *out], "ids64.npy: unsupported .npy dtype 'f8'")]
    detok = built["manifest"].package_path("detokenize")
    for args, message in cases:
        r = _run(built["detok"], detok, *args)
        assert r.returncode == 2 and message in r.stderr, (message, r.returncode, r.stderr[-300:])
        assert r.stderr.count("\n") == 1 and not list(tmp_path.glob("o.npy*"))
    r = _run(built["tok"], built["manifest"].package_path("tokenize"), "--out", tmp_path / "o.npy", "--bogus", "1")
    assert r.returncode == 2 and "unknown option '--bogus' (the options: --images, --out)" in r.stderr
    assert _run(built["detok"], detok, *ids, "--seed", "1", *out).returncode == 0 and (tmp_path / "o.npy").exists()


def _npy_with_header(path: Path, header: str, data: bytes) -> None:
    """A .npy file (format 1.0) with the given header dict text and data bytes, however wrong they are."""
    text = header.encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data)


def test_damaged_file_headers_are_named_before_anything_is_allocated(built: dict[str, Any], tmp_path: Path) -> None:
    """A .npy or PPM header that is wrong or claims more data than its file holds is a one-line error naming the
    file and the field (before: "stoll", "stoi", "vector::_M_default_append", or std::bad_alloc after trying to
    allocate the 80 GB a damaged shape asked for)."""
    npy = "{'descr': '<i8', 'fortran_order': False, 'shape': %s, }"
    _npy_with_header(tmp_path / "huge.npy", npy % "(100000, 100000)", bytes(64))
    _npy_with_header(tmp_path / "negative.npy", npy % "(-1, 64)", bytes(512))
    _npy_with_header(tmp_path / "garbled.npy", npy % "(1, x64)", bytes(512))
    _npy_with_header(tmp_path / "short.npy", npy % "(1, 64)", bytes(100))
    _npy_with_header(tmp_path / "valid.npy", npy % "(1, 64)", bytes(512))
    cases = [("huge.npy", "huge.npy: truncated .npy data (the header asks for more bytes than the file's 64)"),
             ("negative.npy", "negative.npy: .npy shape entry must be a non-negative integer below 10^12, got '-1'"),
             ("garbled.npy", "garbled.npy: .npy shape entry must be a non-negative integer below 10^12, got 'x64'"),
             ("short.npy", "short.npy: truncated .npy data (the header asks for more bytes than the file's 100)")]
    detok = built["manifest"].package_path("detokenize")
    for name, message in cases + [("valid.npy", "")]:
        r = _run(built["detok"], detok, "--ids", tmp_path / name, "--seed", "1", "--out", tmp_path / "o.npy")
        if not message:
            assert r.returncode == 0 and (tmp_path / "o.npy").exists(), r.stderr
            continue
        assert r.returncode == 2 and message in r.stderr, (message, r.returncode, r.stderr[-300:])
        assert r.stderr.count("\n") == 1 and not (tmp_path / "o.npy").exists()
    ppms = [(b"P6\n-5 64\n255\n", "PPM width must be a non-negative integer below 10^12, got '-5'"),
            (b"P6\n64 abc\n255\n", "PPM height must be a non-negative integer below 10^12, got 'abc'"),
            (b"P6\n100000 100000\n255\n" + bytes(4), "truncated PPM data (the header asks for more bytes than "
                                                      "the file's 4)"),
            (b"P6\n64 64\n65535\n" + bytes(64 * 64 * 6), "only maxval 255 PPMs are supported")]
    tok = built["manifest"].package_path("tokenize")
    for i, (content, message) in enumerate(ppms):
        (tmp_path / f"{i}.ppm").write_bytes(content)
        r = _run(built["tok"], tok, "--out", tmp_path / "ids.npy", tmp_path / f"{i}.ppm")
        assert r.returncode == 2 and f"{i}.ppm: {message}" in r.stderr, (message, r.returncode, r.stderr[-300:])
        assert not (tmp_path / "ids.npy").exists()


def test_out_of_contract_values_are_refused_before_the_graph_runs(built: dict[str, Any], tmp_path: Path) -> None:
    """ids or orders outside their range index outside the compiled graph's tables (which aborted the process
    from a worker thread: exit 134 and a C++ stack), a repeated order entry or a NaN gave a wrong image with
    exit 0; each is now a one-line error naming the input, and no output is written."""
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 4096, (2, 64)).astype(np.int64)
    orders, noise = seeded_randomness(5, 2, 64, 192, 4)
    detok = built["manifest"].package_path("detokenize")

    def detokenize(**changed: np.ndarray) -> subprocess.CompletedProcess[str]:
        arrays = {"ids": ids, "orders": orders, "noise": noise, **changed}
        for name, a in arrays.items():
            np.save(tmp_path / f"{name}.npy", a)
        (tmp_path / "out.npy").unlink(missing_ok=True)
        return _run(built["detok"], detok, "--ids", tmp_path / "ids.npy", "--orders", tmp_path / "orders.npy",
                    "--noise", tmp_path / "noise.npy", "--out", tmp_path / "out.npy")

    repeated = orders.copy()
    repeated[1, 5] = repeated[1, 6]
    nan_noise = noise.copy()
    nan_noise[0, 3, 7] = np.nan
    too_large, negative = ids.copy(), ids.copy()
    too_large[0, 0], too_large[1, 2] = 0, 4096
    negative[0, 0] = -3
    cases = [({"ids": too_large}, "ids must be in [0, 4096), got range [0, 4096]"),
             ({"ids": negative}, "ids must be in [0, 4096), got range [-3, "),
             ({"orders": repeated}, "orders row 1 is not a permutation of 0..63 (each position exactly once); "
                                    "1 of 2 rows are not"),
             ({"orders": orders + 1}, "orders row 0 is not a permutation of 0..63"),
             ({"noise": nan_noise}, "input 'noise' must be finite")]
    for changed, message in cases:
        r = detokenize(**changed)
        assert r.returncode == 2 and message in r.stderr, (message, r.returncode, r.stderr[-300:])
        assert r.stderr.count("\n") == 1 and not (tmp_path / "out.npy").exists()
    assert detokenize().returncode == 0 and (tmp_path / "out.npy").exists()   # the valid inputs run

    crops = eval_crops(HELDOUT_PHOTOS, 64, per_image=1)
    tok = built["manifest"].package_path("tokenize")
    for value, message in ((1.5, "images must be within [-1, 1] (pixel / 127.5 - 1), got |x| up to 1.5"),
                           (np.inf, "input 'images' must be finite")):
        images = crops.copy()
        images[0, 1, 2, 3] = value
        np.save(tmp_path / "images.npy", images)
        r = _run(built["tok"], tok, "--out", tmp_path / "ids.npy", "--images", tmp_path / "images.npy")
        assert r.returncode == 2 and message in r.stderr, (message, r.returncode, r.stderr[-300:])


@pytest.fixture(scope="module")
def guided(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A guided one-call detokenize (official CFG at 2.0, 2 masked-AR iterations of one step: small to compile)
    as ONNX and as an AOTInductor package."""
    root = tmp_path_factory.mktemp("cpp_guided")
    m = export_model("default", root / "export", stages=["detokenize"], steps=1, aoti=True, quality=False,
                     progress=False, parity_photos=0, sampler={"temperature": 1.0, "cfg_scale": 2.0, "num_iter": 2})
    return {"package": m.package_path("detokenize"), "onnx": m.path("detokenize", "fp32")}


def test_guided_package_takes_its_default_or_the_given_cfg_scale(built: dict[str, Any], guided: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    """A guided package's cfg_scale input is fed from its metadata (2.0) or from --cfg-scale; the images equal the
    one-call ONNX graph's run by ONNX Runtime at that scale (clipped to [-1, 1] as both clients do)."""
    import onnxruntime as ort

    ids = np.random.default_rng(9).integers(0, 4096, (2, 64)).astype(np.int64)
    orders, noise = seeded_randomness(3, 2, 64, 192, 2)
    for name, a in (("ids", ids), ("orders", orders), ("noise", noise)):
        np.save(tmp_path / f"{name}.npy", a)
    session = ort.InferenceSession(str(guided["onnx"]), providers=["CPUExecutionProvider"])
    feeds = {"ids": ids, "orders": orders, "noise": noise}
    got: dict[float | None, np.ndarray] = {}
    for scale in (None, 3.0, 1.0):                      # None: the package's default, 2.0
        extra = [] if scale is None else ["--cfg-scale", str(scale)]
        r = _run(built["detok"], guided["package"], "--ids", tmp_path / "ids.npy", "--orders", tmp_path / "orders.npy",
                 "--noise", tmp_path / "noise.npy", "--out", tmp_path / "out.npy", *extra)
        assert r.returncode == 0, r.stderr
        got[scale] = np.load(tmp_path / "out.npy")
        fed = np.array([2.0 if scale is None else scale], np.float32)
        ref = np.clip(session.run(None, {**feeds, "cfg_scale": fed})[0], -1, 1)
        assert np.abs(ref).max() > 0.1
        assert np.abs(got[scale] - ref).max() <= 1e-4 * np.abs(ref).max(), scale
    assert np.abs(got[None] - got[3.0]).max() > 1e-2 and np.abs(got[None] - got[1.0]).max() > 1e-2
    r = _run(built["detok"], guided["package"], "--ids", tmp_path / "ids.npy", "--seed", "1", "--cfg-scale", "nan",
             "--out", tmp_path / "o.npy")
    assert r.returncode == 2 and "--cfg-scale must be a finite number, got 'nan'" in r.stderr
    assert not (tmp_path / "o.npy").exists()

"""V2FlowPipeline over the torch engine: the three verbs, image handling, bad input, seeded decoding against
the spec's float64 sampler, the standard and colour eval suites.

The model has its zero-initialised layers randomised (``live_tiny_model``): a fresh model's velocity is 0,
so decoding would return the noise and a broken ids → image path would pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from v2flow_rt import data
from v2flow_rt.cli import main
from v2flow_rt.errors import ArtifactError, BackendUnavailable, ImageError, ShapeError
from v2flow_rt.pipeline import V2FlowPipeline
from v2flow_rt.reference.checkpoint import save_pretrained


@pytest.fixture(scope="module")
def model_dir(live_tiny_model, tmp_path_factory):
    return save_pretrained(live_tiny_model, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(model_dir) -> V2FlowPipeline:
    return V2FlowPipeline.from_pretrained(model_dir, backend="torch")


def test_tokenize_matches_the_reference_model(pipe, live_tiny_model) -> None:
    import torch

    from v2flow_rt.reference.codecs import build_codec

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    ids = pipe.tokenize(images)
    x = torch.from_numpy(pipe.prepare(images))
    ref = live_tiny_model.tokenize(build_codec(live_tiny_model.config).encode(x)).numpy()
    assert ids.shape == (3, 64) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref)


@pytest.fixture(scope="module")
def default_model():
    """The bundled trained model: unlike a random one, its decoder depends strongly on the ids."""
    from v2flow_rt.reference.checkpoint import from_pretrained

    return from_pretrained("default")


@pytest.mark.parametrize("which", ["live-tiny", "default"])
def test_detokenize_is_seeded_and_equals_the_official_sampler(pipe, live_tiny_model, default_model, which) -> None:
    import torch
    from reference_loop import official_sample_tokens

    from v2flow_rt.reference.codecs import build_codec

    if which == "default":
        model, pipe = default_model, V2FlowPipeline.from_pretrained("default", backend="torch")
    else:
        model = live_tiny_model
    ids = np.random.default_rng(1).integers(0, 4096, (2, 64))
    a = pipe.detokenize(ids, seed=3, steps=2)
    b = pipe.detokenize(ids, seed=3, steps=2)
    c = pipe.detokenize(ids, seed=4, steps=2)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0
    # ids → image against the spec's sampler in float64 (then the codec), at the model's default temperature
    with torch.no_grad():
        tokens = official_sample_tokens(model, model.embed_ids(torch.from_numpy(ids)), steps=2, seed=3,
                                        temperature=model.config.temperature)
        ref = data.from_model_range(build_codec(model.config).decode(
            model.tokens_to_latent(torch.from_numpy(tokens).float())).numpy())
    diff = np.abs(a.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01          # float32 vs float64: a rounding step at most
    noise_only = data.from_model_range(build_codec(model.config).decode(model.tokens_to_latent(
        torch.from_numpy(official_randomness_noise(3, model)))).numpy())
    assert np.abs(a.astype(int) - noise_only.astype(int)).mean() > 5     # the velocity net moved the noise
    if which == "default":    # trained: the ids decide the image (a random model's decoder barely reads them)
        other = pipe.detokenize(np.random.default_rng(2).integers(0, 4096, (2, 64)), seed=3, steps=2)
        assert np.abs(a.astype(int) - other.astype(int)).mean() > 10
    out = pipe.reconstruct(np.zeros((1, 64, 64, 3), np.uint8), steps=1)
    assert out.shape == (1, 64, 64, 3)


def official_randomness_noise(seed: int, model) -> np.ndarray:
    """The starting noise of a 2-image decode at the model's temperature (what a zero velocity returns)."""
    from reference_loop import official_randomness

    cfg = model.config
    return official_randomness(seed, 2, cfg.num_tokens, cfg.token_dim, cfg.num_iter)[1] * np.float32(cfg.temperature)


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


def test_eval_on_your_own_images_equals_the_same_built_in_photo(model_dir, tmp_path) -> None:
    from v2flow_rt.evaluate import evaluate

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.load_photo("chelsea")).save(folder / "cat.png")
    (folder / "notes.txt").write_text("not an image")
    kw = {"per_image": 2, "scale": 0.5, "steps": 2, "num_iter": 2}
    mine = evaluate(model_dir, images=[folder], **kw)
    builtin = evaluate(model_dir, photos=["chelsea"], **kw)
    assert mine["images"] == 2 and mine["photos"] == [str(folder / "cat.png")] and mine["scale"] == 0.5
    for key in ("psnr", "ssim", "grid_baseline_psnr", "grid_baseline_nearest_psnr"):
        assert mine[key] == builtin[key], key
    assert mine["held_out"] is None            # nobody can tell for files


def test_eval_says_whether_the_photos_were_held_out(model_dir, tmp_path) -> None:
    from v2flow_rt.evaluate import evaluate

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["extra"] = {**cfg.get("extra", {}), "train_photos": ["astronaut", "coffee"]}
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / "config.json").write_text(json.dumps(cfg))
    (recorded / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    kw = {"per_image": 1, "steps": 1, "num_iter": 1}
    assert evaluate(recorded, photos=["chelsea"], **kw)["held_out"] is True
    assert evaluate(recorded, photos=["chelsea", "coffee"], **kw)["held_out"] is False
    assert evaluate(model_dir, photos=["chelsea"], **kw)["held_out"] is None   # config records no photos


def test_eval_refuses_bad_image_sources_clearly(model_dir, tmp_path, capsys) -> None:
    from v2flow_rt.evaluate import evaluate

    empty = tmp_path / "empty"
    empty.mkdir()
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tiny)
    with pytest.raises(ImageError, match="missing.png: no such file"):
        evaluate(model_dir, images=[tmp_path / "missing.png"])
    with pytest.raises(ImageError, match="holds no image files"):
        evaluate(model_dir, images=[empty])
    with pytest.raises(ImageError, match=r"unknown built-in photo\(s\) \['kitten'\]"):
        evaluate(model_dir, photos=["kitten"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(ImageError, match="broken.png"):
        evaluate(model_dir, images=[broken])
    # a photo smaller than the model's crop is not an error: it is resized (as the official preprocessing
    # does), and the report says so
    small = evaluate(model_dir, images=[tiny], steps=2)
    assert small["images"] == 1 and small["crops"] == "resized centre crop"
    with pytest.raises(ShapeError, match="scale must be in"):
        evaluate(model_dir, photos=["chelsea"], scale=1.5)
    assert main(["eval", "--model", str(model_dir), "--images", str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err


def test_bundled_default_beats_the_grid_baseline_on_held_out_photos() -> None:
    """The bundled model beats the token grid by the 2.5 dB issue 15 asks for, on photos it never saw.

    Full `v2flow-rt eval` protocol (16 crops, the model's default sampler), seed 3: measured 25.14 dB
    against 21.60 dB (+3.54; seeds 0-3: +3.50 to +3.54), so the bound leaves room for other BLAS builds.
    """
    from v2flow_rt.evaluate import evaluate

    report = evaluate("default", seed=3)
    assert report["held_out"] is True and report["images"] == 16
    assert report["sampler"]["temperature"] == 0.5           # the bundled config's default, see its README
    assert report["psnr_gain_db"] >= 3.0, report


def test_bundled_default_holds_up_under_every_colour_change() -> None:
    """Issue 15's colour targets on the held-out photos: worst variant >= +1.5 dB over its grid baseline, mean
    >= +2.5 dB. Measured (seed 0): worst +2.38 dB (hue +270), mean +2.94 dB; the model before colour
    augmentation gave -4.35 and -1.01 and fails this test."""
    from v2flow_rt.evaluate import evaluate_colour

    report = evaluate_colour("default")
    assert report["held_out"] is True and len(report["variants"]) == 9
    assert report["meets_targets"] is True, report
    assert report["worst"]["psnr_gain_db"] >= 2.0 and report["mean_psnr_gain_db"] >= 2.6, report


def test_recolour_agrees_with_colorsys_and_keeps_grays() -> None:
    import colorsys

    from v2flow_rt.colour import recolour

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    for hue, sat in [(0, 1.0), (45, 1.0), (200, 1.0), (0, 1.6), (300, 0.5)]:
        want = np.empty(img.shape, np.uint8)
        for idx in np.ndindex(img.shape[:-1]):                 # the stdlib's HSV, pixel by pixel
            h, s, v = colorsys.rgb_to_hsv(*(img[idx] / 255.0))
            rgb = colorsys.hsv_to_rgb((h + hue / 360.0) % 1.0, min(1.0, s * sat), v)
            want[idx] = np.rint(np.array(rgb) * 255.0)
        got = recolour(img, hue, sat).astype(int)
        # the same HSV maths in another order of float operations: a value on a .5 may round either way
        assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.05, f"hue {hue} saturation {sat}"
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], np.uint8)
    np.testing.assert_array_equal(recolour(primaries, 120), [[[0, 255, 0], [0, 0, 255], [255, 0, 0], [90, 90, 90]]])
    np.testing.assert_array_equal(recolour(primaries, 360), primaries)


def test_colour_suite_reports_every_variant_worst_and_mean(model_dir, tmp_path, capsys) -> None:
    """On the bundled model (a random decoder barely reads its input), then the CLI on a small random one."""
    from v2flow_rt.evaluate import COLOUR_HUES, evaluate, evaluate_colour

    kw = {"per_image": 2, "steps": 2, "num_iter": 2}
    grid = tmp_path / "colour.png"
    report = evaluate_colour("default", photos=["chelsea"], hues=(0, 90, 200), saturation=1.5, grid_png=str(grid),
                             grid_crops_shown=2, **kw)
    names = [v["name"] for v in report["variants"]]
    assert names == ["original", "hue+90", "hue+200", "saturation x1.5"] and report["images"] == 2
    # the unchanged variant is the standard suite on the same crops and seed
    standard = evaluate("default", photos=["chelsea"], **kw)
    for key in ("psnr", "ssim", "grid_baseline_psnr", "grid_baseline_ssim", "psnr_gain_db"):
        assert report["variants"][0][key] == standard[key], key
    # each variant is recoloured: its grid baseline differs (not for multiples of 120°, which permute the
    # channels, so the suite's hues avoid them)
    assert len({v["grid_baseline_psnr"] for v in report["variants"]}) == 4
    # one variant recomputed by hand: the recoloured crops are the reference and the model's input
    from v2flow_rt.colour import recolour
    from v2flow_rt.metrics import grid_baseline, psnr, ssim

    plain = data.from_model_range(data.fitting_crops([data.load_photo("chelsea")], 64, 2)[0])
    ref = recolour(plain, 90)
    x = data.to_model_range(ref)
    recon = V2FlowPipeline.from_pretrained("default", backend="torch").reconstruct(x, seed=0, steps=2, num_iter=2)
    hue90 = report["variants"][1]
    assert hue90["psnr"] == round(psnr(ref, recon), 3) and hue90["ssim"] == round(ssim(ref, recon), 4)
    assert hue90["grid_baseline_psnr"] == round(psnr(ref, data.from_model_range(grid_baseline(x, 8))), 3)
    gains = [v["psnr_gain_db"] for v in report["variants"]]
    worst = report["variants"][int(np.argmin(gains))]
    assert report["worst"] == {"name": worst["name"], "psnr_gain_db": min(gains), "psnr": worst["psnr"]}
    assert abs(report["mean_psnr_gain_db"] - sum(gains) / 4) < 1e-3
    assert report["meets_targets"] == (min(gains) >= 1.5 and report["mean_psnr_gain_db"] >= 2.5)
    assert Image.open(grid).size[1] == 2 + 8 * (64 + 2)          # two rows (originals, V2Flow) per variant
    # The CLI's default suite: at least six hues spread over the circle (no gap over 60°) and a saturation boost.
    assert len(COLOUR_HUES) >= 6 and max(np.diff(sorted(COLOUR_HUES) + [360 + min(COLOUR_HUES)])) <= 60
    assert main(["eval", "--suite", "colour", "--model", str(model_dir), "--photos", "chelsea", "--per-image", "1",
                 "--steps", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["suite"] == "colour" and len(out["variants"]) == len(COLOUR_HUES) + 1
    assert out["variants"][-1]["saturation"] > 1 and {v["hue_deg"] for v in out["variants"]} == set(COLOUR_HUES)

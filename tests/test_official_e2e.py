"""Official checkpoints end to end: a checkpoint-last.pth in the official layout (written from the spec's key
list) plus a local random AutoencoderDC folder → ``import-official`` → ``export`` → tokenize / reconstruct on
the torch and ONNX Runtime backends; the DC-AE graphs against diffusers itself; caller-supplied orders and
noise through the pipeline; bad codec folders and unrepresentable checkpoints refused clearly.

Geometry: base-256 (DC-AE 32×8×8 latents, 64 tokens, D 768, 12 heads, velocity width 1536) at reduced depth
and vocabulary, with the official two-layer readout. Every weight of the checkpoint is random and non-zero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import official_small_config
from official import write_official_checkpoint

from v2flow_rt.cli import main
from v2flow_rt.errors import CheckpointError
from v2flow_rt.metrics import psnr
from v2flow_rt.pipeline import V2FlowPipeline
from v2flow_rt.reference.checkpoint import from_pretrained, import_official
from v2flow_rt.reference.codecs import make_tiny_dcae
from v2flow_rt.sampling import seeded_randomness

pytest.importorskip("diffusers")

STEPS = 3
SCALE = 0.41407        # written out here, not taken from the package: the scale the official code uses


def _config():
    return official_small_config().replace(readout_depth=2)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """checkpoint-last.pth + DC-AE folder → import-official (CLI, codec copied in) → export (CLI, fp32)."""
    root = tmp_path_factory.mktemp("official_e2e")
    ckpt, raw, _ = write_official_checkpoint(_config(), root / "run" / "checkpoint-last.pth", seed=4,
                                              readout_gain=40.0)
    dcae = make_tiny_dcae(root / "dc-ae", seed=2)
    model_dir, export_dir = root / "model", root / "export"
    assert main(["import-official", str(ckpt), "--out", str(model_dir), "--codec", str(dcae), "--copy-codec",
                 "--quiet"]) == 0
    assert main(["export", str(model_dir), "--out", str(export_dir), "--steps", str(STEPS), "--quiet"]) == 0
    return {"root": root, "ckpt": ckpt, "raw": raw, "dcae": dcae, "model_dir": model_dir, "export": export_dir}


def _photos(n: int, seed: int) -> np.ndarray:
    """Smooth colour images unlike random noise (gradients and blobs), uint8 [n, 256, 256, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    out = []
    for _ in range(n):
        img = np.zeros((256, 256, 3))
        for c in range(3):
            a, b, ph = rng.uniform(-3, 3, 3)
            img[..., c] = 0.5 + 0.4 * np.sin(a * xx + b * yy + ph)
        out.append((img * 255).astype(np.uint8))
    return np.stack(out)


def test_import_writes_a_model_folder_with_its_codec(flow: dict[str, Any], capsys) -> None:
    cfg = json.loads((flow["model_dir"] / "config.json").read_text())
    assert cfg["extra"]["dcae_path"] == "codec" and (flow["model_dir"] / "codec" / "config.json").is_file()
    model = from_pretrained(flow["model_dir"])
    assert Path(model.config.extra["dcae_path"]) == (flow["model_dir"] / "codec").resolve()
    # the weights are the checkpoint's raw entry, key for key (the unused class_emb dropped)
    state = model.state_dict()
    for key, value in flow["raw"].items():
        if key != "class_emb.weight":
            assert torch.equal(state[key], value), key
    assert "class_emb.weight" not in state
    # the CLI says what it dropped and why
    out = flow["root"] / "again"
    assert main(["import-official", str(flow["ckpt"]), "--out", str(out), "--ema", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "dropped class_emb.weight: the official model's unused class embedding" in text
    assert "codec: none recorded" in text


def test_ids_equal_across_backends_and_images_agree(flow: dict[str, Any]) -> None:
    """Torch (the model folder) and ONNX Runtime (the export) give identical ids and images ≥ 60 dB apart
    for the same seed; explicit orders + noise reproduce the seeded decode on ORT exactly."""
    torch_pipe = V2FlowPipeline.from_pretrained(flow["model_dir"], backend="torch")
    ort_pipe = V2FlowPipeline.from_pretrained(flow["export"], backend="ort")
    images = _photos(3, seed=1)
    ids_t, ids_o = torch_pipe.tokenize(images), ort_pipe.tokenize(images)
    np.testing.assert_array_equal(ids_t, ids_o)
    assert len(np.unique(ids_t)) > 3            # the random readout does not collapse every token to one code
    kw = {"steps": STEPS, "seed": 5, "output": "float"}
    rec_t, rec_o = torch_pipe.detokenize(ids_t, **kw), ort_pipe.detokenize(ids_t, **kw)
    assert np.abs(rec_t).max() > 1e-3           # not a blank image: the velocity net's output layer is non-zero
    assert psnr(rec_t, rec_o, data_range=2.0) >= 60.0
    orders, noise = seeded_randomness(5, 3, 64, 32, torch_pipe.config.num_iter)
    explicit = ort_pipe.detokenize(ids_t, steps=STEPS, seed=None, orders=orders, noise=noise, output="float")
    np.testing.assert_array_equal(explicit, rec_o)


def test_cli_reconstruct_on_both_backends(flow: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(_photos(1, seed=2)[0]).save(src)
    outs = []
    for backend, model in (("torch", flow["model_dir"]), ("ort", flow["export"])):
        out = tmp_path / f"{backend}.png"
        assert main(["reconstruct", str(src), "--out", str(out), "--backend", backend, "--model", str(model),
                     "--steps", str(STEPS), "--seed", "1"]) == 0
        outs.append(np.asarray(Image.open(out)))
    assert outs[0].shape == (256, 256, 3)
    assert psnr(outs[0], outs[1]) >= 60.0


def test_dcae_graphs_match_diffusers_and_apply_the_scale_once(flow: dict[str, Any]) -> None:
    """codec_encode = vae.encode(x).latent · 0.41407 and codec_decode(l) = vae.decode(l / 0.41407), computed
    with diffusers directly, to 1e-4 of the largest value, on the ONNX graphs and on the torch engine. A
    scale applied twice or never is off by a factor 0.41407 and fails."""
    from diffusers import AutoencoderDC

    from v2flow_rt.export.precision import ort_session
    from v2flow_rt.manifest import Manifest

    vae = AutoencoderDC.from_pretrained(str(flow["dcae"]), local_files_only=True).eval()
    m = Manifest.load(flow["export"])
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (2, 3, 256, 256)).astype(np.float32)
    latent = (rng.standard_normal((2, 32, 8, 8)) * 0.6).astype(np.float32)
    with torch.no_grad():
        ref_lat = vae.encode(torch.from_numpy(images)).latent.numpy() * SCALE
        ref_img = vae.decode(torch.from_numpy(latent) / SCALE).sample.numpy()
    engine = V2FlowPipeline.from_pretrained(flow["model_dir"], backend="torch").engine
    for got_lat, got_img in (
            (ort_session(m.path("codec_encode")).run(None, {"images": images})[0],
             ort_session(m.path("codec_decode")).run(None, {"latent": latent})[0]),
            (engine.run("codec_encode", {"images": images})["latent"],
             engine.run("codec_decode", {"latent": latent})["images"])):
        assert np.abs(got_lat - ref_lat).max() <= 1e-4 * np.abs(ref_lat).max()
        assert np.abs(got_img - ref_img).max() <= 1e-4 * np.abs(ref_img).max()
    assert m.parity["fp32"]["codec_decode"]["random"]["images"]["max_rel"] <= 1e-4


@pytest.mark.parametrize("case", ["missing", "no_config", "channels", "stride", "pickle_only"])
def test_bad_codec_folders_are_clear_errors(flow: dict[str, Any], tmp_path: Path, case: str, capsys) -> None:
    folder = tmp_path / "dcae"
    needle = {"missing": "does not exist", "no_config": "has no config.json",
              "channels": "latent_channels 16 at stride 32, but model 'official-base-256' expects "
                          "latent_channels 32 at codec_stride 32",
              "stride": "latent_channels 32 at stride 16, but model 'official-base-256' expects",
              "pickle_only": "pickled .bin weights are not loaded"}[case]
    if case == "no_config":
        folder.mkdir()
    elif case == "channels":
        make_tiny_dcae(folder, latent_channels=16)
    elif case == "stride":
        make_tiny_dcae(folder, stride=16)
    elif case == "pickle_only":
        make_tiny_dcae(folder)
        (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    out = tmp_path / "model"
    code = main(["import-official", str(flow["ckpt"]), "--out", str(out), "--codec", str(folder), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not out.exists()                      # nothing written


def test_a_recorded_codec_that_went_missing_is_named(flow: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from v2flow_rt.reference.checkpoint import import_official_folder

    dcae = make_tiny_dcae(tmp_path / "dcae")
    model_dir = tmp_path / "model"
    import_official_folder(flow["ckpt"], model_dir, codec=dcae, progress=False)
    shutil.rmtree(dcae)
    with pytest.raises(CheckpointError, match=f"DC-AE codec folder {dcae} does not exist"):
        V2FlowPipeline.from_pretrained(model_dir, backend="torch")


@pytest.mark.parametrize("field,value,needle", [
    ("flow_method", "CondOT", "--flow_method CondOT"),
    ("patch_size", 2, "--patch_size 2"),
    ("visual_vocabulary", False, "without the visual vocabulary"),
])
def test_unrepresentable_official_checkpoints_are_refused(tmp_path: Path, field: str, value: object,
                                                           needle: str) -> None:
    path, _, _ = write_official_checkpoint(_config(), tmp_path / "checkpoint-last.pth", **{field: value})
    with pytest.raises(CheckpointError, match=needle):
        import_official(path)


def test_validate_eval_bench_and_demo_accept_an_official_model(flow: dict[str, Any], tmp_path: Path,
                                                                capsys) -> None:
    """The verbs a user runs next on an imported model: validate (the DC-AE graphs against the recorded codec
    folder too), eval on their own photos, bench and demo."""
    from PIL import Image

    from v2flow_rt.engines.base import denormals_flushed
    from v2flow_rt.export.validate import validate_folder

    report = validate_folder(flow["export"], seed=3)
    assert report.ok and report.reference.startswith("pytorch")
    assert {"codec_encode", "codec_decode"} <= {r["stage"] for r in report.rows}
    photo = tmp_path / "mine.png"
    Image.fromarray(_photos(1, seed=9)[0]).resize((220, 200)).save(photo)   # smaller than the model's crop
    capsys.readouterr()
    assert main(["eval", "--model", str(flow["model_dir"]), "--images", str(photo), "--steps", str(STEPS),
                 "--per-image", "2", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["images"] == 1 and ev["crops"] == "resized centre crop" and ev["psnr"] > 0
    bench = tmp_path / "bench.json"
    assert not denormals_flushed()
    assert main(["bench", "--model", str(flow["model_dir"]), "--export", str(flow["export"]), "--precisions", "fp32",
                 "--torch-modes", "torch", "--repeat", "1", "--steps", str(STEPS), "--json", str(bench),
                 "--split"]) == 0
    assert not denormals_flushed()     # it flushed them in every backend, then gave this thread its state back
    b = json.loads(bench.read_text())
    assert b["flush_denormals"] is True
    res = b["results"]
    assert set(res) == {"torch", "torch-loop", "ort-fp32", "ort-fp32-loop"}    # one call and the loop, both timed
    assert res["ort-fp32"]["one_call"] == {"tokenize": True, "detokenize": True}
    assert res["ort-fp32-loop"]["one_call"] == {"tokenize": False, "detokenize": False}
    assert all(r["ids_equal_torch"] and r["psnr_vs_torch"] > 60 for r in res.values()), res
    # --split: only the ONNX Runtime row that decodes in one call; the matmuls it removed are the decode's
    # (the yardstick, to 0.1 %) and the DC-AE decoder's few of its own (its attention: 0.2 % here)
    assert [k for k, r in res.items() if "detokenize_split" in r] == ["ort-fp32"]
    split = res["ort-fp32"]["detokenize_split"]
    assert 0.999 <= split["matmul_gflop"] * 1e9 / b["flops"]["detokenize"] <= 1.01
    assert split["max_rel_diff"] <= 1e-5
    floor = b["flops"]["detokenize"] / b["matmul_peak"]["ort_gflops"] / 1e6
    assert b["detokenize_floor_ms"] == pytest.approx(floor) and floor > 0
    assert all(r["detokenize_ort_peak_fraction"] == pytest.approx(floor / r["detokenize"]["median_ms"])
               for r in res.values())
    assert main(["demo", "--model", str(flow["model_dir"]), "--export", str(flow["export"]), "--out",
                 str(tmp_path / "demo"), "--precisions", "fp32", "--repeat", "1", "--steps", str(STEPS)]) == 0
    assert (tmp_path / "demo" / "report.md").is_file() and (tmp_path / "demo" / "reconstructions.png").is_file()

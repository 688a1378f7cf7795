"""Export: stage modules vs the reference, ONNX parity (tiny and an official geometry), precisions, quality
figures, atomic exports, broken artifacts, validate_folder and the CLI.

Models have random weights with the zero-initialised layers (adaLN, final layer) filled in, so that no
stage is trivially zero. Two exports are shared by the tests of this file: the tiny preset at every
precision (from a checkpoint folder, so validate_folder can compare with PyTorch) and the base-256 geometry
with reduced depth at fp32. ODE graphs bake 3 solver steps to keep export time down (the unrolled graph
grows linearly with the steps; the solver code is the same at any count).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import conftest
import numpy as np
import onnx
import pytest
import torch

from v2flow_rt.cli import main
from v2flow_rt.config import V2FlowConfig, get_preset
from v2flow_rt.data import HELDOUT_PHOTOS, eval_crops
from v2flow_rt.errors import ArtifactError, ExportError, ParityError
from v2flow_rt.export.folder import export_model
from v2flow_rt.export.parity import FP32_MAX_REL, stage_parity
from v2flow_rt.export.precision import ID_AGREEMENT_MIN, INT8_MAX_LOSS_DB, convert_fp16, ort_session
from v2flow_rt.export.validate import validate_folder
from v2flow_rt.manifest import MANIFEST_NAME, PRECISIONS, Manifest
from v2flow_rt.reference import stage_modules as M
from v2flow_rt.reference.checkpoint import save_pretrained
from v2flow_rt.reference.model import TorchStages, V2Flow
from v2flow_rt.sampling import SamplerSettings, host_ode
from v2flow_rt.stages import ONE_CALL_STAGES, stage_specs

STEPS = 3


def randomized(cfg: V2FlowConfig, seed: int = 0) -> V2Flow:
    """A model with every zero-initialised weight (adaLN, final layer, biases) drawn at random too."""
    torch.manual_seed(seed)
    model = V2Flow(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 1 and float(p.abs().max()) == 0 and "norm" not in name and "_ln" not in name:
                p.normal_(0.0, 0.02, generator=g)
    return model


def official_small_config() -> V2FlowConfig:
    """conftest's small base-256, with a smaller LLM table and the official readout depth."""
    return conftest.official_small_config(llm_vocab_size=512, llm_dim=256, readout_depth=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny preset exported at every precision from a checkpoint folder."""
    root = tmp_path_factory.mktemp("tiny")
    model = randomized(get_preset("tiny"))
    save_pretrained(model, root / "ckpt")
    manifest = export_model(root / "ckpt", root / "export", precisions=PRECISIONS, steps=STEPS, progress=False,
                            calib_images=8)
    return {"model": model, "manifest": manifest, "folder": root / "export", "ckpt": root / "ckpt"}


def tiny_dcae(folder: Path) -> Path | None:
    """A randomly initialised diffusers AutoencoderDC with the official f32c32 geometry (6 stages: 32× down,
    32 latent channels) but 8–64 channels, saved as a local folder; None without diffusers."""
    try:
        from diffusers import AutoencoderDC
    except ImportError:
        return None
    torch.manual_seed(0)
    ch = (8, 8, 16, 16, 32, 64)
    vae = AutoencoderDC(in_channels=3, latent_channels=32, attention_head_dim=8, encoder_block_types=("ResBlock",) * 6,
                        decoder_block_types=("ResBlock",) * 6, encoder_block_out_channels=ch,
                        decoder_block_out_channels=ch, encoder_layers_per_block=(1,) * 6,
                        decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=((),) * 6,
                        decoder_qkv_multiscales=((),) * 6)
    vae.save_pretrained(folder)  # type: ignore[attr-defined]  # ModelMixin method, untyped in diffusers
    return folder


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An official geometry exported at fp32, with a small random DC-AE codec when diffusers is installed."""
    root = tmp_path_factory.mktemp("official")
    model = randomized(official_small_config(), seed=3)
    dcae = tiny_dcae(root / "dcae")
    manifest = export_model(model, root / "export", steps=STEPS, progress=False, quality=False, parity_photos=1,
                            dcae_path=str(dcae) if dcae else None)
    return {"model": model, "manifest": manifest, "folder": root / "export", "dcae": dcae}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A quick partial export (codec + token_embed) from a checkpoint folder, to copy and break."""
    root = tmp_path_factory.mktemp("small")
    model = randomized(get_preset("tiny"), seed=5)
    save_pretrained(model, root / "ckpt")
    export_model(root / "ckpt", root / "export", stages=["codec_encode", "token_embed", "codec_decode"],
                 progress=False, quality=False)
    return {"model": model, "folder": root / "export", "ckpt": root / "ckpt", "root": root}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- stage modules (torch only)

@pytest.mark.parametrize("solver", ["euler", "heun", "dpm++2m"])
def test_fused_ode_equals_host_integrate(solver: str) -> None:
    """Ode/OdeCfg (hoisted cond_embed, constant time embeddings, batched CFG) = sampling.integrate over the
    reference velocity, to fp32 rounding (1e-5 of the largest value: only the order of additions differs)."""
    model = randomized(get_preset("tiny"), seed=7)
    settings = SamplerSettings.from_config(model.config, solver=solver, steps=5)
    spec = stage_specs(model.config, steps=5, solver=solver)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((7, model.config.token_dim)).astype(np.float32)
    z = rng.standard_normal((7, model.config.decoder_dim)).astype(np.float32)
    z_u = rng.standard_normal((7, model.config.decoder_dim)).astype(np.float32)
    host = host_ode(TorchStages(model).velocity, settings)
    with torch.no_grad():
        fused = M.stage_module("ode", model, spec["ode"])(torch.from_numpy(noise), torch.from_numpy(z)).numpy()
        fused_cfg = M.stage_module("ode_cfg", model, spec["ode_cfg"])(
            torch.from_numpy(noise), torch.from_numpy(z), torch.from_numpy(z_u), torch.tensor([2.5])).numpy()
    for got, ref in ((fused, host(noise, z, None, 1.0)), (fused_cfg, host(noise, z, z_u, 2.5))):
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_stage_modules_equal_reference_methods() -> None:
    model = randomized(get_preset("tiny"), seed=8)
    cfg = model.config
    specs = stage_specs(cfg)
    mods = M.stage_modules(model, specs)
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.uniform(-1, 1, (3, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        latent = mods["codec_encode"](images)
        assert torch.equal(mods["codec_decode"](latent), images)
        ids = mods["tokenizer"](latent)
        assert torch.equal(ids, model.tokenize(latent))
        assert torch.equal(mods["token_embed"](ids), model.embed_ids(ids))
        tokens = torch.randn(3, cfg.num_tokens, cfg.token_dim)
        buffer = model.embed_ids(ids)
        mask = torch.from_numpy(rng.permutation(np.repeat([True, False], 32))[None].repeat(3, 0).copy())
        keep = torch.from_numpy(np.stack([np.concatenate([np.arange(64), 64 + np.flatnonzero(~m.numpy())])
                                          for m in mask]))
        torch.testing.assert_close(mods["mar_step"](tokens, buffer, keep), model.mar_step(tokens, mask, buffer),
                                   rtol=0, atol=0)


# ----------------------------------------------------------------------------- fp32 parity

def _check_parity(m: Manifest, model: V2Flow, seed: int, dcae: Path | None = None) -> None:
    """The export-time figures (fresh random inputs at every ``parity_cases`` size: batch / rows at min, 3 and
    max (capped), token counts from none to all-but-one known) are within tolerance, and an independent
    re-check on new inputs of other sizes agrees."""
    rng = np.random.default_rng(seed)
    codec = M.build_codec(model.config, dcae) if model.config.codec == "patch" or dcae else None
    for stage in m.stages:
        spec = m.spec(stage)
        recorded = m.parity["fp32"][stage]["random"]
        assert all(f["cases"] >= 3 for f in recorded.values()), (stage, recorded)
        other = {k: {"batch": 2, "rows": 5, "keep": lo + 5}[k] for k, (lo, _, _) in spec.dims.items()}
        session = ort_session(m.path(stage, "fp32"))
        module = M.stage_module(stage, model, spec, codec)

        def run(feeds: dict[str, np.ndarray], s: Any = session) -> list[np.ndarray]:
            return list(s.run(None, feeds))

        fresh = stage_parity(stage, spec, run, module,
                             {"random": [spec.sample_inputs(rng, **other)]}, gate=True)["random"]
        for name in spec.output_names:
            for fig in (recorded[name], fresh[name]):
                assert fig.get("max_rel", 0.0) <= FP32_MAX_REL and fig.get("mismatches", 0.0) == 0, (stage, fig)
                assert fig.get("ref_max", 1.0) > 0, f"{stage} output is all zeros: the test would prove nothing"


def test_tiny_fp32_graphs_match_pytorch(tiny: dict[str, Any]) -> None:
    m: Manifest = tiny["manifest"]
    assert set(m.files["fp32"]) == set(stage_specs(m.config))
    for stage, figs in m.parity["fp32"].items():
        assert set(figs) == {"random", "photo"}, stage      # both random and real-photo inputs were checked
    _check_parity(m, tiny["model"], seed=11)


def test_official_geometry_fp32_graphs_match_pytorch(official: dict[str, Any]) -> None:
    m: Manifest = official["manifest"]
    core = {"tokenizer", "token_embed", "mar_step", "velocity", "ode", "ode_cfg"}
    if official["dcae"] is None:
        assert set(m.stages) == core and any("codec stages not exported" in n for n in m.notes)
    else:   # DC-AE codec graphs too, and every stage was also checked on real photo crops
        assert set(m.stages) == core | {"codec_encode", "codec_decode"} | set(ONE_CALL_STAGES)
        assert all("photo" in m.parity["fp32"][s] for s in m.stages)
    _check_parity(m, official["model"], seed=12, dcae=official["dcae"])
    # symbolic dims stay symbolic in the graphs
    graph = onnx.load(str(m.path("mar_step")), load_external_data=False).graph
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert dims == [["batch", 64, 32], ["batch", 64, 768], ["batch", "keep"]]


def test_tokenizer_graph_gives_pytorch_ids_on_heldout_photos(tiny: dict[str, Any]) -> None:
    model, m = tiny["model"], tiny["manifest"]
    images = eval_crops(HELDOUT_PHOTOS, 64, 8, 0.5)
    latent = ort_session(m.path("codec_encode")).run(None, {"images": images})[0]
    ids = ort_session(m.path("tokenizer")).run(None, {"latent": latent})[0]
    with torch.no_grad():
        ref = model.tokenize(model_latent := M.stage_module("codec_encode", model, m.spec("codec_encode"))(
            torch.from_numpy(images))).numpy()
    assert model_latent.shape == latent.shape
    np.testing.assert_array_equal(ids, ref)


DEFAULT = Path(__file__).resolve().parents[1] / "v2flow_rt" / "assets" / "default"


@pytest.mark.skipif(not (DEFAULT / "model.safetensors").is_file(), reason="the bundled default model is not built yet")
def test_default_model_tokenizer_graph_ids_on_heldout_photos(tmp_path: Path) -> None:
    """On the trained default, ids equal PyTorch's except where the best two codes are tied (a trained
    codebook can hold near-duplicate codes; PyTorch itself flips those between batch sizes)."""
    from v2flow_rt.export.parity import TIE_EPS
    from v2flow_rt.reference.checkpoint import from_pretrained

    m = export_model("default", tmp_path / "export", stages=["codec_encode", "tokenizer"], progress=False,
                     quality=False)   # the export itself gates the photo crops it checks
    model = from_pretrained("default")
    images = eval_crops(HELDOUT_PHOTOS, 64, 8, 0.5)
    latent = ort_session(m.path("codec_encode")).run(None, {"images": images})[0]
    ids = ort_session(m.path("tokenizer")).run(None, {"latent": latent})[0]
    tokenizer = M.Tokenizer(model).eval()
    with torch.no_grad():
        sims = tokenizer.similarities(torch.from_numpy(latent))
    ref = sims.argmax(-1).numpy()
    top = sims.topk(2, dim=-1).values
    tied = ((top[..., 0] - top[..., 1]) <= TIE_EPS).numpy()
    assert not ((ids != ref) & ~tied).any()
    picked = torch.gather(sims, -1, torch.from_numpy(ids)[..., None])[..., 0]
    assert float((sims.max(-1).values - picked).max()) <= TIE_EPS     # any flip picks an equally close code


class _Cancel(torch.nn.Module):
    """y = (x + 1e5) − 1e5: fp32 keeps x only to ~4e-3, fp64 exactly (an ill-conditioned stage)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1e5) - 1e5


def test_fp32_bound_widens_only_where_pytorch_fp32_itself_is_that_far_from_fp64() -> None:
    from v2flow_rt.export.parity import FP64_FACTOR, gate_fp32, needs_bounds, roundoff_bounds, torch_outputs
    from v2flow_rt.stages import StageSpec, TensorSpec

    spec = StageSpec(name="cancel", inputs=(TensorSpec("x", "float32", ("rows", 8)),),
                     outputs=(TensorSpec("y", "float32", ("rows", 8)),), dims={"rows": (1, 4, 8)})
    feeds = [{"x": np.random.default_rng(i).uniform(0.5, 1.0, (4, 8)).astype(np.float32)} for i in range(2)]
    own = max(float(np.abs(((f["x"] + np.float32(1e5)) - np.float32(1e5)) - f["x"].astype(np.float64)).max()
                    / np.abs(f["x"]).max()) for f in feeds)
    assert own > 10 * FP32_MAX_REL                                      # fp32 really is that far off here
    cancel = _Cancel()
    bound = roundoff_bounds(cancel, spec, feeds, [torch_outputs(cancel, spec, f) for f in feeds])["y"]
    assert bound == pytest.approx(FP64_FACTOR * own, rel=1e-6)
    as_pytorch = {"max_abs": own, "max_rel": own}
    assert needs_bounds([as_pytorch]) and not needs_bounds([{"max_abs": 0.0, "max_rel": 0.0}])
    gate_fp32("cancel", "y", as_pytorch, "test", bound)                 # as accurate as PyTorch fp32: passes
    with pytest.raises(ParityError, match="fp64"):
        gate_fp32("cancel", "y", {"max_abs": 0.05, "max_rel": 0.05}, "test", bound)   # a wrong graph still fails
    with pytest.raises(ParityError, match=r"<= 0\.0001"):
        gate_fp32("cancel", "y", as_pytorch, "test")                    # without the fp64 measurement: 1e-4
    # a well-conditioned stage is not widened
    linear = torch.nn.Linear(8, 8)
    assert roundoff_bounds(linear, spec, feeds, [torch_outputs(linear, spec, f) for f in feeds])["y"] == FP32_MAX_REL


def test_default_model_guided_ode_exports_within_its_fp32_bound(tmp_path: Path) -> None:
    """The bundled model's guided ODE is ill-conditioned in fp32 (PyTorch fp32 vs fp64 ~4e-4 on photo
    inputs at guidance 3); its export must pass parity, and any widened bound is recorded."""
    m = export_model("default", tmp_path / "export", stages=["ode_cfg"], progress=False, quality=False)
    figs = [f for kind in m.parity["fp32"]["ode_cfg"].values() for f in kind.values()]
    assert figs and all(f["max_rel"] <= max(f.get("bound", FP32_MAX_REL), FP32_MAX_REL) for f in figs)
    assert all(f.get("bound", FP32_MAX_REL) < 1e-2 for f in figs)


# ----------------------------------------------------------------------------- precisions and quality

def test_precisions_notes_and_quality(tiny: dict[str, Any]) -> None:
    m: Manifest = tiny["manifest"]
    assert m.precisions == list(PRECISIONS)
    for precision in PRECISIONS:
        for stage in m.stages:
            assert m.path(stage, precision).is_file()
    fp16 = m.precision_notes["fp16"]
    assert "LayerNormalization" in fp16["mar_step"]["fp32_op_types"] and "fp32_nodes" in fp16["mar_step"]
    assert fp16["codec_encode"]["method"].startswith("copied from fp32")
    for precision in ("int8", "int8-qdq"):
        tok = m.precision_notes[precision]["tokenizer"]
        assert tok["exclusions_tried"] and tok["id_agreement_calibration"] >= ID_AGREEMENT_MIN, tok
        assert all(t["id_agreement"] < ID_AGREEMENT_MIN for t in tok["exclusions_tried"][:-1])   # cheapest rung kept
    # dynamic int8 of a float-output graph: the fastest scheme within the bound of per-channel weights' SNR,
    # as recorded; the tokenizer's ids keep per-channel scales (its exclusion ladder)
    for stage, notes in m.precision_notes["int8"].items():
        scheme = notes.get("int8_scheme")
        if stage in ("tokenizer", "tokenize") or "copied from fp32" in notes["method"]:
            assert scheme is None and "per_channel=False" not in notes["method"], (stage, notes)
            continue
        best = scheme["snr_db"]["per-channel"]
        tried = [name for name in scheme["snr_db"] if name != "per-channel"]   # fastest first, up to the one kept
        accepted = [name for name in tried if scheme["snr_db"][name] >= best - INT8_MAX_LOSS_DB]
        assert accepted == ([] if scheme["chosen"] == "per-channel" else [scheme["chosen"]]), (stage, scheme)
        assert scheme["chosen"] == "per-channel" or tried[-1] == scheme["chosen"], (stage, scheme)
        assert f"per_channel={scheme['chosen'] == 'per-channel'}" in notes["method"], (stage, notes)
    # qdq graphs hold QuantizeLinear/DequantizeLinear; dynamic int8 graphs hold integer matmuls
    ops = {p: {n.op_type for n in onnx.load(str(m.path("velocity", p))).graph.node} for p in ("int8", "int8-qdq")}
    assert "DequantizeLinear" in ops["int8-qdq"] and "MatMulInteger" in ops["int8"]
    q = m.quality
    assert set(q) == set(PRECISIONS)
    assert q["fp32"]["token_agreement_pytorch"] == 1.0 and abs(q["fp32"]["psnr"] - q["fp32"]["psnr_pytorch"]) < 0.01
    assert q["fp32"]["token_mismatches_pytorch_untied"] == 0
    assert q["fp32"]["images"] == 16
    # The README figures come from the trained default; on this random model the gates hold as well.
    assert abs(q["fp16"]["psnr_delta_vs_fp32"]) <= 0.1
    assert abs(q["int8"]["psnr_delta_vs_fp32"]) <= 1.0 and abs(q["int8-qdq"]["psnr_delta_vs_fp32"]) <= 1.0


def test_fp16_keeps_large_activations_in_fp32(tmp_path: Path) -> None:
    """Measured blocking: a MatMul whose output reaches 2e4 and a Mul that takes it to 8e4 (> fp16 max 65504)
    stay fp32, and so do the tensors between them: the converter alone would still pass them through fp16
    casts between the blocked nodes, turning 8e4 into inf."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    w = np.full((4, 4), 5000.0, dtype=np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="big_matmul"),
             helper.make_node("Mul", ["y", "four"], ["y4"], name="overflowing_mul"),
             helper.make_node("Mul", ["y4", "small"], ["out"], name="rescale")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(np.array([4.0], np.float32), "four"),
                               numpy_helper.from_array(np.array([1e-3], np.float32), "small")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "g.onnx")
    x = np.ones((2, 4), dtype=np.float32)
    notes = convert_fp16(tmp_path / "g.onnx", tmp_path / "g16.onnx", [{"x": x}])
    assert set(notes["fp32_nodes"]) == {"big_matmul", "overflowing_mul", "rescale"}
    assert "max |x| 2e+04" in notes["fp32_nodes"]["big_matmul"] and notes["fp16_round_trips_removed"] == 3
    out = ort_session(tmp_path / "g16.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(out, np.full((2, 4), 80.0), rtol=1e-6)
    blocked_only = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(notes["fp32_nodes"]))
    onnx.save(blocked_only, tmp_path / "blocked_only.onnx")
    assert np.isinf(ort_session(tmp_path / "blocked_only.onnx").run(None, {"x": x})[0]).all()


def test_fp16_time_embedding_argument_stays_fp32(tiny: dict[str, Any]) -> None:
    """sin/cos of σ·1000: the nodes computing the argument from the fp32 input t are kept fp32."""
    kept = tiny["manifest"].precision_notes["fp16"]["velocity"]["fp32_nodes"]
    assert any("argument of Sin" in why or "argument of Cos" in why for why in kept.values()), kept


# ----------------------------------------------------------------------------- atomic export

def test_failed_export_leaves_previous_export_untouched(small: dict[str, Any], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = _copy(small["folder"], tmp_path / "export")
    before = _snapshot(out)
    import v2flow_rt.export.folder as folder_mod

    real = folder_mod.export_graph
    calls: list[str] = []

    def flaky(module: Any, spec: Any, path: Path, *args: Any, **kwargs: Any) -> Any:
        calls.append(spec.name)
        if len(calls) == 2:
            raise ExportError(f"stage {spec.name!r}: simulated failure")
        return real(module, spec, path, *args, **kwargs)

    monkeypatch.setattr(folder_mod, "export_graph", flaky)
    stages = ["codec_encode", "token_embed", "codec_decode"]
    with pytest.raises(ExportError, match="simulated failure"):
        export_model(small["ckpt"], out, stages=stages, progress=False, quality=False)
    assert _snapshot(out) == before
    # a fresh target gets nothing at all, and no temporary folder is left behind
    calls.clear()
    with pytest.raises(ExportError):
        export_model(small["ckpt"], tmp_path / "fresh", stages=stages, progress=False, quality=False)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_interrupt_and_parity_failure_leave_no_manifest(small: dict[str, Any], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import v2flow_rt.export.folder as folder_mod

    real = folder_mod.export_graph

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(folder_mod, "export_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(small["ckpt"], tmp_path / "a", stages=["token_embed"], progress=False, quality=False)

    def wrong_graph(module: Any, spec: Any, path: Path, *args: Any, **kwargs: Any) -> Any:
        # export a different model's token_embed: the graph is valid, but not this model's
        return real(M.TokenEmbed(randomized(get_preset("tiny"), seed=99)).eval(), spec, path, *args, **kwargs)

    monkeypatch.setattr(folder_mod, "export_graph", wrong_graph)
    with pytest.raises(ParityError, match=r"stage 'token_embed', output 'buffer'"):
        export_model(small["ckpt"], tmp_path / "b", stages=["token_embed"], progress=False, quality=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_refuses_bad_arguments_and_foreign_folders(small: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"unknown precision.*fp8.*fp32, fp16, int8, int8-qdq"):
        export_model(small["ckpt"], tmp_path / "x", precisions=("fp8",))
    with pytest.raises(ExportError, match="opset 17"):
        export_model(small["ckpt"], tmp_path / "x", opset=17)
    with pytest.raises(ExportError, match="unknown stage"):
        export_model(small["ckpt"], tmp_path / "x", stages=["decoder"])
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not mine")
    with pytest.raises(ExportError, match="not an export folder"):
        export_model(small["ckpt"], foreign, stages=["codec_encode"], progress=False)
    assert (foreign / "holiday.jpg").read_bytes() == b"not mine"


# ----------------------------------------------------------------------------- broken artifacts, validate

def test_broken_artifacts_give_clear_errors(small: dict[str, Any], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    missing = _copy(small["folder"], tmp_path / "missing")
    (missing / "token_embed.fp32.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"token_embed\.fp32\.onnx is missing"):
        validate_folder(missing)
    truncated = _copy(small["folder"], tmp_path / "truncated")
    graph = truncated / "token_embed.fp32.onnx"
    graph.write_bytes(graph.read_bytes()[:4096])
    assert main(["validate", str(truncated)]) == 2
    assert "token_embed.fp32.onnx is corrupted or truncated" in capsys.readouterr().err
    flipped = _copy(small["folder"], tmp_path / "flipped")
    data = bytearray((flipped / "codec_encode.fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / "codec_encode.fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"codec_encode\.fp32\.onnx is corrupted"):
        Manifest.load(flipped)
    m = Manifest.load(small["folder"])
    with pytest.raises(ArtifactError, match=r"precision 'int4' was not exported.*holds fp32"):
        m.path("token_embed", "int4")
    assert main(["export", str(small["ckpt"]), "--out", str(tmp_path / "x"), "--precision", "fp32,int4"]) == 2
    assert "unknown precision" in capsys.readouterr().err


def test_manifest_from_another_checkpoint(small: dict[str, Any], tmp_path: Path) -> None:
    ckpt = _copy(small["ckpt"], tmp_path / "ckpt")
    folder = tmp_path / "export"
    export_model(ckpt, folder, stages=["token_embed"], progress=False, quality=False)
    save_pretrained(randomized(get_preset("tiny"), seed=42), ckpt)     # the checkpoint is retrained in place
    with pytest.raises(ArtifactError, match="manifest is from another checkpoint"):
        validate_folder(folder)
    shutil.rmtree(ckpt)                                                 # unreachable: fp32 graphs are the reference
    report = validate_folder(folder)
    assert report.ok and report.reference == "fp32 ONNX graphs"
    assert any("not reachable" in n for n in report.notes)


def test_validate_folder_detects_a_wrong_but_consistent_graph(small: dict[str, Any], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy(small["folder"], tmp_path / "export")
    report = validate_folder(folder, seed=0)
    assert report.ok and report.reference.startswith("pytorch"), report.to_text()
    # scale one weight of the graph and re-hash it into the manifest: only parity can catch this
    path = folder / "token_embed.fp32.onnx"
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = onnx.numpy_helper.to_array(init) * np.float32(1.01)
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))
    data = json.loads((folder / MANIFEST_NAME).read_text())
    from v2flow_rt.manifest import file_sha256

    data["sha256"][path.name] = file_sha256(path)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    report = validate_folder(folder, seed=0)
    assert not report.ok and {r["stage"] for r in report.failures} == {"token_embed"}
    with pytest.raises(ParityError, match="token_embed"):
        report.raise_for_failure()
    assert main(["validate", str(folder), "--json"]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["ok"] is False and "check(s) failed" in out.err


def test_validate_folder_every_precision(tiny: dict[str, Any]) -> None:
    report = validate_folder(tiny["folder"], seed=1)
    assert report.ok, report.to_text()
    seen = {(r["stage"], r["precision"]) for r in report.rows}
    assert seen == {(s, p) for s in tiny["manifest"].stages for p in PRECISIONS}
    assert any("TensorRT runner skipped" in n for n in report.notes)
    assert report.summary().startswith("all ") and "pytorch" in report.summary()


def test_large_graphs_use_external_data(small: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the size limit (lowered here to 1 kB; really ~1.8 GB, e.g. the official large resampler's
    32000×32000 readout) weights go to ``{graph}.data``: hashed, checked, converted, validated like the rest."""
    import v2flow_rt.export.onnx as onnx_mod
    import v2flow_rt.export.precision as precision_mod

    monkeypatch.setattr(onnx_mod, "STREAMED_WEIGHT_BYTES", 1000)
    monkeypatch.setattr(precision_mod, "EXTERNAL_DATA_BYTES", 1000)
    folder = tmp_path / "export"
    m = export_model(small["ckpt"], folder, precisions=("fp32", "int8"), stages=["token_embed"], progress=False,
                     quality=False)
    for precision in ("fp32", "int8"):
        data = folder / f"token_embed.{precision}.onnx.data"
        assert data.is_file() and data.name in m.sha256
        assert (folder / f"token_embed.{precision}.onnx").stat().st_size < data.stat().st_size
    assert validate_folder(folder).ok
    data = folder / "token_embed.fp32.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"token_embed\.fp32\.onnx\.data is corrupted or truncated"):
        Manifest.load(folder)


def test_graphs_over_the_streaming_size_keep_external_data_and_still_convert(
        small: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 256 MiB of weights (lowered here to 1 kB; at full size ``mar_step`` and the one-call
    ``detokenize``) the fp32 graph keeps its weights in external data, so that the Transpose fold (the
    weights the one call's unrolled iterations share) and the GELU reorder stream them; under ~1.8 GB the
    precisions still load it whole: fp16 converts, dynamic int8 quantizes every weight matmul (Gemm
    included), and both are written inline."""
    import v2flow_rt.export.onnx as onnx_mod

    monkeypatch.setattr(onnx_mod, "STREAMED_WEIGHT_BYTES", 1000)
    folder = tmp_path / "export"
    stages = ["codec_encode", "tokenizer", "token_embed", "mar_step", "ode", "codec_decode", "detokenize"]
    m = export_model(small["ckpt"], folder, precisions=("fp32", "fp16", "int8"), stages=stages, progress=False,
                     quality=False, calib_images=4)
    for stage in ("mar_step", "ode", "detokenize"):
        assert (folder / f"{stage}.fp32.onnx.data").is_file()
        assert not any((folder / f"{stage}.{p}.onnx.data").exists() for p in ("fp16", "int8"))
        assert m.precision_notes["fp16"][stage]["method"].startswith("onnxruntime.transformers.float16")
        assert m.precision_notes["int8"][stage]["method"].startswith("quantize_dynamic")
        fp32 = onnx.load(str(folder / f"{stage}.fp32.onnx"), load_external_data=False).graph
        inits = {t.name for t in fp32.initializer}
        assert not [n.name for n in fp32.node if n.op_type == "Transpose" and n.input[0] in inits]
        int8 = onnx.load(str(folder / f"{stage}.int8.onnx")).graph
        weights = {t.name for t in int8.initializer if len(t.dims) == 2}
        assert not [n.name for n in int8.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    mar = onnx.load(str(folder / "mar_step.fp32.onnx"), load_external_data=False).graph
    scalars = {t.name: onnx.numpy_helper.to_array(t).reshape(-1) for t in mar.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(t.dims)) == 1}
    halves = {name for name, v in scalars.items() if v[0] == 0.5}
    erfs = [n for n in mar.node if n.op_type == "Erf"]
    gelu_products = [n for n in mar.node if n.op_type == "Mul" and set(n.input) & halves]
    assert erfs and len(gelu_products) == len(erfs)         # the 0.5 comes last: (x·(1 + erf))·0.5
    producer = {o: n.op_type for n in mar.node for o in n.output}
    assert all(producer.get(next(i for i in n.input if i not in halves)) == "Mul" for n in gelu_products)
    assert validate_folder(folder).ok


def test_tensorrt_runner_in_validation(small: dict[str, Any]) -> None:
    """With TensorRT 11 installed, validate_folder adds a TrtRunner per graph (strongly typed: the graph's
    precision is what TensorRT builds) and holds it to the same fp32 tolerance."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:
        pytest.skip(f"tensorrt does not import here ({type(exc).__name__}); TensorRT is not installable on the "
                    f"development/CI machines")
    report = validate_folder(small["folder"], seed=0)
    trt_rows = [r for r in report.rows if r["runner"] == "trt"]
    assert trt_rows and all(r["ok"] for r in trt_rows), report.to_text()


def test_an_export_of_the_loop_stages_alone_records_its_quality(tmp_path: Path) -> None:
    """A full-size export leaves the one-call graphs out (``--stages``) to fit in memory; its quality
    figures are still measured through the stage loop (no velocity graph needed: the fused ODE runs)."""
    stages = ["codec_encode", "tokenizer", "token_embed", "mar_step", "ode", "codec_decode"]
    m = export_model("default", tmp_path / "export", stages=stages, progress=False, calib_images=8,
                     quality_per_image=2)
    fig = m.quality["fp32"]
    assert fig["images"] == 4 and fig["token_agreement_pytorch"] == 1.0 and "one_call" not in fig
    assert abs(fig["psnr"] - fig["psnr_pytorch"]) < 0.01 and fig["psnr"] > 15, fig
    assert not any("quality figures not measured" in n for n in m.notes)
    m = export_model("default", tmp_path / "no_ode", stages=stages[:-2] + ["codec_decode"], progress=False,
                     calib_images=8)
    assert not m.quality and any("need the stages" in n and "ode" in n for n in m.notes), m.notes


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_gelus_are_reordered_for_fusion_with_the_same_values(tmp_path: Path, external: bool) -> None:
    """The exporter's exact GELU, x·(0.5·(1 + erf(x/√2))), is rewritten as (x·(1 + erf))·0.5: ONNX Runtime
    then fuses it (no Erf left in its optimized graph; before: one per GELU). Unfused the outputs are bit for
    bit the same; fused, within float32 round-off. Also in a graph whose weights live in external data."""
    import onnxruntime as ort

    from v2flow_rt.export.onnx import reorder_gelus

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16),
                              torch.nn.GELU()).eval()
    path = tmp_path / "mlp.onnx"
    with torch.no_grad():
        torch.onnx.export(mlp, (torch.randn(5, 16),), dynamo=True, opset_version=18,
                          input_names=["x"], output_names=["y"]).save(str(path), external_data=external)
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)

    def run_and_erfs(p: Path, optimize: bool = True) -> tuple[np.ndarray, int]:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        y = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        erfs = sum(n.op_type == "Erf" for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
        return y, erfs

    before, erfs_before = run_and_erfs(path)
    plain_before, _ = run_and_erfs(path, optimize=False)
    assert erfs_before == 2
    assert reorder_gelus(path) == 2
    after, erfs_after = run_and_erfs(path)
    plain_after, _ = run_and_erfs(path, optimize=False)
    assert erfs_after == 0
    np.testing.assert_array_equal(plain_after, plain_before)         # the rewrite itself is exact
    # the fused kernel rounds its own erf: float32 round-off (measured 1.1e-6 of the largest value)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    assert reorder_gelus(path) == 0                       # nothing left to rewrite
    assert (tmp_path / "mlp.onnx.data").exists() == external


@pytest.mark.parametrize("rows", [False, True], ids=["all-rows", "query-rows"])
def test_attention_is_written_out_for_the_graph_and_equals_sdpa(rows: bool, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Exported, attention is matmul-softmax-matmul: fewer nodes than the exporter's SDPA (its key transpose
    comes with shape arithmetic), with SDPA's values (eager PyTorch's kernel, fresh inputs, 1e-5: float
    rounding of a 16-wide dot product)."""
    from torch.export import Dim

    from v2flow_rt.reference.transformer import Attention

    torch.manual_seed(0)
    attn = Attention(64, 4, 0.0, 0.0).eval()

    class Wrap(torch.nn.Module):
        def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return attn(x, r if rows else None)

    x, r = torch.randn(2, 10, 64), torch.tensor([[1, 4, 7], [0, 2, 9]])
    batch = Dim("batch", min=1, max=8)

    def export(name: str) -> onnx.ModelProto:
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(Wrap(), (x, r), dynamo=True, dynamic_shapes={"x": {0: batch}, "r": {0: batch}},
                          input_names=["x", "r"]).save(str(path))
        return onnx.load(str(path))

    written = export("written")
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: False)   # the SDPA path, as eager runs it
    sdpa = export("sdpa")
    assert len(written.graph.node) <= len(sdpa.graph.node) - 5, (len(written.graph.node), len(sdpa.graph.node))
    x2, r2 = torch.randn(3, 10, 64), torch.tensor([[9, 3, 0], [5, 6, 7], [2, 1, 8]])
    with torch.no_grad():
        want = Wrap()(x2, r2).numpy()
    session = ort_session(tmp_path / "written.onnx")
    feeds = {"x": x2.numpy(), "r": r2.numpy()}
    got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_row_scatter_is_one_scatternd_in_the_graph_with_scatters_values(tmp_path: Path) -> None:
    """Exported, ``scatter_rows`` is an index_put (``ScatterND`` copying whole rows) instead of the eager
    ``scatter`` (``ScatterElements``, an index per value); the values are the same copy (exact), at batch
    sizes other than the traced one and with rows in any order."""
    from torch.export import Dim

    from v2flow_rt.reference.transformer import scatter_rows

    class Wrap(torch.nn.Module):
        def forward(self, base: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return scatter_rows(base, rows, values)

    batch, m = Dim("batch", min=1, max=8), Dim("m", min=1, max=12)
    path = tmp_path / "scatter.onnx"
    torch.onnx.export(Wrap(), (torch.randn(2, 12, 16), torch.tensor([[3, 0, 7], [1, 11, 4]]), torch.randn(2, 3, 16)),
                      dynamo=True,
                      dynamic_shapes={"base": {0: batch}, "rows": {0: batch, 1: m}, "values": {0: batch, 1: m}},
                      input_names=["base", "rows", "values"]).save(str(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "ScatterND" in ops and "ScatterElements" not in ops, ops
    gen = torch.Generator().manual_seed(4)
    session = ort_session(path)
    for b, k in ((1, 5), (3, 12), (2, 1)):
        base, values = torch.randn(b, 12, 16, generator=gen), torch.randn(b, k, 16, generator=gen)
        rows = torch.stack([torch.randperm(12, generator=gen)[:k] for _ in range(b)])
        want = base.scatter(1, rows[..., None].expand(-1, -1, 16), values).numpy()
        got = session.run(None, {"base": base.numpy(), "rows": rows.numpy(), "values": values.numpy()})[0]
        np.testing.assert_array_equal(got, want)

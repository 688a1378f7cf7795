"""One-call graphs: the whole tokenize and the whole detokenize as one graph each.

References: the numpy sampling loop (over the reference model's torch stages, and over the exported stage
graphs on the same engine) fed the same ids, orders and noise; the stage path's ids. Models have every
zero-initialised layer randomised (a fresh model's velocity output is exactly zero)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from v2flow_rt.config import get_preset
from v2flow_rt.errors import ArtifactError, BackendUnavailable
from v2flow_rt.export.folder import export_model
from v2flow_rt.export.parity import FP32_MAX_REL
from v2flow_rt.export.validate import validate_folder
from v2flow_rt.pipeline import V2FlowPipeline
from v2flow_rt.reference.checkpoint import randomize_zero_layers
from v2flow_rt.reference.codecs import build_codec
from v2flow_rt.reference.model import V2Flow
from v2flow_rt.reference.stage_modules import stage_module
from v2flow_rt.sampling import SamplerSettings, seeded_randomness, tokens_per_iteration
from v2flow_rt.stages import stage_specs

STEPS = 4


def _model(seed: int = 0, **overrides: Any) -> V2Flow:
    torch.manual_seed(seed)
    return randomize_zero_layers(V2Flow(get_preset("tiny", **overrides)).eval(), seed + 1)


@pytest.mark.parametrize("overrides", [{}, {"cfg_scale": 3.0},
                                       {"cfg_scale": 2.5, "cfg_mode": "mar", "cfg_schedule": "linear"}],
                         ids=["unguided", "official-cfg", "mar-cfg-linear"])
def test_detokenize_module_equals_the_loop_over_the_reference_stages(overrides: dict[str, Any]) -> None:
    """The one-call module against ``sampling.sample_tokens`` over the reference model (then the codec),
    with the orders and noise of the same seed: 1e-5 of the largest value (only summation order differs)."""
    model = _model(**overrides, temperature=0.8)
    spec = stage_specs(model.config, steps=STEPS)["detokenize"]
    module = stage_module("detokenize", model, spec)
    settings = SamplerSettings.from_config(model.config, steps=STEPS)
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 4096, (3, 64)))
    orders, noise = seeded_randomness(9, 3, 64, 192, settings.num_iter)
    args = [ids, torch.from_numpy(orders), torch.from_numpy(noise)]
    if settings.guided:
        args.append(torch.tensor([settings.cfg_scale]))
    with torch.no_grad():
        got = module(*args).numpy()
        tokens = model.sample_tokens(model.embed_ids(ids), settings, seed=9)
        ref = build_codec(model.config).decode(model.tokens_to_latent(tokens)).numpy()
    assert np.abs(ref).max() > 0.1
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.fixture(scope="module")
def guided(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("one_call")
    model = _model(3, cfg_scale=3.0, temperature=1.0)
    m = export_model(model, root / "export", precisions=("fp32", "int8"), steps=STEPS, progress=False,
                     calib_images=8, quality_per_image=4)
    return {"model": model, "manifest": m, "folder": root / "export", "root": root}


def test_manifest_records_what_the_graph_bakes_in(guided: dict[str, Any]) -> None:
    attrs = guided["manifest"].stages["detokenize"]["attrs"]
    assert {k: attrs[k] for k in ("num_iter", "steps", "solver", "shift", "cfg_mode", "temperature", "guided")} == \
        {"num_iter": 4, "steps": STEPS, "solver": "dpm++2m", "shift": 3.0, "cfg_mode": "official",
         "temperature": 1.0, "guided": True}
    assert attrs["tokens_per_iteration"] == tokens_per_iteration(64, 4) == [5, 14, 21, 24]
    names = [t[0] for t in guided["manifest"].stages["detokenize"]["inputs"]]
    assert names == ["ids", "orders", "noise", "cfg_scale"]
    q = guided["manifest"].quality
    assert q["fp32"]["one_call"]["psnr_vs_loop"] > 80 and q["fp32"]["one_call"]["token_agreement_with_stage_path"] == 1
    assert "one_call" in q["int8"]


def test_int8_graphs_quantize_every_weight_matmul(guided: dict[str, Any]) -> None:
    """The exporter writes a Linear shared by the unrolled iterations (and one on a 3-D input) as
    MatMul(x, Transpose(W)); with the weight folded (``export.large.fold_constant_transposes``) every weight
    matmul is quantized, as in the stage graphs; attention's activation × activation matmuls too where the
    export's measured int8 scheme says so (``int8_scheme``), else they stay fp32."""
    import onnx

    for stage in ("detokenize", "mar_step", "ode"):
        fp32 = onnx.load(str(guided["manifest"].path(stage, "fp32")))
        int8 = onnx.load(str(guided["manifest"].path(stage, "int8")))
        weights = {t.name for t in fp32.graph.initializer}
        assert not [n for n in fp32.graph.node if n.op_type == "Transpose" and n.input[0] in weights], stage
        weight_matmuls = [n for n in fp32.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
        assert weight_matmuls, stage
        int8_weights = {t.name for t in int8.graph.initializer}
        left = [n.name for n in int8.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in int8_weights]
        assert not left, (stage, left)
        activation = [n for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
        scheme = guided["manifest"].precision_notes["int8"][stage]["int8_scheme"]["chosen"]
        expected = len(weight_matmuls) + (len(activation) if "activation matmuls" in scheme else 0)
        assert sum(n.op_type == "MatMulInteger" for n in int8.graph.node) == expected, (stage, scheme)
        assert sum(n.op_type == "MatMul" for n in int8.graph.node) == len(activation) - (expected - len(weight_matmuls))


def test_fused_odes_split_their_modulations_once_per_group(guided: dict[str, Any]) -> None:
    """The modulation matmul's rows are laid out (row, σ), so one Split of 2-D pieces gives every chunk of
    every σ of a group: in the exported graphs one Split per group of evaluations per solve, with (3·depth
    + 2) outputs per σ of the group, and none per σ (the (σ, row) layout split the block by σ, then each σ
    by chunk)."""
    import onnx

    from v2flow_rt.sampling.solvers import evaluated_sigmas, sigma_grid

    model, m = guided["model"], guided["manifest"]
    chunks = 3 * model.config.flow_depth + 2
    attrs = m.stages["detokenize"]["attrs"]
    for stage, solves in (("detokenize", attrs["num_iter"]), ("ode_cfg", 1), ("ode", 1)):
        a = m.stages[stage]["attrs"]
        evals = len(evaluated_sigmas(a["solver"], sigma_grid(a["steps"], a["shift"])))
        module = stage_module(stage, model, m.spec(stage))
        group = module.ode.group if stage == "detokenize" else module.group
        sizes = [min(group, evals - first) * chunks for first in range(0, evals, group)]
        graph = onnx.load(str(m.path(stage, "fp32"))).graph
        splits = sorted(len(n.output) for n in graph.node if n.op_type == "Split" and len(n.output) >= chunks)
        assert splits == sorted(sizes * solves), (stage, group, evals)


def test_one_call_equals_the_loop_on_the_same_engine(guided: dict[str, Any]) -> None:
    pipe = V2FlowPipeline.from_pretrained(guided["folder"], backend="ort")
    ids = np.random.default_rng(5).integers(0, 4096, (3, 64))
    kw = {"steps": STEPS, "seed": 11, "output": "float", "cfg": 2.0}
    one, loop = pipe.detokenize(ids, one_call=True, **kw), pipe.detokenize(ids, one_call=False, **kw)
    assert np.abs(loop).max() > 0.1
    assert np.abs(one - loop).max() <= FP32_MAX_REL * np.abs(loop).max()
    # explicit orders + noise through the graph = the seeded path
    orders, noise = seeded_randomness(11, 3, 64, 192, 4)
    np.testing.assert_array_equal(pipe.detokenize(ids, one_call=True, orders=orders, noise=noise, **kw), one)
    images = np.random.default_rng(6).uniform(-1, 1, (5, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(pipe.tokenize(images, one_call=True), pipe.tokenize(images, one_call=False))


def test_pipeline_prefers_one_call_when_the_settings_match(guided: dict[str, Any]) -> None:
    pipe = V2FlowPipeline.from_pretrained(guided["folder"], backend="ort")
    calls: list[str] = []
    real = pipe.engine.run

    def counting(stage: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(stage)
        return real(stage, feeds)

    pipe.engine.run = counting  # type: ignore[method-assign]
    ids = np.random.default_rng(1).integers(0, 4096, (2, 64))
    pipe.detokenize(ids, steps=STEPS, seed=0)
    assert calls == ["detokenize"]                       # one call for the whole batch
    calls.clear()
    pipe.detokenize(ids, steps=STEPS + 1, seed=0)        # other settings: the loop
    assert "detokenize" not in calls and calls.count("mar_step") == 4
    with pytest.raises(ArtifactError, match=r"baked settings differ .*'steps': \(4, 5\)"):
        pipe.detokenize(ids, steps=STEPS + 1, one_call=True)
    with pytest.raises(ArtifactError, match=r"'guided': \(True, False\)"):
        pipe.detokenize(ids, steps=STEPS, cfg=1.0, one_call=True)


def test_the_cli_decodes_an_export_folder_on_onnx_runtime_without_being_told(guided: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    """What a user types after ``export --precision fp32,int8``: no ``--backend``, ``--precision int8``
    (a precision only ONNX Runtime has). The export folder makes ONNX Runtime the default, and the image is
    the int8 one call's (``--backend ort``), not fp32's."""
    from PIL import Image

    from v2flow_rt.cli import main

    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(3).integers(0, 4096, (1, 64)))
    base = ["detokenize", str(ids), "--model", str(guided["folder"]), "--steps", str(STEPS), "--seed", "2"]
    for name, extra in (("auto", []), ("ort", ["--backend", "ort"]), ("fp32", ["--precision", "fp32"])):
        precision = [] if name == "fp32" else ["--precision", "int8"]
        assert main([*base, *precision, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
    auto, ort, fp32 = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("auto", "ort", "fp32"))
    assert auto.std() > 1.0                                  # an image, not a blank
    np.testing.assert_array_equal(auto, ort)
    assert np.abs(auto - fp32).max() > 0                     # int8 did run: not the fp32 graph's image


def test_validate_checks_one_call_against_the_stage_path(guided: dict[str, Any]) -> None:
    report = validate_folder(guided["folder"], seed=4)
    rows = {(r["stage"], r["precision"], r["runner"]): r for r in report.rows}
    assert rows[("detokenize", "fp32", "vs-loop")]["ok"] and rows[("tokenize", "fp32", "vs-stages")]["ok"]
    assert ("detokenize", "int8", "vs-loop") in rows and ("detokenize", "fp32", "pytorch") not in rows
    assert report.ok, report.to_text()


def test_an_export_of_the_one_call_graphs_alone_serves_both_verbs(guided: dict[str, Any]) -> None:
    folder = guided["root"] / "only"
    export_model(guided["model"], folder, stages=["tokenize", "detokenize"], steps=STEPS, progress=False,
                 quality=False)
    pipe = V2FlowPipeline.from_pretrained(folder, backend="ort")
    full = V2FlowPipeline.from_pretrained(guided["folder"], backend="ort")
    images = np.random.default_rng(7).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    ids = pipe.tokenize(images)
    np.testing.assert_array_equal(ids, full.tokenize(images, one_call=False))
    assert pipe.detokenize(ids, steps=STEPS, seed=1).shape == (2, 64, 64, 3)
    with pytest.raises(ArtifactError, match="baked settings differ"):
        pipe.detokenize(ids, steps=STEPS + 2)            # no loop stages to fall back on: say why


def test_cuda_graph_mode_needs_the_cuda_provider(guided: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="CUDA graphs need the cuda provider"):
        V2FlowPipeline.from_pretrained(guided["folder"], backend="ort", cuda_graph=True)


def test_cuda_graph_replay_on_a_gpu(guided: dict[str, Any]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with a CUDA device is not installable on the development/CI machines")
    pipe = V2FlowPipeline.from_pretrained(guided["folder"], backend="ort-cuda", cuda_graph=True)
    ids = np.random.default_rng(2).integers(0, 4096, (2, 64))
    a = pipe.detokenize(ids, steps=STEPS, seed=0, output="float")
    b = pipe.detokenize(ids, steps=STEPS, seed=0, output="float")     # the replay
    ref = V2FlowPipeline.from_pretrained(guided["folder"], backend="ort").detokenize(ids, steps=STEPS, seed=0,
                                                                                     output="float")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - ref).max() <= 1e-3 * np.abs(ref).max()


def test_an_engine_releases_a_session_and_loads_it_again(guided: dict[str, Any]) -> None:
    """Quality and validation drop each tokenizer session before loading the next (a full-size model's
    readout is 4 GB a graph); a released stage loads again on its next run, with the same result."""
    pipe = V2FlowPipeline.from_pretrained(guided["folder"], backend="ort")
    images = np.random.default_rng(2).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    ids = pipe.tokenize(images, one_call=True)
    assert "tokenize" in pipe.engine._sessions
    pipe.engine.release("tokenize")
    assert "tokenize" not in pipe.engine._sessions
    np.testing.assert_array_equal(pipe.tokenize(images, one_call=True), ids)
    pipe.engine.release()
    assert not pipe.engine._sessions

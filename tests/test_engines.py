"""Engines: the torch modes agree with eager, unavailable backends say so, TensorRT plan caching keys."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from v2flow_rt.config import get_preset
from v2flow_rt.engines.trt import plan_key
from v2flow_rt.errors import BackendUnavailable, ShapeError
from v2flow_rt.stages import stage_specs

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_plan_key_changes_with_every_input() -> None:
    spec = stage_specs(get_preset("tiny"))["velocity"]
    other = stage_specs(get_preset("tiny"), max_batch=4)["velocity"]
    base = plan_key("11.1.0", (9, 0), "a" * 64, spec)
    assert base == plan_key("11.1.0", (9, 0), "a" * 64, spec)
    assert len({base, plan_key("11.2.0", (9, 0), "a" * 64, spec), plan_key("11.1.0", (8, 9), "a" * 64, spec),
                plan_key("11.1.0", (9, 0), "b" * 64, spec), plan_key("11.1.0", (9, 0), "a" * 64, other)}) == 5


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the refusal path is not reachable")
def test_tensorrt_engine_refuses_clearly_without_tensorrt(tmp_path) -> None:
    from v2flow_rt.engines.trt import TrtEngine

    with pytest.raises(BackendUnavailable, match="tensorrt"):
        TrtEngine(tmp_path)


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installable on this machine (no NVIDIA index, no GPU)")
def test_tensorrt_matches_onnx_runtime(tmp_path) -> None:  # pragma: no cover - needs a GPU with TensorRT
    from v2flow_rt.engines.ort import OrtEngine
    from v2flow_rt.engines.trt import TrtEngine
    from v2flow_rt.export import export_model
    from v2flow_rt.reference.model import V2Flow

    folder = tmp_path / "export"
    export_model(V2Flow(get_preset("tiny")), folder, precisions=("fp32",), progress=False)
    trt, ort = TrtEngine(folder), OrtEngine(folder)
    rng = np.random.default_rng(0)
    for stage in ("velocity", "ode", "mar_step"):
        feeds = trt.spec(stage).sample_inputs(rng, batch=2, rows=37, keep=80)
        for name, ref in ort.run(stage, feeds).items():
            np.testing.assert_allclose(trt.run(stage, feeds)[name], ref, rtol=1e-3, atol=1e-3)


def test_onnx_runtime_gpu_providers_refuse_clearly(tmp_path) -> None:
    import onnxruntime

    from v2flow_rt.engines.ort import OrtEngine

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    from v2flow_rt.export import export_model
    from v2flow_rt.reference.model import V2Flow

    folder = tmp_path / "export"
    export_model(V2Flow(get_preset("tiny")), folder, precisions=("fp32",), progress=False, stages=("velocity",),
                 validate=False, quality=False)
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        OrtEngine(folder, provider="cuda")


def test_torch_engine_modes(tiny_model) -> None:
    from v2flow_rt.engines.torch import TorchEngine

    with pytest.raises(BackendUnavailable, match="CUDA"):
        TorchEngine(tiny_model, mode="cudagraph", device="cpu")
    eager = TorchEngine(tiny_model)
    with pytest.raises(ShapeError, match="velocity"):
        eager.run("velocity", {"x": np.zeros((2, 192), np.float32)})
    compiled = TorchEngine(tiny_model, mode="compile")
    rng = np.random.default_rng(0)
    feeds = eager.spec("velocity").sample_inputs(rng, rows=33)
    # torch.compile fuses kernels; fp32 results agree to rounding.
    np.testing.assert_allclose(compiled.run("velocity", feeds)["v"], eager.run("velocity", feeds)["v"],
                               rtol=1e-4, atol=1e-5)

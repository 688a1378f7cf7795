"""Engines: the torch modes agree with eager and with a float64 reference, TensorRT with ONNX Runtime,
unavailable backends say so, TensorRT plan caching keys.

Models have their zero-initialised layers randomised: a fresh model's velocity output is exactly zero, and
comparing zeros would pass whatever the engines computed."""

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
    from v2flow_rt.reference.checkpoint import randomize_zero_layers
    from v2flow_rt.reference.model import V2Flow

    folder = tmp_path / "export"
    export_model(randomize_zero_layers(V2Flow(get_preset("tiny")).eval(), seed=1), folder, precisions=("fp32",),
                 progress=False)
    trt, ort = TrtEngine(folder), OrtEngine(folder)
    rng = np.random.default_rng(0)
    for stage in ("velocity", "ode", "mar_step"):
        feeds = trt.spec(stage).sample_inputs(rng, batch=2, rows=37, keep=80)
        for name, ref in ort.run(stage, feeds).items():
            assert np.abs(ref).max() > 1e-2, (stage, name)           # not the zeros of a fresh velocity net
            # TF32 / fused kernels on the GPU against ORT's CPU fp32: 1e-3 of the output's scale
            np.testing.assert_allclose(trt.run(stage, feeds)[name], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


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


def test_torch_engine_modes(live_tiny_model) -> None:
    from reference_loop import velocity_float64

    from v2flow_rt.engines.torch import TorchEngine

    with pytest.raises(BackendUnavailable, match="CUDA"):
        TorchEngine(live_tiny_model, mode="cudagraph", device="cpu")
    eager = TorchEngine(live_tiny_model)
    with pytest.raises(ShapeError, match="velocity"):
        eager.run("velocity", {"x": np.zeros((2, 192), np.float32)})
    compiled = TorchEngine(live_tiny_model, mode="compile")
    rng = np.random.default_rng(0)
    feeds = eager.spec("velocity").sample_inputs(rng, rows=33)
    want = eager.run("velocity", feeds)["v"]
    ref = velocity_float64(live_tiny_model, feeds["x"], feeds["t"], feeds["c"])     # the spec's net, float64
    assert np.abs(ref).std() > 1e-2                                 # not the zeros of a fresh velocity net
    assert np.abs(want - ref).max() <= 1e-4 * np.abs(ref).max()
    # torch.compile fuses kernels; fp32 results agree to rounding.
    np.testing.assert_allclose(compiled.run("velocity", feeds)["v"], want, rtol=1e-4, atol=1e-5)


_DENORMAL_PROBE = """
import sys
import numpy as np
backend, folder, flush = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if backend == "ort":
    from v2flow_rt.engines.ort import OrtEngine
    engine = OrtEngine(folder, threads=1, flush_denormals=flush)
    stage = engine.stage_names[0]
    options = engine.session(stage).get_session_options()
    print(options.get_session_config_entry("session.set_denormal_as_zero"))
else:
    from v2flow_rt.config import get_preset
    from v2flow_rt.engines.torch import TorchEngine
    from v2flow_rt.reference.model import V2Flow
    TorchEngine(V2Flow(get_preset("tiny")), threads=1, flush_denormals=flush)
    print(int(flush))
# half the smallest normal float32: a denormal, or 0 where the thread flushes them
print(float((np.array([1.1754944e-38], np.float32) * np.float32(0.5))[0]))
"""


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_engines_flush_denormals_on_the_calling_thread_when_asked(backend: str, default_export) -> None:
    """Denormal floats are flushed to zero where asked (off by default on both engines): seen in the
    arithmetic of the thread that made the engine, in a fresh process (ONNX Runtime sets the calling thread
    from the process's first session only). The probe computes the product itself rather than calling
    ``engines.base.denormals_flushed``, so it is independent of the code under test."""
    import subprocess
    import sys

    seen = {}
    for flush in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", _DENORMAL_PROBE, backend, str(default_export), flush],
                             capture_output=True, text=True, check=True).stdout.split()
        seen[flush] = (out[0], float(out[1]))
    assert seen == {"1": ("1", 0.0), "0": ("0", pytest.approx(5.877472e-39, rel=1e-6))}


def test_onnx_runtime_session_options(default_export) -> None:
    """Denormals kept by default (flushing is the thread's, not the session's alone); worker threads spin in
    the one-call sessions only (the loop's stage sessions take turns, and a spinning idle worker holds the
    core the next one needs), unless asked."""
    from v2flow_rt.engines.ort import OrtEngine
    from v2flow_rt.stages import ONE_CALL_STAGES

    def entries(engine: OrtEngine) -> dict[str, tuple[str, str]]:
        out = {}
        for stage in engine.stage_names:
            options = engine.session(stage).get_session_options()
            out[stage] = (options.get_session_config_entry("session.set_denormal_as_zero"),
                          options.get_session_config_entry("session.intra_op.allow_spinning"))
        return out

    default = entries(OrtEngine(default_export, threads=2))
    assert set(default) & set(ONE_CALL_STAGES) and set(default) - set(ONE_CALL_STAGES)
    assert default == {s: ("0", "1" if s in ONE_CALL_STAGES else "0") for s in default}
    forced = entries(OrtEngine(default_export, threads=2, spinning=False, flush_denormals=True))
    assert forced == dict.fromkeys(default, ("1", "0"))


def test_float_environment_is_given_back() -> None:
    """What ``run_bench`` and every CLI verb run inside: a thread that flushed no denormals before flushes
    none after, whatever the block set (here PyTorch's flush, as ``TorchEngine(flush_denormals=True)``)."""
    import torch

    from v2flow_rt.engines.base import denormals_flushed, preserved_float_environment

    assert not denormals_flushed()
    try:
        with preserved_float_environment():
            torch.set_flush_denormal(True)
            assert denormals_flushed()
        assert not denormals_flushed()
    finally:
        torch.set_flush_denormal(False)

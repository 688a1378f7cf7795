"""pytest-benchmark suite: each stage and the end-to-end decode, PyTorch eager beside ONNX Runtime.

    python -m pytest benchmarks/test_bench_stages.py --benchmark-only --benchmark-group-by=param:stage

Uses the bundled default model, exported once per session into a temporary folder (the stages timed here,
fp32 and int8, without the parity and quality passes of a full export). Speed is reported, never asserted.

Not collected by the test suite (``testpaths`` is ``tests``): ``scripts/test.sh`` (so CI) runs it once as a
quick check, every benchmark called once with pytest-benchmark's timing off,

    python -m pytest -q -p no:cacheprovider benchmarks/test_bench_stages.py --benchmark-disable

so an API change that breaks the benchmarks fails CI; each call's output is checked for shape and finiteness.
"""

from __future__ import annotations

import numpy as np
import pytest

from v2flow_rt.pipeline import V2FlowPipeline

BACKENDS = [("torch", "fp32"), ("ort", "fp32"), ("ort", "int8")]
# What the benchmarks run: the timed stages and the stage loop of detokenize (no one-call graphs).
BENCH_STAGES = ("codec_encode", "tokenizer", "token_embed", "mar_step", "velocity", "ode", "codec_decode")


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    from v2flow_rt.export import export_model

    folder = tmp_path_factory.mktemp("bench") / "export"
    export_model("default", folder, precisions=("fp32", "int8"), progress=False, stages=BENCH_STAGES,
                 validate=False, quality=False)
    return folder


@pytest.fixture(scope="session")
def pipes(export_dir) -> dict[str, V2FlowPipeline]:
    out = {}
    for backend, precision in BACKENDS:
        path = "default" if backend == "torch" else export_dir
        out[f"{backend}-{precision}"] = V2FlowPipeline.from_pretrained(path, backend=backend, precision=precision)
    return out


@pytest.mark.parametrize("name", [f"{b}-{p}" for b, p in BACKENDS])
@pytest.mark.parametrize("stage", ["mar_step", "ode", "velocity", "tokenizer"])
def test_stage(benchmark, pipes, name: str, stage: str) -> None:
    engine = pipes[name].engine
    feeds = engine.spec(stage).sample_inputs(np.random.default_rng(0), batch=1, rows=256, keep=96)
    benchmark.group = stage
    out = benchmark(engine.run, stage, feeds)
    assert set(out) == set(engine.spec(stage).output_names) and all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("name", [f"{b}-{p}" for b, p in BACKENDS])
def test_detokenize(benchmark, pipes, name: str) -> None:
    pipe = pipes[name]
    ids = np.random.default_rng(0).integers(0, pipe.config.codebook_size, (1, pipe.config.num_tokens))
    benchmark.group = "detokenize"
    images = benchmark(pipe.detokenize, ids, seed=0)
    assert images.shape == (1, pipe.config.img_size, pipe.config.img_size, 3) and images.std() > 1

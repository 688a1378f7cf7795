"""``v2flow-rt triton-repo``: every config.pbtxt parses into Triton's own ModelConfig protobuf and says what
the manifest recorded (names, dtypes, dims, batch profile); the graphs are the export's, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from v2flow_rt.cli import main
from v2flow_rt.errors import ServingError
from v2flow_rt.manifest import Manifest, file_sha256
from v2flow_rt.scale.triton_repo import model_config, write_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient")
text_format = pytest.importorskip("google.protobuf.text_format")


def _parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_repository_of_the_stage_graphs_matches_the_manifest(default_export, tmp_path) -> None:
    import onnxruntime as ort

    m = Manifest.load(default_export)
    repo = tmp_path / "repo"
    stages = list(m.stages)
    assert write_repository(default_export, repo, stages=stages) == stages
    dtype = {v: k for k, v in model_config_pb2.DataType.items()}
    for stage in stages:
        cfg = _parse((repo / stage / "config.pbtxt").read_text())
        spec = m.spec(stage)
        assert cfg.name == stage and cfg.platform == "onnxruntime_onnx"
        lead = spec.inputs[0].shape[0]                       # cfg_scale [1] does not lead with it: unbatched
        batched = all(t.shape and t.shape[0] == lead for t in spec.inputs + spec.outputs)
        assert cfg.max_batch_size == (spec.dims[lead][2] if batched else 0)
        assert cfg.HasField("dynamic_batching") == batched
        for got, want in [*zip(cfg.input, spec.inputs), *zip(cfg.output, spec.outputs)]:
            shape = want.shape[1:] if batched else want.shape
            assert got.name == want.name and dtype[got.data_type] == "TYPE_" + {"float32": "FP32",
                                                                                "int64": "INT64"}[want.dtype]
            assert list(got.dims) == [d if isinstance(d, int) else -1 for d in shape]
        assert len(cfg.input) == len(spec.inputs) and len(cfg.output) == len(spec.outputs)
        graph = repo / stage / "1" / "model.onnx"
        assert file_sha256(graph) == m.sha256[m.files["fp32"][stage]]
    assert cfg_batched(repo, "tokenizer") and not cfg_batched(repo, "ode_cfg")
    # the copied graph runs under the names and shapes the config declares
    sess = ort.InferenceSession(str(repo / "tokenizer" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = m.spec("tokenizer").sample_inputs(np.random.default_rng(0), batch=3)
    assert sess.run(["ids"], feeds)[0].shape == (3, m.config.num_tokens)


def cfg_batched(repo, stage: str) -> bool:
    return _parse((repo / stage / "config.pbtxt").read_text()).max_batch_size > 0


def test_one_call_graphs_are_the_default_and_bad_requests_are_named(default_export, tmp_path) -> None:
    import os

    assert write_repository(default_export, tmp_path / "r0") == ["tokenize", "detokenize"]
    assert cfg_batched(tmp_path / "r0", "tokenize")
    # an export without the one-call graphs (made before they existed) must name the graphs to serve
    m = Manifest.load(default_export)
    old = tmp_path / "old_export"
    old.mkdir()
    for stage in ("tokenize", "detokenize"):
        m.stages.pop(stage)
        for per in m.files.values():
            m.sha256.pop(per.pop(stage, ""), None)
    for rel in m.sha256:
        os.link(default_export / rel, old / rel)
    m.write(old)
    with pytest.raises(ServingError, match=r"no one-call graph\(s\) \['tokenize', 'detokenize'\]"):
        write_repository(old, tmp_path / "r1")
    with pytest.raises(ServingError, match="no stage"):
        write_repository(default_export, tmp_path / "r2", stages=["decoder"])
    with pytest.raises(ServingError, match="no TensorRT plan of 'tokenizer'"):
        write_repository(default_export, tmp_path / "r3", stages=["tokenizer"], platform="tensorrt_plan")
    assert not any(p.name.startswith(".r3") for p in tmp_path.iterdir())     # no half-written repository left
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ServingError, match="not empty"):
        write_repository(default_export, tmp_path / "full", stages=["tokenizer"])
    assert main(["triton-repo", str(default_export), "--out", str(tmp_path / "cli"), "--stages",
                 "tokenizer,token_embed"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["token_embed", "tokenizer"]
    # a recorded one-call graph (issue 13's shape: images in, ids out) gets a batched TensorRT config
    record = {"inputs": [["images", "float32", ["batch", 3, 64, 64]]], "outputs": [["ids", "int64", ["batch", 64]]],
              "dims": {"batch": [1, 4, 32]}, "attrs": {}}
    cfg = _parse(model_config("tokenize", record, "tensorrt_plan"))
    assert (cfg.platform, cfg.max_batch_size, list(cfg.input[0].dims)) == ("tensorrt_plan", 32, [3, 64, 64])
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU

"""Graphs with external data handled without loading their weights whole (``export.large``): the streamed
copy is exact; the streamed per-channel int8 graph agrees with ONNX Runtime's own ``quantize_dynamic`` and
with fp32 to quantization accuracy; an export whose tokenizer keeps its weights in external data writes the
int8 tokenizer that way and records its measured id agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_fixtures import mlp_model
from onnx import TensorProto, helper, numpy_helper

from v2flow_rt.export.large import copy_large, quantize_matmuls
from v2flow_rt.export.precision import _name_nodes, ort_session, quantize_int8


def _mlp(path: Path, seed: int = 0) -> Path:
    """x [rows, 64] → MatMul 64×300 → Relu → MatMul 300×200 (+ bias), weights in external data."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, 300)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((300, 200)) * rng.uniform(0.01, 1.0, 200)).astype(np.float32)  # columns differ
    b = rng.standard_normal(200).astype(np.float32)
    model = mlp_model(w1, w2, b)
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort_session(path).run(None, {"x": x})[0]


def test_streamed_copy_is_exact(tmp_path: Path) -> None:
    src = _mlp(tmp_path / "a.onnx")
    files = copy_large(src, tmp_path / "b.onnx")
    assert [f.name for f in files] == ["b.onnx", "b.onnx.data"]
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "b.onnx", x), _run(src, x))
    (tmp_path / "a.onnx.data").unlink()          # the copy does not read the source's data file
    assert _run(tmp_path / "b.onnx", x).shape == (5, 200)


def test_streamed_int8_matches_quantize_dynamic_and_fp32(tmp_path: Path) -> None:
    src = _mlp(tmp_path / "fp32.onnx")
    notes = quantize_matmuls(src, tmp_path / "ours.onnx", min_values=1)
    assert notes["quantized_nodes"] == ["MatMul_0", "MatMul_2"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "ours.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    quantize_int8(src, tmp_path / "ort.onnx", "dynamic")
    x = np.random.default_rng(2).standard_normal((33, 64)).astype(np.float32)
    ref, ours, theirs = _run(src, x), _run(tmp_path / "ours.onnx", x), _run(tmp_path / "ort.onnx", x)

    def worst_column(a: np.ndarray) -> float:
        return float((np.linalg.norm(a - ref, axis=0) / np.linalg.norm(ref, axis=0)).max())

    # The same scheme as quantize_dynamic(per_channel=True, QInt8): the same numbers (measured: identical
    # outputs), and every output column within a few % of fp32 (measured 2.5 %); a per-tensor weight scale
    # loses the small columns (measured 58 % on the worst one: the column scales span 100×).
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert worst_column(ours) < 0.06
    # excluding a node keeps it fp32
    kept = quantize_matmuls(src, tmp_path / "part.onnx", exclude=["MatMul_2"], min_values=1)
    assert kept["quantized_nodes"] == ["MatMul_0"]


def test_dynamic_int8_keeps_an_excluded_gemm_fp32(tmp_path: Path) -> None:
    """The exclusion ladder names nodes as the fp32 graph has them; dynamic quantization renames every Gemm
    before it reads the exclusions, so an excluded Gemm must still stay fp32 (it did not, silently)."""
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((300, 64)) * 0.2).astype(np.float32)            # Gemm transB: [N, K]
    w2 = (rng.standard_normal((300, 200)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 200])],
                              [numpy_helper.from_array(a, n) for a, n in
                               ((w1, "w1"), (rng.standard_normal(300).astype(np.float32), "b1"), (w2, "w2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    _name_nodes(model)
    onnx.save_model(model, str(tmp_path / "fp32.onnx"))
    for exclude, quantized_weights in (([], {"w1", "w2"}), (["Gemm_0"], {"w2"}), (["MatMul_2"], {"w1"})):
        quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", "dynamic", exclude=exclude)
        got = onnx.load(str(tmp_path / "int8.onnx")).graph
        inits = {t.name for t in got.initializer}
        assert {w for w in ("w1", "w2") if any(i.startswith(w) and i.endswith("_quantized") for i in inits)} \
            == quantized_weights, exclude
        assert sum(n.op_type == "MatMulInteger" for n in got.node) == len(quantized_weights), exclude


def test_an_external_data_tokenizer_gets_streamed_int8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At a threshold of 1 MB the tiny tokenizer's readout goes to external data, as the official 4.1 GB one
    does: its int8 graph then comes from ``export.large`` and its id agreement is measured and recorded."""
    import torch

    from v2flow_rt.config import get_preset
    from v2flow_rt.export import onnx as onnx_export
    from v2flow_rt.export import precision
    from v2flow_rt.export.folder import export_model
    from v2flow_rt.reference.checkpoint import randomize_zero_layers
    from v2flow_rt.reference.model import V2Flow

    monkeypatch.setattr(onnx_export, "STREAMED_WEIGHT_BYTES", 1 << 20)
    monkeypatch.setattr(precision, "EXTERNAL_DATA_BYTES", 1 << 20)
    torch.manual_seed(0)
    model = randomize_zero_layers(V2Flow(get_preset("tiny", llm_vocab_size=2048)).eval())
    m = export_model(model, tmp_path / "export", precisions=("fp32", "int8", "fp16"),
                     stages=["codec_encode", "tokenizer"], progress=False, quality=False, calib_images=8)
    assert (tmp_path / "export" / "tokenizer.fp32.onnx.data").is_file()
    notes = m.precision_notes["int8"]["tokenizer"]
    assert notes["method"].startswith("per-channel symmetric int8 weights"), notes
    assert notes["id_agreement_calibration"] >= precision.ID_AGREEMENT_MIN
    assert "kept fp32" in m.precision_notes["fp16"]["tokenizer"]["method"]
    assert (tmp_path / "export" / "tokenizer.int8.onnx.data").stat().st_size < \
        0.5 * (tmp_path / "export" / "tokenizer.fp32.onnx.data").stat().st_size


def _transposed_weight_graph(path: Path, external: bool) -> Path:
    """x [rows, 64] → MatMul(x, Transpose(W)) twice over one Transpose (a Linear shared by two call sites, as
    the exporter writes the one-call graphs' unrolled iterations) and a 3-D Transpose of a second weight."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 64)).astype(np.float32)                   # Linear(64 → 300).weight
    v = rng.standard_normal((2, 300, 3)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("Transpose", ["wt"], ["wt_back"], perm=[1, 0]),  # reads the folded output
             helper.make_node("MatMul", ["x", "wt"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "wt_back"], ["g"]), helper.make_node("Add", ["g", "x"], ["s"]),
             helper.make_node("MatMul", ["x", "wt"], ["h2"]),
             helper.make_node("Transpose", ["v"], ["vt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["vt", "wt_back"], ["u"]), helper.make_node("Mul", ["u", "x"], ["ux"]),
             helper.make_node("ReduceSum", ["ux"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, [3, 64]),
                               helper.make_tensor_value_info("h2", TensorProto.FLOAT, [3, 300]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_weight_transposes_are_folded_into_the_weights(tmp_path: Path, external: bool) -> None:
    from v2flow_rt.export.large import fold_constant_transposes

    path = _transposed_weight_graph(tmp_path / "t.onnx", external)
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    before = ort_session(path).run(None, {"x": x})
    # the two Transposes of initializers go; the one of a Transpose's output stays (not an initializer yet)
    assert fold_constant_transposes(path) == 2
    model = onnx.load(str(path), load_external_data=False)
    assert [n.op_type for n in model.graph.node].count("Transpose") == 1
    assert {t.name for t in model.graph.initializer} == {"wt", "vt"}    # the originals no one reads are gone
    after = ort_session(path).run(None, {"x": x})
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)                      # a transposed copy: bit-identical results
    if external:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx", "t.onnx.data"]   # no side folder left
    assert fold_constant_transposes(path) == 1                  # the remaining one reads "wt" now: folded too
    for a, b in zip(ort_session(path).run(None, {"x": x}), before):
        np.testing.assert_array_equal(a, b)
    # int8 now quantizes the MatMuls whose weights were behind a Transpose
    quantize_int8(path, tmp_path / "int8.onnx", "dynamic")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulInteger") == 4 and "MatMul" not in ops, ops


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_repeated_transposes_of_one_weight_share_one_folded_copy(tmp_path: Path, external: bool) -> None:
    """One Transpose of the same weight per unrolled iteration (the full-size one-call graphs) folds into one
    transposed initializer that every MatMul reads; another permutation of it gets its own."""
    from v2flow_rt.export.large import fold_constant_transposes

    rng = np.random.default_rng(6)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    v = rng.standard_normal((1, 64, 64)).astype(np.float32)
    node = helper.make_node
    nodes = [node("Transpose", ["w"], ["t1"], perm=[1, 0]), node("MatMul", ["x", "t1"], ["h1"]),
             node("Transpose", ["w"], ["t2"], perm=[1, 0]), node("MatMul", ["h1", "t2"], ["h2"]),
             node("Transpose", ["w"], ["t3"]), node("MatMul", ["h2", "t3"], ["h3"]),   # default perm: the same
             node("Transpose", ["v"], ["v1"], perm=[0, 2, 1]), node("Transpose", ["v"], ["v2"], perm=[2, 1, 0]),
             node("MatMul", ["h3", "v1"], ["h4"]), node("MatMul", ["h4", "v2"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 3, 1])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")])
    path = tmp_path / "r.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    before = ort_session(path).run(None, {"x": x})[0]
    assert fold_constant_transposes(path) == 5
    folded = onnx.load(str(path), load_external_data=False).graph
    assert sorted(t.name for t in folded.initializer) == ["t1", "v1", "v2"]
    assert [n.input[1] for n in folded.node] == ["t1", "t1", "t1", "v1", "v2"]
    np.testing.assert_array_equal(ort_session(path).run(None, {"x": x})[0], before)
    if external:
        assert (tmp_path / "r.onnx.data").stat().st_size < w.nbytes + 2 * v.nbytes + 1024


def test_a_fold_that_fails_leaves_the_graph_and_its_data_as_they_were(tmp_path: Path, monkeypatch) -> None:
    from v2flow_rt.export import large

    path = _transposed_weight_graph(tmp_path / "t.onnx", external=True)
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    before = ort_session(path).run(None, {"x": x})
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(a: np.ndarray):
        yield b"\0" * 16
        raise OSError("disk full")

    monkeypatch.setattr(large, "_transposed_rows", broken)
    with pytest.raises(OSError, match="disk full"):
        large.fold_constant_transposes(path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files      # same files, same bytes
    for a, b in zip(ort_session(path).run(None, {"x": x}), before):
        np.testing.assert_array_equal(a, b)

"""Dynamic int8 weight scales (``export.precision``): an all-zero per-column weight zero point is stored as a
scalar with the same numbers and the fused kernel kept; a float-output graph gets one weight scale per
matrix only where that loses at most ``INT8_MAX_LOSS_DB`` against per-column scales on its
calibration inputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_fixtures import mlp_model
from onnx import TensorProto, helper, numpy_helper

from v2flow_rt.export.precision import (
    INT8_MAX_LOSS_DB,
    _name_nodes,
    dynamic_int8,
    ort_session,
    quantize_int8,
    scalar_zero_points,
    snr_db,
)


def _mlp(path: Path, column_spread: float, seed: int = 0) -> Path:
    """x [rows, 64] → MatMul 64×300 → Relu → MatMul 300×200 + bias; the second weight's column scales span
    ``column_spread``× (1: every column of both weights has the same largest |w|, so that one scale per
    matrix is each column's own)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, 300))
    w1 = (w1 / np.abs(w1).max(axis=0) * 0.5).astype(np.float32)
    w2 = rng.standard_normal((300, 200))
    spread = np.exp(rng.uniform(-np.log(column_spread), 0.0, 200)) if column_spread > 1 else np.ones(200)
    w2 = (w2 / np.abs(w2).max(axis=0) * 0.3 * spread).astype(np.float32)
    b = (rng.standard_normal(200) * 0.01).astype(np.float32)
    model = mlp_model(w1, w2, b)
    onnx.save_model(model, str(path))
    return path


def _feeds(seed: int, batches: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((24, 64)).astype(np.float32)} for _ in range(batches)]


def _zero_point_shapes(path: Path) -> list[tuple[int, ...]]:
    model = onnx.load(str(path))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [inits[n.input[3]] for n in model.graph.node if n.op_type == "MatMulInteger"]


def _optimized_ops(path: Path) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def test_zero_points_become_scalars_with_the_same_numbers_and_the_fused_kernel(tmp_path: Path) -> None:
    src = _mlp(tmp_path / "fp32.onnx", column_spread=100.0)
    quantize_int8(src, tmp_path / "int8.onnx", "dynamic", per_channel=True)
    assert _zero_point_shapes(tmp_path / "int8.onnx") == [(), ()]
    # The same graph with the per-column zero vectors that quantize_dynamic writes (put back by hand)
    model = onnx.load(str(tmp_path / "int8.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "MatMulInteger"):
        columns = inits[node.input[1]].dims[1]
        name = node.input[1] + "_column_zero_points"
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(columns, np.int8), name))
        node.input[3] = name
    onnx.save_model(model, str(tmp_path / "columns.onnx"))
    x = np.random.default_rng(7).standard_normal((17, 64)).astype(np.float32)
    ours = ort_session(tmp_path / "int8.onnx").run(None, {"x": x})[0]
    theirs = ort_session(tmp_path / "columns.onnx").run(None, {"x": x})[0]
    np.testing.assert_array_equal(ours, theirs)          # integer arithmetic with zero offsets either way
    assert _optimized_ops(tmp_path / "int8.onnx").count("DynamicQuantizeMatMul") == 2
    # writing the scalars again finds nothing to do
    assert scalar_zero_points(onnx.load(str(tmp_path / "int8.onnx"))) == 0


def test_a_nonzero_zero_point_is_left_alone() -> None:
    zp = np.array([0, 3, 0], np.uint8)
    nodes = [helper.make_node("MatMulInteger", ["a", "b", "", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 3])],
                              [numpy_helper.from_array(np.ones((4, 3), np.uint8), "b"),
                               numpy_helper.from_array(zp, "zp")])
    model = helper.make_model(graph)
    assert scalar_zero_points(model) == 0
    assert model.graph.node[0].input[3] == "zp"
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[1]), zp)


@pytest.mark.parametrize(("spread", "chosen"), [(1.0, "per-tensor"), (100.0, "per-channel")])
def test_per_tensor_scales_only_where_they_cost_little(spread: float, chosen: str, tmp_path: Path) -> None:
    """Columns alike: one scale per matrix loses nothing and is kept. Column scales spanning 100×: it loses
    the small columns and per-column scales are kept. (No activation matmuls here: that scheme is skipped.)"""
    src = _mlp(tmp_path / "fp32.onnx", column_spread=spread)
    notes = dynamic_int8(src, tmp_path / "int8.onnx", _feeds(1))
    scheme = notes["int8_scheme"]
    assert scheme["chosen"] == chosen, scheme
    assert set(scheme["snr_db"]) == ({"per-channel", "per-tensor"}), scheme
    loss = scheme["snr_db"]["per-channel"] - scheme["snr_db"]["per-tensor"]
    assert (loss <= INT8_MAX_LOSS_DB) == (chosen == "per-tensor"), scheme
    if chosen == "per-channel":
        assert loss > 3 * INT8_MAX_LOSS_DB, scheme    # not a close call (measured 4.1 dB)
    # the graph written is the one chosen: one scale per matrix, or one per column
    model = onnx.load(str(tmp_path / "int8.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    scale_sizes = {int(np.prod(inits[n.input[1].replace("_quantized", "_scale")].dims))
                   for n in model.graph.node if n.op_type == "MatMulInteger"}
    assert scale_sizes == ({1} if chosen == "per-tensor" else {300, 200}), scale_sizes
    # its SNR on fresh inputs agrees with the one recorded (a few tenths of a dB: other rows)
    fresh = _feeds(2)
    ref = [ort_session(src).run(None, f)[0] for f in fresh]
    got = [ort_session(tmp_path / "int8.onnx").run(None, f)[0] for f in fresh]
    assert abs(snr_db(got, ref) - scheme["snr_db"][chosen]) < 1.0


def _with_activation_matmul(path: Path, weight: float) -> Path:
    """y = Relu(x W1) W2 + weight · (a b), where a [rows, 16] and b [16, 32] are inputs: an activation ×
    activation matmul (as in attention) beside weight matmuls whose columns are alike."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 128)), rng.standard_normal((128, 32))
    w1, w2 = [(w / np.abs(w).max(axis=0) * 0.3).astype(np.float32) for w in (w1, w2)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("MatMul", ["a", "b"], ["ab"]),
             helper.make_node("Mul", ["ab", "c"], ["abc"]), helper.make_node("Add", ["m", "abc"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
              (("x", ["rows", 64]), ("a", ["rows", 16]), ("b", [16, 32]))]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 32])
    graph = helper.make_graph(nodes, "act", inputs, [output],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(np.array(weight, np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    _name_nodes(model)
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize(("weight", "outlier", "chosen"), [(0.01, 1.0, "per-tensor, activation matmuls too"),
                                                          (1.0, 1000.0, "per-tensor")])
def test_activation_matmuls_are_quantized_only_where_they_cost_little(weight: float, outlier: float, chosen: str,
                                                                      tmp_path: Path) -> None:
    """A small activation matmul term: quantizing it costs nothing measurable and it is kept. A dominant one
    whose input a has one column 1000× the others (b's row 1000× smaller, so every column counts): a
    per-tensor uint8 of a rounds the other columns away, and the matmul stays fp32."""
    src = _with_activation_matmul(tmp_path / "fp32.onnx", weight)
    rng = np.random.default_rng(5)
    feeds = []
    for _ in range(2):
        a, b = rng.standard_normal((24, 16)), rng.standard_normal((16, 32))
        a[:, 0] *= outlier
        b[0] /= outlier
        feeds.append({"x": rng.standard_normal((24, 64)).astype(np.float32), "a": a.astype(np.float32),
                      "b": b.astype(np.float32)})
    scheme = dynamic_int8(src, tmp_path / "int8.onnx", feeds)["int8_scheme"]
    assert scheme["chosen"] == chosen, scheme
    best = scheme["snr_db"]["per-channel"]
    fastest = scheme["snr_db"]["per-tensor, activation matmuls too"]
    assert (fastest >= best - INT8_MAX_LOSS_DB) == (chosen == "per-tensor, activation matmuls too"), scheme
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    assert ops.count("MatMulInteger") == (3 if chosen == "per-tensor, activation matmuls too" else 2), ops
    assert ops.count("MatMul") == (0 if chosen == "per-tensor, activation matmuls too" else 1), ops


def test_snr_db_against_a_known_value() -> None:
    ref = [np.array([3.0, 4.0], np.float32)]                  # signal energy 25
    assert snr_db([np.array([3.0, 4.5], np.float32)], ref) == pytest.approx(10 * np.log10(25 / 0.25))
    assert snr_db(ref, ref) == float("inf")

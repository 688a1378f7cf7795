"""Small hand-built ONNX graphs shared by the precision tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from v2flow_rt.export.precision import _name_nodes


def mlp_model(w1: np.ndarray, w2: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """x [rows, K] → MatMul w1 [K, H] → Relu → MatMul w2 [H, N] → + b [N], nodes named."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", w1.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", w2.shape[1]])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (b, "b"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    _name_nodes(model)
    return model

"""Graphs whose weights live in external data, handled without loading the weights into memory at once.

The official readout (Linear 32000 → 32000) alone is 4.1 GB in fp32. ``onnx.load`` of such a graph holds
all of it, and ONNX Runtime's ``quantize_dynamic`` peaked at 17.3 GB of RSS quantizing that one readout
(measured here: 4.2 GB graph, 209 s), which leaves no room for the rest of an export on a 24 GB machine.
Here the graph structure is loaded without its data (``load_external_data=False``) and the weights are
read through ``numpy.memmap`` in row chunks, so memory stays near one chunk:

- ``copy_large``: a graph and its external data under a new name (data copied file to file);
- ``fold_constant_transposes``: weights the exporter transposes at run time stored transposed instead;
- ``quantize_matmuls``: per-channel int8 weights for MatMuls with a constant weight, with dynamic
  activation quantization, the same scheme as ``quantize_dynamic(per_channel=True, QInt8)``:
  ``DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q, x_zp, 0) → Cast → Mul(x_scale · w_scale[N])``,
  weights symmetric per output column (``scale = max|W[:, n]| / 127``). ONNX Runtime fuses the pattern
  into its int8 GEMM; the weights take a quarter of the space.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROW_CHUNK_BYTES = 256 << 20      # read weights 256 MiB at a time
MIN_QUANT_VALUES = 1 << 16       # smaller weights are not worth the quantize/dequantize overhead


def data_name(path: Path) -> str:
    return path.name + ".data"


def _external(t: TensorProto) -> dict[str, str] | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}


def read_tensor(t: TensorProto, folder: Path) -> np.ndarray:
    """An initializer as a numpy array: memory-mapped when it lives in external data (read-only)."""
    ext = _external(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    if ext is None:
        return numpy_helper.to_array(t)
    offset, shape = int(ext.get("offset", 0)), tuple(int(d) for d in t.dims)
    return np.memmap(folder / ext["location"], dtype=dtype, mode="r", offset=offset, shape=shape)


def _row_chunks(a: np.ndarray) -> Iterator[slice]:
    if a.ndim == 0 or a.size == 0:
        yield slice(None)
        return
    rows = max(1, ROW_CHUNK_BYTES // max(1, a[0].nbytes))
    for i in range(0, a.shape[0], rows):
        yield slice(i, min(a.shape[0], i + rows))


class _DataFile:
    """Appends tensors to one external-data file, chunk by chunk, and points initializers at them."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.f = open(path, "wb")

    def add(self, t: TensorProto, chunks: Iterator[bytes]) -> None:
        start = self.offset
        for block in chunks:
            self.f.write(block)
            self.offset += len(block)
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(self.offset - start))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        pad = (-self.offset) % 64        # keep every tensor 64-byte aligned for memory mapping
        self.f.write(b"\0" * pad)
        self.offset += pad

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _copy_external(t: TensorProto, src_folder: Path, out: _DataFile) -> None:
    a = read_tensor(t, src_folder)
    out.add(t, (np.ascontiguousarray(a[s]).tobytes() for s in _row_chunks(a)))


def _save(model: onnx.ModelProto, dst: Path, data: _DataFile) -> list[Path]:
    data.close()
    onnx.save_model(model, str(dst))           # the structure only: every large tensor is a reference
    onnx.checker.check_model(str(dst))
    return [dst, data.path]


def copy_large(src: Path, dst: Path) -> list[Path]:
    """Copy a graph with external data to ``dst`` (data in ``dst.name + '.data'``), never loading it whole."""
    model = onnx.load(str(src), load_external_data=False)
    data = _DataFile(dst.with_name(data_name(dst)))
    try:
        for t in model.graph.initializer:
            if _external(t) is not None:
                _copy_external(t, src.parent, data)
    except BaseException:
        data.f.close()
        raise
    return _save(model, dst, data)


def _column_scales(w: np.ndarray) -> np.ndarray:
    """Symmetric per-output-column int8 scale of a MatMul weight [K, N]: max|W[:, n]| / 127 (1 for zeros)."""
    peak = np.zeros(w.shape[1], dtype=np.float32)
    for s in _row_chunks(w):
        np.maximum(peak, np.abs(w[s]).max(axis=0), out=peak)
    return np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)


def _quantized_rows(w: np.ndarray, scale: np.ndarray) -> Iterator[bytes]:
    for s in _row_chunks(w):
        yield np.clip(np.rint(w[s] / scale), -127, 127).astype(np.int8).tobytes()


def quantize_matmuls(src: Path, dst: Path, exclude: Sequence[str] = (), min_values: int = MIN_QUANT_VALUES,
                     ) -> dict[str, Any]:
    """Per-channel int8 weights (dynamic int8 activations) for every MatMul with a constant 2-D float weight
    of at least ``min_values`` values that no other node reads, except nodes named in ``exclude``.

    Node names must be unique (``precision._name_nodes``). Returns the notes for the manifest: the method,
    the quantized nodes (none: the graph is copied) and the excluded ones.
    """
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    targets = {n.name: n for n in graph.node
               if n.op_type == "MatMul" and n.name not in exclude and n.input[1] in inits
               and readers.get(n.input[1]) == 1 and inits[n.input[1]].data_type == TensorProto.FLOAT
               and len(inits[n.input[1]].dims) == 2 and int(np.prod(inits[n.input[1]].dims)) >= min_values}
    weights = {targets[n].input[1]: n for n in targets}
    data = _DataFile(dst.with_name(data_name(dst)))
    new_inits: list[TensorProto] = []
    try:
        for t in graph.initializer:
            if t.name not in weights:
                if _external(t) is not None:
                    _copy_external(t, src.parent, data)
                new_inits.append(t)
                continue
            w = read_tensor(t, src.parent)                                     # [K, N], memory-mapped
            scale = _column_scales(w)
            q = TensorProto(name=t.name + "_quantized", data_type=TensorProto.INT8, dims=list(t.dims))
            data.add(q, _quantized_rows(w, scale))
            new_inits += [q, numpy_helper.from_array(scale, t.name + "_scale"),
                          # one scalar zero, as precision.scalar_zero_points stores it
                          numpy_helper.from_array(np.zeros((), np.int8), t.name + "_zero_point")]
    except BaseException:
        data.f.close()
        raise
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        x, w = node.input[0], node.input[1]
        p = node.name
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [x], [f"{p}_xq", f"{p}_xs", f"{p}_xzp"], name=f"{p}_quant"),
            helper.make_node("MatMulInteger", [f"{p}_xq", w + "_quantized", f"{p}_xzp", w + "_zero_point"],
                             [f"{p}_i32"], name=f"{p}_MatMulInteger"),
            helper.make_node("Cast", [f"{p}_i32"], [f"{p}_f32"], to=TensorProto.FLOAT, name=f"{p}_cast"),
            helper.make_node("Mul", [f"{p}_xs", w + "_scale"], [f"{p}_s"], name=f"{p}_scales"),
            helper.make_node("Mul", [f"{p}_f32", f"{p}_s"], [node.output[0]], name=f"{p}_rescale"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    _save(model, dst, data)
    if not targets:
        return {"method": f"copied from fp32: no MatMul with a constant weight of >= {min_values} values",
                "quantized_nodes": [], "excluded_nodes": list(exclude)}
    return {"method": "per-channel symmetric int8 weights (max|W[:, n]|/127), dynamic uint8 activations "
                      "(DynamicQuantizeLinear → MatMulInteger), written streaming from the fp32 external data",
            "quantized_nodes": sorted(targets), "excluded_nodes": list(exclude)}


def _transposed_rows(a: np.ndarray) -> Iterator[bytes]:
    """The bytes of ``a.T`` for a 2-D (memory-mapped) array, a block of output rows at a time."""
    cols = max(1, ROW_CHUNK_BYTES // max(1, a.shape[0] * a.itemsize))
    for j in range(0, a.shape[1], cols):
        yield np.ascontiguousarray(a[:, j:j + cols].T).tobytes()


def fold_constant_transposes(path: Path) -> int:
    """Replace every ``Transpose`` of an initializer by the transposed initializer, in place; return how many.

    The exporter writes a Linear on a 3-D input, and a weight shared by several call sites (the unrolled
    iterations of the one-call graphs), as ``MatMul(x, Transpose(W))``. ONNX Runtime folds that when a
    session starts, but not above its size limit (the official 4 GB readout was transposed on every
    call), and the int8 quantizers only quantize a MatMul whose weight is an initializer, so such MatMuls
    stayed fp32 in the int8 graphs. A weight in external data is transposed streaming, a block of columns
    at a time, into a new data file. Transposes of the same weight with the same permutation (one per
    unrolled iteration at full size, where the exporter's optimizer does not fold tensors that large) share
    one transposed copy: the full-size one-call ``detokenize`` would otherwise grow from 1.4 to 3.4 GB.
    """
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    folds = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits and n.input[0] not in inputs]
    if not folds:
        return 0
    fold_ids = {id(n) for n in folds}
    locations = sorted({e["location"] for t in graph.initializer if (e := _external(t)) is not None})
    staged = path.parent / f".{path.name}.fold"
    if locations:            # read the old data from a side folder while the new file takes its name
        staged.mkdir(exist_ok=True)
        for location in locations:
            os.replace(path.parent / location, staged / location)
    data = None
    try:
        data = _DataFile(path.with_name(data_name(path))) if locations else None
        read = {n.input[0] for n in folds}
        outputs = {o.name for o in graph.output}
        still_read = {name for n in graph.node if id(n) not in fold_ids for name in n.input} | outputs
        transposed: list[TensorProto] = []
        made: dict[tuple[str, tuple[int, ...]], str] = {}   # (weight, perm) → its transposed initializer
        alias: dict[str, str] = {}                         # a repeated Transpose's output → that initializer
        for node in folds:
            src = inits[node.input[0]]
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(src.dims)))[::-1])
            key = (src.name, tuple(perm))
            if key in made and node.output[0] not in outputs:
                alias[node.output[0]] = made[key]
                continue
            made.setdefault(key, node.output[0])
            a = read_tensor(src, staged)
            new = TensorProto(name=node.output[0], data_type=src.data_type, dims=[int(src.dims[i]) for i in perm])
            if _external(src) is not None and data is not None and perm == [1, 0]:
                data.add(new, _transposed_rows(a))
            else:
                new = numpy_helper.from_array(np.ascontiguousarray(np.transpose(np.asarray(a), perm)), node.output[0])
            transposed.append(new)
        kept = [t for t in graph.initializer if not (t.name in read and t.name not in still_read)]
        for t in kept:
            if _external(t) is not None and data is not None:
                _copy_external(t, staged, data)
        del graph.initializer[:]
        graph.initializer.extend(kept + transposed)
        nodes = [n for n in graph.node if id(n) not in fold_ids]
        for n in nodes:
            for i, name in enumerate(n.input):
                if name in alias:
                    n.input[i] = alias[name]
        del graph.node[:]
        graph.node.extend(nodes)
        if data is not None:
            _save(model, path, data)
        else:
            onnx.save_model(model, str(path))
    except BaseException:               # put the old data back: the graph file is unchanged until _save
        if data is not None:
            data.f.close()
            data.path.unlink(missing_ok=True)
        for location in locations:
            if (staged / location).exists():
                os.replace(staged / location, path.parent / location)
        raise
    finally:
        if locations:
            for f in staged.iterdir():
                f.unlink()
            staged.rmdir()
    return len(folds)


def remove_graph(path: Path) -> None:
    """Delete a graph and its external data."""
    for p in (path, path.with_name(data_name(path))):
        p.unlink(missing_ok=True)

"""fp16 and int8 variants of the exported fp32 graphs, and the real-photo calibration data they use.

Precisions (the graph carries its precision; TensorRT 11 builds what it is given):

- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`` with fragile
  ops kept fp32 (``FP16_BLOCK_OPS``: normalisations, softmax, reductions, pow/sqrt, exp/log, sin/cos),
  plus *measured* blocking: the fp32 graph runs on calibration inputs with every intermediate exposed,
  and every node that writes or reads a tensor above ``FP16_SAFE_MAX`` stays fp32; so do the nodes that
  compute a sin/cos argument (σ·1000 up to 1000 rad). The converter casts the output of every blocked
  node to fp16 even when the next node is blocked too; those fp32→fp16→fp32 round trips are removed
  afterwards (``drop_round_trip_casts``), or a chain of fp32 nodes would still overflow between them.
- ``int8``: ``quantize_dynamic`` (QInt8 weights of MatMul/Gemm with constant B); the fast CPU format. A
  graph with float outputs gets one weight scale per matrix, and its attention matmuls quantized too,
  where that costs at most ``INT8_MAX_LOSS_DB`` against a scale per column, measured against fp32 on
  the calibration inputs (``dynamic_int8``); integer outputs (tokenizer ids) keep per-column scales.
- ``int8-qdq``: ``quantize_static`` in symmetric per-channel QDQ format (QInt8 activations and weights,
  MinMax) calibrated on real photo crops of the TRAIN photos pushed through the fp32 stages (never the
  held-out photos); the TensorRT format.

Graphs with no MatMul/Gemm/Conv (the patch codec: reshapes only) gain nothing from either and are
copied as fp32. For the tokenizer, whose output is an argmax, more and more of the graph is kept fp32
(the matmul feeding the argmax, the vocabulary mix before it, every dense layer, every conv) until
``ID_AGREEMENT_MIN`` (99 %) of the ids agree with fp32 on the calibration crops; if no rung does, the
tokenizer stays fp32. Each rung's agreement is recorded.

Graphs over ~1.8 GB (``is_large``: the official tokenizer, whose readout is 4.1 GB) are never loaded whole
(``export.large``): int8 writes per-channel int8 weights streaming from the fp32 data; fp16 and int8-qdq,
whose converters hold the whole graph several times over, keep such a graph fp32 (recorded). Export writes
graphs over 256 MiB with external data as well (``export.onnx.STREAMED_WEIGHT_BYTES``); under ~1.8 GB they
convert like any other, and their converted variants are written inline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ExportError
from ..stages import StageSpec
from .large import copy_large, quantize_matmuls

EXTERNAL_DATA_BYTES = int(1.8e9)     # protobuf's hard limit is 2 GiB; leave room for the graph itself
# fp16 has 11 significant bits and overflows at 65504. A tensor above 1e4 is within 6.5x of overflow
# (one square or a sum of a few such values in the next op overflows: LayerNorm variance, logits,
# attention scores), and its fp16 spacing is 8, so a later subtraction of two such values loses all
# precision. Nodes that write or read such tensors stay fp32.
FP16_SAFE_MAX = 1e4
# Kept in fp32 whatever their measured range: normalisations and reductions accumulate (sums of squares
# overflow, means lose bits), softmax exponentiates, and sin/cos take σ·1000 up to 1000, where fp16
# spacing is 0.5 rad, which would make the time embedding meaningless.
FP16_BLOCK_OPS = ("LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare",
                  "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceProd", "Pow", "Sqrt", "Reciprocal", "Exp",
                  "Log", "Sin", "Cos")
COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
QUANT_OPS_DYNAMIC = ["MatMul", "Gemm"]
# A reduced-precision tokenizer must give the fp32 ids for at least this fraction of the calibration tokens
# (the cheapest exclusion rung that does is kept): a flipped id is a different visual word for the LLM.
ID_AGREEMENT_MIN = 0.99
QUANT_OPS_STATIC = ["MatMul", "Gemm", "Conv"]
# Dynamic int8 of a float-output graph: ONNX Runtime's DynamicQuantizeMatMul rescales an output with one
# weight scale per column in a second pass over it, 6-8 % of the int8 one-call decode at its 5 to 24 rows,
# and the attention's fp32 activation matmuls are another 5 % (measured, one thread). A faster scheme is
# kept when its error against fp32 on the calibration inputs is at most this much above that of per-column
# weight scales alone (1 dB: 26 % more error energy).
INT8_MAX_LOSS_DB = 1.0
# Calibration batches the choice is measured on (the full-size fp32 decode takes seconds an image).
INT8_SCHEME_FEEDS = 2

Feeds = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- ORT and file helpers

def ort_session(path: str | os.PathLike[str], threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; ``threads`` defaults to $OMP_NUM_THREADS (0 = ORT's choice)."""
    opts = ort.SessionOptions()
    n = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) if threads is None else threads
    opts.intra_op_num_threads = n
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def graph_files(path: str | os.PathLike[str]) -> list[Path]:
    """The graph file and its external-data file, when there is one."""
    p = Path(path)
    data = p.with_name(p.name + ".data")
    return [p, data] if data.exists() else [p]


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights stored in the graph (external or not)."""
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> list[Path]:
    """Save a graph, with its weights in ``{name}.data`` when over ``EXTERNAL_DATA_BYTES``; return the files."""
    p = Path(path)
    for old in graph_files(p):
        old.unlink(missing_ok=True)
    if initializer_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=p.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(p))
    return graph_files(p)


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def has_compute(model: onnx.ModelProto) -> bool:
    """Whether a graph has any op that a lower precision would speed up."""
    return any(n.op_type in COMPUTE_OPS for n in model.graph.node)


def copy_graph(src: Path, dst: Path) -> list[Path]:
    """Copy a graph (and its external data, renamed) to ``dst``; a graph with external data is copied
    file to file, never loaded whole."""
    if len(graph_files(src)) > 1:
        return copy_large(src, dst)
    model = load_model(src)
    return save_model(model, dst)


def graph_bytes(path: Path) -> int:
    """Bytes on disk of a graph and its external data."""
    return sum(f.stat().st_size for f in graph_files(path))


def is_large(path: Path) -> bool:
    """Whether a graph is too large to load whole for conversion: over ``EXTERNAL_DATA_BYTES`` on disk
    (export writes graphs over 256 MiB with external data too; those under this size still convert as usual)."""
    return graph_bytes(path) > EXTERNAL_DATA_BYTES


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (fp16 blocking and quantizer exclusion address nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _run(session: ort.InferenceSession, feeds: Feeds) -> list[np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


# ----------------------------------------------------------------------------- measured fp16 blocking

def activation_ranges(model: onnx.ModelProto, feeds: Sequence[Feeds], workdir: Path) -> dict[str, float]:
    """Max |x| of every float intermediate tensor over the calibration feeds (fp32 graph in ORT)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for out in node.output:
            if out and out not in existing:
                probe.graph.output.append(onnx.ValueInfoProto(name=out))
                existing.add(out)
    path = workdir / "probe.onnx"
    save_model(probe, path)
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    ranges: dict[str, float] = defaultdict(float)
    for f in (part for whole in feeds for part in split_feeds(whole)):
        for name, value in zip(names, _run(session, f)):
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size:
                ranges[name] = max(ranges[name], float(np.nanmax(np.abs(value))))
    del session
    for p in graph_files(path):
        p.unlink(missing_ok=True)
    return dict(ranges)


def split_feeds(feeds: Feeds, rows: int = 256) -> list[Feeds]:
    """One feed dict cut along the leading axis into small pieces (one image, or ``rows`` token rows),
    so that exposing every intermediate tensor stays within memory on the official geometries."""
    lead = max(v.shape[0] for v in feeds.values() if v.ndim)
    step = 1 if any(v.ndim >= 3 for v in feeds.values()) else rows
    if lead <= step:
        return [feeds]
    return [{k: (v[i:i + step] if v.ndim and v.shape[0] == lead else v) for k, v in feeds.items()}
            for i in range(0, lead, step)]


def fp16_unsafe_nodes(model: onnx.ModelProto, ranges: dict[str, float],
                      threshold: float = FP16_SAFE_MAX) -> dict[str, str]:
    """node name → why it stays fp32: it writes or reads a tensor whose measured |x| exceeds ``threshold``."""
    big = {name: v for name, v in ranges.items() if v > threshold}
    why: dict[str, str] = {}
    for node in model.graph.node:
        for out in node.output:
            if out in big:
                why[node.name] = f"writes {out} with max |x| {big[out]:.3g} > {threshold:g}"
        for inp in node.input:
            if inp in big and node.name not in why:
                why[node.name] = f"reads {inp} with max |x| {big[inp]:.3g} > {threshold:g}"
    return why


def periodic_argument_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """node name → why: every float node on the path from a graph input to a Sin/Cos argument.

    The time embedding takes sin/cos of σ·1000·freq, up to 1000 rad: fp16 spacing there is 0.5 rad, so
    the argument must be computed in fp32 from the fp32 input, not just the Sin/Cos itself.
    """
    producer = {out: n for n in model.graph.node for out in n.output}
    why: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Sin", "Cos"):
            continue
        frontier = list(node.input)
        while frontier:
            src = producer.get(frontier.pop())
            if src is None or src.name in why or src.op_type in ("Shape", "Constant"):
                continue
            why[src.name] = f"computes the argument of {node.op_type} {node.name} (up to σ·1000 rad)"
            frontier.extend(src.input)
    return why


def drop_round_trip_casts(model: onnx.ModelProto, fp32_nodes: set[str], fp32_ops: set[str]) -> int:
    """Bypass Cast(fp32→fp16)→Cast(fp16→fp32) pairs whose source is fp32; return how many were bypassed.

    The ORT converter casts every blocked node's output to fp16, even when the consumer is blocked too,
    so a chain of fp32 nodes still round-trips each tensor through fp16 (overflowing above 65504 and
    losing 13 bits). Consumers of the second Cast read the fp32 source instead.
    """
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    fp32_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}

    def to(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "to"), -1)

    def is_fp32(name: str) -> bool:
        src = producer.get(name)
        if src is None:
            return name in fp32_inputs
        return src.name in fp32_nodes or src.op_type in fp32_ops or (src.op_type == "Cast"
                                                                       and to(src) == onnx.TensorProto.FLOAT)

    rename: dict[str, str] = {}
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type != "Cast" or to(node) != onnx.TensorProto.FLOAT or node.output[0] in outputs:
            continue
        first = producer.get(node.input[0])
        if first is not None and first.op_type == "Cast" and to(first) == onnx.TensorProto.FLOAT16 \
                and is_fp32(first.input[0]):
            rename[node.output[0]] = first.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    # drop casts nobody reads any more
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and all(o not in used for o in n.output)]
        if not dead:
            return len(rename)
        for n in dead:
            graph.node.remove(n)


def convert_fp16(src: Path, dst: Path, feeds: Sequence[Feeds], block_nodes: Sequence[str] = (),
                 threshold: float = FP16_SAFE_MAX, ranges: dict[str, float] | None = None) -> dict[str, Any]:
    """Write the fp16 graph of ``src`` to ``dst``; return what stayed fp32 and why.

    ``ranges`` (from ``activation_ranges``) are measured on ``feeds`` when not given.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = load_model(src)
    _name_nodes(model)
    if ranges is None:
        with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
            ranges = activation_ranges(model, feeds, Path(tmp)) if feeds else {}
    keep = {**periodic_argument_nodes(model), **fp16_unsafe_nodes(model, ranges, threshold),
            **{n: "kept fp32 so the integer output agrees with fp32 (measured)" for n in block_nodes}}
    op_block = list(DEFAULT_OP_BLOCK_LIST) + list(FP16_BLOCK_OPS)
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=op_block, node_block_list=list(keep))
    bypassed = drop_round_trip_casts(fp16, set(keep), set(op_block))
    save_model(fp16, dst)
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)",
            "fp32_op_types": list(FP16_BLOCK_OPS), "safe_max": threshold,
            "calibration_batches": len(feeds),
            "max_abs_activation": max(ranges.values(), default=0.0),
            "fp32_nodes": keep, "fp16_round_trips_removed": bypassed}


# ----------------------------------------------------------------------------- int8

@contextlib.contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    """The ORT quantizer warns through the root logger on every call ("consider pre-processing")."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[Feeds], names: Sequence[str]) -> None:
        self._it: Iterator[Feeds] = iter([{k: f[k] for k in names} for f in feeds])

    def get_next(self) -> Feeds | None:
        return next(self._it, None)


def quantize_int8(src: Path, dst: Path, mode: str, feeds: Sequence[Feeds] = (),
                  exclude: Sequence[str] = (), calibration_cache: Path | None = None,
                  per_channel: bool = True, activation_matmuls: bool = False) -> dict[str, Any]:
    """``mode='dynamic'`` (precision ``int8``) or ``'qdq'`` (``int8-qdq``, needs calibration ``feeds``).

    ``calibration_cache``: a file where static quantization keeps the measured activation ranges, so
    that quantizing the same graph again with other exclusions does not calibrate again.
    ``per_channel``: dynamic int8 weight scales per output column (else one per matrix); QDQ is always
    per column. ``activation_matmuls``: dynamic int8 also of matmuls whose both inputs are activations
    (attention), each quantized per tensor at run time.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    model = load_model(src)
    _name_nodes(model)
    big = initializer_bytes(model) > EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, _root_log_level(logging.ERROR):
        named = Path(tmp) / "named.onnx"
        save_model(model, named)
        out = Path(tmp) / "quant.onnx"
        if mode == "dynamic":
            # Dynamic quantization first rewrites each Gemm as MatMul "NAME_MatMul" (+ Add), then looks
            # the exclusions up by name: a Gemm is excluded under its new name.
            gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
            renamed = [f"{name}_MatMul" for name in exclude if name in gemms]
            quantize_dynamic(named, out, op_types_to_quantize=QUANT_OPS_DYNAMIC, per_channel=per_channel,
                             weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude) + renamed,
                             use_external_data_format=big,
                             extra_options={"MatMulConstBOnly": not activation_matmuls})
            which = "every MatMul/Gemm" if activation_matmuls else "MatMul/Gemm with constant B"
            how = (f"quantize_dynamic(per_channel={per_channel}, weight_type=QInt8, {which}), zero weight zero "
                   f"points stored as scalars")
        elif mode == "qdq":
            if not feeds:
                raise ExportError(f"static int8 of {src.name} needs calibration inputs, got none")
            names = [i.name for i in model.graph.input]
            quantize_static(named, out, _Reader(feeds, names), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=QUANT_OPS_STATIC, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(exclude),
                            use_external_data_format=big,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "MatMulConstBOnly": True},
                            calibration_cache_path=calibration_cache)
            how = ("quantize_static(QDQ, per_channel=True, QInt8 activations and weights, symmetric, MinMax, "
                   "MatMul/Gemm with constant B and Conv)")
        else:
            raise ExportError(f"unknown int8 mode {mode!r}")
        quantized = load_model(out)
        if mode == "dynamic":
            scalar_zero_points(quantized)
        save_model(quantized, dst)
    return {"method": how, "calibration_batches": len(feeds) if mode == "qdq" else 0,
            "excluded_nodes": list(exclude)}


def scalar_zero_points(model: onnx.ModelProto) -> int:
    """Store each all-zero per-column weight zero point of a ``MatMulInteger`` (what per-channel symmetric
    quantization writes) as one scalar zero; returns how many. The same numbers, and ONNX Runtime's fused
    kernel then skips its per-column zero-point path: 2-3 % of the int8 one-call decode (measured)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    scalars: dict[int, str] = {}
    done = 0
    for node in model.graph.node:
        zp = inits.get(node.input[3]) if node.op_type == "MatMulInteger" and len(node.input) > 3 else None
        if zp is None or len(zp.dims) != 1 or numpy_helper.to_array(zp).any():
            continue
        if zp.data_type not in scalars:
            scalars[zp.data_type] = name = f"weight_zero_point_scalar_{zp.data_type}"
            zero = np.zeros((), onnx.helper.tensor_dtype_to_np_dtype(zp.data_type))
            model.graph.initializer.append(numpy_helper.from_array(zero, name))
        node.input[3] = scalars[zp.data_type]
        done += 1
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return done


def snr_db(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Signal-to-error ratio of float ``outputs`` against ``reference`` over all of them, in dB."""
    signal = sum(float(np.square(r, dtype=np.float64).sum()) for r in reference)
    error = sum(float(np.square(o.astype(np.float64) - r).sum()) for o, r in zip(outputs, reference))
    return float("inf") if error == 0 else 10.0 * float(np.log10(max(signal, 1e-300) / error))


# Dynamic int8 schemes of a float-output graph, fastest first: (name, per-channel weight scales, activation ×
# activation matmuls quantized too). The last is the most accurate and the yardstick of the others.
DYNAMIC_SCHEMES = (("per-tensor, activation matmuls too", False, True), ("per-tensor", False, False),
                   ("per-channel", True, False))


def dynamic_int8(src: Path, dst: Path, feeds: Sequence[Feeds], exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Dynamic int8 of a float-output graph, the fastest of ``DYNAMIC_SCHEMES`` whose SNR against fp32 on (up
    to ``INT8_SCHEME_FEEDS`` of) the calibration ``feeds`` is within ``INT8_MAX_LOSS_DB`` of per-channel
    weights'. Quantizing the attention's activation × activation matmuls too is tried only where the graph
    has some. Each scheme's SNR and the choice go in the notes (``int8_scheme``)."""
    feeds = list(feeds)[:INT8_SCHEME_FEEDS]
    session = ort_session(src)
    reference = [o for f in feeds for o in _run(session, f) if o.dtype.kind == "f"]
    del session
    model = onnx.load(str(src), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    has_activation_matmuls = any(n.op_type == "MatMul" and n.input[1] not in weights for n in model.graph.node)

    def write(per_channel: bool, activation_matmuls: bool) -> tuple[dict[str, Any], float]:
        notes = quantize_int8(src, dst, "dynamic", exclude=exclude, per_channel=per_channel,
                              activation_matmuls=activation_matmuls)
        s = ort_session(dst)
        return notes, snr_db([o for f in feeds for o in _run(s, f) if o.dtype.kind == "f"], reference)

    *faster, (best, per_channel, activation_matmuls) = DYNAMIC_SCHEMES
    notes, best_db = write(per_channel, activation_matmuls)
    snrs, chosen = {best: round(best_db, 2)}, best
    for name, per_channel, activation_matmuls in faster:
        if activation_matmuls and not has_activation_matmuls:
            continue
        notes, snrs[name] = write(per_channel, activation_matmuls)
        if snrs[name] >= best_db - INT8_MAX_LOSS_DB:
            chosen = name
            break
    if chosen == best and len(snrs) > 1:            # dst holds a rejected scheme: write the yardstick again
        notes, _ = write(*DYNAMIC_SCHEMES[-1][1:])
    notes["int8_scheme"] = {"chosen": chosen, "snr_db": {k: round(v, 2) for k, v in snrs.items()},
                            "max_loss_db": INT8_MAX_LOSS_DB, "calibration_batches": len(feeds)}
    return notes


# ----------------------------------------------------------------------------- per-stage conversion

def _argmax_ladder(model: onnx.ModelProto) -> list[list[str]]:
    """Exclusion ladder for an argmax output, cheapest first: nothing; the matmul feeding the argmax; the
    one before it (the vocabulary mix); every MatMul/Gemm but the one with the largest weight; every
    MatMul/Gemm (the readout); every compute node."""
    producer = {out: n for n in model.graph.node for out in n.output}
    chosen: list[str] = []
    for node in model.graph.node:
        if node.op_type != "ArgMax":
            continue
        frontier = [node.input[0]]
        while frontier and len(chosen) < 2:
            src = producer.get(frontier.pop(0))
            if src is None:
                continue
            if src.op_type in COMPUTE_OPS and src.name not in chosen:
                chosen.append(src.name)
            frontier.extend(i for i in src.input if i in producer)
    dense = chosen + [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in chosen]
    every = dense + [n.name for n in model.graph.node if n.op_type in COMPUTE_OPS and n.name not in dense]
    # The largest weight alone (the official readout's 32000×32000 layer: most of the tokenizer's time)
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    weighted = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
                and n.input[1] in sizes]
    largest = max(weighted, key=lambda n: sizes[n.input[1]]).name if weighted else None
    only_largest = [n for n in dense if n != largest] if largest else dense
    ladder: list[list[str]] = [[]]
    for rung in (chosen[:1], chosen[:2], only_largest, dense, every):
        if rung and rung != ladder[-1]:
            ladder.append(list(rung))
    return ladder


def _ids(path: Path, feeds: Sequence[Feeds]) -> np.ndarray:
    s = ort_session(path)
    return np.concatenate([_run(s, f)[0].reshape(-1) for f in feeds])


def convert_stage(precision: str, spec: StageSpec, src: Path, dst: Path, feeds: Sequence[Feeds]) -> dict[str, Any]:
    """Write ``spec``'s graph at ``precision`` (``fp16``/``int8``/``int8-qdq``) from the fp32 graph ``src``.

    ``feeds`` are calibration inputs (fp32 pipeline on TRAIN photo crops). Returns the notes recorded in
    the manifest: the method, what stayed fp32 and why, and for integer outputs the measured id agreement
    with fp32 of each exclusion tried.
    """
    model = onnx.load(str(src), load_external_data=False)     # the structure; weights are read where needed
    if not has_compute(model):
        copy_graph(src, dst)
        return {"method": "copied from fp32: the graph has no MatMul/Gemm/Conv to convert"}
    large = is_large(src)
    if large and precision != "int8":
        copy_graph(src, dst)
        return {"method": f"kept fp32: {precision} conversion loads the whole graph, and this one keeps "
                          f"{graph_bytes(src) / 1e9:.1f} GB in external data; "
                          f"int8 (streamed per-channel weights) is the reduced precision for it"}
    _name_nodes(model)
    integer_out = _integer_output(spec)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{spec.name}.{precision}."))
    ranges: dict[str, float] | None = None

    def build(exclude: Sequence[str]) -> dict[str, Any]:
        nonlocal ranges
        if precision == "fp16":
            if ranges is None:   # measured once, reused by every rung of the ladder (``model`` lacks the weights)
                ranges = activation_ranges(load_model(src), feeds, work) if feeds else {}
            return convert_fp16(src, dst, feeds, block_nodes=exclude, ranges=ranges)
        if precision == "int8":
            if large:
                return quantize_matmuls(src, dst, exclude)
            if feeds and not integer_out:
                return dynamic_int8(src, dst, feeds, exclude)
            return quantize_int8(src, dst, "dynamic", feeds, exclude)
        if precision == "int8-qdq":
            return quantize_int8(src, dst, "qdq", feeds, exclude, calibration_cache=work / "ranges.json")
        raise ExportError(f"unknown precision {precision!r}")

    try:
        return _convert_measured(spec, model, src, dst, feeds, build)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _integer_output(spec: StageSpec) -> bool:
    """Whether a stage outputs integers (tokenizer ids): reduced precision is measured by id agreement."""
    return any(t.dtype.startswith("int") for t in spec.outputs)


def _convert_measured(spec: StageSpec, model: onnx.ModelProto, src: Path, dst: Path, feeds: Sequence[Feeds],
                      build: Callable[[Sequence[str]], dict[str, Any]]) -> dict[str, Any]:
    """``build(())``, or for an integer output the exclusion ladder (see ``convert_stage``)."""
    if not _integer_output(spec) or not feeds:
        return build(())
    # Integer output (tokenizer ids): measure, and keep the matmuls next to the argmax in fp32 until the
    # ids agree with fp32 on the calibration inputs (or report the best that could be reached).
    ref = _ids(src, feeds)
    tried: list[dict[str, Any]] = []
    best_agree, best_exclude = -1.0, list[str]()
    notes: dict[str, Any] = {}
    for exclude in _argmax_ladder(model):
        notes = build(exclude)
        agree = float((_ids(dst, feeds) == ref).mean())
        tried.append({"fp32_nodes": exclude, "id_agreement": agree})
        if agree > best_agree:
            best_agree, best_exclude = agree, exclude
        if agree >= ID_AGREEMENT_MIN:
            best_agree, best_exclude = agree, exclude
            break
    if best_agree < ID_AGREEMENT_MIN:   # no partial conversion keeps the ids: the stage stays fp32
        copy_graph(src, dst)
        notes = {"method": f"kept fp32: no partial conversion kept {ID_AGREEMENT_MIN:.0%} of the fp32 ids on "
                           f"the calibration crops (best {best_agree:.4f})"}
        best_agree = float((_ids(dst, feeds) == ref).mean())
    elif tried[-1]["fp32_nodes"] != best_exclude:   # a later rung was worse: write the best one again
        notes = build(best_exclude)
    notes["id_agreement_calibration"] = best_agree
    notes["exclusions_tried"] = tried
    return notes

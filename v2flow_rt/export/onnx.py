"""One stage module → one checked ONNX graph (floor 3: the graph-level half of an export).

``export_graph``: ``torch.onnx.export`` (dynamo, opset 18 by default, ``dynamic_shapes`` from the stage
spec's symbolic dims), saved as ``{stage}.fp32.onnx`` (``.onnx.data`` beside it when the weights pass
256 MiB), ``onnx.checker.check_model`` by path, shape inference and the stage contract's I/O names.
The whole export job (parity, precisions, quality, the atomic swap) is ``export.folder.export_model``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .. import __version__
from ..errors import ExportError, V2FlowError
from ..stages import StageSpec
from .large import fold_constant_transposes
from .precision import graph_files

# Graphs with more weights than this are saved with external data, though protobuf would take them inline
# up to 2 GB: the graph rewrites below (Transpose fold, GELU order) then stream the weights instead of
# loading the graph whole beside the model being exported (at full size the 1.4 GB one-call detokenize took
# the export past 24 GB that way, so it was left unfolded: its int8 variant kept the weights its unrolled
# iterations share fp32). The precisions reload a graph whole only under ``precision.EXTERNAL_DATA_BYTES``.
STREAMED_WEIGHT_BYTES = 256 << 20


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over a state dict (sorted keys, dtypes, shapes, bytes): the identity of an in-memory model."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    import onnxruntime

    return {"v2flow_rt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------- one graph

def export_inputs(spec: StageSpec, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Sample inputs for tracing: every symbolic dim ≥ 2 (torch.export specialises sizes 0 and 1) and
    distinct where possible, so no two dims are assumed equal."""
    dims: dict[str, int] = {}
    for i, (name, (lo, opt, hi)) in enumerate(spec.dims.items()):
        want = max(lo, 2 + i, min(opt, hi))
        dims[name] = min(want, hi) if hi >= 2 else hi
    feeds = spec.sample_inputs(rng, **dims)
    return tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)


def dynamic_shapes(spec: StageSpec) -> tuple[dict[int, Any] | None, ...]:
    """``torch.export`` dynamic_shapes from the spec: one shared ``Dim`` per symbolic dim name."""
    dims = {name: torch.export.Dim(name) for name in spec.dims}
    return tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None for t in spec.inputs)


def export_graph(module: torch.nn.Module, spec: StageSpec, path: Path, opset: int,
                 rng: np.random.Generator, optimize: bool = True) -> list[Path]:
    """Export one stage module to ``path`` (checked by path, shapes inferred); return the files written.

    ``optimize``: run the exporter's onnxscript optimizer. Third-party modules are exported without it
    (DC-AE, in the codec and one-call stages): its add-zero rewrite matches constants within 1e-8 of
    zero, so DC-AE's linear attention ``num / (den + 1e-15)`` loses its epsilon and gives 0/0 = NaN where
    ReLU zeroes a whole key set (measured with onnxscript 0.7.2). ONNX Runtime and TensorRT optimise the
    graph at load anyway.
    """
    args = export_inputs(spec, rng)
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                        dynamic_shapes=dynamic_shapes(spec), input_names=spec.input_names,
                                        output_names=spec.output_names, verbose=False, optimize=optimize)
    except V2FlowError:
        raise
    except Exception as exc:
        raise ExportError(f"stage {spec.name!r}: torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    if program is None:
        raise ExportError(f"stage {spec.name!r}: torch.onnx.export returned no program")
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                  if v.const_value is not None)
    for old in graph_files(path):
        old.unlink(missing_ok=True)
    program.save(str(path), external_data=weights > STREAMED_WEIGHT_BYTES)
    fold_constant_transposes(path)
    reorder_gelus(path)
    check_graph(path, spec)
    return graph_files(path)


def _scalar(inits: dict[str, onnx.TensorProto], name: str) -> float | None:
    """The value of a one-element initializer stored in the graph file, else None."""
    t = inits.get(name)
    if t is None or int(np.prod(t.dims)) != 1 or t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return float(onnx.numpy_helper.to_array(t).reshape(()))


def reorder_gelus(path: Path) -> int:
    """Rewrite every exact GELU the exporter writes, ``x·(0.5·(1 + erf(x/√2)))``, as
    ``(x·(1 + erf(x/√2)))·0.5``, in place; return how many.

    The graph's value is the same bit for bit (a product by 0.5 is exact), and the second order is the one
    ONNX Runtime's GELU fusion recognises: the masked transformer's MLPs then run one fused ``BiasGelu``
    kernel instead of five elementwise ones (its own erf: float32 round-off apart; the int8 one-call decode
    of the default model 3–5 % faster, measured). The weights are not read (``load_external_data=False``).
    """
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)

    def made_by(name: str, op: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    count = 0
    for half_mul in graph.node:
        if half_mul.op_type != "Mul" or len(half_mul.input) != 2:
            continue
        half = next((i for i in half_mul.input if _scalar(inits, i) == 0.5), None)
        inner = next((i for i in half_mul.input if i != half), None)
        add = made_by(inner, "Add") if half is not None and inner is not None else None
        if add is None or len(readers.get(inner, [])) != 1 or not any(_scalar(inits, i) == 1.0 for i in add.input):
            continue
        erf = next((e for i in add.input if (e := made_by(i, "Erf")) is not None), None)
        div = made_by(erf.input[0], "Div") if erf is not None else None
        if div is None or abs((_scalar(inits, div.input[1]) or 0.0) - 2 ** 0.5) > 1e-6:
            continue
        x = div.input[0]
        outer = readers.get(half_mul.output[0], [])
        if len(outer) != 1 or outer[0].op_type != "Mul" or sorted(outer[0].input) != sorted([x, half_mul.output[0]]):
            continue
        del half_mul.input[:]
        half_mul.input.extend([x, inner])                  # x·(1 + erf): x precedes the Div, so order holds
        del outer[0].input[:]
        outer[0].input.extend([half_mul.output[0], half])
        count += 1
    if count:
        onnx.save_model(model, str(path))
    return count


def check_graph(path: Path, spec: StageSpec) -> None:
    """``onnx.checker`` (by path, so graphs with external data work), shape inference, I/O names."""
    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    except Exception as exc:
        raise ExportError(f"stage {spec.name!r}: {path.name} fails the ONNX checker: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    got_in = [i.name for i in graph.input]
    got_out = [o.name for o in graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise ExportError(f"stage {spec.name!r}: {path.name} has inputs {got_in} and outputs {got_out}, the stage "
                          f"contract says {spec.input_names} → {spec.output_names}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's per-stage chatter (warnings about torchvision ops and the like)."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as devnull:
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                devnull.close()
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)

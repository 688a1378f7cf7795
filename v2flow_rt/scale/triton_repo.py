"""``v2flow-rt triton-repo``: a Triton model repository of an export folder's graphs, for GPU clusters that
run Triton Inference Server itself (its onnxruntime or tensorrt backends). Standard library only.

One model per listed graph, written from the manifest's recorded stage specs (names, dtypes, symbolic
shapes, min/opt/max ranges), never from a second copy of them::

    REPO/{stage}/config.pbtxt           platform, max_batch_size, inputs/outputs, dynamic batching
    REPO/{stage}/1/model.onnx           the graph (onnxruntime_onnx), its .onnx.data beside it if any
    REPO/{stage}/1/model.plan           or a TensorRT plan built by ``v2flow-rt build`` (tensorrt_plan)

A stage whose inputs and outputs all lead with one shared symbolic dim (``batch``, ``rows``) is batched by
Triton along it: that dim leaves ``dims``, its profile maximum becomes ``max_batch_size`` and the model
gets a dynamic batcher. Any other stage (``ode_cfg``'s scalar ``cfg_scale``) is served with
``max_batch_size: 0`` and full shapes, where ``-1`` marks a symbolic dim.

By default the repository holds the one-call graphs ``tokenize`` and ``detokenize`` (images → ids and
ids → images in one graph) when the export has them; otherwise ``stages`` must name the graphs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ServingError
from ..fileio import staged_folder
from ..manifest import Manifest
from ..stages import ONE_CALL_STAGES as ONE_CALL

PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan")
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                 "bool": "TYPE_BOOL"}


def _batch_dim(record: dict[str, Any]) -> str | None:
    """The symbolic dim every input and output starts with, if there is one."""
    firsts = {t[2][0] if t[2] else None for t in record["inputs"] + record["outputs"]}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if isinstance(first, str) else None


def model_config(name: str, record: dict[str, Any], platform: str, queue_delay_us: int = 2000) -> str:
    """``config.pbtxt`` text for one recorded stage (``Manifest.stages[name]``).

    Raises ServingError for a dtype Triton has no type for, or an unknown platform.
    """
    if platform not in PLATFORMS:
        raise ServingError(f"unknown Triton platform {platform!r}; choose one of {', '.join(PLATFORMS)}")
    batch = _batch_dim(record)
    max_batch = int(record["dims"][batch][2]) if batch else 0

    def tensors(kind: str) -> str:
        rows = []
        for tname, dtype, shape in record[kind]:
            if dtype not in TRITON_DTYPES:
                raise ServingError(f"stage {name!r}: {kind[:-1]} {tname!r} has dtype {dtype!r}, which Triton "
                                   f"has no type for")
            dims = [d if isinstance(d, int) else -1 for d in (shape[1:] if batch else shape)]
            rows.append(f'  {{\n    name: "{tname}"\n    data_type: {TRITON_DTYPES[dtype]}\n'
                        f'    dims: [ {", ".join(str(d) for d in dims)} ]\n  }}')
        return f"{kind[:-1]} [\n" + ",\n".join(rows) + "\n]\n"

    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
    text = (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
            + tensors("inputs") + tensors("outputs")
            + f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n")
    if batch:
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
    return text


def _plan(folder: Path, stage: str, precision: str) -> Path:
    plans = sorted((folder / "trt").glob(f"{stage}.{precision}.*.plan"), key=lambda p: p.stat().st_mtime)
    if not plans:
        raise ServingError(f"{folder}: no TensorRT plan of {stage!r} at {precision}; build them on the GPU that "
                           f"will serve them: v2flow-rt build {folder} --precisions {precision}")
    return plans[-1]          # the newest build (plans are keyed by TensorRT version and GPU)


def write_repository(export_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                     stages: Sequence[str] | None = None, precision: str = "fp32",
                     platform: str = "onnxruntime_onnx", queue_delay_us: int = 2000) -> list[str]:
    """Write the repository (atomically: built beside ``out``, then renamed); return the model names.

    Raises ServingError if ``out`` exists and is not empty, if the one-call graphs are asked for (no
    ``stages``) and the export lacks them, or if a stage or its graph/plan is not in the export.
    """
    manifest = Manifest.load(export_dir)
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise ServingError(f"{dest} exists and is not empty; give a new --out")
    if stages is None:
        missing = [s for s in ONE_CALL if s not in manifest.stages]
        if missing:
            raise ServingError(f"{export_dir} has no one-call graph(s) {missing}; name the graphs to serve with "
                               f"--stages (this export has {', '.join(manifest.stages)})")
        stages = ONE_CALL
    unknown = [s for s in stages if s not in manifest.stages]
    if unknown:
        raise ServingError(f"{export_dir} has no stage(s) {unknown}; it has {', '.join(manifest.stages)}")
    with staged_folder(dest) as tmp:
        for stage in stages:
            version = tmp / stage / "1"
            version.mkdir(parents=True)
            if platform == "tensorrt_plan":
                shutil.copy2(_plan(Path(export_dir), stage, precision), version / "model.plan")
            else:
                graph = manifest.path(stage, precision)
                shutil.copy2(graph, version / "model.onnx")
                data = graph.with_name(graph.name + ".data")
                if data.is_file():      # the graph names its external weights file; keep that name
                    shutil.copy2(data, version / data.name)
            (tmp / stage / "config.pbtxt").write_text(
                model_config(stage, manifest.stages[stage], platform, queue_delay_us), encoding="utf-8")
        os.chmod(tmp, 0o755)
    return list(stages)

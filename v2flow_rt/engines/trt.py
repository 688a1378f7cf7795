"""TensorRT 11 engine: build from an export folder's graphs, cache plans, run with ``execute_async_v3``.

TensorRT 11 networks are always strongly typed: precision comes from the ONNX graph (fp32, fp16 with
fp32 islands, int8 QDQ), never from builder flags. Plans are cached under ``<export>/trt/`` keyed by the
TensorRT version, the GPU's compute capability, the graph's sha256 and the optimisation profile, and
rebuilt whenever one of them changes. Buffers are torch CUDA tensors on one stream; static-shape calls
are captured once as CUDA graphs and replayed.

Nothing here can run on a machine without TensorRT and an NVIDIA GPU; importing this module is safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, BackendUnavailable
from ..fileio import atomic_write_bytes
from ..manifest import Manifest
from ..stages import StageSpec
from .base import Engine


def _import_trt() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
        import torch
    except ImportError as exc:
        raise BackendUnavailable(
            "the TensorRT engine needs the tensorrt Python package (TensorRT 10/11, from NVIDIA's index) and "
            "torch with CUDA; neither can be installed on this machine") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailable("the TensorRT engine needs an NVIDIA GPU; torch sees none")
    return trt, torch


def plan_key(trt_version: str, capability: tuple[int, int], graph_sha256: str, spec: StageSpec) -> str:
    """Cache key of a built plan: any change of TensorRT, GPU generation, graph or profile rebuilds it."""
    blob = json.dumps({"trt": trt_version, "sm": list(capability), "graph": graph_sha256,
                       "profile": {k: [list(s) for s in v] for k, v in spec.profile().items()}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_plan(onnx_path: Path, spec: StageSpec, plan_path: Path, timing_cache: Path,
               workspace_gib: float = 4.0) -> None:
    """Parse the ONNX graph, add the spec's min/opt/max profile, build and write the serialized plan."""
    trt, _ = _import_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)            # TensorRT 11: strongly typed, no precision flags
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):   # by path, so external data is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(f"TensorRT failed to build {onnx_path} (see the TensorRT log above)")
    atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))
    atomic_write_bytes(plan_path, memoryview(plan))


class TrtEngine(Engine):
    """Executes an export folder's stages with TensorRT; ``build()`` makes every plan ahead of time."""

    backend = "trt"

    def __init__(self, folder: str | os.PathLike[str], precision: str = "fp32", device_id: int = 0,
                 use_cuda_graphs: bool = True) -> None:
        self.trt, self.torch = _import_trt()
        self.manifest = Manifest.load(folder)
        if precision not in self.manifest.precisions:
            raise ArtifactError(f"{folder} holds precisions {self.manifest.precisions}, not {precision!r}")
        self.precision, self.device = precision, f"cuda:{device_id}"
        self.specs = {s: self.manifest.spec(s) for s in self.manifest.files[precision]}
        self.cache_dir = Path(folder) / "trt"
        self.use_cuda_graphs = use_cuda_graphs
        self.stream = self.torch.cuda.Stream(device=self.device)
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}
        self._graphs: dict[tuple[str, tuple[tuple[int, ...], ...]], tuple[Any, dict[str, Any]]] = {}

    def plan_path(self, stage: str) -> Path:
        rel = self.manifest.files[self.precision][stage]
        cap = self.torch.cuda.get_device_capability(self.device)
        key = plan_key(self.trt.__version__, cap, self.manifest.sha256[rel], self.specs[stage])
        return self.cache_dir / f"{stage}.{self.precision}.{key}.plan"

    def build(self, stages: list[str] | None = None) -> list[Path]:
        """Build (or reuse from the cache) the plan of each stage; returns the plan paths."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for stage in stages or list(self.specs):
            plan = self.plan_path(stage)
            if not plan.is_file():
                build_plan(self.manifest.path(stage, self.precision), self.specs[stage], plan,
                           self.cache_dir / "timing.cache")
            paths.append(plan)
        return paths

    def _context(self, stage: str) -> Any:
        if stage not in self._contexts:
            plan = self.build([stage])[0]
            runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise ArtifactError(f"TensorRT cannot deserialize {plan}; delete it to rebuild")
            self._engines[stage] = engine
            self._contexts[stage] = engine.create_execution_context()
        return self._contexts[stage]

    def _torch_dtype(self, engine: Any, name: str) -> Any:
        return {self.trt.float32: self.torch.float32, self.trt.float16: self.torch.float16,
                self.trt.int64: self.torch.int64, self.trt.int32: self.torch.int32,
                self.trt.bfloat16: self.torch.bfloat16, self.trt.bool: self.torch.bool}[engine.get_tensor_dtype(name)]

    def _run(self, stage: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        ctx = self._context(stage)
        engine = self._engines[stage]
        spec = self.specs[stage]
        key = (stage, tuple(tuple(feeds[t.name].shape) for t in spec.inputs))
        with torch.cuda.stream(self.stream):
            if key in self._graphs:                        # replay: copy inputs into the captured buffers
                graph, bufs = self._graphs[key]
                for t in spec.inputs:
                    bufs[t.name].copy_(torch.from_numpy(feeds[t.name]), non_blocking=True)
                graph.replay()
            else:
                bufs = {}
                for t in spec.inputs:
                    bufs[t.name] = torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(
                        self.device, self._torch_dtype(engine, t.name))
                    ctx.set_input_shape(t.name, tuple(bufs[t.name].shape))
                for t in spec.outputs:
                    shape = tuple(ctx.get_tensor_shape(t.name))
                    bufs[t.name] = torch.empty(shape, dtype=self._torch_dtype(engine, t.name), device=self.device)
                for name, buf in bufs.items():
                    ctx.set_tensor_address(name, buf.data_ptr())
                if not ctx.execute_async_v3(self.stream.cuda_stream):
                    raise ArtifactError(f"TensorRT execution of stage {stage!r} failed")
                if self.use_cuda_graphs:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        ctx.execute_async_v3(self.stream.cuda_stream)
                    self._graphs[key] = (graph, bufs)
            self.stream.synchronize()
        return {t.name: bufs[t.name].float().cpu().numpy() if bufs[t.name].is_floating_point()
                else bufs[t.name].cpu().numpy() for t in spec.outputs}

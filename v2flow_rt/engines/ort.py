"""ONNX Runtime engine: one session per stage graph of an export folder (numpy + onnxruntime only).

Providers: ``cpu``; ``cuda`` (onnxruntime-gpu, with IO binding so outputs stay on the device until
read); ``tensorrt`` (ORT's TensorRT provider with an engine and timing cache next to the graphs and the
stage specs' min/opt/max profiles). onnxruntime-gpu replaces onnxruntime: install one or the other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, BackendUnavailable, ConfigError
from ..manifest import PRECISIONS, Manifest
from ..stages import ONE_CALL_STAGES
from .base import Engine, check_threads

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime") from exc
    return onnxruntime


def _trt_profile(shapes: Mapping[str, tuple[tuple[int, ...], ...]], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in shapes.items())


class OrtEngine(Engine):
    """Sessions over ``folder``'s graphs of one precision; stages load lazily on first use."""

    backend = "ort"

    def __init__(self, folder: str | os.PathLike[str], precision: str = "fp32", provider: str = "cpu",
                 threads: int | None = None, verify: bool = True, device_id: int = 0, cuda_graph: bool = False,
                 flush_denormals: bool = False, spinning: bool | None = None) -> None:
        """``cuda_graph`` (provider ``cuda``): capture each one-call stage (``tokenize``, ``detokenize``) as a
        CUDA graph per input shape on its first call and replay it afterwards, one launch per request;
        its inputs and outputs live in device buffers bound once per shape (ORT's ``enable_cuda_graph``).

        ``flush_denormals``: the CPU computes with denormal floats flushed to zero (ORT's
        ``session.set_denormal_as_zero``; values under 1.2e-38 become 0). A trained model's attention
        softmax and activations produce denormals, each an order of magnitude slower to compute with on x86
        (a [4, 128, 128] softmax of peaked scores: 544 against 26 µs): the default model's one-call decode
        is 2–9 % faster with them flushed. Off by default because it is not the session's alone: ONNX
        Runtime sets it on each session's own worker threads, and on the calling thread (where a one-thread
        session runs) from the process's first session, for the rest of the process, so whatever that
        thread computes afterwards (numpy included) flushes too. The CLI's inference commands and ``bench``
        turn it on; ``preserved_float_environment`` gives a thread its previous state back.

        ``spinning``: whether a session's idle worker threads busy-wait for the next call
        (``session.intra_op.allow_spinning``; only with more than one thread). None, the default: the
        one-call graphs spin (one call per request, their workers hot: 18.1 against 24.7 ms fp32, 14.4
        against 15.5 ms int8, two threads) and the stage graphs do not, since the sampling loop calls
        several of them in turn with numpy work between, and each session's spinning worker then takes the
        core the next one needs (two threads: the fp32 stage loop 49–55 ms spinning, 23–25 ms not; int8
        32.5 against 16.1–16.9 ms)."""
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        ort = _ort()
        self.manifest = Manifest.load(folder, verify=verify)
        if precision not in self.manifest.precisions:
            raise ArtifactError(f"{folder} holds precisions {self.manifest.precisions}, not {precision!r}; "
                                f"re-export with --precision {precision}")
        if provider not in PROVIDERS:
            raise BackendUnavailable(f"unknown ONNX Runtime provider {provider!r}; choose one of {sorted(PROVIDERS)}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise BackendUnavailable(
                f"ONNX Runtime here has providers {ort.get_available_providers()}, not {PROVIDERS[provider]}; "
                f"install onnxruntime-gpu (instead of onnxruntime) on a machine with an NVIDIA GPU")
        if cuda_graph and provider != "cuda":
            raise BackendUnavailable(f"CUDA graphs need the cuda provider, not {provider!r}")
        threads = check_threads(threads)
        self.precision, self.provider, self.threads, self.device_id = precision, provider, threads, device_id
        self.cuda_graph, self.flush_denormals, self.spinning = cuda_graph, flush_denormals, spinning
        self._bound: dict[tuple[str, tuple[tuple[int, ...], ...]], tuple[Any, dict[str, Any], Any]] = {}
        self.device = "cpu" if provider == "cpu" else f"cuda:{device_id}"
        self.backend = f"ort-{provider}"
        self.specs = {s: self.manifest.spec(s) for s in self.manifest.files[precision]}
        self._sessions: dict[str, Any] = {}

    def _providers(self, stage: str) -> list[Any]:
        cpu = "CPUExecutionProvider"
        if self.provider == "cpu":
            return [cpu]
        cuda_options: dict[str, Any] = {"device_id": self.device_id}
        if self.cuda_graph and stage in ONE_CALL_STAGES:
            cuda_options["enable_cuda_graph"] = "1"
        cuda = ("CUDAExecutionProvider", cuda_options)
        if self.provider == "cuda":
            return [cuda, cpu]
        folder = self.manifest.folder or Path(".")
        shapes = self.specs[stage].profile()
        trt = {"device_id": self.device_id, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(folder / "trt_cache"), "trt_timing_cache_enable": True,
               "trt_timing_cache_path": str(folder / "trt_cache"),
               "trt_profile_min_shapes": _trt_profile(shapes, 0), "trt_profile_opt_shapes": _trt_profile(shapes, 1),
               "trt_profile_max_shapes": _trt_profile(shapes, 2)}
        return [("TensorrtExecutionProvider", trt), cuda, cpu]

    def session(self, stage: str) -> Any:
        if stage not in self._sessions:
            ort = _ort()
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.threads:
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.set_denormal_as_zero", "1" if self.flush_denormals else "0")
            spin = stage in ONE_CALL_STAGES if self.spinning is None else self.spinning
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            path = self.manifest.path(stage, self.precision)
            try:
                self._sessions[stage] = ort.InferenceSession(str(path), opts, providers=self._providers(stage))
            except Exception as exc:
                raise ArtifactError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from None
        return self._sessions[stage]

    def release(self, *stages: str) -> None:
        for stage in stages or list(self._sessions):
            self._sessions.pop(stage, None)
            self._bound = {k: v for k, v in self._bound.items() if k[0] != stage}

    def _run(self, stage: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session(stage)
        names = self.specs[stage].output_names
        if self.provider == "cpu":
            return dict(zip(names, sess.run(names, feeds)))
        if self.cuda_graph and stage in ONE_CALL_STAGES:
            return self._run_graph(stage, sess, feeds)
        # On the GPU: inputs copied once to the device, outputs allocated there by ORT (IO binding).
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            binding.bind_output(name, "cuda", self.device_id)
        sess.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def _run_graph(self, stage: str, sess: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One replay of the stage's CUDA graph for this input shape (captured by ORT on the first run with a
        new ``gpu_graph_id``): inputs are copied into the bound device buffers in place, so their addresses
        never change, which is what a captured graph needs."""
        ort = _ort()
        spec = self.specs[stage]
        key = (stage, tuple(tuple(feeds[t.name].shape) for t in spec.inputs))
        if key not in self._bound:
            binding = sess.io_binding()
            values: dict[str, Any] = {}
            for t in spec.inputs:
                values[t.name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[t.name]), "cuda",
                                                                  self.device_id)
                binding.bind_ortvalue_input(t.name, values[t.name])
            dims = spec.check_inputs(feeds)
            for t in spec.outputs:
                values[t.name] = ort.OrtValue.ortvalue_from_shape_and_type(t.resolve(dims), np.dtype(t.dtype), "cuda",
                                                                           self.device_id)
                binding.bind_ortvalue_output(t.name, values[t.name])
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
            self._bound[key] = (binding, values, options)
        binding, values, options = self._bound[key]
        for t in spec.inputs:
            values[t.name].update_inplace(np.ascontiguousarray(feeds[t.name]))
        sess.run_with_iobinding(binding, options)
        return {t.name: values[t.name].numpy() for t in spec.outputs}

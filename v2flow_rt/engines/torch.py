"""PyTorch engine: the reference stages in eager mode, under ``torch.compile``, or replayed as CUDA graphs.

This is the baseline every other engine is measured against, run inside the same harness. ``mode``:

- ``eager``: the stage modules as they are;
- ``compile``: ``torch.compile(dynamic=True)`` per stage (recompiles avoided across token counts);
- ``cudagraph``: ``torch.compile(mode="reduce-overhead")`` on CUDA, which captures CUDA graphs for the
  static shapes of the loop (one graph per shape), falling back to compile on CPU is refused.

``dtype`` may be float32, float16 or bfloat16 (half types on CUDA); inputs/outputs stay float32 numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailable
from ..reference.codecs import build_codec
from ..reference.model import V2Flow
from ..reference.stage_modules import stage_module
from ..stages import stage_specs
from .base import Engine, check_threads

MODES = ("eager", "compile", "cudagraph")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchEngine(Engine):
    def __init__(self, model: V2Flow, mode: str = "eager", device: str | None = None, precision: str = "fp32",
                 threads: int | None = None, max_batch: int = 16, with_codec: bool = True,
                 flush_denormals: bool | None = None, **spec_options: Any) -> None:
        """``with_codec``: build the codec stages (the patch codec, or the DC-AE folder the model records;
        a DC-AE model without one raises BackendUnavailable or CheckpointError naming what is missing);
        False leaves them out, for stage-level benchmarks.

        ``flush_denormals``: True or False sets PyTorch's flush-denormal mode (``torch.set_flush_denormal``)
        on the calling thread, process-wide for that thread (where a one-thread engine computes); None, the
        default, leaves it as it is. See ``OrtEngine``: the same setting on both engines compares like with
        like."""
        if mode not in MODES:
            raise BackendUnavailable(f"unknown torch mode {mode!r}; choose one of {MODES}")
        if precision not in DTYPES:
            raise BackendUnavailable(f"torch precision must be one of {sorted(DTYPES)}, got {precision!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("CUDA was requested but torch sees no GPU here")
        if mode == "cudagraph" and not device.startswith("cuda"):
            raise BackendUnavailable("CUDA graphs need a CUDA device; use mode='compile' on the CPU")
        if precision != "fp32" and not device.startswith("cuda"):
            raise BackendUnavailable(f"{precision} torch inference is meant for CUDA; this device is {device}")
        threads = check_threads(threads)
        if threads:
            torch.set_num_threads(threads)
        if flush_denormals is not None:
            torch.set_flush_denormal(flush_denormals)
        self.model = model.eval().to(device)
        self.mode, self.device, self.precision = mode, device, precision
        self.backend = "torch" if mode == "eager" else f"torch-{mode}"
        self.dtype = DTYPES[precision]
        self.specs = stage_specs(model.config, max_batch=max_batch, **spec_options)
        self.codec = build_codec(model.config).to(device).eval() if with_codec else None
        if self.codec is None:
            self.specs = {k: v for k, v in self.specs.items() if not k.startswith("codec")}
        self._modules: dict[str, Any] = {}

    def module(self, stage: str) -> Any:
        if stage not in self._modules:
            mod = stage_module(stage, self.model, self.spec(stage), self.codec).to(self.device).eval()
            if self.dtype != torch.float32 and stage not in ("codec_encode", "codec_decode", "tokenizer"):
                mod = mod.to(self.dtype)
            if self.mode == "compile":
                mod = torch.compile(mod, dynamic=True)
            elif self.mode == "cudagraph":
                mod = torch.compile(mod, mode="reduce-overhead", dynamic=False)
            self._modules[stage] = mod
        return self._modules[stage]

    @torch.inference_mode()
    def _run(self, stage: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.spec(stage)
        args = []
        for t in spec.inputs:
            x = torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device)
            if x.is_floating_point() and t.name not in ("images", "latent", "cfg_scale"):
                x = x.to(self.dtype)
            args.append(x)
        out = self.module(stage)(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        result = {}
        for t, o in zip(spec.outputs, outs):
            o = o.float() if o.is_floating_point() else o
            result[t.name] = o.cpu().numpy()
        return result

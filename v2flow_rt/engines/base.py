"""The small interface every engine implements: run named numpy inputs of a stage → named outputs."""

from __future__ import annotations

import abc
import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import ConfigError, ShapeError
from ..stages import StageSpec


def check_threads(threads: Any) -> int | None:
    """None or 0 (the library's default), or a positive number of threads; ConfigError otherwise."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise ConfigError(f"threads must be a positive integer (or 0/None for the default), got {threads!r}")
    return int(threads) or None


def denormals_flushed() -> bool:
    """Whether the calling thread flushes denormal floats to zero: half the smallest normal float32, computed
    here, comes out 0 (the thread's SSE control register, which ``flush_denormals`` and
    ``torch.set_flush_denormal`` set)."""
    return float((np.array([1.1754944e-38], np.float32) * np.float32(0.5))[0]) == 0.0


@functools.cache
def _libm() -> Any:
    """The C maths library, or None (``find_library`` asks ldconfig: once a process)."""
    path = ctypes.util.find_library("m")
    libm = ctypes.CDLL(path) if path else None
    return libm if libm is not None and hasattr(libm, "fegetenv") else None


@contextlib.contextmanager
def preserved_float_environment() -> Iterator[None]:
    """Run a block, then give the calling thread back the floating-point environment it had (rounding,
    exception masks, flush-to-zero and denormals-are-zero: C's ``fegetenv`` / ``fesetenv``). Engines asked to
    flush denormals set them for the whole thread, ONNX Runtime through the process's first session: a
    benchmark or command run inside a caller's process leaves it as it found it. Where the C library has no
    ``fegetenv`` the block runs as it is."""
    libm = _libm()
    if libm is None:
        yield
        return
    saved = ctypes.create_string_buffer(256)             # fenv_t is 32 bytes on x86-64 glibc
    if libm.fegetenv(saved) != 0:
        yield
        return
    try:
        yield
    finally:
        libm.fesetenv(saved)


class Engine(abc.ABC):
    """A set of executable stages on one backend.

    Attributes: ``backend`` (e.g. ``"ort"``), ``device`` (``"cpu"``, ``"cuda:0"``), ``precision``
    (``"fp32"``, ``"fp16"``, ``"int8"``, ``"int8-qdq"``, ``"bf16"``), ``specs`` (stage name → StageSpec).
    """

    backend: str = "?"
    device: str = "cpu"
    precision: str = "fp32"
    specs: dict[str, StageSpec]

    @property
    def stage_names(self) -> list[str]:
        return list(self.specs)

    def has(self, stage: str) -> bool:
        return stage in self.specs

    def spec(self, stage: str) -> StageSpec:
        if stage not in self.specs:
            raise ShapeError(f"{self.describe()} has no stage {stage!r}; it has {self.stage_names}")
        return self.specs[stage]

    def run(self, stage: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``feeds`` against the stage spec, execute, return outputs by name (numpy, host memory)."""
        self.spec(stage).check_inputs(feeds)
        return self._run(stage, feeds)

    @abc.abstractmethod
    def _run(self, stage: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...

    def release(self, *stages: str) -> None:  # noqa: B027 (optional: engines that cache nothing free nothing)
        """Free what the engine holds for ``stages`` (all when none are named); the next ``run`` of one
        loads it again. A full-size model's tokenizer graphs hold its 4 GB readout each, so code that
        runs both the stage path and the one-call path drops one before loading the other."""

    def describe(self) -> str:
        return f"{self.backend} engine ({self.device}, {self.precision})"

    def info(self) -> dict[str, Any]:
        """What the engine is: backend, device, precision and each stage's I/O shapes."""
        return {"backend": self.backend, "device": self.device, "precision": self.precision,
                "stages": {name: {t.name: list(t.shape) for t in s.inputs + s.outputs}
                           for name, s in self.specs.items()}}

"""The project's exceptions: every user-facing failure is one of these, naming what was wrong."""

from __future__ import annotations


class V2FlowError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(V2FlowError, ValueError):
    """A configuration is wrong or inconsistent (names the field and the expected value)."""


class CheckpointError(V2FlowError):
    """A checkpoint file cannot be read safely or does not fit the model (names the file or key)."""


class ImageError(V2FlowError, ValueError):
    """An input image is missing, unreadable or of a shape or mode the pipeline refuses."""


class ShapeError(V2FlowError, ValueError):
    """An array given to a stage or engine has the wrong shape or dtype."""


class ArtifactError(V2FlowError):
    """An exported folder, graph or manifest is missing, corrupted or from another checkpoint."""


class ExportError(V2FlowError):
    """Exporting a stage failed."""


class ParityError(V2FlowError):
    """An exported stage disagrees with its PyTorch reference beyond tolerance."""

    def __init__(self, stage: str, output: str, max_abs_diff: float, max_rel_diff: float,
                 tolerance: str, detail: str = "") -> None:
        self.stage = stage
        self.output = output
        self.max_abs_diff = max_abs_diff
        self.max_rel_diff = max_rel_diff
        msg = (f"stage {stage!r}, output {output!r}: max abs diff {max_abs_diff:.3e}, "
               f"max rel diff {max_rel_diff:.3e} exceeds {tolerance}")
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class BackendUnavailable(V2FlowError):
    """An optional backend (tensorrt, CUDA, diffusers, ...) is not installed or has no device."""


class LLMError(V2FlowError, ValueError):
    """The LLM stage got an input it cannot use (layout, vocabulary, prompt length, token count)."""


class DatasetError(V2FlowError):
    """A dataset job cannot run: a source that is not a dataset, duplicate keys, an output folder written by
    another tokenizer, or input rows that never came back (names the folder, file or key)."""


class ServingError(V2FlowError):
    """The Triton server cannot start or a model repository cannot be written (names what is missing)."""


class BusyError(V2FlowError):
    """Another live process is writing the same output (names the output, the other writer's pid and the lock)."""

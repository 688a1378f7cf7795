"""Export side: stage modules, ONNX export, fp16/int8 variants, parity and quality checks (needs the ``export`` extra).

Public API::

    export_model(model, out_dir, precisions=("fp32",), opset=18, max_batch=16, progress=True, ...) -> Manifest
    validate_folder(folder, json=False) -> ValidationReport

Imported lazily so that ``import v2flow_rt.export`` does not pull in torch or onnx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .folder import export_model
    from .validate import ValidationReport, validate_folder

__all__ = ["ValidationReport", "export_model", "validate_folder"]


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from .folder import export_model

        return export_model
    if name in ("validate_folder", "ValidationReport"):
        from . import validate

        return getattr(validate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

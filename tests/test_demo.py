"""The demo's choice of backend for its reconstructions: the fastest ONNX Runtime row, run the way it was timed."""

from __future__ import annotations

import pytest

from v2flow_rt.demo import fastest_ort_row
from v2flow_rt.errors import ArtifactError


def _row(backend: str, precision: str, ms: float) -> dict:
    return {"backend": backend, "precision": precision, "detokenize": {"median_ms": ms}}


def test_the_fastest_row_may_be_a_stage_loop() -> None:
    report = {"results": {"torch": _row("torch", "fp32", 5.0), "ort-fp32": _row("ort-cpu", "fp32", 20.0),
                          "ort-int8": _row("ort-cpu", "int8", 12.0), "ort-int8-loop": _row("ort-cpu", "int8", 11.0)}}
    assert fastest_ort_row(report) == ("ort-int8-loop", "int8", False)      # PyTorch rows never count
    report["results"]["ort-int8"]["detokenize"]["median_ms"] = 10.0
    assert fastest_ort_row(report) == ("ort-int8", "int8", None)
    with pytest.raises(ArtifactError, match="no ONNX Runtime rows"):
        fastest_ort_row({"results": {"torch": _row("torch", "fp32", 5.0)}})

"""pyproject.toml tells the truth: [trt] and [llm-ort] list what their code paths import, the license is SPDX."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _imported_top_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _dists(extra: str) -> set[str]:
    deps = PYPROJECT["project"]["optional-dependencies"][extra]
    return {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in deps}


def test_trt_extra_lists_what_the_trt_engine_imports() -> None:
    imported = _imported_top_modules(ROOT / "v2flow_rt" / "engines" / "trt.py")
    assert {"tensorrt", "torch"} <= imported
    assert {"tensorrt", "torch"} <= _dists("trt")
    everything = set().union(*(_imported_top_modules(p) for p in (ROOT / "v2flow_rt").rglob("*.py")))
    if "cuda-python" in _dists("trt"):
        assert "cuda" in everything, "cuda-python is listed but never imported"


def test_license_is_an_spdx_string() -> None:
    assert PYPROJECT["project"]["license"] == "MIT"
    assert int(re.search(r"setuptools>=(\d+)", PYPROJECT["build-system"]["requires"][0]).group(1)) >= 77


def test_hypothesis_is_a_dev_dependency() -> None:
    assert "hypothesis" in _dists("dev")


def test_llm_ort_extra_is_what_generate_on_ort_needs_beyond_the_base() -> None:
    """``generate --backend ort`` (tested without torch in test_llm.py) tokenizes prompts with tokenizers
    and fingerprints a model folder with safetensors' numpy API; the extra brings those and no torch."""
    imported = _imported_top_modules(ROOT / "v2flow_rt" / "llm" / "generate.py") | \
        _imported_top_modules(ROOT / "v2flow_rt" / "manifest.py")
    assert {"tokenizers", "safetensors"} <= imported
    assert _dists("llm-ort") == {"tokenizers", "safetensors"}
    base = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in PYPROJECT["project"]["dependencies"]}
    assert "onnxruntime" in base and "torch" not in base

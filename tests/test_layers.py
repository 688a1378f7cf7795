"""The house's floors (shared/ARCHITECTURE.md): a module imports only from its floor or below, lazily or not.

Where the code moved a module to another floor than the starting layout gave it, the reason is beside it.
The check reads every ``import`` statement in the package (module level and inside functions), so an
upward edge cannot hide in a function body.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "v2flow_rt"

FLOORS: dict[int, tuple[str, ...]] = {
    1: ("v2flow_rt", "config", "errors", "sampling", "data", "fileio", "ids", "metrics", "colour", "procedural",
        "machine_load", "llm", "scale"),    # the llm and scale package files are empty
    2: ("stages", "manifest", "reference"),
    # llm.generate holds the LM's step backends (torch / ORT) and its decoding loop: the LLM's engines, used
    # by llm.export, so on the engines' floor (the starting layout put it on 4 beside the pipeline).
    3: ("engines", "export.onnx", "export.precision", "export.calibration", "export.parity", "export.large",
        "export.aoti", "llm.vocab", "llm.export", "llm.generate", "llm.base_lm", "llm.captions"),
    # export.folder is the export job: it measures quality through the pipeline (export.quality), so it
    # sits with validate on 4, and export.onnx keeps only the graph-level work of floor 3.
    4: ("pipeline", "export.validate", "export.quality", "export.folder", "llm.t2i", "llm.train", "evaluate",
        "scale.serve", "scale.ray_jobs", "scale.sources", "scale.store", "scale.triton_repo", "bench", "roofline",
        "demo", "export"),          # the package: its names (export_model, validate_folder) are floor 4's
    5: ("cli", "cli_checks", "llm.commands", "scale.commands"),
}
# Package __init__ files that only re-export their own floor's modules lazily (``export``: floor 3 and 4).
FACADES = {"export", "llm", "scale"}
TRAINING = ("reference.train", "llm.train")


def floor_of(module: str) -> int:
    """The floor of ``module`` (dotted, without ``v2flow_rt.``): its longest listed prefix's."""
    best, floor = -1, 0
    for f, names in FLOORS.items():
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, floor = len(name), f
    if best < 0:
        raise AssertionError(f"v2flow_rt.{module} is on no floor: add it to FLOORS in {__file__}")
    return floor


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name or "v2flow_rt"] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (dotted, without ``v2flow_rt.``)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "v2flow_rt":
        package = []
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("v2flow_rt"):
                target = node.module.removeprefix("v2flow_rt").lstrip(".")
            else:
                continue
            for alias in node.names:   # ``from . import validate`` names a module; ``from .x import y`` a symbol
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in known else target or "v2flow_rt")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("v2flow_rt."):
                    found.add(alias.name.removeprefix("v2flow_rt."))
    return found - {name}


def test_every_module_imports_only_its_floor_or_below() -> None:
    mods = modules()
    known = set(mods)
    upward = []
    for name, path in mods.items():
        if name in FACADES:
            continue
        for target in imports(name, path, known):
            if floor_of(target) > floor_of(name):
                upward.append(f"{name} (floor {floor_of(name)}) imports {target} (floor {floor_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_engines_never_import_export_and_the_runtime_never_imports_training() -> None:
    mods = modules()
    known = set(mods)
    bad = []
    for name, path in mods.items():
        targets = imports(name, path, known)
        if name.startswith("engines"):
            bad += [f"{name} imports {t}" for t in targets if t.startswith("export")]
        if floor_of(name) == 4 and name not in TRAINING:
            bad += [f"{name} imports training code {t}" for t in targets if t.startswith(TRAINING)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The check can fail: a lazy ``from ..pipeline import ...`` in a floor-3 module is an upward edge."""
    fake = tmp_path / "v2flow_rt" / "export"
    fake.mkdir(parents=True)
    (fake / "onnx.py").write_text("def f():\n    from ..pipeline import V2FlowPipeline\n", encoding="utf-8")
    found = imports("export.onnx", fake / "onnx.py", {"pipeline", "export.onnx"})
    assert found == {"pipeline"} and floor_of("pipeline") > floor_of("export.onnx")


@pytest.mark.parametrize("module", ["config", "sampling", "data", "stages", "manifest", "engines.ort", "pipeline",
                                    "export.validate", "export.quality", "llm.t2i", "llm.generate", "evaluate",
                                    "scale.serve", "cli"])
def test_the_onnx_runtime_path_loads_without_torch(module: str) -> None:
    """Floors 1-4 of the ORT path (and the CLI) import with torch, transformers and onnx absent."""
    code = ("import importlib, importlib.abc, sys\n"
            "class B(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers', 'onnx', 'onnxscript', 'diffusers'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, B())\n"
            f"importlib.import_module('v2flow_rt.{module}')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

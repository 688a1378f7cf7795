"""AOTInductor packages of the one-call graphs, for C++ hosts without ONNX Runtime headers (``cpp/``).

``torch.export`` of the ``tokenize`` / ``detokenize`` modules (the very modules the ONNX graphs are exported
from, dynamic batch from the stage spec), compiled ahead of time by ``torch._inductor.aoti_compile_and_package``
into ``{stage}.pt2``: a zip with the compiled kernels and the weights that LibTorch's
``torch::inductor::AOTIModelPackageLoader`` runs with no Python. Inputs and outputs follow the stage spec
(names, dtypes, shapes), in its order. Each package is checked against its module on fresh random inputs
at several batch sizes before it is recorded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExportError, ParityError
from ..stages import StageSpec
from .onnx import _quiet, export_inputs
from .parity import FP32_MAX_REL, FP32_TOLERANCE, TIE_EPS

PACKAGE_SUFFIX = ".pt2"


def _dynamic_shapes(spec: StageSpec) -> tuple[dict[int, Any] | None, ...]:
    dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, _, hi) in spec.dims.items()}
    return tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None for t in spec.inputs)


def package_metadata(spec: StageSpec, defaults: dict[str, Any]) -> dict[str, str]:
    """What a C++ host needs to call the package without Python, stored in it (``get_metadata()``):
    ``v2flow.inputs`` / ``v2flow.outputs`` as ``name:dtype:dim,dim,...;...`` in call order (``batch`` for the
    dynamic dim), the stage's attrs and ``defaults`` (e.g. the default cfg_scale) as JSON."""
    def io(ts: Any) -> str:
        return ";".join(f"{t.name}:{t.dtype}:{','.join(str(d) for d in t.shape)}" for t in ts)

    return {"v2flow.stage": spec.name, "v2flow.inputs": io(spec.inputs), "v2flow.outputs": io(spec.outputs),
            "v2flow.attrs": json.dumps(spec.attrs, sort_keys=True), "v2flow.defaults": json.dumps(defaults)}


def compile_package(module: torch.nn.Module, spec: StageSpec, path: Path, rng: np.random.Generator,
                    defaults: dict[str, Any] | None = None) -> Path:
    """``torch.export`` + AOTInductor of one stage module into ``path`` (a ``.pt2`` package)."""
    args = export_inputs(spec, rng)
    configs = {"aot_inductor.metadata": package_metadata(spec, defaults or {})}
    try:
        with torch.no_grad(), _quiet():
            program = torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(spec))
            out = torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    except Exception as exc:
        raise ExportError(f"stage {spec.name!r}: AOTInductor compilation failed: {type(exc).__name__}: {exc}") from exc
    return Path(out)


def package_parity(module: torch.nn.Module, spec: StageSpec, path: Path, rng: np.random.Generator,
                   batches: Sequence[int] = (1, 3)) -> dict[str, float]:
    """Max |package − module| / max |module| (floats) or untied id mismatches (ints) over fresh random inputs;
    ParityError beyond the fp32 tolerance or for any untied mismatch."""
    runner = torch._inductor.aoti_load_package(str(path))
    worst: dict[str, float] = {"cases": 0.0, "max_rel": 0.0, "mismatches": 0.0}
    for b in batches:
        feeds = spec.sample_inputs(rng, batch=min(b, spec.dims["batch"][2]))
        args = [torch.from_numpy(feeds[n]) for n in spec.input_names]
        with torch.no_grad():
            ref, got = module(*args), runner(*args)
        got = got[0] if isinstance(got, (list, tuple)) else got
        if ref.dtype.is_floating_point:
            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            worst["max_rel"] = max(worst["max_rel"], err)
        else:   # an id may flip only where the best two codes are tied (parity.TIE_EPS)
            with torch.no_grad():
                top = module.similarities(*args).topk(2, dim=-1).values
            tied = (top[..., 0] - top[..., 1]) <= TIE_EPS
            worst["mismatches"] += float(((got != ref) & ~tied).sum())
        worst["cases"] += 1
    if worst["max_rel"] > FP32_MAX_REL or worst["mismatches"]:
        raise ParityError(spec.name, spec.output_names[0], worst["mismatches"], worst["max_rel"],
                          f"{FP32_TOLERANCE}, exact ids", f"AOTInductor package {path.name}")
    return worst


def write_packages(modules: dict[str, torch.nn.Module], specs: dict[str, StageSpec], folder: Path,
                   rng: np.random.Generator, progress: bool = True, defaults: dict[str, Any] | None = None,
                   ) -> tuple[dict[str, str], dict[str, Any]]:
    """Compile every given one-call stage into ``folder``; returns ({stage: file name}, {stage: parity}).
    ``defaults`` (e.g. ``{"cfg_scale": 4.5}``) are recorded in each package's metadata."""
    from tqdm import tqdm

    files: dict[str, str] = {}
    parity: dict[str, Any] = {}
    for name in tqdm(list(modules), desc="aoti", unit="package", disable=not progress, leave=False):
        path = compile_package(modules[name], specs[name], folder / f"{name}{PACKAGE_SUFFIX}", rng, defaults)
        parity[name] = package_parity(modules[name], specs[name], path, rng)
        files[name] = path.name
    return files, parity

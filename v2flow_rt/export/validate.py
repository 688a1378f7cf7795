"""``validate_folder``: re-run the parity of an export folder any time, through Polygraphy's ``Comparator``
(a ``PytRunner`` over the torch stage, an ``OnnxrtRunner`` per precision, a ``TrtRunner`` when TensorRT
imports), against the source checkpoint recorded in the manifest, or against the fp32 graphs when that
checkpoint is not reachable (said in the report). The tolerances are ``export.parity``'s; the one-call
graphs are checked against the stage loop (``export.quality.one_call_rows``).
"""

from __future__ import annotations

import contextlib
import json as _json
import secrets
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ArtifactError, ParityError
from ..manifest import Manifest, checkpoint_sha256
from ..stages import StageSpec
from .parity import (
    FP32_MAX_REL,
    FP32_TOLERANCE,
    IDS_TOLERANCE,
    Feeds,
    compare_output,
    fp32_tolerance,
    gate_fp32,
    merge,
    needs_bounds,
    ordered,
    random_feeds,
    roundoff_bounds,
    tie_mask,
)
from .quality import one_call_rows

if TYPE_CHECKING:  # torch is imported where it is used: a folder can be checked against its fp32 graphs
    from torch import nn

    from ..reference.model import V2Flow


# ----------------------------------------------------------------------------- validate_folder

@dataclass
class ValidationReport:
    """What ``validate_folder`` found: one row per (stage, precision, runner)."""

    folder: str
    reference: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed: int = 0
    as_json: bool = False

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if not r["ok"]]

    def raise_for_failure(self) -> None:
        """ParityError naming the first failing stage/output."""
        for r in self.failures:
            raise ParityError(r["stage"], r["output"], r.get("max_abs", float("nan")),
                              r.get("max_rel", float("nan")), r.get("tolerance", FP32_TOLERANCE),
                              f"{r['precision']} graph on {r['runner']}")

    def summary(self) -> str:
        """One line: how many checks passed, against what reference."""
        n, bad = len(self.rows), len(self.failures)
        if not bad:
            return f"all {n} checks passed (reference: {self.reference})"
        names = sorted({f"{r['stage']}/{r['precision']}" for r in self.failures})
        return f"{bad} of {n} checks FAILED ({', '.join(names)}; reference: {self.reference})"

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "reference": self.reference, "ok": self.ok, "seed": self.seed,
                "rows": self.rows, "notes": self.notes}

    def to_json(self) -> str:
        return _json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        lines = [f"{self.folder}: reference = {self.reference}, seed {self.seed}"]
        lines += [f"note: {n}" for n in self.notes]
        for r in self.rows:
            if "id_agreement" in r:
                tied = int(r.get("tie_mismatches", 0))
                figs = f"id agreement {r['id_agreement']:.4f}" + (f" ({tied} flips at ties)" if tied else "")
            elif "max_abs" not in r:
                figs = f"{int(r.get('cases', 0))} input sets"
            else:
                figs = f"max abs {r.get('max_abs', float('nan')):.3e}  max rel {r.get('max_rel', float('nan')):.3e}"
            gate = "ok" if r["ok"] else "FAIL"
            lines.append(f"{r['stage']:13s} {r['precision']:9s} {r['runner']:8s} {r['output']:7s} {figs}  "
                         f"[{gate}: {r['tolerance']}]")
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_json() if self.as_json else self.to_text()


def _cpu_pyt_runner(module: nn.Module, spec: StageSpec) -> Any:
    """A Polygraphy PytRunner over a torch stage module, on CPU."""
    import torch
    from polygraphy import util
    from polygraphy.backend.pyt import PytRunner
    from polygraphy.common import TensorMetadata

    meta = TensorMetadata()
    for t in spec.inputs:
        meta.add(t.name, np.dtype(t.dtype), [d if isinstance(d, int) else -1 for d in t.shape])

    class CpuPytRunner(PytRunner):
        # Polygraphy 0.53's PytRunner moves inputs to CUDA and returns (outputs, time), which its own
        # Comparator no longer accepts (it reads ``inference_time``); this one stays on CPU and conforms.
        @util.check_called_by("infer")
        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
            start = time.perf_counter()
            with torch.no_grad():
                out = self.model(*[torch.from_numpy(np.ascontiguousarray(feed_dict[n])) for n in spec.input_names])
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.inference_time = time.perf_counter() - start
            # contiguous: Polygraphy's comparison views every output as its reference's shape
            return OrderedDict((n, np.ascontiguousarray(o.cpu().numpy())) for n, o in zip(spec.output_names, outs))

    # PytRunner calls its model argument if callable (a loader); a Module is callable, so wrap it.
    return CpuPytRunner(lambda: module, meta, spec.output_names, name=f"pytorch-{spec.name}")


def _trt_runner(path: Path, spec: StageSpec) -> tuple[Any | None, str]:
    """A Polygraphy TrtRunner (TensorRT 11, strongly typed: precision comes from the graph), or why not."""
    try:
        import tensorrt  # noqa: F401
        from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner
    except Exception as exc:  # ImportError, or the bindings failing to find libnvinfer
        return None, f"TensorRT runner skipped: tensorrt does not import here ({type(exc).__name__}: {exc})"
    profile = Profile()
    for name, (lo, opt, hi) in spec.profile().items():
        profile.add(name, min=lo, opt=opt, max=hi)
    network = NetworkFromOnnxPath(str(path), strongly_typed=True)
    engine = EngineFromNetwork(network, config=CreateConfig(profiles=[profile]))
    return TrtRunner(engine, name=f"trt-{path.name}"), ""


def _load_reference(m: Manifest, notes: list[str]) -> V2Flow | None:
    """The source checkpoint's model if reachable (ArtifactError if it is another checkpoint), else None."""
    src = m.source_checkpoint
    if not src or not Path(src).exists():
        notes.append(f"source checkpoint {src or '(in-memory model)'} is not reachable: graphs of every precision "
                     f"are compared with the fp32 graphs, not with PyTorch")
        return None
    m.check_source(checkpoint_sha256(src))
    from ..reference.checkpoint import from_pretrained

    return from_pretrained(src)


def validate_folder(folder: str | Path, json: bool = False, seed: int | None = None, photos: bool = True,
                    ) -> ValidationReport:
    """Re-run the parity checks of an export folder (see the module docstring).

    Raises ArtifactError for a broken folder (missing or corrupted graph, manifest from another
    checkpoint). Returns a report; ``report.ok`` is False if an fp32 graph disagrees with its reference
    (``report.raise_for_failure()`` turns that into a ParityError). ``json`` makes ``str(report)`` JSON.
    """
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    # Polygraphy logs to stdout; keep stdout for the report (``--json`` must stay parseable).
    with contextlib.redirect_stdout(sys.stderr):
        return _validate(Path(folder), json, seed, photos)


def _validate(folder: Path, json: bool, seed: int | None, photos: bool) -> ValidationReport:
    m = Manifest.load(folder, verify=True)
    seed = secrets.randbits(31) if seed is None else seed
    rng = np.random.default_rng(seed)
    report = ValidationReport(str(folder), "", seed=seed, as_json=json)
    model = _load_reference(m, report.notes)
    report.reference = "pytorch (source checkpoint)" if model is not None else "fp32 ONNX graphs"
    modules, photo_feeds = _reference_stages(m, model, photos) if model is not None else ({}, {})
    trt_note = ""
    stage_bounds: dict[str, dict[str, float]] = {}
    for stage in m.stages:
        feeds = [ordered(m.spec(stage), f) for f in random_feeds(m.spec(stage), rng)]
        feeds += [ordered(m.spec(stage), f) for f in photo_feeds.get(stage, [])[:3]]
        rows, stage_bounds[stage], why = _stage_rows(m, stage, modules.get(stage), feeds)
        report.rows += rows
        trt_note = trt_note or why
    if "detokenize" in m.stages or "tokenize" in m.stages:
        report.rows += one_call_rows(m, rng, stage_bounds.get("detokenize", {}))
    if trt_note:
        report.notes.append(trt_note)
    if not report.rows:
        raise ArtifactError(f"{folder}: nothing to validate (no stage has a graph)")
    return report


def _reference_stages(m: Manifest, model: V2Flow, photos: bool) -> tuple[dict[str, Any], dict[str, list[Feeds]]]:
    """The source model's stage modules, and (``photos``) each stage's inputs recorded on held-out photo
    crops pushed through them (a few solver steps)."""
    from ..reference.stage_modules import codec_available, stage_modules
    from ..sampling import SamplerSettings
    from ..stages import stage_specs
    from .calibration import photo_crops, record_stage_inputs

    codec, _ = codec_available(m.config)
    specs = {s: sp for s, sp in stage_specs(m.config, **m.stage_options).items()
             if codec is not None or not s.startswith("codec")}
    modules = stage_modules(model, specs, codec)   # every stage: recording photo inputs runs them all
    if not photos or codec is None:
        return modules, {}
    from ..data import HELDOUT_PHOTOS

    settings = SamplerSettings.from_config(m.config, **{k: v for k, v in m.stage_options.items() if k != "max_batch"})
    imgs = photo_crops(HELDOUT_PHOTOS, m.config.img_size)[:4]
    return modules, record_stage_inputs(model, modules, imgs, replace(settings, steps=min(settings.steps, 4)),
                                        seed=0, batch=4, max_rows=64, stages=list(m.stages))


def _stage_rows(m: Manifest, stage: str, module: nn.Module | None, feeds: list[OrderedDict[str, np.ndarray]],
                ) -> tuple[list[dict[str, Any]], dict[str, float], str]:
    """One stage through Polygraphy: its reference (the PyTorch module, or the first fp32 graph when there
    is none) against every precision's graph on ORT (and TensorRT where it imports). Returns (rows, the fp32
    round-off bounds used, why TensorRT did not run or "")."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    from .precision import ort_session

    spec = m.spec(stage)
    rows: list[dict[str, Any]] = []
    runners: list[Any] = [] if module is None else [_cpu_pyt_runner(module, spec)]
    labels: list[tuple[str, str]] = []
    trt_note = ""
    for precision in m.precisions:
        if stage not in m.files[precision]:
            continue
        path = m.path(stage, precision)
        runners.append(OnnxrtRunner(lambda p=path: ort_session(p), name=f"ort-{precision}-{stage}"))
        labels.append((precision, "ort"))
        trt, why = _trt_runner(path, spec)
        if trt is not None:
            runners.append(trt)
            labels.append((precision, "trt"))
        trt_note = trt_note or why
    if module is None:  # the first fp32 ORT runner is the reference
        labels = labels[1:]
    results = Comparator.run(runners, data_loader=feeds)
    ref_iters = results[0][1]
    ties = [tie_mask(module, spec, f) if module is not None else None for f in feeds]
    if module is None:   # the fp32 graph is the reference: it must at least run and give finite values
        for name in spec.output_names:
            finite = all(np.isfinite(it[name]).all() for it in ref_iters if it[name].dtype.kind == "f")
            rows.append({"stage": stage, "precision": "fp32", "runner": "ort", "output": name,
                         "cases": float(len(ref_iters)), "ok": bool(finite),
                         "tolerance": "reference (no PyTorch here): runs, outputs finite"})
    figures = {(i, name): merge([compare_output(it[name], r[name], t)
                                 for it, r, t in zip(results[i][1], ref_iters, ties)])
               for i in range(1, len(labels) + 1) for name in spec.output_names}
    fp32_figs = [f for (i, _), f in figures.items() if labels[i - 1][0] == "fp32"]
    bounds = (roundoff_bounds(module, spec, feeds, ref_iters)
              if module is not None and needs_bounds(fp32_figs) else {})
    for i, (precision, kind) in enumerate(labels, start=1):
        for name in spec.output_names:
            rows.append(_row(stage, precision, kind, name, figures[(i, name)], bounds.get(name, FP32_MAX_REL)))
    polygraphy = _polygraphy_opinion(results, labels, spec, bounds)
    if polygraphy is not None:
        rows.append({"stage": stage, **polygraphy})
    return rows, bounds, trt_note


def _row(stage: str, precision: str, kind: str, output: str, fig: dict[str, float], bound: float) -> dict[str, Any]:
    """A report row: fp32 gated (ids exact but for ties, floats within ``bound``), the others recorded."""
    gated = precision == "fp32"
    row = {"stage": stage, "precision": precision, "runner": kind, "output": output, **fig,
           "tolerance": (IDS_TOLERANCE if "mismatches" in fig else fp32_tolerance(bound)) if gated
           else "recorded only (judged by quality figures)"}
    try:
        if gated:
            gate_fp32(stage, output, fig, f"{precision} on {kind}", bound)
        row["ok"] = True
    except ParityError as exc:
        row["ok"], row["error"] = False, str(exc)
    return row


def _polygraphy_opinion(results: Any, labels: list[tuple[str, str]], spec: StageSpec,
                        bounds: dict[str, float]) -> dict[str, Any] | None:
    """Polygraphy's own element-wise check of the fp32 graph(s) against the reference, as a second opinion:
    a failing row, or None when it agrees (or has nothing to compare). compare_accuracy takes ONE RunResults
    holding every runner (never the reference as the second positional argument, which is fail_fast);
    comparisons pair the reference with each runner."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    ref_iters = results[0][1]
    fp32_idx = [i for i, (p, _) in enumerate(labels, start=1) if p == "fp32"]
    floats = [n for n in spec.output_names if ref_iters[0][n].dtype.kind == "f"]   # ids: see the tie rule
    if not fp32_idx or not floats:
        return None
    atol = {n: bounds.get(n, FP32_MAX_REL) * max(float(np.abs(it[n]).max()) for it in ref_iters if it[n].size)
            for n in floats}
    wanted = tuple(floats)
    compare = SimpleCompareFunc(atol=atol, rtol=0.0, find_output_func=lambda name, index, result, w=wanted:
                                [name] if name in w else [])
    accuracy = Comparator.compare_accuracy(results, comparisons=[(0, i) for i in fp32_idx], compare_func=compare)
    if bool(accuracy):
        return None
    return {"precision": "fp32", "runner": "polygraphy", "output": "*", "ok": False,
            "tolerance": "polygraphy elementwise atol = the fp32 bound * max|ref|"}

"""Parity of exported graphs against the PyTorch stages, and quality figures per precision.

Tolerances (the reason next to each):

- fp32: max |ORT − PyTorch| / max |PyTorch| ≤ ``FP32_MAX_REL`` = 1e-4 per output, i.e. relative to the
  output's largest magnitude (an element-wise relative error is meaningless near zeros). The two backends
  run the same fp32 math in a different order; measured errors are ~1e-6, so 1e-4 leaves room for deep
  graphs (the unrolled ODE) while catching any wrong op, weight or layout.
  Where the computation itself is ill-conditioned, PyTorch's own fp32 result is that far from its fp64
  result, and no fp32 graph can do better: the unrolled ODE with guidance extrapolates
  (uncond + s·(cond − uncond)) at every solver step, so round-off grows along the solver (measured on
  the bundled model: PyTorch fp32 vs fp64 3.9e-4 at guidance 3). An output that misses 1e-4 is then
  judged against ``FP64_FACTOR`` × PyTorch fp32's error against PyTorch fp64 on the same inputs
  (``roundoff_bounds``): the graph must be about as accurate as PyTorch, not more accurate than fp32 is.
- integer outputs (tokenizer ids): exact, except at ties (the reference's best two code similarities within
  ``TIE_EPS``; see there), which are counted separately.
- fp16 / int8 / int8-qdq: not judged by a tensor tolerance; their figures are recorded, and the quality
  figures (tokenizer id agreement with fp32, decoder-path PSNR through ``V2FlowPipeline``) judge them.

``validate_folder`` re-runs the parity of an export folder any time, through Polygraphy's ``Comparator``
(a ``PytRunner`` over the torch stage, an ``OnnxrtRunner`` per precision, a ``TrtRunner`` when TensorRT
imports), against the source checkpoint recorded in the manifest, or against the fp32 graphs when that
checkpoint is not reachable (said in the report).
"""

from __future__ import annotations

import contextlib
import json as _json
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ArtifactError, ParityError
from ..manifest import Manifest, checkpoint_sha256
from ..stages import StageSpec

if TYPE_CHECKING:  # torch is imported where it is used: a folder can be checked against its fp32 graphs
    from torch import nn

    from ..reference.model import V2Flow

FP32_MAX_REL = 1e-4
FP32_TOLERANCE = f"fp32 tolerance max|ort-torch|/max|torch| <= {FP32_MAX_REL:g}"
FP64_FACTOR = 4.0
# Two codes whose cosine similarities to a token differ by at most this are tied: 1e-6 is ~8 float32 ulps at
# 1.0, the rounding of a d-term dot product summed in another order. A trained codebook can hold
# (near-)duplicate codes; the argmax among them depends on summation order, even between PyTorch runs at
# two batch sizes, so such flips pick an equivalent code and are counted apart, not as errors.
TIE_EPS = 1e-6
IDS_TOLERANCE = f"exact ids (except ties: best two similarities within {TIE_EPS:g})"
# Random parity inputs are capped so that checking the official geometry stays cheap; ORT's kernels do
# not change with the size of a dynamic dim beyond these.
_CAPS = {"batch": 4, "rows": 65}

Feeds = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- inputs

def parity_cases(spec: StageSpec) -> list[dict[str, int]]:
    """Dim assignments to test: every dim at its minimum, at an odd middle value, and at max (capped).

    ``mar_step`` also mixes the batch with the first iteration (no known token) and the last (all but
    one known).
    """
    def pick(name: str, which: int) -> int:
        lo, opt, hi = spec.dims[name]
        cap = _CAPS.get(name, hi)
        return [lo, min(max(lo, 3), hi, max(cap, lo)), min(hi, max(cap, lo))][which]

    cases = [{k: pick(k, i) for k in spec.dims} for i in range(3)]
    if "keep" in spec.dims:
        lo, _, hi = spec.dims["keep"]
        cases += [{**cases[2], "keep": lo}, {**cases[0], "keep": hi}]
    unique: list[dict[str, int]] = []
    for c in cases:
        if c not in unique:
            unique.append(c)
    return unique


def random_feeds(spec: StageSpec, rng: np.random.Generator) -> list[Feeds]:
    """Fresh random inputs at every ``parity_cases`` assignment."""
    return [spec.sample_inputs(rng, **case) for case in parity_cases(spec)]


def ordered(spec: StageSpec, feeds: Feeds) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((n, np.ascontiguousarray(feeds[n])) for n in spec.input_names)


# ----------------------------------------------------------------------------- comparison

def torch_outputs(module: nn.Module, spec: StageSpec, feeds: Feeds) -> dict[str, np.ndarray]:
    """Run a torch stage module on numpy feeds → {output name: array}."""
    import torch

    with torch.no_grad():
        out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {name: np.ascontiguousarray(o.detach().cpu().numpy()) for name, o in zip(spec.output_names, outs)}


def roundoff_bounds(module: nn.Module, spec: StageSpec, feeds: Sequence[Feeds],
                    fp32_refs: Sequence[Any]) -> dict[str, float]:
    """Per float output: the fp32 bound on these feeds, max(``FP32_MAX_REL``, ``FP64_FACTOR`` × PyTorch
    fp32's own max|fp32 − fp64| / max|fp64|); ``fp32_refs``: PyTorch's fp32 outputs on ``feeds`` (by
    output name), already computed by the caller. An output whose fp64 run fails keeps ``FP32_MAX_REL``."""
    import copy

    bounds: dict[str, float] = {}
    try:
        wide = copy.deepcopy(module).double()
        for f, narrow in zip(feeds, fp32_refs):
            f64 = {n: (v.astype(np.float64) if v.dtype == np.float32 else v) for n, v in f.items()}
            for name, r in torch_outputs(wide, spec, f64).items():
                if r.dtype.kind == "f" and r.size:
                    err = float(np.abs(narrow[name].astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-30))
                    bounds[name] = max(bounds.get(name, FP32_MAX_REL), FP64_FACTOR * err)
    except (RuntimeError, TypeError) as exc:   # a stage with fixed-precision internals: no widening
        print(f"note: no fp64 reference for {spec.name}: {exc}", file=sys.stderr)
        return {}
    return bounds


def fp32_tolerance(bound: float) -> str:
    if bound <= FP32_MAX_REL:
        return FP32_TOLERANCE
    return (f"fp32 tolerance max|ort-torch|/max|torch| <= {bound:.2g} ({FP64_FACTOR:g} x PyTorch fp32's own error "
            f"against fp64 on these inputs; {FP32_MAX_REL:g} where fp32 is well-conditioned)")


def tie_mask(module: nn.Module, spec: StageSpec, feeds: Feeds) -> np.ndarray | None:
    """For the tokenizer: True where the reference's best two code similarities are within ``TIE_EPS``."""
    import torch

    if not hasattr(module, "similarities"):
        return None
    with torch.no_grad():
        sims = module.similarities(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names])
        top = sims.topk(2, dim=-1).values
    return ((top[..., 0] - top[..., 1]) <= TIE_EPS).numpy()


def compare_output(got: np.ndarray, ref: np.ndarray, ties: np.ndarray | None = None) -> dict[str, float]:
    """Figures of one output: ids → agreement (and how many mismatches are ties, when ``ties`` is given);
    floats → max abs and max abs / max |ref|."""
    if got.shape != ref.shape:
        return {"shape_mismatch": 1.0, "max_abs": float("inf"), "max_rel": float("inf")}
    if ref.dtype.kind in "iu":
        diff = got != ref
        fig = {"mismatches": float(diff.sum()), "total": float(diff.size),
               "id_agreement": float(1.0 - diff.mean()) if diff.size else 1.0, "tie_mismatches": 0.0}
        if ties is not None and ties.shape == diff.shape:
            fig["tie_mismatches"] = float((diff & ties).sum())
        return fig
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    if not np.isfinite(got).all():
        max_abs = float("inf")
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs, "ref_max": scale}


def merge(figures: Sequence[dict[str, float]]) -> dict[str, float]:
    """Worst case over several calls (sums for id counts)."""
    out: dict[str, float] = {"cases": float(len(figures))}
    for f in figures:
        for k, v in f.items():
            if k in ("mismatches", "total", "tie_mismatches"):
                out[k] = out.get(k, 0.0) + v
            elif k != "id_agreement":
                out[k] = max(out.get(k, 0.0), v)
    if "total" in out:
        out["id_agreement"] = 1.0 - out["mismatches"] / out["total"] if out["total"] else 1.0
    return out


def gate_fp32(stage: str, output: str, fig: dict[str, float], what: str, bound: float = FP32_MAX_REL) -> None:
    """ParityError if fp32 figures are out of tolerance (ids must be exact, except at exact ties; floats
    within ``bound``, ``FP32_MAX_REL`` unless ``roundoff_bounds`` widened it)."""
    if "shape_mismatch" in fig:
        raise ParityError(stage, output, float("inf"), float("inf"), "the PyTorch output shape", what)
    if "mismatches" in fig:
        real = fig["mismatches"] - fig.get("tie_mismatches", 0.0)
        if real > 0:
            raise ParityError(stage, output, fig["mismatches"], 1.0 - fig["id_agreement"], IDS_TOLERANCE,
                              f"{int(real)} of {int(fig['total'])} ids differ on {what} where the best code is not "
                              f"tied")
        return
    if not fig["max_rel"] <= max(bound, FP32_MAX_REL):
        raise ParityError(stage, output, fig["max_abs"], fig["max_rel"], fp32_tolerance(bound), what)


def needs_bounds(figs: Iterable[dict[str, float]]) -> bool:
    """Whether a float output misses the plain fp32 bound (so ``roundoff_bounds`` is worth computing)."""
    return any("mismatches" not in f and "shape_mismatch" not in f and not f["max_rel"] <= FP32_MAX_REL
               for f in figs)


def stage_parity(stage: str, spec: StageSpec, run: Callable[[Feeds], list[np.ndarray]], module: nn.Module,
                 feeds: dict[str, Sequence[Feeds]], gate: bool, cache: dict[int, Any] | None = None,
                 ) -> dict[str, dict[str, dict[str, float]]]:
    """Compare ``run`` (a graph) with the torch ``module`` on each named feed set (``random``, ``photo``).

    Returns {feed set: {output: figures}}; with ``gate`` raises ParityError on an fp32 mismatch.
    ``cache`` keeps the reference outputs per feed dict, for checking several precisions on the same feeds.
    """
    result: dict[str, dict[str, dict[str, float]]] = {}
    cache = {} if cache is None else cache
    for kind, feed_list in feeds.items():
        per_output: dict[str, list[dict[str, float]]] = {n: [] for n in spec.output_names}
        for f in feed_list:
            if id(f) not in cache:   # keyed by identity: the caller keeps the feed dicts alive
                cache[id(f)] = (torch_outputs(module, spec, f), tie_mask(module, spec, f))
            ref, ties = cache[id(f)]
            got = dict(zip(spec.output_names, run(f)))
            for name in spec.output_names:
                per_output[name].append(compare_output(got[name], ref[name], ties))
        result[kind] = {name: merge(figs) for name, figs in per_output.items() if figs}
        if gate:
            bounds = (roundoff_bounds(module, spec, feed_list, [cache[id(f)][0] for f in feed_list])
                      if needs_bounds(result[kind].values()) else {})
            for name, fig in result[kind].items():
                if name in bounds:
                    fig["bound"] = bounds[name]
                gate_fp32(stage, name, fig, f"{kind} inputs", bounds.get(name, FP32_MAX_REL))
    return result


# ----------------------------------------------------------------------------- quality

def measure_quality(folder: Path, model: V2Flow, images: np.ndarray, settings: Any, seed: int = 0,
                    ) -> dict[str, dict[str, Any]]:
    """Per precision: tokenizer id agreement with the fp32 graph and decoder-path PSNR vs the originals.

    The decoder path is the runtime's own: ``V2FlowPipeline.from_pretrained(folder, backend="ort",
    precision=...)`` tokenizes ``images`` (held-out photo crops [B,3,H,W] in [-1,1]) and detokenizes the
    ids with ``settings``' solver and steps (the fused ODE graph) and the same ``seed`` for every precision.
    The fp32 entry also records PyTorch's PSNR on the same path, its id agreement with PyTorch, how many
    of the disagreeing ids are not ties, and the fraction of tokens whose best code is tied. With one-call
    graphs, ``one_call`` holds their PSNR, their PSNR against the loop's images (same ids, orders and
    noise) and the one-call tokenize's id agreement with the stage path.
    """
    import os

    import torch

    from ..data import from_model_range
    from ..manifest import Manifest
    from ..metrics import psnr
    from ..pipeline import V2FlowPipeline
    from ..reference.stage_modules import stage_module

    manifest = Manifest.load(folder, verify=False)
    original = from_model_range(images)
    with torch.no_grad():
        enc = stage_module("codec_encode", model, manifest.spec("codec_encode"))
        dec = stage_module("codec_decode", model, manifest.spec("codec_decode"))
        latent = enc(torch.from_numpy(images))
        ids_torch = model.tokenize(latent).numpy()
        tok = stage_module("tokenizer", model, manifest.spec("tokenizer"))
        ties = tie_mask(tok, manifest.spec("tokenizer"), {"latent": latent.numpy()})
        tokens = model.sample_tokens(model.embed_ids(torch.from_numpy(ids_torch)), settings, seed=seed)
        recon_torch = dec(model.tokens_to_latent(tokens)).numpy()
    torch_psnr = psnr(from_model_range(recon_torch), original)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None
    out: dict[str, dict[str, Any]] = {}
    ids_fp32: np.ndarray | None = None
    psnr_fp32 = 0.0
    for precision in manifest.precisions:
        t0 = time.perf_counter()
        pipe = V2FlowPipeline.from_pretrained(folder, backend="ort", precision=precision, threads=threads)
        ids = pipe.tokenize(images, one_call=False)
        pipe.engine.release("tokenizer")    # at full size each tokenizer graph holds the 4 GB readout
        sampling = {"steps": settings.steps, "solver": settings.solver, "temperature": settings.temperature,
                    "cfg": settings.cfg_scale, "num_iter": settings.num_iter, "cfg_mode": settings.cfg_mode}
        recon = pipe.detokenize(ids, seed=seed, one_call=False, **sampling)              # uint8 [B,H,W,3]
        value = psnr(recon, original)
        if ids_fp32 is None:   # fp32 comes first
            ids_fp32, psnr_fp32 = ids, value
        fig: dict[str, Any] = {"images": int(images.shape[0]), "psnr": value, "psnr_delta_vs_fp32": value - psnr_fp32,
                               "token_agreement": float((ids == ids_fp32).mean()),
                               "seconds": time.perf_counter() - t0}
        if pipe.engine.has("detokenize") and pipe.engine.has("tokenize"):
            pipe.engine.release()           # the stage graphs' sessions, before the one-call graphs load
            ids1 = pipe.tokenize(images, one_call=True)
            pipe.engine.release("tokenize")
            recon1 = pipe.detokenize(ids, seed=seed, one_call=True, **sampling)
            fig["one_call"] = {"psnr": psnr(recon1, original), "psnr_vs_loop": psnr(recon1, recon),
                               "token_agreement_with_stage_path": float((ids1 == ids).mean())}
        if precision == "fp32":
            fig["token_agreement_pytorch"] = float((ids == ids_torch).mean())
            # flips among (near-)duplicate codes are ties, not errors (see TIE_EPS)
            fig["token_mismatches_pytorch_untied"] = int(((ids != ids_torch) & ~ties).sum()) if ties is not None \
                else int((ids != ids_torch).sum())
            fig["tied_token_fraction"] = float(ties.mean()) if ties is not None else 0.0
            fig["psnr_pytorch"] = torch_psnr
        out[precision] = fig
        pipe.engine.release()
        del pipe
    return out


# ----------------------------------------------------------------------------- one call vs the stage path

def one_call_rows(m: Manifest, rng: np.random.Generator, bounds: dict[str, float]) -> list[dict[str, Any]]:
    """Per precision: the one-call ``tokenize`` against the stage path's ids (exact) and the one-call
    ``detokenize`` against the sampling loop over the stage graphs of the same precision, fed the same ids,
    orders and noise (fp32 gated at ``FP32_MAX_REL`` or the stage's round-off bound; the others recorded)."""
    from ..pipeline import V2FlowPipeline

    rows: list[dict[str, Any]] = []
    cfg = m.config
    ids = rng.integers(0, cfg.codebook_size, (2, cfg.num_tokens), dtype=np.int64)
    images = rng.uniform(-1, 1, (2, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    seed = int(rng.integers(0, 2**31))
    for precision in m.precisions:
        pipe = V2FlowPipeline.from_pretrained(m.folder or ".", backend="ort", precision=precision, verify=False)
        gated = precision == "fp32"
        eng = pipe.engine
        if eng.has("tokenize") and eng.has("tokenizer") and eng.has("codec_encode"):
            ids_one = pipe.tokenize(images, one_call=True)
            eng.release("tokenize")         # one 4 GB readout at a time at full size
            fig = compare_output(ids_one, pipe.tokenize(images, one_call=False))
            eng.release("tokenizer")
            ok = fig["mismatches"] == 0 or not gated
            rows.append({"stage": "tokenize", "precision": precision, "runner": "vs-stages", "output": "ids", **fig,
                         "ok": ok, "tolerance": "exact ids of the stage path" if gated else "recorded only"})
        if eng.has("detokenize") and eng.has("mar_step"):
            attrs = eng.spec("detokenize").attrs
            kw = {"steps": attrs["steps"], "solver": attrs["solver"], "num_iter": attrs["num_iter"],
                  "cfg_mode": attrs["cfg_mode"], "temperature": attrs["temperature"],
                  "cfg": (cfg.cfg_scale if cfg.cfg_scale != 1.0 else 3.0) if attrs["guided"] else 1.0}
            one = pipe.detokenize(ids, seed=seed, output="float", one_call=True, **kw)
            loop = pipe.detokenize(ids, seed=seed, output="float", one_call=False, **kw)
            fig = compare_output(one, loop)
            bound = bounds.get("images", FP32_MAX_REL)
            row = {"stage": "detokenize", "precision": precision, "runner": "vs-loop", "output": "images", **fig,
                   "tolerance": fp32_tolerance(bound) if gated else "recorded only (judged by quality figures)"}
            try:
                if gated:
                    gate_fp32("detokenize", "images", fig, "one call vs the loop", bound)
                row["ok"] = True
            except ParityError as exc:
                row["ok"], row["error"] = False, str(exc)
            rows.append(row)
    return rows


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
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    from .precision import ort_session

    m = Manifest.load(folder, verify=True)
    seed = secrets.randbits(31) if seed is None else seed
    rng = np.random.default_rng(seed)
    report = ValidationReport(str(folder), "", seed=seed, as_json=json)
    model = _load_reference(m, report.notes)
    report.reference = "pytorch (source checkpoint)" if model is not None else "fp32 ONNX graphs"
    modules: dict[str, Any] = {}
    photo_feeds: dict[str, list[Feeds]] = {}
    if model is not None:
        from ..reference.stage_modules import codec_available, stage_modules
        from ..sampling import SamplerSettings
        from ..stages import stage_specs
        from .calibration import photo_crops, record_stage_inputs

        codec, _ = codec_available(m.config)
        specs = {s: sp for s, sp in stage_specs(m.config, **m.stage_options).items()
                 if codec is not None or not s.startswith("codec")}
        modules = stage_modules(model, specs, codec)   # every stage: recording photo inputs runs them all
        if photos and codec is not None:
            from ..data import HELDOUT_PHOTOS

            settings = SamplerSettings.from_config(m.config, **{k: v for k, v in m.stage_options.items()
                                                                 if k != "max_batch"})
            imgs = photo_crops(HELDOUT_PHOTOS, m.config.img_size)[:4]
            photo_feeds = record_stage_inputs(model, modules, imgs, replace(settings, steps=min(settings.steps, 4)),
                                              seed=0, batch=4, max_rows=64, stages=list(m.stages))
    trt_note = ""
    stage_bounds: dict[str, dict[str, float]] = {}
    for stage in m.stages:
        spec = m.spec(stage)
        feeds = [ordered(spec, f) for f in random_feeds(spec, rng)]
        feeds += [ordered(spec, f) for f in photo_feeds.get(stage, [])[:3]]
        runners: list[Any] = []
        labels: list[tuple[str, str]] = []
        if model is not None:
            runners.append(_cpu_pyt_runner(modules[stage], spec))
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
        if model is None:  # the first fp32 ORT runner is the reference
            labels = labels[1:]
        results = Comparator.run(runners, data_loader=feeds)
        ref_iters = results[0][1]
        ties = [tie_mask(modules[stage], spec, f) if model is not None else None for f in feeds]
        if model is None:   # the fp32 graph is the reference: it must at least run and give finite values
            for name in spec.output_names:
                finite = all(np.isfinite(it[name]).all() for it in ref_iters if it[name].dtype.kind == "f")
                report.rows.append({"stage": stage, "precision": "fp32", "runner": "ort", "output": name,
                                    "cases": float(len(ref_iters)), "ok": bool(finite),
                                    "tolerance": "reference (no PyTorch here): runs, outputs finite"})
        figures = {(i, name): merge([compare_output(it[name], r[name], t)
                                     for it, r, t in zip(results[i][1], ref_iters, ties)])
                   for i in range(1, len(labels) + 1) for name in spec.output_names}
        fp32_figs = [f for (i, _), f in figures.items() if labels[i - 1][0] == "fp32"]
        bounds = (roundoff_bounds(modules[stage], spec, feeds, ref_iters)
                  if model is not None and needs_bounds(fp32_figs) else {})
        stage_bounds[stage] = bounds
        for i, (precision, kind) in enumerate(labels, start=1):
            for name in spec.output_names:
                fig = figures[(i, name)]
                gated = precision == "fp32"
                bound = bounds.get(name, FP32_MAX_REL)
                row = {"stage": stage, "precision": precision, "runner": kind, "output": name, **fig,
                       "tolerance": (IDS_TOLERANCE if "mismatches" in fig else fp32_tolerance(bound)) if gated
                       else "recorded only (judged by quality figures)"}
                try:
                    if gated:
                        gate_fp32(stage, name, fig, f"{precision} on {kind}", bound)
                    row["ok"] = True
                except ParityError as exc:
                    row["ok"], row["error"] = False, str(exc)
                report.rows.append(row)
        # Polygraphy's own element-wise check of the fp32 graph(s) against the reference, as a second
        # opinion. compare_accuracy takes ONE RunResults holding every runner (never the reference as the
        # second positional argument, which is fail_fast); comparisons pair the reference with each runner.
        fp32_idx = [i for i, (p, _) in enumerate(labels, start=1) if p == "fp32"]
        floats = [n for n in spec.output_names if ref_iters[0][n].dtype.kind == "f"]   # ids: see the tie rule
        if fp32_idx and floats:
            from polygraphy.comparator import SimpleCompareFunc

            atol = {n: bounds.get(n, FP32_MAX_REL) * max(float(np.abs(it[n]).max()) for it in ref_iters if it[n].size)
                    for n in floats}
            wanted = tuple(floats)
            compare = SimpleCompareFunc(atol=atol, rtol=0.0, find_output_func=lambda name, index, result, w=wanted:
                                        [name] if name in w else [])
            accuracy = Comparator.compare_accuracy(results, comparisons=[(0, i) for i in fp32_idx],
                                                   compare_func=compare)
            if not bool(accuracy):
                report.rows.append({"stage": stage, "precision": "fp32", "runner": "polygraphy", "output": "*",
                                    "ok": False,
                                    "tolerance": "polygraphy elementwise atol = the fp32 bound * max|ref|"})
    if "detokenize" in m.stages or "tokenize" in m.stages:
        report.rows += one_call_rows(m, rng, stage_bounds.get("detokenize", {}))
    if trt_note:
        report.notes.append(trt_note)
    if not report.rows:
        raise ArtifactError(f"{folder}: nothing to validate (no stage has a graph)")
    return report

"""Parity of exported graphs against the PyTorch stages: inputs, figures and the fp32 gate.

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
  figures (``export.quality``) judge them.

Floor 3 of the house (beside ``export.onnx``): numpy and the stage contract at module load, torch where
a module runs; never the pipeline.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ParityError
from ..stages import StageSpec

if TYPE_CHECKING:
    from torch import nn

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

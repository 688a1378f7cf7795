"""Benchmarks in one harness: PyTorch eager and ``torch.compile`` as baselines beside every ONNX Runtime
precision, per stage and end to end, reported as ratios measured in the same run.

Also reports matmul FLOPs per stage and per decode, the fraction of this machine's measured matrix-multiply
peak that the fused velocity ODE loop and each backend's whole decode reach, and the decode's floor: its
matmul FLOPs at ONNX Runtime's measured MatMul rate (the yardsticks are in ``roofline``). Times are medians
of ``repeat`` runs after warm-up; the end-to-end times behind the ratios are taken with all backends
interleaved (``measure_interleaved``).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .engines.base import preserved_float_environment
from .fileio import atomic_write
from .metrics import psnr
from .pipeline import V2FlowPipeline
from .roofline import detokenize_flops, mar_step_flops, matmul_peak, matmul_split, ode_flops, velocity_flops_per_eval
from .sampling import SamplerSettings, tokens_per_iteration
from .stages import ONE_CALL_STAGES


def measure(fn: Callable[[], Any], warmup: int = 1, repeat: int = 5) -> dict[str, float]:
    """Wall time of ``fn`` in ms: median, min and p90 over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    return _summary([_timed(fn) for _ in range(repeat)])


def measure_interleaved(fns: dict[str, Callable[[], Any]], repeat: int = 5, blocks: int = 5,
                        settle_s: float = 0.1, warm_s: float = 0.2) -> dict[str, dict[str, Any]]:
    """``measure`` of several functions whose times are compared: ``blocks`` rounds, in each every function
    runs untimed for ``warm_s``, then about ``repeat / blocks`` timed runs; each summary also holds its
    per-round medians (``block_median_ms``), from which ``speedup`` takes its ratio. A change of the machine's
    speed during the benchmark (a shared machine's clock and neighbours: PyTorch eager's median moved 12 %
    between two back-to-back runs here) then moves only the rounds it falls in.

    Before each function's turn the harness waits ``settle_s``: the previous function's thread-pool workers
    spin on after it returns (with two threads, PyTorch's 2.5 ms tokenize took 6 to 14 ms in the rounds right
    after ONNX Runtime's without the wait). The machine then needs some 50 ms of work to come back to speed
    (one thread, medians of 12 rounds by call after the pause: PyTorch eager's decode 43.1, 39.6, 39.1,
    38.9 ms, ONNX Runtime's int8 one call 15.5, 12.5, 12.1, 12.2 ms), which a short call pays on more of its
    first calls than a long one does; so each turn first runs its function untimed for ``warm_s`` (at least
    once), and every timed run is a steady one."""
    blocks = max(1, min(blocks, repeat))
    times: dict[str, list[list[float]]] = {name: [] for name in fns}
    for block in range(blocks):
        runs = repeat // blocks + (block < repeat % blocks)
        for name, fn in fns.items():
            time.sleep(settle_s)
            _warm(fn, warm_s)
            times[name].append([_timed(fn) for _ in range(runs)])
    return {name: {**_summary([x for b in t for x in b]), "block_median_ms": [float(np.median(b)) for b in t]}
            for name, t in times.items()}


def _warm(fn: Callable[[], Any], seconds: float) -> None:
    """Untimed calls of ``fn`` until ``seconds`` have passed, at least one."""
    end = time.perf_counter() + seconds
    fn()
    while time.perf_counter() < end:
        fn()


def speedup(base: dict[str, Any], other: dict[str, Any]) -> float:
    """How many times faster ``other`` ran than ``base`` (two ``measure`` summaries): the median over rounds
    of the ratio of their round medians when both come from one ``measure_interleaved``, else the ratio of
    their medians."""
    if "block_median_ms" in base and len(base["block_median_ms"]) == len(other.get("block_median_ms", ())):
        return float(np.median(np.divide(base["block_median_ms"], other["block_median_ms"])))
    return float(base["median_ms"] / other["median_ms"])


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _summary(times: list[float]) -> dict[str, float]:
    arr = np.array(times)
    return {"median_ms": float(np.median(arr)), "min_ms": float(arr.min()), "p90_ms": float(np.percentile(arr, 90))}


def _pipelines(model: str, export_dir: str | None, precisions: list[str], torch_modes: list[str],
               threads: int | None, flush_denormals: bool) -> dict[str, V2FlowPipeline]:
    pipes: dict[str, V2FlowPipeline] = {}
    for mode in torch_modes:
        pipes[mode] = V2FlowPipeline.from_pretrained(model, backend=mode, threads=threads,
                                                     flush_denormals=flush_denormals)
    if export_dir:
        for p in precisions:
            pipes[f"ort-{p}"] = V2FlowPipeline.from_pretrained(export_dir, backend="ort", precision=p, threads=threads,
                                                               flush_denormals=flush_denormals)
    return pipes


@preserved_float_environment()
def run_bench(model: str = "default", export_dir: str | None = None, precisions: tuple[str, ...] = ("fp32",),
              torch_modes: tuple[str, ...] = ("torch", "torch-compile"), batch: int = 1, repeat: int = 5,
              threads: int | None = None, progress: bool = True, steps: int | None = None,
              split: bool = False, flush_denormals: bool = True) -> dict[str, Any]:
    """Time every backend on the same ids, images and seed; ratios are against PyTorch eager, from end-to-end
    times taken with the backends interleaved (``measure_interleaved``: ``repeat`` timed runs each).

    A backend with one-call graphs gets two rows: ``NAME`` (one call per tokenize / detokenize, as the
    pipeline picks; each row's ``one_call`` says which ran) and ``NAME-loop`` (the stage graphs and the
    numpy loop), both decoding the same ids with the same seeded orders and noise. On PyTorch eager,
    ``torch`` is the one-call module and ``torch-loop`` the stage loop, as the official sampler runs.

    ``steps``: ODE steps of the decode (default: the model's; equal to an export's baked steps, the ORT
    backends run the fused ODE graphs). ``split``: also time each ONNX Runtime one-call ``detokenize``
    graph with and without its matmul nodes (``matmul_split``; CPU provider). ``flush_denormals``: every
    backend computes with denormal floats flushed to zero, or every one without (``OrtEngine``); the calling
    thread's floating-point environment is restored afterwards."""
    from tqdm import tqdm

    from .data import HELDOUT_PHOTOS, fitting_crops, from_model_range, load_photo
    from .machine_load import LoadMeter

    meter = LoadMeter().start()     # other work on the machine moves the ratios: record it, warn about it
    pipes = _pipelines(model, export_dir, list(precisions), list(torch_modes), threads, flush_denormals)
    base = pipes[next(iter(pipes))]
    cfg = base.config
    settings = SamplerSettings.from_config(cfg, steps=steps)
    photos = [load_photo(n) for n in HELDOUT_PHOTOS]
    crops = fitting_crops(photos, cfg.img_size, per_image=max(1, batch // 2 + batch % 2))[0]
    crops = np.concatenate([crops] * -(-batch // len(crops)))[:batch]
    ids = base.tokenize(crops)
    rng = np.random.default_rng(0)
    rows = batch * max(tokens_per_iteration(cfg.num_tokens, settings.num_iter))
    stage_inputs = {
        "mar_step": base.engine.spec("mar_step").sample_inputs(rng, batch=batch, keep=cfg.num_tokens * 3 // 2),
        "ode": {"noise": rng.standard_normal((rows, cfg.token_dim), dtype=np.float32),
                "z": rng.standard_normal((rows, cfg.decoder_dim), dtype=np.float32)},
        "velocity_rows256": {"x": rng.standard_normal((256, cfg.token_dim), dtype=np.float32),
                             "t": np.full(256, 500.0, np.float32),
                             "c": rng.standard_normal((256, cfg.decoder_dim), dtype=np.float32)},
        "ode_rows256": {"noise": rng.standard_normal((256, cfg.token_dim), dtype=np.float32),
                        "z": rng.standard_normal((256, cfg.decoder_dim), dtype=np.float32)},
    }
    results: dict[str, Any] = {}
    reference_images = None
    # a backend with one-call graphs is timed both ways: "NAME" as the pipeline picks (one call per decode
    # when the baked settings equal the request), "NAME-loop" through the stage graphs and the numpy loop
    runs: list[tuple[str, V2FlowPipeline, bool | None, dict[str, bool]]] = []
    for name, pipe in pipes.items():
        one = {s: pipe.serves_in_one_call(s, settings if s == "detokenize" else None) for s in ONE_CALL_STAGES}
        runs.append((name, pipe, None, one))
        if any(one.values()) and pipe.engine.has("mar_step"):
            runs.append((f"{name}-loop", pipe, False, dict.fromkeys(ONE_CALL_STAGES, False)))
    # the end-to-end times every ratio is taken from: all backends in interleaved rounds
    def decode(pipe: V2FlowPipeline, one_call: bool | None) -> Callable[[], Any]:
        return lambda: pipe.detokenize(ids, seed=0, steps=settings.steps, output="float", one_call=one_call)

    def encode(pipe: V2FlowPipeline, one_call: bool | None) -> Callable[[], Any]:
        return lambda: pipe.tokenize(crops, one_call=one_call)

    with tqdm(total=2, desc="bench end to end, interleaved", disable=not progress) as bar:
        detokenize = measure_interleaved({name: decode(pipe, oc) for name, pipe, oc, _ in runs}, repeat)
        bar.update()
        tokenize = measure_interleaved({name: encode(pipe, oc) for name, pipe, oc, _ in runs}, repeat)
        bar.update()
    for name, pipe, one_call, used in tqdm(runs, desc="bench stages", disable=not progress):
        eng = pipe.engine
        r: dict[str, Any] = {"backend": eng.backend, "precision": eng.precision,
                             "one_call": {s: bool(v) for s, v in used.items()},
                             "detokenize": detokenize[name], "tokenize": tokenize[name]}
        stages = {}
        for stage, feeds in stage_inputs.items():
            real = stage.split("_rows")[0]
            if eng.has(real) and one_call is not False:     # a "-loop" row's stages are its row above's
                stages[stage] = measure(lambda: eng.run(real, feeds), 1, repeat)  # noqa: B023
        r["stages"] = stages
        if split and eng.backend == "ort-cpu" and used["detokenize"]:
            feeds = eng.spec("detokenize").sample_inputs(rng, batch=batch)
            r["detokenize_split"] = matmul_split(eng.manifest.path("detokenize", eng.precision), feeds,
                                                 threads, repeat, flush_denormals)
        images = pipe.detokenize(ids, seed=0, steps=settings.steps, output="float", one_call=one_call)
        if reference_images is None:
            reference_images = images
        r["psnr_vs_" + next(iter(pipes))] = psnr(from_model_range(reference_images), from_model_range(images))
        r["ids_equal_" + next(iter(pipes))] = bool((pipe.tokenize(crops, one_call=one_call) == ids).all())
        results[name] = r
    first = next(iter(results))
    for r in results.values():
        r["detokenize_speedup"] = speedup(results[first]["detokenize"], r["detokenize"])
        r["tokenize_speedup"] = speedup(results[first]["tokenize"], r["tokenize"])
    peak = matmul_peak(threads=threads)
    flops = {"ode_per_call": ode_flops(cfg, rows, settings.steps, settings.solver),
             "ode_rows256": ode_flops(cfg, 256, settings.steps, settings.solver),
             "velocity_rows256": 256 * velocity_flops_per_eval(cfg),
             "mar_step": mar_step_flops(cfg, batch, cfg.num_tokens // 2),
             "detokenize": detokenize_flops(cfg, batch, settings)}
    # the decode's matmuls at this machine's ORT MatMul rate: no engine running them can be faster
    floor_ms = flops["detokenize"] / peak["ort_gflops"] / 1e6
    for r in results.values():
        r["detokenize_gflops"] = flops["detokenize"] / r["detokenize"]["median_ms"] / 1e6
        r["detokenize_ort_peak_fraction"] = floor_ms / r["detokenize"]["median_ms"]
        st = r["stages"]
        if "ode_rows256" in st:
            gflops = flops["ode_rows256"] / st["ode_rows256"]["median_ms"] / 1e6
            r["ode_rows256_gflops"] = gflops
            r["ode_rows256_peak_fraction"] = gflops / peak["peak_gflops"]
    return {
        "model": model, "config": cfg.name, "batch": batch, "repeat": repeat, "threads": threads,
        "flush_denormals": flush_denormals,
        "sampler": settings.__dict__, "tokens_per_iteration": tokens_per_iteration(cfg.num_tokens, settings.num_iter),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load": meter.stop()},
        "matmul_peak": peak, "flops": flops, "detokenize_floor_ms": floor_ms, "baseline": first, "results": results,
    }


def plot(report: dict[str, Any], png: str | Path) -> None:
    """Bar chart of end-to-end detokenize and tokenize speed-ups against the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    det = [report["results"][n]["detokenize_speedup"] for n in names]
    tok = [report["results"][n]["tokenize_speedup"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.6))
    ax.bar(x - 0.2, det, 0.4, label="detokenize")
    ax.bar(x + 0.2, tok, 0.4, label="tokenize")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel(f"speed-up vs {report['baseline']}")
    n = report.get("threads")
    threads = f"{n} thread{'s' * (n != 1)}" if n else "default threads"
    flush = report.get("flush_denormals")
    denormals = "" if flush is None else ", denormals flushed" if flush else ", denormals kept"
    ax.set_title(f"{report['config']}, batch {report['batch']}, {threads} on {report['machine']['cpus']} CPU cores"
                 f"{denormals}")
    ax.legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)

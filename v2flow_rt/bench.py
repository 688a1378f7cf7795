"""Benchmarks in one harness: PyTorch eager and ``torch.compile`` as baselines beside every ONNX Runtime
precision, per stage and end to end, reported as ratios measured in the same run.

Also reports matmul FLOPs per stage and per decode, the fraction of this machine's measured matrix-multiply
peak that the fused velocity ODE loop and each backend's whole decode reach, and the decode's floor: its
matmul FLOPs at ONNX Runtime's measured MatMul rate. Times are medians of ``repeat`` runs after warm-up;
the end-to-end times behind the ratios are taken with all backends interleaved (``measure_interleaved``).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import V2FlowConfig
from .engines.base import preserved_float_environment
from .fileio import atomic_write
from .metrics import psnr
from .pipeline import V2FlowPipeline
from .sampling import SamplerSettings, evaluations, tokens_per_iteration
from .sampling.solvers import evaluated_sigmas, sigma_grid
from .stages import ONE_CALL_STAGES


def measure(fn: Callable[[], Any], warmup: int = 1, repeat: int = 5) -> dict[str, float]:
    """Wall time of ``fn`` in ms: median, min and p90 over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    return _summary([_timed(fn) for _ in range(repeat)])


def measure_interleaved(fns: dict[str, Callable[[], Any]], repeat: int = 5, blocks: int = 5,
                        settle_s: float = 0.1) -> dict[str, dict[str, Any]]:
    """``measure`` of several functions whose times are compared: ``blocks`` rounds, in each every function
    runs once untimed, then about ``repeat / blocks`` timed runs; each summary also holds its per-round
    medians (``block_median_ms``), from which ``speedup`` takes its ratio. A change of the machine's speed
    during the benchmark (a shared machine's clock and neighbours: PyTorch eager's median moved 12 % between
    two back-to-back runs here) then moves only the rounds it falls in. Before each function's turn the
    harness waits ``settle_s`` and makes the untimed run: the previous function's thread-pool workers spin
    on after it returns (with two threads, PyTorch's 2.5 ms tokenize took 6 to 14 ms in the rounds right
    after ONNX Runtime's without the wait)."""
    blocks = max(1, min(blocks, repeat))
    times: dict[str, list[list[float]]] = {name: [] for name in fns}
    for block in range(blocks):
        runs = repeat // blocks + (block < repeat % blocks)
        for name, fn in fns.items():
            time.sleep(settle_s)
            fn()
            times[name].append([_timed(fn) for _ in range(runs)])
    return {name: {**_summary([x for b in t for x in b]), "block_median_ms": [float(np.median(b)) for b in t]}
            for name, t in times.items()}


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


# The environment variables through which numpy's BLAS builds (OpenBLAS, MKL, BLIS, OpenMP ones) take their
# thread count; read once when numpy loads, so a count of its own needs a process of its own.
_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")

_NUMPY_MATMUL = """
import sys, time
import numpy as np
n, warmup, repeat = (int(v) for v in sys.argv[1:4])
rng = np.random.default_rng(0)
a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
times = []
for i in range(warmup + repeat):
    t0 = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t0)
print(min(times[warmup:]) * 1e3)
"""


def numpy_matmul_ms(n: int, repeat: int, threads: int | None) -> float:
    """The least time (ms) of numpy's float32 [n, n] × [n, n] over ``repeat`` runs, its BLAS limited to
    ``threads`` (None: the BLAS's own default). Runs in a child process: a BLAS reads its thread count when
    it loads."""
    import subprocess
    import sys

    env = dict(os.environ)
    if threads:
        env.update({var: str(threads) for var in _BLAS_THREAD_VARS})
    done = subprocess.run([sys.executable, "-c", _NUMPY_MATMUL, str(n), "2", str(repeat)], env=env,
                          capture_output=True, text=True, check=True)
    return float(done.stdout)


def matmul_peak(n: int = 1024, repeat: int = 7, threads: int | None = None) -> dict[str, Any]:
    """This machine's float32 matrix-multiply rate (GFLOP/s) through ONNX Runtime's MatMul (the kernels
    the ORT engine uses) and numpy's BLAS, both on ``threads`` threads (None: each library's default); the
    larger is the peak the efficiency figures divide by."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    flops = 2.0 * n ** 3
    ort_ms = measure(lambda: sess.run(None, {"a": a, "b": b}), 2, repeat)["min_ms"]
    np_ms = numpy_matmul_ms(n, repeat, threads)
    ort_g, np_g = flops / ort_ms / 1e6, flops / np_ms / 1e6
    return {"ort_gflops": ort_g, "numpy_gflops": np_g, "peak_gflops": max(ort_g, np_g), "n": n,
            "threads": threads}


def velocity_flops_per_eval(cfg: V2FlowConfig) -> float:
    """Matmul FLOPs of one velocity-net call per token row, all of it (the ``velocity`` stage)."""
    return modulation_flops(cfg) + state_flops(cfg)


def modulation_flops(cfg: V2FlowConfig) -> float:
    """Per token row and σ: the adaLN modulations (3 per block, 2 for the final layer), which depend on
    (σ, condition) only."""
    w = cfg.flow_width
    return 2.0 * (3 * cfg.flow_depth + 2) * w * w


def state_flops(cfg: V2FlowConfig) -> float:
    """Per token row and evaluation: the matmuls on the state (input projection, block MLPs, output)."""
    w, c = cfg.flow_width, cfg.token_dim
    return 2.0 * (c * w + cfg.flow_depth * 2 * w * w + w * c)


def ode_flops(cfg: V2FlowConfig, rows: int, steps: int, solver: str, guided: bool = False) -> float:
    """One fused ODE solve of ``rows`` tokens as the fused graph runs it: the condition embedding once, the
    modulations once per distinct σ the solver evaluates, the state's matmuls at every evaluation."""
    copies = 2 if guided else 1
    sigmas = len(evaluated_sigmas(solver, sigma_grid(steps)))
    return rows * copies * (evaluations(solver, steps) * state_flops(cfg) + sigmas * modulation_flops(cfg)
                            + 2.0 * cfg.decoder_dim * cfg.flow_width)


def mar_step_flops(cfg: V2FlowConfig, batch: int, known: int, predicted: int | None = None) -> float:
    """Matmul FLOPs of one masked-transformer call with ``known`` known tokens (attention included).

    ``predicted`` = M: the one-call graph's call, whose last decoder block computes attention outputs,
    projection and MLP only at the M rows the iteration predicts."""
    n, buf = cfg.num_tokens, cfg.buffer_size

    def block(dim: int, seq: int, rows: int) -> float:       # qkv on every row; the rest on ``rows``
        hidden = int(dim * cfg.mlp_ratio)
        return 2.0 * seq * 3 * dim * dim + 4.0 * rows * seq * dim + 2.0 * rows * (dim * dim + 2 * dim * hidden)

    enc_seq, dec_seq = buf + known, buf + n
    enc = cfg.encoder_depth * block(cfg.encoder_dim, enc_seq, enc_seq) + 2.0 * n * cfg.token_dim * cfg.encoder_dim
    dec = ((cfg.decoder_depth - 1) * block(cfg.decoder_dim, dec_seq, dec_seq)
           + block(cfg.decoder_dim, dec_seq, dec_seq if predicted is None else predicted)
           + 2.0 * enc_seq * cfg.encoder_dim * cfg.decoder_dim)
    return batch * (enc + dec)


def detokenize_flops(cfg: V2FlowConfig, batch: int, settings: SamplerSettings) -> float:
    """Matmul FLOPs of one whole decode of ``batch`` images: the ids' embedding, each masked-AR iteration's
    masked transformer (twice with ``mar`` guidance) and the ODE solve of the tokens it predicts, as the
    one-call graph runs them.
    Divided by a matmul peak it is the least time any engine can take for the decode."""
    total = 2.0 * batch * cfg.num_tokens * cfg.llm_dim * cfg.encoder_dim      # token_embed's projector
    known = 0
    passes = 2 if settings.guided and settings.cfg_mode == "mar" else 1
    for m in tokens_per_iteration(cfg.num_tokens, settings.num_iter):
        total += passes * mar_step_flops(cfg, batch, known, predicted=m)
        total += ode_flops(cfg, batch * m, settings.steps, settings.solver, settings.guided)
        known += m
    return total


# ONNX Runtime's matrix-multiply kernels, as its optimized graphs name them (fp32, fused, dynamic int8, QDQ).
MATMUL_OPS = frozenset({"Gemm", "MatMul", "FusedMatMul", "DynamicQuantizeMatMul", "MatMulInteger",
                        "MatMulIntegerToFloat", "QLinearMatMul", "MatMulNBits"})


def _matmul_flops(node: Any, values: dict[str, np.ndarray]) -> float:
    """2 · (output elements) · K of one matmul node, from the shapes it saw in a run."""
    a = values[node.input[0]]
    trans = {x.name: x.i for x in node.attribute}.get("transA", 0)
    return 2.0 * values[node.output[0]].size * a.shape[-2 if trans else -1]


def matmul_split(graph: str | Path, feeds: dict[str, np.ndarray], threads: int | None = None,
                 repeat: int = 20, flush_denormals: bool = False) -> dict[str, Any]:
    """Where a graph's time goes on ONNX Runtime's CPU provider: its matmul nodes against everything else.

    The graph as ONNX Runtime runs it (after its fusions, ``ORT_ENABLE_EXTENDED``) is run once with every
    matmul node's output captured; then the same graph without its matmul nodes, fed those captured outputs,
    is timed against the whole graph (medians of ``repeat``). ``matmul_ms`` is the difference,
    the matmuls' share of a real run (an estimate: the rest runs without the matmuls between its nodes, its
    inputs in buffers of their own). ``max_rel_diff``: the split graph's outputs against the whole graph's,
    and the matmul inputs it computes against the real run's, each relative to its largest value (the same
    computation: 0 up to another fusion choice). For graphs ONNX Runtime can save whole (under 2 GB).
    ``flush_denormals``: as ``OrtEngine``'s."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from .errors import ArtifactError
    from .export.precision import EXTERNAL_DATA_BYTES, graph_bytes

    size = graph_bytes(Path(graph))
    if size > EXTERNAL_DATA_BYTES:
        raise ArtifactError(f"{graph}: {size / 1e9:.1f} GB with its weights; the split saves the graph as "
                            f"ONNX Runtime optimized it, which takes graphs under 2 GB")

    def options(level: Any) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.add_session_config_entry("session.set_denormal_as_zero", "1" if flush_denormals else "0")
        return opts

    cpu = ["CPUExecutionProvider"]
    levels = ort.GraphOptimizationLevel
    with tempfile.TemporaryDirectory() as tmp:
        opts = options(levels.ORT_ENABLE_EXTENDED)
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(graph), opts, providers=cpu)
        model = onnx.load(opts.optimized_model_filepath)
    matmuls = [n for n in model.graph.node if n.op_type in MATMUL_OPS]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = [x for n in matmuls for x in (n.input[0], n.output[0])]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(x) for x in dict.fromkeys(wanted))
    session = ort.InferenceSession(probe.SerializeToString(), options(levels.ORT_DISABLE_ALL), providers=cpu)
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    del rest.graph.node[:]
    rest.graph.node.extend(n for n in model.graph.node if n.op_type not in MATMUL_OPS)
    rest.graph.input.extend(helper.make_tensor_value_info(n.output[0], helper.np_dtype_to_tensor_dtype(
        values[n.output[0]].dtype), values[n.output[0]].shape) for n in matmuls)
    # each matmul's input stays an output: the nodes that only feed a matmul must run (nothing may drop them
    # as dead code), and what they compute is checked below
    graph_inputs = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    fed = dict.fromkeys(n.input[0] for n in matmuls if n.input[0] not in graph_inputs)
    rest.graph.output.extend(helper.make_empty_tensor_value_info(x) for x in fed)
    used = {x for n in rest.graph.node for x in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del rest.graph.initializer[:]
    rest.graph.initializer.extend(kept)

    runs = {}
    for name, source in (("whole", str(graph)), ("without_matmuls", rest.SerializeToString())):
        sess = ort.InferenceSession(source, options(levels.ORT_ENABLE_ALL), providers=cpu)
        binding = sess.io_binding()
        for i in sess.get_inputs():
            binding.bind_ortvalue_input(i.name, ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(feeds[i.name] if i.name in feeds else values[i.name])))
        for o in sess.get_outputs():     # the kept matmul inputs into buffers allocated once
            if o.name in fed:
                binding.bind_ortvalue_output(o.name, ort.OrtValue.ortvalue_from_numpy(np.empty_like(values[o.name])))
            else:
                binding.bind_output(o.name)
        sess.run_with_iobinding(binding)
        runs[name] = (sess, binding)
    # the split graph's outputs against the whole graph's, and every matmul input it computes against the real run's
    got, want = ({o.name: v for o, v in zip(runs[k][0].get_outputs(), runs[k][1].copy_outputs_to_cpu())}
                 for k in ("without_matmuls", "whole"))
    diff = max(float(np.abs(got[k] - v).max() / max(np.abs(v).max(), 1e-30))
               for k, v in {**want, **{x: values[x] for x in fed}}.items())
    # one session after the other, not interleaved: with several threads, a session's idle workers spin for a
    # while after its run and would compete with the other session's
    times: dict[str, list[float]] = {k: [] for k in runs}
    for name, (sess, binding) in runs.items():
        sess.run_with_iobinding(binding)
        for _ in range(repeat):
            t0 = time.perf_counter()
            sess.run_with_iobinding(binding)
            times[name].append((time.perf_counter() - t0) * 1e3)
    whole, without = (float(np.median(times[k])) for k in ("whole", "without_matmuls"))
    return {"whole_ms": whole, "without_matmuls_ms": without, "matmul_ms": whole - without,
            "matmul_nodes": len(matmuls), "other_nodes": len(rest.graph.node),
            "matmul_gflop": sum(_matmul_flops(n, values) for n in matmuls) / 1e9,
            "max_rel_diff": diff, "repeat": repeat}


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

"""The benchmark's yardsticks: how many matmul FLOPs a decode is (per stage and whole, the count the one-call
graph runs), how fast this machine multiplies matrices (ONNX Runtime's MatMul and numpy's BLAS on the
thread count asked for), and where a one-call graph's time goes (its matmul nodes against the rest).
``bench`` divides by them: the decode's floor is its FLOPs at ONNX Runtime's measured rate.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import V2FlowConfig
from .sampling import SamplerSettings, evaluations, tokens_per_iteration
from .sampling.solvers import evaluated_sigmas, sigma_grid


def _least_ms(fn: Callable[[], Any], warmup: int, repeat: int) -> float:
    """The least wall time of ``fn`` in ms over ``repeat`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


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
    ort_ms = _least_ms(lambda: sess.run(None, {"a": a, "b": b}), 2, repeat)
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

"""The benchmark's FLOP yardstick (``roofline.detokenize_flops``) against torch's own count of the matmuls the
one-call decode module runs (``torch.utils.flop_counter``), for each guidance mode; and ``roofline.matmul_split``
(a one-call graph timed with and without its matmul nodes) against that yardstick and the whole graph; and
``bench.measure_interleaved`` keeps ratios through a change of the machine's speed (a simulated clock)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from v2flow_rt import bench, roofline
from v2flow_rt.bench import measure, measure_interleaved, speedup
from v2flow_rt.config import get_preset
from v2flow_rt.reference.codecs import build_codec
from v2flow_rt.reference.model import V2Flow
from v2flow_rt.reference.one_call import Detokenize
from v2flow_rt.roofline import detokenize_flops
from v2flow_rt.sampling import SamplerSettings, seeded_randomness


@pytest.mark.parametrize("overrides", [{}, {"cfg_scale": 3.0}, {"cfg_scale": 2.0, "cfg_mode": "mar"},
                                       {"num_iter": 8, "ode_steps": 4, "solver": "heun"}],
                         ids=["unguided", "official-cfg", "mar-cfg", "heun-8-iterations"])
def test_decode_flops_match_torchs_count(overrides: dict[str, Any]) -> None:
    cfg = get_preset("tiny", **overrides)
    settings = SamplerSettings.from_config(cfg)
    module = Detokenize(V2Flow(cfg).eval(), build_codec(cfg), settings, max_batch=2)
    orders, noise = seeded_randomness(0, 2, cfg.num_tokens, cfg.token_dim, settings.num_iter)
    args = [torch.randint(0, cfg.codebook_size, (2, cfg.num_tokens)), torch.from_numpy(orders),
            torch.from_numpy(noise)] + ([torch.tensor([3.0])] if settings.guided else [])
    # The math attention kernel is plain matmuls, which the counter sees (it skips CPU flash attention).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        module(*args)
    # The formula counts every matmul (the rest is elementwise): equal (the token embedding's 0.1 % was once
    # missed inside a 0.1 % tolerance).
    assert detokenize_flops(cfg, 2, settings) == counter.get_total_flops()


def test_matmul_split_runs_the_same_decode_and_removes_exactly_its_matmuls(default_export) -> None:
    from v2flow_rt.pipeline import V2FlowPipeline
    from v2flow_rt.roofline import matmul_split

    pipe = V2FlowPipeline.from_pretrained(default_export, backend="ort", precision="fp32", threads=1)
    engine, cfg = pipe.engine, pipe.config
    feeds = engine.spec("detokenize").sample_inputs(np.random.default_rng(7), batch=2)
    split = matmul_split(engine.manifest.path("detokenize", "fp32"), feeds, threads=1, repeat=2)
    # The graph without its matmuls, fed a real run's matmul outputs, runs the same kernels on the same values:
    # its images, and every matmul input it computes, equal the whole graph's (3e-7 relative here: another
    # fusion choice; 1e-5 is far below what a misrouted or missing value gives, 1.6 with one zeroed).
    assert split["max_rel_diff"] <= 1e-5
    # The removed nodes are the decode's matmuls, no more and no fewer: their FLOPs, from the shapes they saw,
    # equal the yardstick checked against torch's own count above (to 0.1 % for float rounding).
    settings = SamplerSettings.from_config(cfg)
    assert split["matmul_gflop"] * 1e9 == pytest.approx(detokenize_flops(cfg, 2, settings), rel=1e-3)
    assert split["matmul_nodes"] > 0 and split["other_nodes"] > 0


def test_matmul_split_refuses_a_graph_too_large_to_save_whole(default_export, monkeypatch) -> None:
    from v2flow_rt.errors import ArtifactError
    from v2flow_rt.export import precision
    from v2flow_rt.roofline import matmul_split

    monkeypatch.setattr(precision, "EXTERNAL_DATA_BYTES", 1000)     # the default graphs as if over 1.8 GB
    with pytest.raises(ArtifactError, match=r"detokenize.fp32.onnx: .* takes graphs under 2 GB"):
        matmul_split(default_export / "detokenize.fp32.onnx", {})


def test_interleaved_timing_keeps_ratios_when_the_machine_slows_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two functions costing 2 and 1 time units on a simulated clock whose speed drops 3x partway through the
    benchmark (at 0.3, 0.5 and 0.7 of it): timed one after the other their ratio is the drift's; interleaved,
    the median of the per-round ratios is theirs (only the round with the change is off)."""
    clock = {"now": 0.0, "calls": 0, "change": 0.0}

    def cost(units: float) -> Any:
        def run() -> None:
            clock["calls"] += 1
            clock["now"] += units * (3.0 if clock["calls"] > clock["change"] else 1.0) / 1e3
        return run

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    repeat, blocks = 25, 5
    for at in (0.3, 0.5, 0.7):
        clock.update(now=0.0, calls=0, change=at * 2 * (repeat + blocks))
        times = measure_interleaved({"slow": cost(2.0), "fast": cost(1.0)}, repeat, blocks, settle_s=0.0,
                                    warm_s=0.0)
        assert clock["calls"] == 2 * (repeat + blocks)
        assert speedup(times["slow"], times["fast"]) == pytest.approx(2.0), (at, times)
    # timed one after the other, the ratio is the drift's, not theirs (and so is the ratio of medians)
    clock.update(now=0.0, calls=0, change=repeat + 1)
    slow, fast = measure(cost(2.0), 1, repeat), measure(cost(1.0), 1, repeat)
    assert speedup(slow, fast) == pytest.approx(2.0 / 3.0)


def test_interleaved_timing_starts_after_the_machine_is_back_to_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the harness's pause the simulated machine runs the next 150 ms at a third of its speed (this
    machine's first calls of a 12 ms decode after the 0.1 s pause: 15.5, 12.5, 12.1 ms; stretched here so that
    it covers most of a round's timed calls of the short function, whose median then shows it). A 40 ms and a
    10 ms function compare 4:1 only if each turn's untimed warm-up runs until ``warm_s`` has passed."""
    clock = {"now": 0.0, "slow_left": 0.0}

    def sleep(seconds: float) -> None:
        clock["now"] += seconds
        clock["slow_left"] = 0.150                       # wall seconds at a third of the speed

    def cost(ms: float) -> Any:
        def run() -> None:
            work = ms / 1e3
            slow = min(work, clock["slow_left"] / 3.0)   # the part of this call done while still slow
            clock["slow_left"] -= 3.0 * slow
            clock["now"] += 3.0 * slow + (work - slow)
        return run

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(bench.time, "sleep", sleep)
    fns = {"long": cost(40.0), "short": cost(10.0)}
    warmed = measure_interleaved(fns, 25, 5, settle_s=0.1, warm_s=0.2)
    assert warmed["short"]["median_ms"] == pytest.approx(10.0)
    assert warmed["long"]["median_ms"] == pytest.approx(40.0)
    assert speedup(warmed["long"], warmed["short"]) == pytest.approx(4.0)
    # one untimed call (the harness before warm_s) leaves the short function's first timed calls slow
    cold = measure_interleaved(fns, 25, 5, settle_s=0.1, warm_s=0.0)
    assert cold["long"]["median_ms"] == pytest.approx(40.0)
    assert speedup(cold["long"], cold["short"]) < 3.5


def test_numpy_matmul_rate_is_measured_on_the_threads_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's BLAS takes its thread count from the environment when it loads, so the peak's numpy figure
    comes from a child process given that count (in this process it ran on every core while ONNX Runtime's
    ran on one: 286 against 130 GFLOP/s with threads=1)."""
    import subprocess

    seen: list[dict[str, str]] = []
    real_run = subprocess.run

    def recording_run(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["env"])
        return real_run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    for var in roofline._BLAS_THREAD_VARS:
        monkeypatch.setenv(var, "7")
    assert roofline.numpy_matmul_ms(64, 2, threads=1) > 0
    assert roofline.numpy_matmul_ms(64, 2, threads=None) > 0
    assert [{var: env[var] for var in roofline._BLAS_THREAD_VARS} for env in seen] == [
        dict.fromkeys(roofline._BLAS_THREAD_VARS, "1"), dict.fromkeys(roofline._BLAS_THREAD_VARS, "7")]

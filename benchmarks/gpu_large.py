"""GPU benchmark of the official ``large`` geometry at 1024² (random weights): PyTorch eager vs
``torch.compile`` vs CUDA graphs, in fp32 / bf16 / fp16, through the same stages and sampling loop the
package runs. Writes JSON. Meant for a machine with an NVIDIA GPU; takes a few minutes.

    python benchmarks/gpu_large.py --out gpu_large.json [--batch 1] [--repeat 5] [--quick]

What is timed (CUDA-synchronised wall clock, median of ``--repeat`` after warm-up):
- ``mar_step``: one masked-transformer call (1024 tokens, D 1024, 16 + 16 blocks) with half the tokens known;
- ``ode``: one fused solve (20 DPM-Solver++ steps, official guidance 4.5) for the largest iteration (391 tokens);
- ``detokenize``: the whole 4-iteration masked-AR decode of one image (ids → latent tokens; no DC-AE).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from v2flow_rt.config import get_preset  # noqa: E402
from v2flow_rt.engines.torch import TorchEngine  # noqa: E402
from v2flow_rt.pipeline import EngineStages  # noqa: E402
from v2flow_rt.reference.model import V2Flow  # noqa: E402
from v2flow_rt.sampling import SamplerSettings, sample_tokens, tokens_per_iteration  # noqa: E402


def cuda_time(fn, warmup: int, repeat: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_large.json")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="reduced depth (2+2 blocks, 2 MLP blocks) for a smoke run")
    ap.add_argument("--modes", default="eager,compile,cudagraph")
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs an NVIDIA GPU", file=sys.stderr)
        return 2
    overrides = dict(readout_depth=1)   # the 32000² readout is tokenizer-only; decode does not use it
    if a.quick:
        overrides |= dict(encoder_depth=2, decoder_depth=2, flow_depth=2)
    cfg = get_preset("large-1024", **overrides)
    torch.manual_seed(0)
    model = V2Flow(cfg).eval()
    settings = SamplerSettings.from_config(cfg)            # 4 iterations, 20 DPM++ steps, CFG 4.5 (official)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.codebook_size, (a.batch, cfg.num_tokens))
    rows = a.batch * max(tokens_per_iteration(cfg.num_tokens, settings.num_iter))
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "platform": platform.platform(),
              "config": cfg.to_dict(), "batch": a.batch, "sampler": settings.__dict__, "results": {}}
    for precision in a.precisions.split(","):
        for mode in a.modes.split(","):
            key = f"{mode}-{precision}"
            print(f"== {key}", flush=True)
            try:
                engine = TorchEngine(model, mode=mode, device="cuda", precision=precision, max_batch=max(4, a.batch),
                                     with_codec=False)
                stages = EngineStages(engine, cfg, model.fake_latent.detach().float().cpu().numpy())
                buffer = engine.run("token_embed", {"ids": ids})["buffer"]
                feeds = engine.spec("mar_step").sample_inputs(rng, batch=a.batch, keep=cfg.num_tokens * 3 // 2)
                ode_feeds = engine.spec("ode_cfg").sample_inputs(rng, rows=rows)
                ode_feeds["cfg_scale"] = np.array([settings.cfg_scale], np.float32)
                t0 = time.perf_counter()
                engine.run("mar_step", feeds)
                engine.run("ode_cfg", ode_feeds)
                first_call_s = time.perf_counter() - t0
                r = {
                    "first_call_s": first_call_s,
                    "mar_step": cuda_time(lambda: engine.run("mar_step", feeds), 2, a.repeat),  # noqa: B023
                    "ode_cfg": cuda_time(lambda: engine.run("ode_cfg", ode_feeds), 2, a.repeat),  # noqa: B023
                    "detokenize": cuda_time(lambda: sample_tokens(stages, buffer, settings, 0,  # noqa: B023
                                                                  token_dim=cfg.token_dim,
                                                                  ode=stages.ode_for(settings)), 1, a.repeat),  # noqa: B023
                }
            except Exception as exc:  # report and go on: one failing mode must not hide the others
                r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            report["results"][key] = r
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
    base = report["results"].get("eager-fp32", {}).get("detokenize", {}).get("median_ms")
    for r in report["results"].values():
        if base and "detokenize" in r:
            r["detokenize_speedup_vs_eager_fp32"] = base / r["detokenize"]["median_ms"]
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
